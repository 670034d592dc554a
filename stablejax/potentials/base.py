"""The contract every potential in stablejax satisfies.

A potential is a bundle of pure functions of an explicit params pytree. One
configuration at a time ("batchless"); callers batch with `jax.vmap`.

Arguments shared by all functions:
  species:   [n] int32 atomic numbers.
  positions: [n, 3] Å.
  edges:     [2, n_edges] or [5, n_edges] int32 directed edges (edges[0] =
             centre atom i, edges[1] = neighbour j); padded entries hold
             i = j = n and must change neither energies nor gradients.
             - [2, e]: the vector is r_j - r_i, minimum image under periodic
               boundaries, which is exact when the cutoff is below half the
               smallest perpendicular width of the cell (`cutoff_fits_cell`).
               Dense free-space edges come from `all_pairs_edges(n)`; periodic
               ones from a jax-md Sparse neighbour list (`neighbors.idx`,
               padding n) or `geometry.cutoff_edges_np`.
             - [5, e]: rows 2..4 are the integer lattice shift s of the
               neighbour's image; the vector is r_j - r_i + s @ cell (cell =
               diag(box) for a [3] box), no minimum image. Any cell, also one
               narrower than twice the cutoff; an atom may then neighbour its
               own images (i = j, s != 0 is a valid edge; i = j, s = 0 is
               not). Built by `geometry.image_edges_np` (host) or
               `geometry.image_edges` (jit, the MD engine's small-cell list).
               Needs a periodic box.
  box:       [3] Å side lengths of an orthorhombic periodic box, [3, 3] Å
             cell matrix with the lattice vectors as rows (ASE convention;
             any triclinic cell), or None for free space (molecules).
             Periodic geometry lives in `stablejax.geometry`.

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
    shift_vectors,
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
    """Edge vectors r_j - r_i (+ s cell with image shifts) and a validity mask.

    Args:
      positions: [n, 3] Å.
      edges: [2, e] int32 (minimum image when box is given) or [5, e] int32
        with lattice shifts s in rows 2..4 (vector r_j - r_i + s cell; needs a
        box); padding i = j = n (see the module docstring).
      box: [3] Å orthorhombic side lengths, [3, 3] Å cell (lattice vectors as
        rows), or None (free space).

    Returns:
      (vectors [e, 3] Å, mask [e] bool). Padded edges get a safe non-zero dummy
      vector (so that norms and their gradients stay finite) and mask False.

    Raises:
      ValueError: edges neither [2, e] nor [5, e], or [5, e] edges without a box.
    """
    n = positions.shape[0]
    rows = edges.shape[0]
    if rows not in (2, 5):
        raise ValueError(f"edges must be [2, e] or [5, e] (with image shifts), got {edges.shape}")
    i, j = edges[0], edges[1]
    mask = (i < n) & (j < n)
    if rows == 5:
        if box is None:
            raise ValueError("edges with image shifts ([5, e]) need a periodic box")
        shifts = edges[2:5].T
        mask = mask & ((i != j) | jnp.any(shifts != 0, axis=1))
    else:
        mask = mask & (i != j)
    ii = jnp.where(mask, i, 0)
    jj = jnp.where(mask, j, 0)
    d = positions[jj] - positions[ii]
    if rows == 5:
        d = d + shift_vectors(shifts, jnp.asarray(box, dtype=positions.dtype))
    elif box is not None:
        d = minimum_image(d, box)
    dummy = jnp.array([1.0, 0.0, 0.0], dtype=positions.dtype) * 100.0
    d = jnp.where(mask[:, None], d, dummy)
    return d, mask


def safe_norm(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Euclidean norm with a finite gradient at zero."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis), eps))
