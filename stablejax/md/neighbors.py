"""Replica-batched neighbour lists: periodic (jax-md Sparse lists, image shifts), free space.

jax-md's ``partition.neighbor_list`` (Sparse format, fractional coordinates)
builds the lists; its ``idx`` is exactly our ``edges`` [2, e] with padding n.
What we do differently, and why:

* Rebuild decision. jax-md's ``update`` decides with ``lax.cond`` on a
  per-replica predicate; under ``vmap`` that cond becomes a select and the
  list is rebuilt every step. We build with ``dr_threshold=0`` (update =
  unconditional rebuild), compute the per-replica criterion ourselves, and
  run the batched rebuild under a ``lax.cond`` on the scalar "any replica
  needs it"; every active replica then takes its new list (one shared
  schedule, so the batch rebuilds about as often as a single replica would).
  Consequence: in periodic runs the edge *order* of a replica depends on when
  the batch rebuilt, so results are reproducible to floating-point summation
  order (not bitwise) when the batch composition changes; free-space runs
  (fixed all-pairs edges, or cutoff lists while their capacity stays, see
  below) are bitwise independent of the other replicas.
* Box changes (Berendsen NPT). The rebuild criterion covers isotropic box
  scaling: with s = L/L_ref, list radius r_l = cutoff + skin and d the largest
  displacement since the build (current box units), no pair inside the cutoff
  can be missing while s * r_l - 2 d >= cutoff. Fixed boxes reduce to the
  usual d < skin / 2.
* Capacity. Static shapes live in a host-side ``NeighborLayout`` (cell size,
  cell capacity) and in the edge array's length. Overflow (edge or cell
  buffer, or cells too small after the box shrank) is reported per replica in
  ``NeighborState.error``; the Simulator grows the capacity and redoes the
  chunk. jax-md 0.2.29 sets its MALFORMED_BOX bit for *valid* boxes when a
  box is passed to ``update`` (inverted predicate), so that bit is ignored.

* General (triclinic) cells. A [3, 3] cell (lattice vectors as rows) goes
  through the same fractional-coordinate path, u = x inv(cell). jax-md's cell
  list wants an upper-triangular transformation T (lattice vectors as
  columns); any cell is a rotation of one, T = cholesky(cell cell^T)^T, which
  has the same metric (cell cell^T) and hence the same distances between
  fractional positions, so the list is that of the cell itself. Boxes are
  [3] or [3, 3] throughout one Simulator, never mixed.

* Small cells (image shifts). When the list radius cutoff + skin is not
  below half the smallest perpendicular width, a pair can interact through
  several periodic images (and an atom with its own), which minimum-image
  [2, e] edges cannot express. ``make_layout`` then returns an
  ``ImageLayout`` and the lists are [5, e] edges with integer lattice shifts
  (``geometry.image_edges``, rows 2..4, vector r_j - r_i + s cell; see
  ``stablejax.potentials.base``): a brute-force O(n^2 k) build over atom
  pairs x a static shift set that covers the radius, fine for the small
  cells that need it. Same ``NeighborState``, rebuild rule (fixed cells:
  a displacement beyond skin / 2) and overflow handling (the
  NEIGHBOR_LIST_OVERFLOW bit; the Simulator grows the capacity and redoes
  the chunk). The shifts refer to the unwrapped positions as they are (the
  build rounds each pair's fractional displacement and folds the rounding
  into the shift), so nothing is wrapped. Fixed cells only: the shift set is
  static (the Simulator refuses Berendsen NPT here).

* Free space (molecules, ``FreeLayout``). With ``free_space_edges="cutoff"``
  the Simulator replaces the dense all-pairs edges by a [2, e] list of the
  pairs within cutoff + skin (``geometry.cutoff_edges``, brute force over all
  pairs, row-major (i, j) order: a subsequence of ``all_pairs_edges``), with
  the same ``NeighborState`` (Cartesian reference positions, box None), the
  same rule (rebuild beyond a displacement of skin / 2), the same batched
  build under one ``lax.cond`` on "any replica needs it", and the same
  overflow handling (NEIGHBOR_LIST_OVERFLOW; grow and redo the chunk). One
  difference: each replica takes the new list only when *it* needs one, so
  its edges depend on its own trajectory alone and a free-space replica stays
  bitwise independent of the other replicas (as with all-pairs edges) as long
  as the capacity does not change (an overflow anywhere pads every list; the
  padding length can change the summation order). The dense build costs far
  less than a model evaluation at molecule sizes, so building whenever any
  replica needs it is cheap. Results equal the all-pairs ones up to
  summation order for models whose energy is zero beyond the cutoff.

Positions handed to the energy function stay unwrapped (continuous); only the
cell list sees wrapped fractional coordinates.
"""

