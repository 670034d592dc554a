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
checks this with ``cutoff_fits_cell``.

Cells narrower than twice the cutoff. A pair may then interact through
several periodic images (an atom even with its own images), so edges carry
the integer lattice shift s of the neighbour: ``[5, e]`` int32 edges
(i, j, s_1, s_2, s_3), vector r_j - r_i + s cell (``shift_vectors``; cell =
diag(box) for a [3] box), padding i = j = n (shift 0). ``image_shifts`` is
the static set of lattice shifts that covers a radius, ``image_edges_np``
(host-side) and ``image_edges`` (jittable, static capacity) build such
lists. Both enumerate minimum-image displacements d0 (fractional coordinates
in [-1/2, 1/2]) plus every shift n of ``image_shifts``: since
|d0 + n cell| >= |f_k + n_k| width_k, no image within the radius is missed.
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
    "cutoff_edges",
    "needs_image_edges",
    "image_reach",
    "shift_grid",
    "image_shifts",
    "shift_vectors",
    "image_edges_np",
    "image_edges",
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
      ValueError: the cutoff does not fit the cell (minimum image would miss
        images; use `image_edges_np`).
    """
    x = np.asarray(positions, dtype=np.float64)
    n = x.shape[0]
    # '<=': pairs at exactly half the width are excluded by the strict test below.
    if box is not None and cutoff > 0.5 * perpendicular_widths(box).min():
        raise ValueError(
            f"cutoff {cutoff} Å exceeds half the shortest box side (perpendicular width "
            f"of the cell; {0.5 * perpendicular_widths(box).min():.3f} Å): minimum-image "
            "edge lists would miss periodic images (use image_edges_np for edges with "
            "lattice shifts)"
        )
    d = minimum_image_np(x[None, :, :] - x[:, None, :], box)
    r2 = np.einsum("ijk,ijk->ij", d, d)
    i, j = np.nonzero((r2 < cutoff * cutoff) & ~np.eye(n, dtype=bool))
    return np.stack([i, j]).astype(np.int32)


def cutoff_edges(positions: jax.Array, cutoff: float, capacity: int, box=None):
    """Jittable twin of `cutoff_edges_np` with a static capacity (brute force, O(n^2)).

    Meant for molecules in free space (the MD engine's free-space list,
    `stablejax.md.neighbors.FreeLayout`): at a few dozen atoms the dense pair
    test costs far less than one model evaluation. Large periodic systems use
    jax-md cell lists instead.

    Args:
      positions: [n, 3] Å.
      cutoff: list radius, Å.
      capacity: number of edge slots (static).
      box: [3] Å, [3, 3] Å cell (rows; minimum image, the cutoff must fit the
        cell) or None (free space).

    Returns:
      (edges [2, capacity] int32 in row-major (i, j) order, padded with n;
      count [] int32 of pairs found; count > capacity means the list
      overflowed and is incomplete).
    """
    x = jnp.asarray(positions)
    n = x.shape[0]
    d = minimum_image(x[None, :, :] - x[:, None, :], box)
    keep = (jnp.sum(d * d, axis=-1) < cutoff * cutoff) & ~jnp.eye(n, dtype=bool)
    count = jnp.sum(keep, dtype=jnp.int32)
    (flat,) = jnp.nonzero(keep.reshape(-1), size=capacity, fill_value=n * n)
    edges = jnp.stack([flat // n, flat % n])  # the fill value n^2 gives (n, 0)
    edges = jnp.where(flat[None] < n * n, edges, n)
    return edges.astype(jnp.int32), count


# ------------------------------------------------------------ edges with image shifts


def needs_image_edges(cutoff: float, box) -> bool:
    """Whether a list of radius `cutoff` needs image-shift edges: cutoff >= half the
    smallest perpendicular width (the complement of `cutoff_fits_cell`)."""
    return box is not None and not cutoff_fits_cell(cutoff, box)


def image_reach(box, cutoff: float) -> np.ndarray:
    """[3] int: floor(cutoff / width_i + 1/2), the largest |n_i| of an image within `cutoff`.

    Args:
      box: [3] Å side lengths or [3, 3] Å cell (lattice vectors as rows).
      cutoff: Å.
    """
    return np.floor(cutoff / perpendicular_widths(box) + 0.5).astype(np.int64)


def shift_grid(reach) -> np.ndarray:
    """All integer shifts n [k, 3] int32 with |n_i| <= reach_i, the zero shift first."""
    axes = [np.arange(-int(m), int(m) + 1) for m in reach]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    grid = grid[np.argsort(np.any(grid != 0, axis=1), kind="stable")]
    return grid.astype(np.int32)


def image_shifts(box, cutoff: float) -> np.ndarray:
    """Lattice shifts n [k, 3] int32 with |n_i| <= floor(cutoff / width_i + 1/2), zero first.

    Added to minimum-image displacements (fractional components in [-1/2, 1/2]),
    they reach every periodic image within `cutoff` (see the module docstring).
    Several boxes: ``shift_grid`` of the element-wise largest ``image_reach``.

    Args:
      box: [3] Å side lengths or [3, 3] Å cell (lattice vectors as rows).
      cutoff: Å.
    """
    return shift_grid(image_reach(box, cutoff))


def shift_vectors(shifts, box):
    """Cartesian lattice vectors s cell [..., 3] Å of integer shifts s [..., 3] (traceable).

    Args:
      shifts: [..., 3] int lattice shifts.
      box: [3] Å side lengths (cell diag(box)) or [3, 3] Å cell (lattice vectors as rows).
    """
    box = jnp.asarray(box)
    s = jnp.asarray(shifts).astype(box.dtype)
    if not is_cell(box):
        return s * box
    return s @ box


def _pair_images(d: np.ndarray, box, shifts: np.ndarray):
    """(vectors [n, n, k, 3], shifts [n, n, k, 3]) of displacements d [n, n, 3] (NumPy)."""
    cell = cell_matrix(box)
    f = d @ np.linalg.inv(cell)
    r = np.round(f)
    d0 = (f - r) @ cell
    vec = d0[:, :, None, :] + (shifts @ cell)[None, None]
    s = shifts[None, None] - r[:, :, None, :].astype(np.int64)
    return vec, s


def image_edges_np(positions: np.ndarray, box, cutoff: float) -> np.ndarray:
    """Directed edges with lattice shifts of all periodic images closer than `cutoff`.

    Host-side, dense over atom pairs x `image_shifts` (small cells; data
    preparation and tests). Works for any cutoff, also below half the width
    (then every pair has at most one image and shift).

    Args:
      positions: [n, 3] Å (need not be wrapped; the shifts refer to them as given).
      box: [3] Å side lengths or [3, 3] Å cell (lattice vectors as rows).
      cutoff: Å.

    Returns:
      [5, e] int32 (i, j, s_1, s_2, s_3): |x_j - x_i + s cell| < cutoff, including
      an atom's own images (i = j, s != 0) and excluding (i, i, 0); ordered by
      (i, j, shift).
    """
    x = np.asarray(positions, dtype=np.float64)
    n = x.shape[0]
    shifts = image_shifts(box, cutoff).astype(np.int64)
    vec, s = _pair_images(x[None, :, :] - x[:, None, :], box, shifts)
    keep = np.einsum("ijkx,ijkx->ijk", vec, vec) < cutoff * cutoff
    keep &= ~(np.eye(n, dtype=bool)[:, :, None] & np.all(s == 0, axis=-1))
    i, j, k = np.nonzero(keep)
    return np.concatenate([np.stack([i, j]), s[i, j, k].T]).astype(np.int32)


def image_edges(positions: jax.Array, box, cutoff: float, shifts, capacity: int):
    """Jittable twin of `image_edges_np` with a static shift set and capacity.

    Brute force over atom pairs x shifts, O(n^2 k) memory and time: meant for
    the small cells that need images (the MD engine's list for cells narrower
    than twice its radius), not for large systems (jax-md cell lists).

    Args:
      positions: [n, 3] Å (unwrapped is fine; shifts refer to them as given).
      box: [3] Å side lengths or [3, 3] Å cell (lattice vectors as rows).
      cutoff: list radius, Å.
      shifts: [k, 3] int lattice shifts covering the radius (`image_shifts`,
        concrete: it fixes shapes).
      capacity: number of edge slots (static).

    Returns:
      (edges [5, capacity] int32 padded with (n, n, 0, 0, 0), count [] int32 of
      edges found; count > capacity means the list overflowed and is incomplete).
    """
    x = jnp.asarray(positions)
    n = x.shape[0]
    shifts = np.asarray(shifts, dtype=np.int32)
    box = jnp.asarray(box, dtype=x.dtype)
    d = x[None, :, :] - x[:, None, :]
    f = to_fractional(d, box)
    r = jnp.round(f)
    d0 = shift_vectors(f - r, box)
    vec = d0[:, :, None, :] + shift_vectors(jnp.asarray(shifts), box)[None, None]
    keep = jnp.sum(vec * vec, axis=-1) < cutoff * cutoff  # [n, n, k]
    zero = np.all(shifts == 0, axis=-1)
    keep = keep & ~(jnp.eye(n, dtype=bool)[:, :, None] & jnp.asarray(zero)[None, None, :])
    count = jnp.sum(keep, dtype=jnp.int32)
    (flat,) = jnp.nonzero(keep.reshape(-1), size=capacity, fill_value=-1)
    ok = flat >= 0
    flat = jnp.where(ok, flat, 0)
    k = shifts.shape[0]
    i, j, t = flat // (n * k), (flat // k) % n, flat % k
    s = jnp.asarray(shifts)[t] - r[i, j].astype(jnp.int32)
    ij = jnp.where(ok[None], jnp.stack([i, j]).astype(jnp.int32), n)
    s = jnp.where(ok[:, None], s, 0).T
    return jnp.concatenate([ij, s]).astype(jnp.int32), count
