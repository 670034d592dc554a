"""Evaluation of trained models by long MD: stable times, observables, QM errors, plots.

`evaluate_model` runs all replicas of one model from given initial states with the
evaluation criterion and returns per-replica stable times (first passage, at the
resolution of the recorded frames), the observables averaged over the stable parts
only (h(r) for molecules; O-O, O-H, H-H RDFs for periodic water), the VACF of the
first `vacf_window` steps, and the diffusivity (water oxygens) of the stable prefix.
`compare` writes `final_metrics.json`, figures and `report.md` for a baseline and a
StABlE-trained model evaluated on the same initial states.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from stablejax import observables, units
from stablejax.stability import StabilityCriterion, first_unstable_time, survival_curve

#: Element pairs of the water RDFs (O-O, O-H, H-H).
WATER_PAIRS = ((8, 8), (8, 1), (1, 1))


@dataclasses.dataclass
class EvalSettings:
    """Evaluation MD settings (units in names).

    Attributes:
      time_ps: simulated time per replica.
      dt_fs: time step.
      temperature_K: thermostat temperature.
      record_every: steps between recorded frames (the stable-time resolution is
        record_every * dt_fs; the RDF-MAE criterion is evaluated on windows of
        `window_frames` recorded frames).
      vacf_window: VACF window in steps (velocities recorded every step for
        2 x vacf_window steps at the start of the run).
      segment_frames: frames per simulated segment (bounds host memory).
      window_frames: frames per window of a windowed criterion (RDF MAE); 1 for
        per-frame criteria.
    """

    time_ps: float
    dt_fs: float
    temperature_K: float
    record_every: int
    vacf_window: int = 100
    segment_frames: int = 50
    window_frames: int = 1

    @property
    def n_steps(self) -> int:
        steps = int(round(self.time_ps * 1000.0 / self.dt_fs))
        return max(self.record_every, steps - steps % self.record_every)

    @property
    def frame_dt_ps(self) -> float:
        return self.record_every * self.dt_fs / 1000.0


@dataclasses.dataclass
class EvalResult:
    """What one model's evaluation produced (NumPy arrays, units in names)."""

    stable_time_ps: np.ndarray  # [R], = max_time_ps when never unstable (censored)
    ever_unstable: np.ndarray  # [R] bool
    max_time_ps: float
    resolution_ps: float
    observables: dict  # name -> [bins] averaged over stable frames (NaN if none)
    n_stable_frames: int
    vacf: np.ndarray | None  # [window], normalised, mean over replicas
    diffusivity_A2_per_ps: float | None

    def summary(self) -> dict:
        t = self.stable_time_ps
        lo, hi, level = median_confidence_interval(t)
        return {
            "median_stable_time_ps": float(np.median(t)),
            # Distribution-free CI of the median (order statistics); `level` is the
            # coverage actually achieved (below 0.95 when there are few replicas).
            "median_stable_time_ci_ps": [lo, hi],
            "median_stable_time_ci_level": level,
            "mean_stable_time_ps": float(np.mean(t)),
            "n_replicas": int(t.size),
            "n_unstable": int(self.ever_unstable.sum()),
            "max_time_ps": float(self.max_time_ps),
            "stable_time_resolution_ps": float(self.resolution_ps),
            "n_stable_frames": int(self.n_stable_frames),
            "diffusivity_A2_per_ps": self.diffusivity_A2_per_ps,
            "stable_times_ps": [float(v) for v in t],  # per replica, for your own statistics
        }


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


def _sym(z: int) -> str:
    return {1: "H", 6: "C", 7: "N", 8: "O"}.get(int(z), str(z))