from __future__ import annotations

import dataclasses as pydataclasses
import math
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax_md import dataclasses, partition, space

from stablejax import geometry

_NEIGHBOR_OVERFLOW = int(partition.PartitionErrorCode.NEIGHBOR_LIST_OVERFLOW)
_CELL_OVERFLOW = int(partition.PartitionErrorCode.CELL_LIST_OVERFLOW)
_CELL_TOO_SMALL = int(partition.PartitionErrorCode.CELL_SIZE_TOO_SMALL)
ERROR_MASK = _NEIGHBOR_OVERFLOW | _CELL_OVERFLOW | _CELL_TOO_SMALL


@dataclasses.dataclass
class NeighborState:
    """Per-replica neighbour list (leading replica axis when batched).

    Attributes:
      edges: [2, e] int32 directed edges, padding value n (jax-md Sparse idx),
        or [5, e] int32 edges with lattice shifts (``ImageLayout``; padding
        (n, n, 0, 0, 0)).
      reference: [n, 3] fractional (unwrapped) positions at the last build
        (Cartesian Å in free space, ``FreeLayout``).
      reference_box: [3] Å box or [3, 3] Å cell at the last build (None in
        free space).
      error: [] uint8 jax-md PartitionErrorCode bits accumulated since the
        list was last (re)allocated; non-zero means the results are invalid.
    """

    edges: Any
    reference: Any
    reference_box: Any
    error: Any


@pydataclasses.dataclass(frozen=True)
class NeighborLayout:
    """Static (host-side) shape information of a batch of neighbour lists."""

    cutoff: float
    skin: float
    fns: Any
    cell_size: Any
    cell_capacity: int | None
    cell_list_fn: Any
    update_fn: Any


@pydataclasses.dataclass(frozen=True, eq=False)
class ImageLayout:
    """Static information of image-shift lists (cells narrower than twice the radius).

    Attributes:
      cutoff: interaction cutoff in Å.
      skin: extra list radius in Å.
      shifts: [k, 3] int32 lattice shifts covering cutoff + skin for every
        replica's cell (``geometry.image_shifts``), the zero shift first.
    """

    cutoff: float
    skin: float
    shifts: np.ndarray


#: Spare edge capacity of a new image-shift list (as jax-md's capacity_multiplier).
IMAGE_CAPACITY_MULTIPLIER = 1.25


@pydataclasses.dataclass(frozen=True, eq=False)
class FreeLayout:
    """Static information of free-space cutoff lists (molecules, no box).

    Attributes:
      cutoff: interaction cutoff in Å.
      skin: extra list radius in Å.
    """

    cutoff: float
    skin: float


#: Spare edge capacity of a new free-space list. Padded slots cost as much as
#: edges in the model, and a molecule's pair count within the list radius
#: fluctuates little (an overflow grows the list and redoes the chunk).
FREE_CAPACITY_MULTIPLIER = 1.1


def make_free_layout(cutoff: float, skin: float, positions):
    """``FreeLayout`` and a suggested edge capacity for positions [R, n, 3] Å.

    The capacity is ``FREE_CAPACITY_MULTIPLIER`` x the largest count of pairs
    within cutoff + skin over the replicas (at most n (n - 1)).
    """
    positions = np.asarray(positions, dtype=np.float64)
    n = positions.shape[1]
    radius = float(cutoff) + float(skin)
    count = max(geometry.cutoff_edges_np(x, radius).shape[1] for x in positions)
    capacity = min(n * (n - 1), max(1, math.ceil(FREE_CAPACITY_MULTIPLIER * count)))
    return FreeLayout(float(cutoff), float(skin)), capacity


def uses_images(cutoff: float, skin: float, boxes) -> bool:
    """Whether lists of radius cutoff + skin need image shifts for any of the boxes [R, ...]."""
    return any(geometry.needs_image_edges(cutoff + skin, b) for b in np.asarray(boxes))


