"""The contract every potential in stablejax satisfies.

A potential is a bundle of pure functions of an explicit params pytree. One
configuration at a time ("batchless"); callers batch with `jax.vmap`.

Arguments shared by all functions:
  species:   [n] int32 atomic numbers.
  positions: [n, 3] Å.
  edges:     [2, n_edges] int32 directed edges (edges[0] = centre atom i,
             edges[1] = neighbour j); padded entries hold the value n and must
             change neither energies nor gradients. Dense free-space edges come
             from `all_pairs_edges(n)`; periodic ones from a jax-md Sparse
             neighbour list (`neighbors.idx`), whose padding value is also n.
  box:       [3] Å side lengths of an orthorhombic periodic box, [3, 3] Å
             cell matrix with the lattice vectors as rows (ASE convention;
             any triclinic cell), or None for free space (molecules).
             Displacements use the minimum image (`stablejax.geometry`),
             which is exact when the cutoff is below half the smallest
             perpendicular width of the cell (`cutoff_fits_cell`).

Energies are in eV, forces in eV/Å; forces are always -grad of the total
energy (no direct force heads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The periodic geometry lives in stablejax.geometry; re-exported here so that
# `from stablejax.potentials.base import minimum_image` keeps working.
from stablejax.geometry import (  # noqa: F401
    cell_matrix,
    cutoff_fits_cell,
    minimum_image,
    perpendicular_widths,
)

Params = Any


@dataclasses.dataclass(frozen=True)
class Potential:
    """A built potential: pure functions plus the config that made it.

    Attributes:
      name: model name ('schnet', 'nequip', 'gemnet_t', 'lennard_jones', 'pair_mlp').
      config: the ml_collections.ConfigDict it was built from.
      cutoff: interaction cutoff in Å (neighbour lists must use at least this).
      init: (key, species [n], positions [n,3], box [3] | [3,3] | None) -> params.
      per_atom_energies: (params, species, positions, edges, box) -> [n] eV.
    """

    name: str
    config: Any
    cutoff: float
    init: Callable[..., Params]
    per_atom_energies: Callable[..., jax.Array]

    def energy(self, params, species, positions, edges, box=None) -> jax.Array:
        """Total energy (eV) = sum of per-atom energies."""
        return jnp.sum(self.per_atom_energies(params, species, positions, edges, box))

    def forces(self, params, species, positions, edges, box=None) -> jax.Array:
        """Forces [n, 3] eV/Å = -dE/dpositions."""
        return -jax.grad(self.energy, argnums=2)(params, species, positions, edges, box)

    def energy_and_forces(self, params, species, positions, edges, box=None):
        """(energy eV, forces [n,3] eV/Å) from one forward+backward pass."""
        e, g = jax.value_and_grad(self.energy, argnums=2)(params, species, positions, edges, box)
        return e, -g


def all_pairs_edges(n_atoms: int) -> np.ndarray:
    """Directed edges between all distinct atom pairs: [2, n(n-1)] int32 (free space)."""
    i, j = np.nonzero(~np.eye(n_atoms, dtype=bool))
    return np.stack([i, j]).astype(np.int32)


def edge_vectors(positions: jax.Array, edges: jax.Array, box=None):
    """Edge vectors r_j - r_i (minimum image when box is given) and a validity mask.

    Args:
      positions: [n, 3] Å.
      edges: [2, e] int32, padding value n.
      box: [3] Å orthorhombic side lengths, [3, 3] Å cell (lattice vectors as
        rows), or None (free space).

    Returns:
      (vectors [e, 3] Å, mask [e] bool). Padded edges get a safe non-zero dummy
      vector (so that norms and their gradients stay finite) and mask False.
    """
    n = positions.shape[0]
    i, j = edges[0], edges[1]
    mask = (i < n) & (j < n) & (i != j)
    ii = jnp.where(mask, i, 0)
    jj = jnp.where(mask, j, 0)
    d = positions[jj] - positions[ii]
    if box is not None:
        d = minimum_image(d, box)
    dummy = jnp.array([1.0, 0.0, 0.0], dtype=positions.dtype) * 100.0
    d = jnp.where(mask[:, None], d, dummy)
    return d, mask


def safe_norm(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Euclidean norm with a finite gradient at zero."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis), eps))