def evaluate_model(
    sim,
    params,
    initial_positions,
    *,
    settings: EvalSettings,
    criterion: StabilityCriterion,
    species,
    box,
    observable_settings: Mapping,
    key,
    progress: bool = True,
    label: str = "",
) -> EvalResult:
    """Long MD of all replicas with the evaluation criterion.

    Args:
      sim: `stablejax.md.Simulator` with the evaluation integrator.
      params: model parameters.
      initial_positions: [R, n, 3] Å held-out starting structures.
      settings: `EvalSettings`.
      criterion: evaluation criterion; per-frame metrics get frames [R, F, n, 3],
        windowed ones (settings.window_frames > 1) get [R, W, window, n, 3].
      species: [n] atomic numbers.
      box: [3] Å or None.
      observable_settings: {'r_max', 'dr', 'sigma'} (Å) of the structural observables.
      key: PRNG key (initial velocities, Langevin noise).
      progress: print a line per segment.
      label: name shown in the progress lines.
    """
    kT = units.kT_from_kelvin(settings.temperature_K)
    state = sim.init(key, params, jnp.asarray(initial_positions), kT)
    R = int(state.position.shape[0])
    dt_ps = settings.dt_fs / 1000.0

    # VACF: velocities every step at the start of the run.
    vacf = None
    if settings.vacf_window > 1:
        n_v = 2 * settings.vacf_window
        _, vtraj = sim.run(params, state, n_v, record_every=1, record_velocities=True)
        v = np.asarray(vtraj.velocity)
        ok = np.all(np.isfinite(v), axis=(1, 2, 3))
        if ok.any():
            per = np.asarray(
                observables.velocity_autocorrelation(
                    jnp.asarray(v[ok]), window=settings.vacf_window
                )
            )
            vacf = per.mean(axis=0)

    obs_fn = jax.jit(lambda x: structural_observables(x, species, box, **dict(observable_settings)))
    check = jax.jit(lambda x: _unstable(criterion, x))

    seg_steps = settings.segment_frames * settings.record_every
    n_steps = settings.n_steps
    unstable = np.zeros(R, bool)
    first_time = np.full(R, np.inf)
    sums, n_frames = None, 0
    window = max(1, settings.window_frames)
    carry = None  # frames left over for windows that span segments
    oxygen_traj = []
    done = 0
    while done < n_steps:
        steps = min(seg_steps, n_steps - done)
        steps -= steps % settings.record_every
        state, traj = sim.run(params, state, steps, record_every=settings.record_every)
        pos = np.asarray(traj.position)  # [R, F, n, 3]
        times = (done + settings.record_every * np.arange(1, pos.shape[1] + 1)) * dt_ps
        if window == 1:
            flags = np.asarray(check(jnp.asarray(pos)))  # [R, F]
            frame_flags = flags
        else:
            buf = pos if carry is None else np.concatenate([carry, pos], axis=1)
            n_win = buf.shape[1] // window
            frame_flags = np.zeros(pos.shape[:2], bool)
            if n_win:
                win = buf[:, : n_win * window].reshape(R, n_win, window, *buf.shape[2:])
                wflags = np.asarray(check(jnp.asarray(win)))  # [R, n_win]
                per_frame = np.repeat(wflags, window, axis=1)  # frames of buf
                offset = 0 if carry is None else carry.shape[1]
                covered = per_frame[:, offset:]
                frame_flags[:, : covered.shape[1]] = covered
            carry = buf[:, n_win * window :]
        frame_flags = frame_flags | ~np.all(np.isfinite(pos), axis=(2, 3))
        t_first = np.asarray(first_unstable_time(jnp.asarray(frame_flags), jnp.asarray(times)))
        newly = ~unstable & np.isfinite(t_first)
        first_time[newly] = t_first[newly]
        # Frames that count as stable: before the replica's first unstable frame.
        stable_frame = times[None, :] < first_time[:, None]
        if stable_frame.any():
            sel = pos[stable_frame]
            vals = {k: np.asarray(v) for k, v in obs_fn(jnp.asarray(sel)).items()}
            s = {k: v.sum(axis=0) for k, v in vals.items()}
            sums = s if sums is None else {k: sums[k] + s[k] for k in s}
            n_frames += int(stable_frame.sum())
        if box is not None:
            ox = np.asarray(species) == 8
            if ox.any():
                oxygen_traj.append(np.where(stable_frame[..., None, None], pos[:, :, ox], np.nan))
        unstable |= newly
        if unstable.any():
            state = sim.freeze(state, jnp.asarray(unstable))
        done += steps
        if progress:
            print(
                f"[eval {label}] {done * dt_ps:8.2f}/{n_steps * dt_ps:.2f} ps | "
                f"unstable {unstable.sum()}/{R}",
                flush=True,
            )
        if unstable.all():
            break
    max_time = n_steps * dt_ps
    stable_time = np.where(np.isfinite(first_time), first_time, max_time)
    obs = {}
    if sums is not None:
        obs = {k: v / n_frames for k, v in sums.items()}
    diffusivity = None
    if oxygen_traj:
        diffusivity = _diffusivity(np.concatenate(oxygen_traj, axis=1), settings.frame_dt_ps)
    return EvalResult(
        stable_time_ps=stable_time,
        ever_unstable=np.isfinite(first_time),
        max_time_ps=max_time,
        resolution_ps=settings.frame_dt_ps * window,
        observables=obs,
        n_stable_frames=n_frames,
        vacf=vacf,
        diffusivity_A2_per_ps=diffusivity,
    )


def _unstable(criterion: StabilityCriterion, x):
    values = criterion.metric(x)
    return criterion.flags(values) | ~jnp.isfinite(values)


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
) -> dict:
    """Writes final_metrics.json, survival/observable/VACF plots and report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    final = {}
    for name, res in results.items():
        m = res.summary()
        m.update(observable_errors(res, reference, dr))
        q = qm_metrics.get(name, {})
        m["energy_mae_meV"] = q.get("energy_mae_meV")
        m["force_mae_meV_per_A"] = q.get("force_mae_meV_per_A")
        final[name] = m
    if len(results) == 2:
        first, second = results.values()
        if first.stable_time_ps.shape == second.stable_time_ps.shape:
            final["paired_test"] = paired_stable_time_test(
                first.stable_time_ps, second.stable_time_ps
            ) | {"models": list(results)}
    if extra:
        final.update(extra)
    with open(os.path.join(out_dir, "final_metrics.json"), "w") as f:
        json.dump(_jsonable(final), f, indent=2)

    figs = []
    # Survival curves.
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, res in results.items():
        t = np.linspace(0, res.max_time_ps, 200)
        ax.step(t, np.asarray(survival_curve(jnp.asarray(res.stable_time_ps), jnp.asarray(t))),
                where="post", label=name)  # fmt: skip
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("fraction of stable replicas")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
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
    lines.append(
        f"Stable time = first recorded frame that crosses the evaluation criterion; time "
        f"resolution {res0.resolution_ps:g} ps; replicas never unstable count as "
        f"{res0.max_time_ps:g} ps (censored)."
    )
    if "paired_test" in final:
        pt = final["paired_test"]
        lines.append(
            f"Paired test on the same initial states ({pt['test']}): {pt['models'][1]} "
            f"outlives {pt['models'][0]} in {pt['n_longer']} of {pt['n']} replicas, shorter in "
            f"{pt['n_shorter']}; median difference {pt['median_difference_ps']:.3g} ps; "
            f"p = {pt['p_value']:.3g}."
        )
    lines.append("")
    for caption, fname in figs:
        lines += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
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