def make_image_layout(cutoff: float, skin: float, positions, boxes):
    """``ImageLayout`` for boxes [R, 3] / cells [R, 3, 3] and a suggested edge capacity.

    The capacity is ``IMAGE_CAPACITY_MULTIPLIER`` x the largest edge count of
    the given positions [R, n, 3].
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    radius = cutoff + skin
    reach = np.max([geometry.image_reach(b, radius) for b in boxes], axis=0)
    layout = ImageLayout(float(cutoff), float(skin), geometry.shift_grid(reach))
    positions = np.asarray(positions, dtype=np.float64)
    count = max(
        geometry.image_edges_np(x, b, radius).shape[1]
        for x, b in zip(positions, boxes, strict=True)
    )
    return layout, max(1, math.ceil(IMAGE_CAPACITY_MULTIPLIER * count))


def max_edges(layout, n: int) -> int:
    """Most edges a list can ever hold (the capacity never grows beyond it)."""
    if isinstance(layout, ImageLayout):
        return n * n * layout.shifts.shape[0] - n
    return n * (n - 1)


def pad_edges(edges, capacity: int, n: int):
    """Edges [..., 2 | 5, e] padded to ``capacity`` slots: atoms n, shifts 0."""
    extra = capacity - edges.shape[-1]
    if extra <= 0:
        return edges
    rows = edges.shape[-2]
    fill = jnp.asarray([n, n, 0, 0, 0][:rows], edges.dtype)[:, None]
    pad = jnp.broadcast_to(fill, edges.shape[:-1] + (extra,))
    return jnp.concatenate([edges, pad], axis=-1)


def _wrap(u):
    return jnp.mod(u, 1.0)


def _jax_md_box(box):
    """jax-md's transformation for our box: [3] as is, a [3, 3] cell as upper-triangular T."""
    if not geometry.is_cell(box):
        return box
    return jnp.linalg.cholesky(box @ box.T).T


def _smallest_width(boxes) -> np.ndarray:
    """[R] smallest perpendicular width (Å) of each [3] box or [3, 3] cell."""
    return np.array([geometry.perpendicular_widths(b).min() for b in boxes])


