"""Evaluation of trained models by long MD: stable times, observables, QM errors, plots.

`evaluate_model` runs all replicas of one model from given initial states, judged by
every evaluation criterion at once and by the simulator's non-finite flag, and returns
per-replica stable times (first passage, at the resolution of the recorded frames) per
criterion and combined, the cause of each instability, the observables averaged over
stable frames only (h(r) for molecules; O-O, O-H, H-H RDFs for periodic water, each
frame with its own box), the VACF of the first `vacf_window` steps, and the diffusivity
(water oxygens) of the stable prefix. `write_report` writes `final_metrics.json`,
figures (Kaplan-Meier survival with censoring) and `report.md` for models evaluated on
the same initial states.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stablejax import geometry, observables, units
from stablejax.files import write_json, write_text
from stablejax.logs import logger
from stablejax.stability import StabilityCriterion
from stablejax.training.metrics import progress_bar

#: Element pairs of the water RDFs (O-O, O-H, H-H).
WATER_PAIRS = observables.WATER_PAIRS  # re-exported


@dataclasses.dataclass
class EvalSettings:
    """Evaluation MD settings (units in names).

    Attributes:
      time_ps: simulated time per replica.
      dt_fs: time step.
      temperature_K: thermostat temperature.
      record_every: steps between recorded frames (the stable-time resolution is
        record_every * dt_fs; windowed criteria, see `EvalCriterion`, judge windows
        of recorded frames).
      vacf_window: VACF window in steps (velocities recorded every step for
        2 x vacf_window steps at the start of the run).
      segment_frames: frames per simulated segment (bounds host memory).
    """

    time_ps: float
    dt_fs: float
    temperature_K: float
    record_every: int
    vacf_window: int = 100
    segment_frames: int = 50

    @property
    def n_steps(self) -> int:
        steps = int(round(self.time_ps * 1000.0 / self.dt_fs))
        return max(self.record_every, steps - steps % self.record_every)

    @property
    def frame_dt_ps(self) -> float:
        return self.record_every * self.dt_fs / 1000.0


@dataclasses.dataclass(frozen=True)
class EvalCriterion:
    """A stability criterion as the evaluation applies it.

    Attributes:
      criterion: the `StabilityCriterion`.
      window_frames: 1 for a per-frame criterion (metric sees frames [R, F, n, 3]);
        > 1 for a windowed one (RDF MAE: metric sees [R, W, window_frames, n, 3],
        every frame of a crossing window counts as unstable from the window's start).
    """

    criterion: StabilityCriterion
    window_frames: int = 1

    @property
    def name(self) -> str:
        return self.criterion.name


def evaluation_criterion(
    criterion: StabilityCriterion, *, frame_ps: float, rdf_window_ps: float
) -> EvalCriterion:
    """`criterion` as the evaluation applies it: per recorded frame, except 'rdf_mae',
    judged on windows of `rdf_window_ps` (at least one frame of `frame_ps` ps)."""
    window = 1
    if criterion.name == "rdf_mae":
        window = max(1, int(round(rdf_window_ps / frame_ps)))
    return EvalCriterion(criterion, window_frames=window)


@dataclasses.dataclass
class EvalResult:
    """What one model's evaluation produced (NumPy arrays, units in names).

    A replica is unstable from the first recorded frame that crosses any criterion
    (the combined criterion) or at which the simulator had flagged it (a step went
    non-finite; its frames repeat the last finite state). Its frames from then on
    never enter observables, VACF or diffusivity.
    """

    stable_time_ps: np.ndarray  # [R] combined criterion, = max_time_ps when never unstable
    ever_unstable: np.ndarray  # [R] bool
    max_time_ps: float
    resolution_ps: float
    observables: dict  # name -> [bins] averaged over stable frames (NaN if none)
    n_stable_frames: int
    vacf: np.ndarray | None  # [window], normalised, mean over replicas
    diffusivity_A2_per_ps: float | None
    # [R] "non_finite" (the simulator flagged it), "criterion" or None (never unstable).
    unstable_cause: list = dataclasses.field(default_factory=list)
    # [R] name of the criterion that ended the replica (None if never / non-finite).
    unstable_criterion: list = dataclasses.field(default_factory=list)
    # name -> (stable times [R] ps, ever_unstable [R] bool) under that criterion alone
    # (non-finite steps count for every criterion); times = max_time_ps when censored.
    by_criterion: dict = dataclasses.field(default_factory=dict)

    @property
    def censored_times_ps(self) -> np.ndarray:
        """[R] stable times with +inf for replicas that never became unstable."""
        return np.where(self.ever_unstable, self.stable_time_ps, np.inf)

    def summary(self) -> dict:
        out = stable_time_summary(self.stable_time_ps, self.ever_unstable)
        out.update(
            max_time_ps=float(self.max_time_ps),
            stable_time_resolution_ps=float(self.resolution_ps),
            n_stable_frames=int(self.n_stable_frames),
            diffusivity_A2_per_ps=self.diffusivity_A2_per_ps,
            unstable_cause=list(self.unstable_cause),
            unstable_criterion=list(self.unstable_criterion),
        )
        keep = (
            "median_stable_time_ps",
            "median_stable_time_ci_ps",
            "mean_stable_time_ps",
            "n_unstable",
            "stable_times_ps",
        )
        out["by_criterion"] = {
            name: {k: v for k, v in stable_time_summary(t, ever).items() if k in keep}
            for name, (t, ever) in self.by_criterion.items()
        }
        return out


def stable_time_summary(stable_times_ps, ever_unstable) -> dict:
    """Median (with its order-statistic CI), mean and counts of per-replica stable times."""
    t = np.asarray(stable_times_ps, dtype=np.float64)
    lo, hi, level = median_confidence_interval(t)
    return {
        "median_stable_time_ps": float(np.median(t)),
        # Distribution-free CI of the median (order statistics); `level` is the
        # coverage actually achieved (below 0.95 when there are few replicas).
        "median_stable_time_ci_ps": [lo, hi],
        "median_stable_time_ci_level": level,
        "mean_stable_time_ps": float(np.mean(t)),
        "n_replicas": int(t.size),
        "n_unstable": int(np.sum(ever_unstable)),
        "stable_times_ps": [float(v) for v in t],  # per replica, for your own statistics
    }


def survival_estimate(stable_times_ps, ever_unstable, grid_ps, level: float = 0.95):
    """Kaplan-Meier survival of replicas with censoring, and its pointwise band.

    Replicas that never became unstable are right-censored at their stable time (the
    run length), not failures: the curve ends at (number never unstable) / R, not 0.
    With every replica followed to the same horizon this is the empirical fraction
    still stable; the band is Greenwood's (log-log) from `scipy.stats.ecdf`.

    Args:
      stable_times_ps: [R] first unstable time, or the censoring time.
      ever_unstable: [R] bool, False = censored.
      grid_ps: [k] times.
      level: band coverage.

    Returns:
      (survival [k], lower [k], upper [k]).
    """
    from scipy import stats

    t = np.asarray(stable_times_ps, dtype=np.float64).ravel()
    failed = np.asarray(ever_unstable, bool).ravel()
    grid = np.asarray(grid_ps, dtype=np.float64)
    if t.shape != failed.shape or t.size == 0:
        raise ValueError("stable_times_ps and ever_unstable must be [R] with R >= 1")
    if not failed.any():
        ones = np.ones_like(grid)
        return ones, ones, ones
    data = stats.CensoredData(uncensored=t[failed], right=t[~failed])
    sf = stats.ecdf(data).sf
    surv = sf.evaluate(grid)
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Undefined where the estimate is 0 or 1 (NaN there); replaced by the estimate.
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = sf.confidence_interval(level, method="log-log")
        lo, hi = ci.low.evaluate(grid), ci.high.evaluate(grid)
    lo = np.where(np.isfinite(lo), lo, surv)
    hi = np.where(np.isfinite(hi), hi, surv)
    # Before the first failure the estimate is exactly 1.
    return surv, np.minimum(lo, surv), np.maximum(hi, surv)


def median_confidence_interval(samples, level: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free confidence interval of a median from order statistics.

    With x_(1) <= ... <= x_(n), the interval [x_(j), x_(n+1-j)] covers the true median
    with probability P(j <= B <= n - j), B ~ Binomial(n, 1/2), whatever the
    distribution: the count of samples below the median is binomial. The narrowest
    symmetric interval with coverage >= `level` is returned; stable times censored at
    the run length keep the interval valid as long as the bound they set is read as
    "at least". No resampling, so it is deterministic.

    Args:
      samples: [n] values (e.g. per-replica stable times, ps).
      level: wanted coverage in (0, 1).

    Returns:
      (lower, upper, achieved coverage); with too few samples for `level`, the
      (min, max) interval and its smaller coverage (n = 2: 0.5).
    """
    from scipy import stats

    x = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    n = x.size
    if n == 0:
        raise ValueError("median_confidence_interval needs at least one sample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    best = 1
    for j in range(1, (n + 1) // 2 + 1):
        if stats.binom.cdf(n - j, n, 0.5) - stats.binom.cdf(j - 1, n, 0.5) >= level:
            best = j
        else:
            break
    coverage = float(stats.binom.cdf(n - best, n, 0.5) - stats.binom.cdf(best - 1, n, 0.5))
    return float(x[best - 1]), float(x[n - best]), coverage


def paired_stable_time_test(first, second) -> dict:
    """One-sided Wilcoxon signed-rank test that `second` outlives `first` replica by replica.

    The evaluation starts both models from the same initial states, so stable times pair
    up; the signed-rank test on the differences needs no distribution and handles ties at
    the censoring time as zero differences (Pratt's treatment, which keeps them in the
    ranking). All differences zero (e.g. identical models): p = 1.

    Args:
      first, second: [R] stable times (ps) of the two models on the same initial states.

    Returns:
      {'test', 'n', 'n_longer', 'n_shorter', 'median_difference_ps', 'p_value'}.
    """
    from scipy import stats

    a = np.asarray(first, dtype=np.float64).ravel()
    b = np.asarray(second, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired stable times must have one shape, got {a.shape} and {b.shape}")
    d = b - a
    if np.all(d == 0):
        p = 1.0
    else:
        p = float(stats.wilcoxon(d, zero_method="pratt", alternative="greater").pvalue)
    return {
        "test": "one-sided Wilcoxon signed-rank, second > first",
        "n": int(d.size),
        "n_longer": int(np.sum(d > 0)),
        "n_shorter": int(np.sum(d < 0)),
        "median_difference_ps": float(np.median(d)),
        "p_value": p,
    }


def structural_observables(positions, species, box, *, r_max: float, dr: float, sigma: float):
    """{name: [..., bins]} of the evaluation observables of frames [..., n, 3] Å.

    Molecules (box None): the distance histogram 'h(r)'. Periodic systems with O and
    H: the O-O, O-H and H-H RDFs (unsmeared when sigma is 0); other periodic
    systems: the all-atom RDF 'g(r)'.
    """
    if box is None:
        return {"h(r)": observables.distance_histogram(positions, r_max=r_max, dr=dr, sigma=sigma)}
    s = set(np.asarray(species).tolist())
    if {1, 8} <= s:
        return {
            f"g_{_sym(a)}{_sym(b)}(r)": observables.radial_distribution_function(
                positions, species, box, pair=(a, b), r_max=r_max, dr=dr, sigma=sigma
            )
            for a, b in WATER_PAIRS
        }
    return {
        "g(r)": observables.radial_distribution_function(
            positions, species, box, pair=None, r_max=r_max, dr=dr, sigma=sigma
        )
    }


def reference_observables(
    positions, species, box, *, observable_settings: Mapping, max_frames: int = 500
) -> dict:
    """{name: [bins]} `structural_observables` averaged over reference frames.

    Args:
      positions: [F, n, 3] Å reference frames (thinned evenly to at most about
        `max_frames`).
      species: [n] atomic numbers.
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None.
      observable_settings: {'r_max', 'dr', 'sigma'} (Å).
    """
    positions = np.asarray(positions)
    frames = jnp.asarray(positions[:: max(1, positions.shape[0] // max_frames)])
    settings = dict(observable_settings)
    values = jax.jit(lambda x: structural_observables(x, species, box, **settings))(frames)
    return {k: np.asarray(v).mean(axis=0) for k, v in values.items()}


def reference_rdfs(
    positions, species, box, *, rdf_settings: Mapping, pairs=WATER_PAIRS, max_frames: int = 500
) -> dict:
    """{(a, b): [bins]} element-pair RDFs averaged over reference frames [F, n, 3] Å: the
    references of the 'rdf_mae' criterion (`stablejax.stability.rdf_mae_criterion`)."""
    positions = np.asarray(positions)
    frames = jnp.asarray(positions[:: max(1, positions.shape[0] // max_frames)])
    return {
        p: np.asarray(
            observables.radial_distribution_function(
                frames, species, box, pair=p, **dict(rdf_settings)
            )
        ).mean(axis=0)
        for p in pairs
    }


def _sym(z: int) -> str:
    return {1: "H", 6: "C", 7: "N", 8: "O"}.get(int(z), str(z))


def _write_trajectories(out_dir, kept, species, box, stable_time_ps) -> None:
    """One extended-XYZ file per replica from the frames kept during evaluation (by
    process 0 alone with several processes: every process holds every replica's frames)."""
    if jax.process_index() != 0:
        return
    import ase
    import ase.io

    os.makedirs(out_dir, exist_ok=True)
    pos = np.concatenate(kept["pos"], axis=1)  # [R, K, n, 3]
    vel = None if any(v is None for v in kept["vel"]) else np.concatenate(kept["vel"], axis=1)
    boxes = None if any(b is None for b in kept["box"]) else np.concatenate(kept["box"], axis=1)
    energy = np.concatenate(kept["energy"], axis=1)
    times = np.concatenate(kept["times"])
    for r in range(pos.shape[0]):
        frames = []
        for f in range(pos.shape[1]):
            cell = boxes[r, f] if boxes is not None else box
            atoms = ase.Atoms(
                numbers=np.asarray(species),
                positions=pos[r, f],
                cell=None if cell is None else geometry.cell_matrix(cell),
                pbc=cell is not None,
            )
            if vel is not None:
                atoms.set_velocities(vel[r, f])
            atoms.info.update(
                time_ps=float(times[f]),
                potential_energy_eV=float(energy[r, f]),
                stable_time_ps=float(stable_time_ps[r]) if np.isfinite(stable_time_ps[r]) else -1.0,
                unstable=bool(times[f] >= stable_time_ps[r]),
            )
            frames.append(atoms)
        path = os.path.join(out_dir, f"replica_{r:03d}.extxyz")
        tmp = path + ".tmp"
        ase.io.write(tmp, frames, format="extxyz")
        os.replace(tmp, path)


def evaluate_model(
    sim,
    params,
    initial_positions,
    *,
    settings: EvalSettings,
    criteria,
    species,
    box,
    observable_settings: Mapping,
    key,
    progress: bool = True,
    label: str = "",
    trajectory_dir: str | None = None,
    trajectory_frames: int = 100,
) -> EvalResult:
    """Long MD of all replicas, judged by every criterion at once.

    Each replica's stable time under each criterion is recorded (`by_criterion`);
    its combined stable time is the earliest of them. A replica the simulator
    flagged (a non-finite step) is unstable from the first frame recorded at or
    after the flag under every criterion. A replica keeps running until every
    criterion has marked it (or it went non-finite), so each criterion's figure is
    its own; only frames before the combined stable time enter observables, VACF and
    diffusivity. Observables and criteria use each frame's own box (NPT).

    Args:
      sim: `stablejax.md.Simulator` with the evaluation integrator.
      params: model parameters.
      initial_positions: [R, n, 3] Å held-out starting structures.
      settings: `EvalSettings`.
      criteria: `EvalCriterion`s (bare `StabilityCriterion`s are per-frame).
      species: [n] atomic numbers.
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None.
      observable_settings: {'r_max', 'dr', 'sigma'} (Å) of the structural observables.
      key: PRNG key (initial velocities, Langevin noise).
      progress: a progress bar in ps on a terminal, else a line per segment.
      label: name shown in the progress lines.
      trajectory_dir: if given, one extended-XYZ file per replica
        (`replica_<r>.extxyz`, readable with `ase.io.read(path, ":")` and OVITO): up to
        `trajectory_frames` evenly thinned recorded frames with positions (Å),
        velocities (Å/ASE time), cell and pbc, and in `info` time_ps,
        potential_energy_eV, stable_time_ps and `unstable` (True from the replica's
        combined stable time on).
      trajectory_frames: frames written per replica (>= 1).
    """
    if isinstance(criteria, StabilityCriterion | EvalCriterion):
        criteria = [criteria]
    criteria = [c if isinstance(c, EvalCriterion) else EvalCriterion(c) for c in criteria]
    if not criteria:
        raise ValueError("evaluate_model needs at least one stability criterion")
    names = [c.name for c in criteria]
    if len(set(names)) != len(names):
        raise ValueError(f"criteria names must be distinct, got {names}")
    if any(c.window_frames < 1 for c in criteria):
        raise ValueError("EvalCriterion.window_frames must be >= 1")
    kT = units.kT_from_kelvin(settings.temperature_K)
    R = int(np.shape(initial_positions)[0])
    dt_ps = settings.dt_fs / 1000.0
    periodic = box is not None
    vacf = _initial_vacf(sim, params, initial_positions, key, kT, settings)
    state = sim.init(key, params, jnp.asarray(initial_positions), kT)

    species_np = np.asarray(species)
    # Compiled once per system and criterion, shared by every model evaluated with them.
    sums = _ObservableSums(
        _observables_fn(
            tuple(species_np.tolist()), tuple(sorted(dict(observable_settings).items())), periodic
        )
    )
    stream = _StabilityStream(criteria, R)
    seg_steps = settings.segment_frames * settings.record_every
    n_steps = settings.n_steps
    oxygen_idx = np.flatnonzero(species_np == 8) if periodic else np.zeros(0, int)
    oxygen_traj, oxygen_times = [], []
    done = 0

    keep_every = 0
    kept: dict[str, list] = {"pos": [], "vel": [], "box": [], "energy": [], "times": []}
    if trajectory_dir is not None:
        if trajectory_frames < 1:
            raise ValueError(f"trajectory_frames must be >= 1; got {trajectory_frames}")
        keep_every = max(1, -(-(n_steps // settings.record_every) // int(trajectory_frames)))
    bar = progress_bar(
        round(n_steps * dt_ps, 6), desc=f"eval {label}", unit="ps", disable=not progress or None
    )
    while done < n_steps:
        steps = min(seg_steps, n_steps - done)
        steps -= steps % settings.record_every
        if keep_every:
            state, traj = sim.run(
                params, state, steps, record_every=settings.record_every, record_velocities=True
            )
        else:
            state, traj = sim.run(params, state, steps, record_every=settings.record_every)
        pos = np.asarray(traj.position)  # [R, F, n, 3]
        times = (done + settings.record_every * np.arange(1, pos.shape[1] + 1)) * dt_ps
        if keep_every:
            _keep_frames(kept, traj, pos, times, first_index=stream.n_pushed, every=keep_every)
        fbox = None if traj.box is None else np.asarray(traj.box)  # [R, F, 3] or [R, F, 3, 3]
        # Simulator-level failure: flagged frames, and frames that are not finite.
        flagged = np.asarray(traj.unstable, bool) | ~np.all(np.isfinite(pos), axis=(2, 3))
        if oxygen_idx.size:
            oxygen_traj.append(pos[:, :, oxygen_idx])
            oxygen_times.append(times)
        stream.push(pos, fbox, times, flagged)
        _release(stream, sums, stream.releasable())
        # A replica runs on until every criterion has marked it (or it went non-finite).
        finished = stream.finished()
        if finished.any():
            state = sim.freeze(state, jnp.asarray(finished))
        done += steps
        if progress:
            status = stream.status()
            if bar.disable:  # not a terminal: one line per segment
                logger.info(
                    f"[eval {label}] {done * dt_ps:8.2f}/{n_steps * dt_ps:.2f} ps | {status}"
                )
            else:
                bar.set_postfix_str(status)
                bar.update(round(steps * dt_ps, 6))
        if finished.all():
            break
    bar.close()
    # Frames of a trailing partial window: judged by the per-frame criteria only.
    _release(stream, sums, stream.n_pending)
    if keep_every:
        _write_trajectories(trajectory_dir, kept, species, box, stream.combined())
    diffusivity = None
    if oxygen_traj:
        diffusivity = _stable_diffusivity(
            oxygen_traj, oxygen_times, stream.combined(), settings.frame_dt_ps
        )
    return _result(
        stream,
        sums,
        max_time_ps=n_steps * dt_ps,
        resolution_ps=settings.frame_dt_ps * max(c.window_frames for c in criteria),
        vacf=vacf,
        diffusivity=diffusivity,
    )


def _initial_vacf(sim, params, initial_positions, key, kT, settings) -> np.ndarray | None:
    """[vacf_window] normalised VACF of the first 2 x vacf_window steps, mean over the
    replicas that stayed finite over the whole window (a flagged replica's frames are
    frozen copies); None when `settings.vacf_window` <= 1 or no replica stayed finite.
    Runs its own MD from `sim.init`: the caller starts the evaluation afresh."""
    if settings.vacf_window <= 1:
        return None
    state = sim.init(key, params, jnp.asarray(initial_positions), kT)
    n_v = 2 * settings.vacf_window
    state, vtraj = sim.run(params, state, n_v, record_every=1, record_velocities=True)
    v = np.asarray(vtraj.velocity)
    ok = np.all(np.isfinite(v), axis=(1, 2, 3)) & ~np.any(vtraj.unstable, axis=1)
    if not ok.any():
        return None
    per = np.asarray(
        observables.velocity_autocorrelation(jnp.asarray(v[ok]), window=settings.vacf_window)
    )
    return per.mean(axis=0)


@dataclasses.dataclass
class _ObservableSums:
    """Running sums of the structural observables over frames (in the order added).

    Attributes:
      fn: `_observables_fn(...)`, `(x [m, n, 3], box [m, ...]) -> {name: [m, bins]}`.
      sums: {name: [bins]} summed over the frames added, None before the first.
      n_frames: frames added.
    """

    fn: Callable
    sums: dict | None = None
    n_frames: int = 0

    def add(self, positions: np.ndarray, boxes: np.ndarray | None) -> None:
        """Adds frames `positions` [m, n, 3] Å with their boxes [m, 3] / [m, 3, 3] (None:
        no box, molecules); one sum per call, so the summation order follows the calls."""
        if positions.shape[0] == 0:
            return
        sel = jnp.asarray(positions)
        bsel = jnp.asarray(boxes) if boxes is not None else jnp.zeros((sel.shape[0], 3), sel.dtype)
        vals = {k: np.asarray(v) for k, v in self.fn(sel, bsel).items()}
        s_ = {k: v.sum(axis=0) for k, v in vals.items()}
        self.sums = s_ if self.sums is None else {k: self.sums[k] + s_[k] for k in s_}
        self.n_frames += int(positions.shape[0])

    def mean(self) -> dict:
        """{name: [bins]} mean over the frames added ({} if none)."""
        if self.sums is None:
            return {}
        return {k: v / self.n_frames for k, v in self.sums.items()}


@dataclasses.dataclass
class _StabilityStream:
    """Streaming stability judgement of recorded frames, segment by segment.

    Each criterion judges the frames pushed so far as soon as it can: per-frame criteria
    every frame, windowed ones (`EvalCriterion.window_frames` > 1) whole windows only,
    so the judgement does not depend on how the frames were split into pushes. Frames
    stay pending until every criterion has judged them (`releasable`, `pop`).

    Attributes:
      criteria: `EvalCriterion`s.
      n_replicas: R.
      first: {name: [R]} time (ps) of each replica's first crossing, +inf if none.
      non_finite: [R] time of the first frame the simulator had flagged (or not
        finite), +inf if none.
      judged: {name: frames (from the start) that criterion has judged}.
      n_pushed: frames pushed so far.
      pos, box, times: pending frames [R, f, n, 3], boxes [R, f, ...] (None without
        boxes), times [f] ps (None before the first push).
    """

    criteria: list
    n_replicas: int
    first: dict = dataclasses.field(init=False)
    non_finite: np.ndarray = dataclasses.field(init=False)
    judged: dict = dataclasses.field(init=False)
    n_pushed: int = 0
    pos: np.ndarray | None = None
    box: np.ndarray | None = None
    times: np.ndarray | None = None

    def __post_init__(self):
        R = self.n_replicas
        self.first = {c.name: np.full(R, np.inf) for c in self.criteria}
        self.non_finite = np.full(R, np.inf)
        self.judged = {c.name: 0 for c in self.criteria}
        self._checks = [_check_fn(c.criterion) for c in self.criteria]

    @property
    def n_pending(self) -> int:
        return 0 if self.pos is None else self.pos.shape[1]

    def push(self, pos, fbox, times, flagged) -> None:
        """Adds frames [R, F, n, 3] with boxes [R, F, ...] (or None), times [F] ps and the
        simulator's flags [R, F] bool, and judges what each criterion can judge now."""
        self.non_finite = np.minimum(self.non_finite, _first_time(flagged, times))
        self.pos = pos if self.pos is None else np.concatenate([self.pos, pos], 1)
        if fbox is not None:
            self.box = fbox if self.box is None else np.concatenate([self.box, fbox], 1)
        self.times = times if self.times is None else np.concatenate([self.times, times])
        self.n_pushed += pos.shape[1]
        base = self.n_pushed - self.n_pending  # global index of the first pending frame
        R = self.n_replicas
        for c, check in zip(self.criteria, self._checks, strict=True):
            w = c.window_frames
            start = self.judged[c.name] - base  # first pending frame c has not judged
            n_win = (self.n_pending - start) // w
            if n_win == 0:
                continue
            x = self.pos[:, start : start + n_win * w]
            b = None if self.box is None else self.box[:, start : start + n_win * w]
            tt = self.times[start : start + n_win * w]
            if w > 1:
                x = x.reshape(R, n_win, w, *x.shape[2:])
                b = None if b is None else b.reshape(R, n_win, w, *b.shape[2:])
            flags = np.asarray(
                check(jnp.asarray(x), None if b is None else jnp.asarray(b))
            )  # [R, n_win]
            self.first[c.name] = np.minimum(self.first[c.name], _first_time(flags, tt[::w]))
            self.judged[c.name] += n_win * w

    def releasable(self) -> int:
        """Pending frames (from the first) that every criterion has judged."""
        return min(self.judged.values()) - (self.n_pushed - self.n_pending)

    def pop(self, n: int):
        """Removes the first `n` pending frames: (positions [R, n, n_atoms, 3], boxes
        [R, n, ...] or None, times [n])."""
        pos, box, times = self.pos[:, :n], None, self.times[:n]
        self.pos, self.times = self.pos[:, n:], self.times[n:]
        if self.box is not None:
            box, self.box = self.box[:, :n], self.box[:, n:]
        return pos, box, times

    def combined(self) -> np.ndarray:
        """[R] combined stable time: the earliest crossing of any criterion or flag."""
        t = self.non_finite.copy()
        for v in self.first.values():
            t = np.minimum(t, v)
        return t

    def finished(self) -> np.ndarray:
        """[R] bool: non-finite, or marked by every criterion (nothing left to judge)."""
        done = np.isfinite(self.non_finite)
        every = np.ones(self.n_replicas, bool)
        for v in self.first.values():
            every &= np.isfinite(v)
        return done | every

    def status(self) -> str:
        """Progress line: unstable replicas, combined, per criterion and non-finite."""
        R = self.n_replicas
        return (
            f"unstable {int(np.isfinite(self.combined()).sum())}/{R} ("
            + ", ".join(f"{k} {int(np.isfinite(v).sum())}" for k, v in self.first.items())
            + f", non-finite {int(np.isfinite(self.non_finite).sum())})"
        )


def _release(stream: _StabilityStream, sums: _ObservableSums, n: int) -> None:
    """Pops the first `n` pending (judged) frames; those before each replica's combined
    stable time enter the observable sums."""
    if n <= 0:
        return
    pos, box, times = stream.pop(n)
    stable_frame = times[None, :] < stream.combined()[:, None]
    if stable_frame.any():
        sums.add(pos[stable_frame], None if box is None else box[stable_frame])


def _keep_frames(kept: dict, traj, pos, times, *, first_index: int, every: int) -> None:
    """Appends every `every`-th recorded frame (global frame index `first_index` + f) of
    one segment to `kept` (positions, velocities, boxes, potential energies, times)."""
    sel = (first_index + np.arange(pos.shape[1]) + 1) % every == 0
    kept["pos"].append(pos[:, sel])
    kept["vel"].append(None if traj.velocity is None else np.asarray(traj.velocity)[:, sel])
    kept["box"].append(None if traj.box is None else np.asarray(traj.box)[:, sel])
    kept["energy"].append(np.asarray(traj.potential_energy)[:, sel])
    kept["times"].append(times[sel])


def _stable_diffusivity(oxygen_traj, oxygen_times, stable_time_ps, frame_dt_ps):
    """Diffusivity of the oxygens' stable prefixes: segments [R, f, n_O, 3] and their
    times [f], frames from each replica's stable time [R] on left out (NaN)."""
    ox = np.concatenate(oxygen_traj, axis=1)  # [R, F, n_O, 3]
    ot = np.concatenate(oxygen_times)
    ox = np.where((ot[None, :] < stable_time_ps[:, None])[..., None, None], ox, np.nan)
    return _diffusivity(ox, frame_dt_ps)


def _result(
    stream: _StabilityStream,
    sums: _ObservableSums,
    *,
    max_time_ps: float,
    resolution_ps: float,
    vacf,
    diffusivity,
) -> EvalResult:
    """The `EvalResult` of a finished stream: combined and per-criterion stable times
    (censored at `max_time_ps`), causes, and the observables' means."""
    first, non_finite = stream.first, stream.non_finite
    t_comb = stream.combined()
    ever = np.isfinite(t_comb)
    cause, which = [], []
    for r in range(stream.n_replicas):
        if not ever[r]:
            cause.append(None)
            which.append(None)
        elif non_finite[r] <= t_comb[r]:
            cause.append("non_finite")
            which.append(None)
        else:
            cause.append("criterion")
            which.append(next(k for k, v in first.items() if v[r] == t_comb[r]))
    by_criterion = {}
    for k, v in first.items():
        t = np.minimum(v, non_finite)
        by_criterion[k] = (np.where(np.isfinite(t), t, max_time_ps), np.isfinite(t))
    return EvalResult(
        stable_time_ps=np.where(ever, t_comb, max_time_ps),
        ever_unstable=ever,
        max_time_ps=max_time_ps,
        resolution_ps=resolution_ps,
        observables=sums.mean(),
        n_stable_frames=sums.n_frames,
        vacf=vacf,
        diffusivity_A2_per_ps=diffusivity,
        unstable_cause=cause,
        unstable_criterion=which,
        by_criterion=by_criterion,
    )


@functools.lru_cache(maxsize=32)
def _observables_fn(species: tuple, settings: tuple, periodic: bool):
    """Jitted `structural_observables` of a batch of frames `(x [f, n, 3], box [f, 3] |
    [f, 3, 3]) -> {name: [f, bins]}`, one per system and settings (so that evaluating a
    second model compiles nothing new). Periodic: each frame's own box (NPT changes it)."""
    species_np = np.asarray(species)
    kw = dict(settings)

    def frame(x, b):
        return structural_observables(x, species_np, b if periodic else None, **kw)

    return jax.jit(jax.vmap(frame))


@functools.lru_cache(maxsize=32)
def _check_fn(criterion: StabilityCriterion):
    """Jitted `criterion.is_unstable`, one per criterion (a `StabilityCriterion` is a
    hashable NamedTuple; `criterion.is_unstable` is a new bound method at every access,
    which `jax.jit` would trace and compile again for every model)."""
    return jax.jit(criterion.is_unstable)


def _first_time(flags: np.ndarray, times: np.ndarray) -> np.ndarray:
    """[R] time of each row's first True flag, +inf if none (NumPy float64, exact times)."""
    flags = np.asarray(flags, bool)
    idx = np.argmax(flags, axis=-1)
    return np.where(flags.any(axis=-1), np.asarray(times, np.float64)[idx], np.inf)


def _diffusivity(oxygens: np.ndarray, frame_dt_ps: float) -> float | None:
    """Mean D (Å^2/ps) over replicas from the stable prefix of their oxygen trajectories."""
    ds = []
    for rep in oxygens:  # [F, n_O, 3], NaN after instability
        ok = np.all(np.isfinite(rep), axis=(1, 2))
        n_ok = int(np.argmin(ok)) if not ok.all() else len(ok)
        if n_ok < 8:
            continue
        max_lag = n_ok // 2
        msd = observables.mean_squared_displacement(jnp.asarray(rep[:n_ok]), max_lag=max_lag)
        ds.append(float(observables.diffusion_coefficient(msd, frame_dt_ps)))
    return float(np.mean(ds)) if ds else None


def observable_errors(result: EvalResult, reference: Mapping[str, np.ndarray], dr: float) -> dict:
    """MAE of each evaluation observable against its reference: dr * sum |O - O_ref| (Å·unit)."""
    out = {}
    for name, ref in reference.items():
        val = result.observables.get(name)
        if val is None or not np.all(np.isfinite(val)):
            out[f"{name}_mae"] = None
        else:
            out[f"{name}_mae"] = float(dr * np.sum(np.abs(np.asarray(val) - np.asarray(ref))))
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def write_report(
    out_dir: str,
    results: Mapping[str, EvalResult],
    *,
    reference: Mapping[str, np.ndarray],
    bins: np.ndarray,
    dr: float,
    qm_metrics: Mapping[str, Mapping],
    title: str,
    notes: str = "",
    extra: Mapping | None = None,
    paired: Sequence[tuple[str, str]] | None = None,
) -> dict:
    """Writes final_metrics.json, survival/observable/VACF plots and report.md.

    `paired`: (first, second) model names, each tested as "second vs first" with
    `paired_stable_time_test`; by default the model 'stable' (else the second model)
    against every other model.

    With several processes (`jax.distributed`) every process returns the metrics and
    process 0 alone writes the files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = {}
    for name, res in results.items():
        m = res.summary()
        m.update(observable_errors(res, reference, dr))
        q = qm_metrics.get(name, {})
        m["energy_mae_meV"] = q.get("energy_mae_meV")
        m["force_mae_meV_per_A"] = q.get("force_mae_meV_per_A")
        final[name] = m
    # Paired tests of the trained model against each other model (same initial states):
    # "stable" when present (the StABlE study: vs baseline, vs baseline_plus), else the
    # second model against the first.
    names = list(results)
    if paired is None and len(names) >= 2:
        target = "stable" if "stable" in results else names[1]
        paired = [(other, target) for other in names if other != target]
    if paired:
        tests = {}
        for other, target in paired:
            a, b = results[other].stable_time_ps, results[target].stable_time_ps
            if other != target and a.shape == b.shape:
                tests[f"{target} vs {other}"] = paired_stable_time_test(a, b) | {
                    "models": [other, target]
                }
        if tests:
            final["paired_tests"] = tests
            final["paired_test"] = next(iter(tests.values()))  # vs the first model
    if extra:
        final.update(extra)
    if jax.process_index() != 0:
        return final

    os.makedirs(out_dir, exist_ok=True)
    figs = []
    # Survival curves.
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, res in results.items():
        t = np.linspace(0, res.max_time_ps, 400)
        surv, lo, hi = survival_estimate(res.stable_time_ps, res.ever_unstable, t)
        (line,) = ax.step(t, surv, where="post", label=f"{name} ({res.ever_unstable.sum()}"
                          f"/{res.ever_unstable.size} unstable)")  # fmt: skip
        ax.fill_between(t, lo, hi, step="post", color=line.get_color(), alpha=0.15, lw=0)
        n_cens = int((~res.ever_unstable).sum())
        if n_cens:  # censored replicas: still stable at the end of the run
            ax.plot([res.max_time_ps], [surv[-1]], "|", ms=14, mew=2, color=line.get_color())
            ax.annotate(f"{n_cens} censored", (res.max_time_ps, surv[-1]),
                        textcoords="offset points", xytext=(-4, 6), ha="right",
                        fontsize=8, color=line.get_color())  # fmt: skip
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("fraction of stable replicas (Kaplan-Meier)")
    ax.set_ylim(-0.02, 1.1)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "survival.png"), dpi=120)
    plt.close(fig)
    figs.append(("Survival", "survival.png"))
    # Observables.
    for obs_name, ref in reference.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(bins, ref, "k-", lw=2, label="reference")
        for name, res in results.items():
            if obs_name in res.observables:
                ax.plot(bins, res.observables[obs_name], label=name, alpha=0.8)
        ax.set_xlabel("r (Å)")
        ax.set_ylabel(obs_name)
        ax.legend()
        fig.tight_layout()
        fname = "obs_" + "".join(c for c in obs_name if c.isalnum() or c == "_") + ".png"
        fig.savefig(os.path.join(out_dir, fname), dpi=120)
        plt.close(fig)
        figs.append((obs_name, fname))
    # VACF.
    if any(res.vacf is not None for res in results.values()):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, res in results.items():
            if res.vacf is not None:
                ax.plot(np.arange(len(res.vacf)), res.vacf, label=name)
        ax.set_xlabel("lag (steps)")
        ax.set_ylabel("VACF (normalised)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "vacf.png"), dpi=120)
        plt.close(fig)
        figs.append(("VACF", "vacf.png"))

    keys = [
        "median_stable_time_ps",
        "median_stable_time_ci_ps",
        "median_stable_time_ci_level",
        "mean_stable_time_ps",
        "n_unstable",
        "n_replicas",
        "max_time_ps",
        "energy_mae_meV",
        "force_mae_meV_per_A",
        "diffusivity_A2_per_ps",
    ] + [f"{k}_mae" for k in reference]
    names = list(results)
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(final[n].get(k)) for n in names) + " |")
    lines.append("")
    res0 = next(iter(results.values()))
    crit_names = list(res0.by_criterion)
    if crit_names:
        lines += [
            "Stable time by criterion (median [CI] ps; unstable replicas; each criterion "
            "alone, non-finite steps included). The table above uses the combined "
            "criterion: the first crossing of any of them.",
            "",
            "| criterion | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for c in crit_names:
            cells = []
            for n in names:
                bc = final[n]["by_criterion"].get(c)
                if bc is None:
                    cells.append("–")
                    continue
                lo_, hi_ = bc["median_stable_time_ci_ps"]
                cells.append(
                    f"{bc['median_stable_time_ps']:.3g} [{lo_:.3g}, {hi_:.3g}]; "
                    f"{bc['n_unstable']}/{final[n]['n_replicas']}"
                )
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        cells = []
        for n in names:
            causes = final[n]["unstable_cause"]
            cells.append(
                f"{final[n]['median_stable_time_ps']:.3g}; {final[n]['n_unstable']}/"
                f"{final[n]['n_replicas']} ({sum(c == 'non_finite' for c in causes)} non-finite)"
            )
        lines += ["| combined | " + " | ".join(cells) + " |", ""]
    lines.append(
        f"Stable time = first recorded frame that crosses an evaluation criterion, or at "
        f"which the simulator had flagged a non-finite step; time resolution "
        f"{res0.resolution_ps:g} ps; replicas never unstable count as "
        f"{res0.max_time_ps:g} ps in medians and means and as censored (not failed) in the "
        f"survival curve."
    )
    for pt in final.get("paired_tests", {}).values():
        lines.append(
            f"Paired test on the same initial states ({pt['test']}): {pt['models'][1]} "
            f"outlives {pt['models'][0]} in {pt['n_longer']} of {pt['n']} replicas, shorter in "
            f"{pt['n_shorter']}; median difference {pt['median_difference_ps']:.3g} ps; "
            f"p = {pt['p_value']:.3g}."
        )
    lines.append("")
    for caption, fname in figs:
        lines += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    write_text(os.path.join(out_dir, "report.md"), "\n".join(lines))
    # Written last: its presence marks the evaluation as done, with every output there.
    write_json(os.path.join(out_dir, "final_metrics.json"), _jsonable(final))
    return final


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.floating | np.integer | np.bool_):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
