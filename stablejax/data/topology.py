"""Molecular topology from a reference structure: bonds, molecules, equilibrium bond lengths.

Bonds are fixed once from reference data (the stability criteria measure deviations
from them), so this is plain NumPy, run once outside any jit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from ase.data import covalent_radii
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from stablejax.geometry import minimum_image_np

#: Default bond tolerance: atoms i, j are bonded if d_ij < scale * (r_i + r_j).
#: ASE's `natural_cutoffs` (used by MDsim) corresponds to scale 1.0, which misses
#: ordinary bonds: C-H ~1.09 Å > r_C + r_H = 1.07 Å (it finds only 11-17 of aspirin's
#: 21 bonds in the MD17 frames), and water O-H r0 = 1.012 Å > r_O + r_H = 0.97 Å.
#: 1.1 still misses some; 1.2 finds all 21 in every frame while staying well below
#: 1-3 distances and hydrogen bonds (water O...H ~1.8 Å vs 1.2 * 0.97 = 1.16 Å;
#: aromatic 1-3 C...C ~2.4 Å vs 1.2 * 1.52 = 1.82 Å).
DEFAULT_BOND_SCALE = 1.2


def _displacements(positions: np.ndarray, box) -> np.ndarray:
    return minimum_image_np(positions[None, :, :] - positions[:, None, :], box)


def find_bonds(species, positions, *, box=None, scale: float = DEFAULT_BOND_SCALE) -> np.ndarray:
    """Covalent bonds of a reference structure from ASE covalent radii.

    Atoms i < j are bonded when d_ij < scale * (r_cov(Z_i) + r_cov(Z_j)), with
    `ase.data.covalent_radii` (Cordero et al. 2008).

    Args:
      species: [n] atomic numbers.
      positions: [n, 3] Å, one equilibrium-like reference frame.
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None for free space.
      scale: tolerance factor on the sum of radii (usual range 1.0-1.25; default 1.2,
        see DEFAULT_BOND_SCALE).

    Returns:
      [b, 2] int64 bonds (i < j), sorted lexicographically.

    Example:
      >>> bonds = find_bonds(atoms.numbers, atoms.positions)   # aspirin: 21 bonds
    """
    z = np.asarray(species, dtype=np.int64)
    x = np.asarray(positions, dtype=float)
    if z.ndim != 1 or x.shape != (len(z), 3):
        raise ValueError(f"species [n] and positions [n, 3] disagree: {z.shape}, {x.shape}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    radii = covalent_radii[z]
    dist = np.linalg.norm(_displacements(x, box), axis=-1)
    cutoff = scale * (radii[:, None] + radii[None, :])
    i, j = np.nonzero(np.triu(dist < cutoff, k=1))
    return np.stack([i, j], axis=1).astype(np.int64)


def molecules(n_atoms: int, bonds) -> np.ndarray:
    """Molecule index of every atom: connected components of the bond graph.

    Args:
      n_atoms: number of atoms n.
      bonds: [b, 2] int atom pairs.

    Returns:
      [n] int64 labels 0 .. n_molecules - 1, numbered in order of each molecule's
      first atom (water in O,H,H order: atom k belongs to molecule k // 3).
    """
    b = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    if len(b) and (b.min() < 0 or b.max() >= n_atoms):
        raise ValueError(f"bond indices must lie in [0, {n_atoms})")
    graph = coo_matrix((np.ones(len(b)), (b[:, 0], b[:, 1])), shape=(n_atoms, n_atoms))
    _, labels = connected_components(graph, directed=False)
    # Relabel by first appearance so that labels follow atom order.
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    relabel = np.empty_like(order)
    relabel[order] = np.arange(len(order))
    return relabel[labels].astype(np.int64)


def equilibrium_bond_lengths(positions, bonds, box=None) -> np.ndarray:
    """Mean bond lengths over reference frames (the l^eq of the bond-deviation criterion).

    Args:
      positions: [m, n, 3] (or [n, 3]) Å reference frames.
      bonds: [b, 2] int atom pairs.
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None.

    Returns:
      [b] mean bond lengths in Å.
    """
    x = np.asarray(positions, dtype=float)
    if x.ndim == 2:
        x = x[None]
    b = np.asarray(bonds, dtype=np.int64)
    if x.ndim != 3 or x.shape[-1] != 3 or b.ndim != 2 or b.shape[1] != 2:
        raise ValueError(f"expected positions [m, n, 3] and bonds [b, 2]; got {x.shape}, {b.shape}")
    d = x[:, b[:, 1]] - x[:, b[:, 0]]
    return np.linalg.norm(minimum_image_np(d, box), axis=-1).mean(axis=0)


class System(NamedTuple):
    """What the criteria and observables need to know about a simulated system.

    Attributes:
      species: [n] int atomic numbers.
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows) or None (free space).
      bonds: [b, 2] int bonded atom pairs (`find_bonds`), or None.
      equilibrium_lengths: [b] Å mean bond lengths (`equilibrium_bond_lengths`), or None.
      molecules: [n] int molecule id of each atom (`molecules`), or None.
    """

    species: Any
    box: Any = None
    bonds: Any = None
    equilibrium_lengths: Any = None
    molecules: Any = None


def system_from_frames(species, positions, box=None) -> System:
    """The `System` of reference frames: bonds of the first frame, their mean lengths
    over all frames, and the molecules the bonds connect.

    Args:
      species: [n] atomic numbers.
      positions: [m, n, 3] (or [n, 3]) Å reference frames (e.g. the training frames).
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None.
    """
    x = np.asarray(positions, dtype=float)
    if x.ndim == 2:
        x = x[None]
    species = np.asarray(species)
    bonds = find_bonds(species, x[0], box=box)
    return System(
        species=species,
        box=box,
        bonds=bonds,
        equilibrium_lengths=equilibrium_bond_lengths(x, bonds, box=box),
        molecules=molecules(len(species), bonds),
    )