def make_layout(cutoff: float, skin: float, positions, boxes, cell_capacity=None, images=None):
    """Allocate a jax-md list on the replica with the smallest box to fix static shapes.

    Args:
      cutoff: interaction cutoff in Å.
      skin: extra list radius in Å.
      positions: [R, n, 3] Å.
      boxes: [R, 3] Å boxes or [R, 3, 3] Å cells (lattice vectors as rows).
      cell_capacity: override of the cell-list capacity (grown on overflow).
      images: True: an ``ImageLayout``; False: a jax-md layout (the cutoff
        alone must be below half the smallest width: minimum image); None:
        decide by ``uses_images``.

    Returns:
      (layout, suggested edge capacity). The layout is an ``ImageLayout``
      (edges with lattice shifts) when cutoff + skin is not below half the
      smallest perpendicular width of some box, else a jax-md ``NeighborLayout``.
    """
    positions = np.asarray(positions)
    boxes = np.asarray(boxes)
    if images is None:
        images = uses_images(cutoff, skin, boxes)
    if images:
        return make_image_layout(cutoff, skin, positions, boxes)
    r = int(np.argmin(_smallest_width(boxes)))
    box = jnp.asarray(boxes[r])
    jbox = _jax_md_box(box)
    displacement, _ = space.periodic_general(jbox, fractional_coordinates=True)
    fns = partition.neighbor_list(
        displacement,
        jbox,
        r_cutoff=cutoff + skin,
        dr_threshold=0.0,
        format=partition.NeighborListFormat.Sparse,
        fractional_coordinates=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")
        x = jnp.asarray(positions[r])
        u = geometry.to_fractional(x, box) if geometry.is_cell(box) else x / box
        template = fns.allocate(_wrap(u), box=jbox)
    cap = template.cell_list_capacity
    if cell_capacity is not None and cap is not None:
        cap = max(int(cell_capacity), int(cap))
    layout = NeighborLayout(
        cutoff=float(cutoff),
        skin=float(skin),
        fns=fns,
        cell_size=template.cell_size,
        cell_capacity=cap,
        cell_list_fn=template.cell_list_fn,
        update_fn=template.update_fn,
    )
    return layout, int(template.max_occupancy)


def build(layout: NeighborLayout, position, box, capacity: int) -> NeighborState:
    """Build one replica's list (vmappable, jittable).

    Args:
      layout: static layout from ``make_layout``.
      position: [n, 3] Å (unwrapped).
      box: [3] Å box or [3, 3] Å cell (lattice vectors as rows).
      capacity: number of edge slots e.
    """
    n = position.shape[0]
    if isinstance(layout, FreeLayout):
        edges, count = geometry.cutoff_edges(position, layout.cutoff + layout.skin, capacity)
        error = jnp.where(count > capacity, jnp.uint8(_NEIGHBOR_OVERFLOW), jnp.uint8(0))
        return NeighborState(edges=edges, reference=position, reference_box=None, error=error)
    u = geometry.to_fractional(position, box)
    if isinstance(layout, ImageLayout):
        edges, count = geometry.image_edges(
            position, box, layout.cutoff + layout.skin, layout.shifts, capacity
        )
        error = jnp.where(count > capacity, jnp.uint8(_NEIGHBOR_OVERFLOW), jnp.uint8(0))
        return NeighborState(edges=edges, reference=u, reference_box=box, error=error)
    template = partition.NeighborList(
        idx=jnp.full((2, capacity), n, jnp.int32),
        reference_position=_wrap(u),
        error=partition.PartitionError(jnp.zeros((), jnp.uint8)),
        cell_list_capacity=layout.cell_capacity,
        max_occupancy=capacity,
        format=partition.NeighborListFormat.Sparse,
        cell_size=layout.cell_size,
        cell_list_fn=layout.cell_list_fn,
        update_fn=layout.update_fn,
    )
    with warnings.catch_warnings():
        # jax-md scatters int64 candidate indices into int32 buffers under x64.
        warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")
        nbr = layout.fns.update(_wrap(u), template, box=_jax_md_box(box))
    edges = nbr.idx.astype(jnp.int32)
    edges = pad_edges(edges, capacity, n)  # jax-md clips to the number of candidates
    error = nbr.error.code & jnp.uint8(ERROR_MASK)
    return NeighborState(edges=edges, reference=u, reference_box=box, error=error)


def needs_rebuild(layout: NeighborLayout, nbr: NeighborState, position, box):
    """Whether a replica's list may miss a pair within the cutoff (scalar bool)."""
    if isinstance(layout, FreeLayout):
        displacement = jnp.max(jnp.linalg.norm(position - nbr.reference, axis=-1))
        return 2.0 * displacement > layout.skin
    if geometry.is_cell(box):
        # Fixed cells in practice (no barostat for [3, 3]); the width ratio covers
        # isotropic scaling like the [3] path below.
        u = geometry.to_fractional(position, box)
        displacement = jnp.max(jnp.linalg.norm((u - nbr.reference) @ box, axis=-1))
        scale = jnp.min(
            geometry.perpendicular_widths_jnp(box)
            / geometry.perpendicular_widths_jnp(nbr.reference_box)
        )
    else:
        u = position / box
        displacement = jnp.max(jnp.linalg.norm((u - nbr.reference) * box, axis=-1))
        scale = jnp.min(box / nbr.reference_box)
    radius = layout.cutoff + layout.skin
    return scale * radius - 2.0 * displacement < layout.cutoff


def grow(layout: NeighborLayout, capacity: int, error_bits: int, positions, boxes, n: int):
    """New (layout, capacity) after an overflow with the given OR-ed error bits."""
    if error_bits & _NEIGHBOR_OVERFLOW:
        capacity = min(max_edges(layout, n), max(capacity + n, math.ceil(1.5 * capacity)))
    if isinstance(layout, (ImageLayout, FreeLayout)):
        return layout, capacity
    cell_capacity = layout.cell_capacity
    if error_bits & _CELL_OVERFLOW and cell_capacity is not None:
        cell_capacity = math.ceil(1.5 * cell_capacity) + 1
    if error_bits & (_CELL_TOO_SMALL | _CELL_OVERFLOW):
        layout, suggested = make_layout(
            layout.cutoff, layout.skin, positions, boxes, cell_capacity=cell_capacity
        )
        capacity = max(capacity, suggested)
    return layout, capacity


def error_message(bits: int) -> str:
    """Readable description of jax-md partition error bits."""
    parts = []
    if bits & _NEIGHBOR_OVERFLOW:
        parts.append("edge buffer overflow")
    if bits & _CELL_OVERFLOW:
        parts.append("cell buffer overflow")
    if bits & _CELL_TOO_SMALL:
        parts.append("cells too small for the shrunken box")
    return ", ".join(parts) or "none"
