"""Stability criteria (paper Sec. A.5) and first-passage / survival statistics.

Three criteria decide when a replica has become unstable:

* max bond-length deviation (MD17/MD22 molecules, after Fu et al. 2022):
  max_b |l_b(x) - l_b^eq| > threshold, 0.25 Å during training, 0.5 Å for evaluation;
* minimum intermolecular distance (water, training): the closest pair of atoms on
  different molecules is nearer than 1.2 Å;
* RDF mean absolute error (water, evaluation): the RDF averaged over a time window
  deviates from the reference by more than 3.0 (see `rdf_mae` for the definition),
  for any of the O-O, H-H, H-O RDFs.

A fourth, the closest non-bonded distance, is our evaluation guard for molecules in
free space (a replica that folds into itself is unstable even when no bond breaks).

Metric functions take one frame `[n, 3]` (RDF: one window `[t, n, 3]`) and also any
leading batch axes (`[replicas, frames, ...]`), returning one value per frame (window).
The `StabilityCriterion` bundles a metric with its threshold and direction; its
metric also takes per-frame boxes (`box [..., 3]` or cells `[..., 3, 3]` with the
positions' leading axes,
e.g. NPT trajectories), so minimum images and RDF densities follow each frame's box.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stablejax import observables

#: Max bond-length deviation (Å) that marks a replica unstable during training.
BOND_DEVIATION_TRAIN_THRESHOLD = 0.25
#: Max bond-length deviation (Å) that marks a simulation unstable in evaluation.
BOND_DEVIATION_EVAL_THRESHOLD = 0.5
#: Minimum intermolecular distance (Å) below which a water replica is unstable (training).
MIN_INTERMOLECULAR_DISTANCE_THRESHOLD = 1.2
#: RDF MAE (Å, see `rdf_mae`) above which a water simulation is unstable (evaluation).
RDF_MAE_THRESHOLD = 3.0
#: Closest non-bonded distance (Å) below which a molecule has folded into itself
#: (evaluation guard of molecules; ours, not the paper's). Non-bonded (1-3 and beyond)
#: pairs of organic molecules sit at >= 1.5 Å (H-C-H 1-3 distances ~1.8 Å); 0.8 Å is
#: closer than any covalent bond but H-H (0.74 Å), i.e. an unphysical contact.
NONBONDED_CONTACT_THRESHOLD = 0.8


# ------------------------------------------------------------------------- metrics


def max_bond_deviation(positions: jax.Array, bonds, equilibrium_lengths, box=None) -> jax.Array:
    """Largest absolute deviation of any bond from its equilibrium length.

    Args:
      positions: [..., n, 3] Å.
      bonds: [b, 2] int atom pairs (`stablejax.data.topology.find_bonds`).
      equilibrium_lengths: [b] Å, mean bond lengths over reference data
        (`stablejax.data.topology.equilibrium_bond_lengths`).
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None.

    Returns:
      [...] Å; unstable above BOND_DEVIATION_TRAIN_THRESHOLD (0.25) in training and
      BOND_DEVIATION_EVAL_THRESHOLD (0.5) in evaluation.
    """
    lengths = observables.bond_lengths(positions, bonds, box)
    eq = jnp.asarray(equilibrium_lengths, dtype=lengths.dtype)
    if eq.shape != lengths.shape[-1:]:
        raise ValueError(
            f"equilibrium_lengths must have shape [{lengths.shape[-1]}], got {eq.shape}"
        )
    return jnp.max(jnp.abs(lengths - eq), axis=-1)


def intermolecular_pairs(molecule_index, exclude_pairs=None) -> np.ndarray:
    """All atom pairs (i < j) on different molecules, minus an optional exclusion list.

    Args:
      molecule_index: [n] int molecule label per atom (`stablejax.data.topology.molecules`).
      exclude_pairs: [p, 2] int pairs to leave out (either order), or None.

    Returns:
      [q, 2] int64 NumPy array of pairs.
    """
    mol = np.asarray(molecule_index)
    if mol.ndim != 1:
        raise ValueError(f"molecule_index must have shape [n], got {mol.shape}")
    i, j = np.triu_indices(len(mol), k=1)
    keep = mol[i] != mol[j]
    if exclude_pairs is not None and len(exclude_pairs):
        ex = np.asarray(exclude_pairs, dtype=np.int64).reshape(-1, 2)
        lo, hi = np.minimum(ex[:, 0], ex[:, 1]), np.maximum(ex[:, 0], ex[:, 1])
        n = len(mol)
        keep &= ~np.isin(i * n + j, lo * n + hi)
    pairs = np.stack([i[keep], j[keep]], axis=1)
    if len(pairs) == 0:
        raise ValueError("no intermolecular pairs: all atoms are on one molecule")
    return pairs


def min_intermolecular_distance(
    positions: jax.Array, molecule_index, box=None, *, exclude_pairs=None
) -> jax.Array:
    """Smallest distance between two atoms on different molecules (minimum image).

    Atoms on different molecules are never bonded (molecules are connected components
    of the bond graph), so this is the paper's minimum over non-bonded pairs; an
    explicit `exclude_pairs` list can remove more pairs.

    Args:
      positions: [..., n, 3] Å.
      molecule_index: [n] int molecule label per atom (concrete).
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None.
      exclude_pairs: [p, 2] int pairs to ignore, or None.

    Returns:
      [...] Å; unstable below MIN_INTERMOLECULAR_DISTANCE_THRESHOLD (1.2 Å).
    """
    pairs = intermolecular_pairs(molecule_index, exclude_pairs)
    return jnp.min(observables.bond_lengths(positions, pairs, box), axis=-1)


def rdf_mae(rdf_frames: jax.Array, reference_rdf: jax.Array, *, dr: float, window=None):
    """RDF error of a time window: integral of |<g>_window(r) - g_ref(r)| dr.

    Definition (as in MDsim/StABlE's WaterRDFMAE): the RDF is first averaged over the
    frames of the window, then MAE = r_max * mean_k |<g>(r_k) - g_ref(r_k)|
    = dr * sum_k |<g>(r_k) - g_ref(r_k)|, i.e. the L1 distance between the curves
    over [0, r_max], in Å. The paper's threshold is 3.0 with r_max = 6 Å, over a
    10 ps window, for any of the O-O, H-H, H-O RDFs.

    Args:
      rdf_frames: [..., t, n_bins] per-frame RDFs (`radial_distribution_function`).
      reference_rdf: [n_bins] reference RDF on the same bins.
      dr: bin width, Å.
      window: frames per window, or None for one window over all t frames. With a
        window, consecutive non-overlapping windows are scored (a trailing partial
        window is dropped).

    Returns:
      [...] (window None) or [..., t // window] MAE in Å.
    """
    rdf_frames = jnp.asarray(rdf_frames)
    ref = jnp.asarray(reference_rdf, dtype=rdf_frames.dtype)
    if rdf_frames.ndim < 2 or ref.shape != rdf_frames.shape[-1:]:
        raise ValueError(
            f"rdf_frames [..., t, n_bins] and reference_rdf [n_bins] disagree: "
            f"{rdf_frames.shape} vs {ref.shape}"
        )
    if window is None:
        mean = jnp.mean(rdf_frames, axis=-2)
    else:
        t = rdf_frames.shape[-2]
        if not 1 <= window <= t:
            raise ValueError(f"window must be in [1, t={t}], got {window}")
        n_win = t // window
        x = rdf_frames[..., : n_win * window, :]
        x = x.reshape(x.shape[:-2] + (n_win, window, x.shape[-1]))
        mean = jnp.mean(x, axis=-2)
    return dr * jnp.sum(jnp.abs(mean - ref), axis=-1)


def max_rdf_mae(
    positions: jax.Array,
    species,
    box,
    reference_rdfs: Mapping[tuple[int, int], jax.Array],
    *,
    r_max: float = 6.0,
    dr: float = 0.01,
    sigma: float = 0.0,
    window=None,
) -> jax.Array:
    """Largest `rdf_mae` over several element-pair RDFs (water: O-O, H-H, H-O).

    The reference RDFs must be computed with the same r_max, dr and sigma (default
    sigma 0: plain histograms, as in the reference implementation).

    Args:
      positions: [..., t, n, 3] Å, frames of one or more windows.
      species: [n] atomic numbers (concrete).
      box: [3] Å box or [3, 3] Å cell (lattice vectors as rows), or one per frame
        [..., t, 3] / [..., t, 3, 3] Å (NPT).
      reference_rdfs: {(a, b): [n_bins] reference g_ab(r)}, e.g. for `observables.WATER_PAIRS`.
      r_max, dr, sigma: RDF settings, Å (see `radial_distribution_function`).
      window: frames per window (see `rdf_mae`), or None for one window.

    Returns:
      [...] or [..., t // window] Å; unstable above RDF_MAE_THRESHOLD (3.0).
    """
    if not reference_rdfs:
        raise ValueError("reference_rdfs is empty")

    def rdf(pair):
        lead = np.shape(positions)[:-2]
        shared_cell = np.shape(box) == (3, 3) and lead + (3,) != (3, 3)
        if np.ndim(box) <= 1 or shared_cell:
            return observables.radial_distribution_function(
                positions, species, box, pair=pair, r_max=r_max, dr=dr, sigma=sigma
            )
        # One box per frame (NPT): each frame's RDF with its own volume.
        return _per_frame_box(
            lambda x, b: observables.radial_distribution_function(
                x, species, b, pair=pair, r_max=r_max, dr=dr, sigma=sigma
            ),
            positions,
            box,
            2,
        )

    maes = [rdf_mae(rdf(pair), ref, dr=dr, window=window) for pair, ref in reference_rdfs.items()]
    return jnp.max(jnp.stack(maes), axis=0)


# ------------------------------------------------------------------- criteria


class StabilityCriterion(NamedTuple):
    """A stability metric with its threshold.

    Attributes:
      name: short label ('bond_length_deviation', 'min_intermolecular_distance',
        'rdf_mae', 'min_nonbonded_distance').
      metric: `(positions [..., n, 3] (RDF: [..., t, n, 3]), box=None) -> [...]`. With
        box None the criterion's own box is used; otherwise `box` holds one [3] Å box
        or [3, 3] Å cell per frame, with the positions' leading axes (`[..., 3]` or
        `[..., 3, 3]`; RDF: `[..., t, 3]` or `[..., t, 3, 3]`).
      threshold: the value at which the metric marks instability (Å).
      unstable_below: True if values below the threshold are unstable (distances),
        False if values above it are (deviations, errors).
    """

    name: str
    metric: Callable[..., jax.Array]
    threshold: float
    unstable_below: bool = False

    def is_unstable(self, positions: jax.Array, box=None) -> jax.Array:
        """[...] bool: whether each frame (window) crosses the threshold (or is not finite)."""
        values = self.metric(positions, box)
        return self.flags(values) | ~jnp.isfinite(values)

    def flags(self, values: jax.Array) -> jax.Array:
        """[...] bool from precomputed metric values."""
        values = jnp.asarray(values)
        return values < self.threshold if self.unstable_below else values > self.threshold


def _frame_box_shape(box, lead: tuple) -> tuple:
    """Shape of one frame's box, (3,) or (3, 3), of boxes given for leading axes `lead`.

    Per-frame boxes have shape `lead + (3,)` or `lead + (3, 3)`; a single box
    [3] or [3, 3] is shared by all frames. The one ambiguous case, a [3, 3]
    array with `lead == (3,)`, is read as three per-frame [3] boxes.
    """
    shape = tuple(np.shape(box))
    if shape == lead + (3,):
        return (3,)
    if shape == lead + (3, 3):
        return (3, 3)
    if shape in ((3,), (3, 3)):
        return shape
    # Otherwise broadcast against the leading axes (e.g. one box per replica [R, 1, 3]).
    return (3, 3) if len(shape) == len(lead) + 2 and shape[-2:] == (3, 3) else (3,)


def _per_frame_box(fn, positions, box, core_ndim: int = 2):
    """fn(x, box [3] | [3, 3]) over the leading axes of positions, one box per frame."""
    positions = jnp.asarray(positions)
    lead = positions.shape[:-core_ndim]
    core = _frame_box_shape(box, lead)
    box = jnp.broadcast_to(jnp.asarray(box, dtype=positions.dtype), lead + core)
    x = positions.reshape((-1,) + positions.shape[-core_ndim:])
    out = jax.vmap(fn)(x, box.reshape((-1,) + core))
    return out.reshape(lead + out.shape[1:])


def _pair_distance_metric(pairs, box, reduce):
    """metric(positions, box=None) = reduce(|x_j - x_i|) over `pairs` (minimum image)."""

    def metric(positions, frame_box=None):
        if frame_box is None:
            return reduce(observables.bond_lengths(positions, pairs, box))
        return _per_frame_box(
            lambda x, b: reduce(observables.bond_lengths(x, pairs, b)), positions, frame_box, 2
        )

    return metric


def _closest_pair_criterion(name, pairs, threshold, box) -> StabilityCriterion:
    """Unstable when the closest of `pairs` is nearer than `threshold` Å."""
    return StabilityCriterion(
        name=name,
        metric=_pair_distance_metric(pairs, box, lambda d: jnp.min(d, axis=-1)),
        threshold=float(threshold),
        unstable_below=True,
    )


def bond_length_criterion(
    bonds, equilibrium_lengths, *, threshold: float = BOND_DEVIATION_TRAIN_THRESHOLD, box=None
) -> StabilityCriterion:
    """Max bond-length deviation criterion (0.25 Å training default; 0.5 Å for evaluation)."""
    bonds = np.asarray(bonds)
    eq = np.asarray(equilibrium_lengths)
    if eq.shape != (len(bonds),):
        raise ValueError(f"equilibrium_lengths must have shape [{len(bonds)}], got {eq.shape}")
    return StabilityCriterion(
        name="bond_length_deviation",
        metric=_pair_distance_metric(
            bonds, box, lambda lengths: jnp.max(jnp.abs(lengths - eq.astype(lengths.dtype)), -1)
        ),
        threshold=float(threshold),
    )


def intermolecular_distance_criterion(
    molecule_index,
    *,
    threshold: float = MIN_INTERMOLECULAR_DISTANCE_THRESHOLD,
    box=None,
    exclude_pairs=None,
) -> StabilityCriterion:
    """Minimum intermolecular distance criterion (unstable below 1.2 Å by default)."""
    pairs = intermolecular_pairs(molecule_index, exclude_pairs)
    return _closest_pair_criterion("min_intermolecular_distance", pairs, threshold, box)


def nonbonded_contact_criterion(
    n_atoms: int, bonds, *, threshold: float = NONBONDED_CONTACT_THRESHOLD, box=None
) -> StabilityCriterion:
    """Closest non-bonded pair (every pair not in `bonds`) nearer than `threshold` Å.

    The evaluation guard for molecules: with the bond-length criterion alone, a
    molecule whose atoms run into each other without stretching a bond counts as
    stable. Directly bonded (1-2) pairs are excluded; 1-3 pairs are kept (>= 1.5 Å
    in organic molecules, far above the 0.8 Å default).

    Args:
      n_atoms: number of atoms n.
      bonds: [b, 2] int bonded pairs (`stablejax.data.topology.find_bonds`).
      threshold: Å; unstable below it.
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None.
    """
    pairs = intermolecular_pairs(np.arange(int(n_atoms)), exclude_pairs=bonds)
    return _closest_pair_criterion("min_nonbonded_distance", pairs, threshold, box)


def rdf_mae_criterion(
    species,
    box,
    reference_rdfs: Mapping[tuple[int, int], jax.Array],
    *,
    threshold: float = RDF_MAE_THRESHOLD,
    r_max: float = 6.0,
    dr: float = 0.01,
    sigma: float = 0.0,
) -> StabilityCriterion:
    """RDF MAE criterion over a window of frames [..., t, n, 3] (unstable above 3.0).

    With per-frame boxes [..., t, 3] or [..., t, 3, 3] (NPT) each frame's RDF is normalised by its own
    volume before the window average.
    """
    species = np.asarray(species)
    refs = dict(reference_rdfs)

    def metric(positions, frame_box=None):
        return max_rdf_mae(
            positions,
            species,
            box if frame_box is None else frame_box,
            refs,
            r_max=r_max,
            dr=dr,
            sigma=sigma,
        )

    return StabilityCriterion(name="rdf_mae", metric=metric, threshold=float(threshold))


#: Criterion names understood by `make_criterion`.
CRITERIA = (
    "bond_length_deviation",
    "min_intermolecular_distance",
    "rdf_mae",
    "min_nonbonded_distance",
)
#: Evaluation threshold of each criterion (Å; RDF-MAE units for 'rdf_mae'): the paper's
#: (bond deviation 0.5 Å, RDF MAE 3.0), the training one of water (1.2 Å) and ours (0.8 Å).
EVAL_THRESHOLDS = {
    "bond_length_deviation": BOND_DEVIATION_EVAL_THRESHOLD,
    "min_intermolecular_distance": MIN_INTERMOLECULAR_DISTANCE_THRESHOLD,
    "rdf_mae": RDF_MAE_THRESHOLD,
    "min_nonbonded_distance": NONBONDED_CONTACT_THRESHOLD,
}
#: RDF settings (Å) of the RDF-MAE criterion: as MDsim/StABlE (unsmeared, 0-6 Å).
RDF_MAE_SETTINGS = {"r_max": 6.0, "dr": 0.01, "sigma": 0.0}


def make_criterion(
    name: str,
    threshold: float,
    *,
    species,
    box=None,
    bonds=None,
    equilibrium_lengths=None,
    molecule_index=None,
    reference_rdfs: Mapping[tuple[int, int], jax.Array] | None = None,
    rdf_settings: Mapping | None = None,
) -> StabilityCriterion:
    """The criterion called `name` (one of `CRITERIA`) with `threshold`, for one system.

    Args:
      name: 'bond_length_deviation' (needs bonds, equilibrium_lengths),
        'min_intermolecular_distance' (molecule_index), 'min_nonbonded_distance'
        (bonds), 'rdf_mae' (a box and reference_rdfs).
      threshold: Å, or RDF-MAE units for 'rdf_mae' (`EVAL_THRESHOLDS` has defaults).
      species: [n] atomic numbers.
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None (free space).
      bonds: [b, 2] int (`stablejax.data.topology.find_bonds`).
      equilibrium_lengths: [b] Å (`stablejax.data.topology.equilibrium_bond_lengths`).
      molecule_index: [n] int molecule label per atom (`stablejax.data.topology.molecules`).
      reference_rdfs: {(a, b): [n_bins] reference g_ab(r)} on `rdf_settings`' bins.
      rdf_settings: {'r_max', 'dr', 'sigma'} (Å) of 'rdf_mae'; default `RDF_MAE_SETTINGS`.

    Example:
      >>> crit = make_criterion('bond_length_deviation', 0.5, species=z, bonds=bonds,
      ...                       equilibrium_lengths=eq)
      >>> crit.is_unstable(frames)  # [..., n, 3] -> [...] bool
    """

    def need(value, what):
        if value is None:
            raise ValueError(f"stability criterion {name!r} needs {what}")

    if name == "bond_length_deviation":
        need(bonds, "the bonds of the system")
        need(equilibrium_lengths, "equilibrium bond lengths")
        return bond_length_criterion(bonds, equilibrium_lengths, threshold=threshold, box=box)
    if name == "min_intermolecular_distance":
        need(molecule_index, "the molecule of every atom")
        return intermolecular_distance_criterion(molecule_index, threshold=threshold, box=box)
    if name == "min_nonbonded_distance":
        need(bonds, "a bonded system")
        return nonbonded_contact_criterion(
            len(np.asarray(species)), bonds, threshold=threshold, box=box
        )
    if name == "rdf_mae":
        need(box, "a periodic box")
        need(reference_rdfs, "reference RDFs")
        return rdf_mae_criterion(
            species, box, reference_rdfs, threshold=threshold, **(rdf_settings or RDF_MAE_SETTINGS)
        )
    raise ValueError(f"unknown stability criterion {name!r}; choose one of {CRITERIA}")


# ------------------------------------------------------------ first passage, survival


def first_unstable_time(unstable_flags, frame_times) -> jax.Array:
    """Time of the first unstable frame of each replica (inf if it never became unstable).

    Args:
      unstable_flags: [..., t] bool per replica and frame (e.g. `criterion.is_unstable`).
      frame_times: [t] times of the frames in any unit (ps for survival curves).

    Returns:
      [...] float first-passage times, +inf for replicas that stayed stable.
    """
    flags = jnp.asarray(unstable_flags, dtype=bool)
    times = jnp.asarray(frame_times)
    if not jnp.issubdtype(times.dtype, jnp.floating):
        times = times.astype(jnp.result_type(float))
    if flags.ndim < 1 or times.shape != flags.shape[-1:]:
        raise ValueError(f"frame_times {times.shape} must match the last axis of {flags.shape}")
    first = jnp.argmax(flags, axis=-1)
    return jnp.where(jnp.any(flags, axis=-1), times[first], jnp.inf)


def survival_curve(first_unstable_times, times) -> jax.Array:
    """Fraction of replicas still stable at each time: P(first_unstable_time > t).

    Args:
      first_unstable_times: [r] from `first_unstable_time` (inf = never unstable).
      times: [k] times at which to evaluate, same unit.

    Returns:
      [k] fractions in [0, 1], non-increasing in t.
    """
    ft = jnp.asarray(first_unstable_times)
    t = jnp.asarray(times, dtype=ft.dtype)
    if ft.ndim != 1:
        raise ValueError(f"first_unstable_times must have shape [r], got {ft.shape}")
    return jnp.mean(ft[None, :] > t[:, None], axis=-1)
