"""Periodic geometry: minimum images, distances, cells and cutoff edge lists.

The one place in stablejax that applies periodic boundary conditions. A
periodic box is either

* ``[3]`` Å side lengths of an orthorhombic box, or
* ``[3, 3]`` Å cell matrix with the lattice vectors as rows (ASE convention),
  any triclinic cell; fractional coordinates s of a position x are
  ``s = x inv(cell)``, so ``x = s cell``.

``None`` means free space everywhere. Functions named ``*_np`` are NumPy
twins of the JAX functions for host-side code (data preparation, topology);
both give the same numbers. The orthorhombic path is a single round per
component (``d - box * round(d / box)``), unchanged from the code this
module replaced.

The minimum image by rounding fractional coordinates is exact for every
displacement shorter than half the smallest perpendicular width of the cell
(``perpendicular_widths``): |s_i| <= |d| / width_i < 1/2. Cutoff-based code
checks this with ``cutoff_fits_cell``; a cell too small for the cutoff
needs a supercell (``potentials.ase_calculator.supercell_repeats``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "is_cell",
    "cell_matrix",
    "cell_volume",
    "perpendicular_widths",
    "perpendicular_widths_jnp",
    "cutoff_fits_cell",
    "minimum_image",
    "minimum_image_np",
    "pair_distances",
    "to_fractional",
    "wrap_positions",
    "wrap_positions_np",
    "cutoff_edges_np",
]


def _shape(box) -> tuple:
    return tuple(np.shape(box))


def is_cell(box) -> bool:
    """Whether ``box`` is a [3, 3] cell matrix (True) or [3] side lengths (False).

    Raises:
      ValueError: any other shape.
    """
    shape = _shape(box)
    if shape == (3,):
        return False
    if shape == (3, 3):
        return True
    raise ValueError(f"box must be [3] or [3, 3] (Å), got shape {shape}.")


def cell_matrix(box) -> np.ndarray:
    """[3, 3] Å cell matrix (lattice vectors as rows) of a [3] or [3, 3] box (host-side)."""
    box = np.asarray(box, dtype=np.float64)
    return box if is_cell(box) else np.diag(box)


def cell_volume(box) -> jax.Array:
    """Volume (Å^3) of a [3] box (product of sides) or [3, 3] cell (|det|); traceable."""
    box = jnp.asarray(box)
    if is_cell(box):
        return jnp.abs(jnp.linalg.det(box))
    return jnp.prod(box)


def perpendicular_widths(box) -> np.ndarray:
    """[3] Å distances between opposite faces of the cell (host-side).

    width_i = V / |a_j x a_k| for the lattice vectors a (rows of the cell);
    equal to the side lengths for an orthorhombic box.

    Args:
      box: [3] Å side lengths or [3, 3] Å cell (lattice vectors as rows).

    Raises:
      ValueError: a degenerate cell (zero volume).
    """
    cell = cell_matrix(box)
    volume = abs(np.linalg.det(cell))
    areas = np.linalg.norm(np.cross(np.roll(cell, -1, axis=0), np.roll(cell, -2, axis=0)), axis=1)
    if volume <= 0 or np.any(areas <= 0):
        raise ValueError(f"Degenerate periodic cell (volume {volume} Å^3):\n{cell}")
    return volume / areas


def perpendicular_widths_jnp(cell: jax.Array) -> jax.Array:
    """[3] Å perpendicular widths of a [3, 3] cell, traceable (no degeneracy check)."""
    areas = jnp.linalg.norm(
        jnp.cross(jnp.roll(cell, -1, axis=0), jnp.roll(cell, -2, axis=0)), axis=1
    )
    return jnp.abs(jnp.linalg.det(cell)) / areas


def cutoff_fits_cell(cutoff: float, box) -> bool:
    """Whether minimum-image edges are exact: cutoff < half the smallest perpendicular width.

    Then every pair within `cutoff` has exactly one periodic image within it,
    the one `minimum_image` returns; otherwise use a supercell.

    Args:
      cutoff: Å.
      box: [3] Å side lengths or [3, 3] Å cell (lattice vectors as rows).
    """
    return bool(cutoff < 0.5 * perpendicular_widths(box).min())


def minimum_image(d: jax.Array, box) -> jax.Array:
    """Minimum-image displacements: the periodic image of `d` nearest the origin.

    An orthorhombic box costs one round per component; a general cell goes
    through fractional coordinates, s = d inv(cell), s -= round(s),
    d = s cell (exact when |d_min| < half the smallest perpendicular width,
    see the module docstring).

    Args:
      d: [..., 3] Å displacements.
      box: [3] Å orthorhombic side lengths, [3, 3] Å cell with the lattice
        vectors as rows (ASE convention), or None (free space: d unchanged).

    Returns:
      [..., 3] Å minimum-image displacements.

    Example:
      >>> cell = jnp.array([[4.0, 0, 0], [2.0, 4.0, 0], [0, 0, 5.0]])
      >>> minimum_image(jnp.array([3.5, 0.5, 0.0]), cell)  # -> [-0.5, 0.5, 0.]
    """
    if box is None:
        return d
    box = jnp.asarray(box, dtype=d.dtype)
    if not is_cell(box):
        return d - box * jnp.round(d / box)
    s = d @ jnp.linalg.inv(box)
    return (s - jnp.round(s)) @ box


def minimum_image_np(d: np.ndarray, box) -> np.ndarray:
    """NumPy twin of `minimum_image` (host-side; same arguments, same numbers)."""
    d = np.asarray(d)
    if box is None:
        return d
    box = np.asarray(box, dtype=np.float64)
    if not is_cell(box):
        return d - box * np.round(d / box)
    s = d @ np.linalg.inv(box)
    return (s - np.round(s)) @ box


def pair_distances(positions: jax.Array, i, j, box=None) -> jax.Array:
    """|x_j - x_i| (minimum image) for the listed pairs.

    Args:
      positions: [n, 3] Å.
      i, j: [p] int atom indices.
      box: [3] Å, [3, 3] Å cell (rows) or None.

    Returns:
      [p] Å distances (no gradient floor; see `observables` for one).
    """
    d = minimum_image(positions[j] - positions[i], box)
    return jnp.linalg.norm(d, axis=-1)


def to_fractional(x: jax.Array, box) -> jax.Array:
    """Fractional coordinates [..., 3] of positions x [..., 3] Å: x / box or x inv(cell)."""
    box = jnp.asarray(box, dtype=x.dtype)
    if not is_cell(box):
        return x / box
    return x @ jnp.linalg.inv(box)


def wrap_positions(x: jax.Array, box) -> jax.Array:
    """Positions [..., 3] Å wrapped into the cell (fractional coordinates in [0, 1))."""
    box = jnp.asarray(box, dtype=x.dtype)
    if not is_cell(box):
        return jnp.mod(x, box)
    s = to_fractional(x, box)
    return (s - jnp.floor(s)) @ box


def wrap_positions_np(x: np.ndarray, box) -> np.ndarray:
    """NumPy twin of `wrap_positions` (orthorhombic: ``np.mod(x, box)``)."""
    x = np.asarray(x)
    box = np.asarray(box, dtype=np.float64)
    if not is_cell(box):
        return np.mod(x, box)
    s = x @ np.linalg.inv(box)
    return (s - np.floor(s)) @ box


def cutoff_edges_np(positions: np.ndarray, cutoff: float, box=None) -> np.ndarray:
    """Directed edges of all pairs closer than `cutoff` (minimum image), host-side.

    Dense O(n^2) NumPy: for data preparation and initialisation, not MD (the
    simulator uses jax-md cell lists, `stablejax.md.neighbors`).

    Args:
      positions: [n, 3] Å.
      cutoff: Å.
      box: [3] Å, [3, 3] Å cell (rows) or None.

    Returns:
      [2, e] int32 (centre i, neighbour j), i != j, in row-major (i, j) order.

    Raises:
      ValueError: the cutoff does not fit the cell (minimum image would miss images).
    """
    x = np.asarray(positions, dtype=np.float64)
    n = x.shape[0]
    # '<=': pairs at exactly half the width are excluded by the strict test below.
    if box is not None and cutoff > 0.5 * perpendicular_widths(box).min():
        raise ValueError(
            f"cutoff {cutoff} Å exceeds half the shortest box side (perpendicular width "
            f"of the cell; {0.5 * perpendicular_widths(box).min():.3f} Å): minimum-image "
            "edge lists would miss periodic images"
        )
    d = minimum_image_np(x[None, :, :] - x[:, None, :], box)
    r2 = np.einsum("ijk,ijk->ij", d, d)
    i, j = np.nonzero((r2 < cutoff * cutoff) & ~np.eye(n, dtype=bool))
    return np.stack([i, j]).astype(np.int32)
