"""Evaluation: blow-ups counted, collapsed water seen, per-frame boxes, censored survival,
summaries over seeds."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pipeline
from experiments.configs import water as water_config
from stablejax import evaluation, md, observables, stability
from stablejax.data import Dataset
from stablejax.evaluation import (
    EvalCriterion,
    EvalSettings,
    evaluate_model,
    survival_estimate,
    write_report,
)
from stablejax.md.simulator import Trajectory

# ------------------------------------------------------------------ helpers


class ReplaySim:
    """Stands in for `md.Simulator`: replays prescribed frames [R, T, n, 3] (and boxes)."""

    def __init__(self, frames, boxes=None, flagged=None):
        self.frames = np.asarray(frames)
        self.boxes = None if boxes is None else np.asarray(boxes)
        R, T = self.frames.shape[:2]
        self.flagged = np.zeros((R, T), bool) if flagged is None else np.asarray(flagged)
        self.frozen_at = np.full(R, -1)

    def init(self, key, params, positions, kT):
        return 0  # the state is the number of frames replayed

    def run(self, params, state, n_steps, *, record_every, record_velocities=False):
        F = n_steps // record_every
        sl = slice(state, state + F)
        return state + F, Trajectory(
            position=self.frames[:, sl],
            velocity=None,
            potential_energy=np.zeros(self.frames[:, sl].shape[:2]),
            kinetic_energy=np.zeros(self.frames[:, sl].shape[:2]),
            temperature=np.zeros(self.frames[:, sl].shape[:2]),
            step=np.zeros(self.frames[:, sl].shape[:2], int),
            box=None if self.boxes is None else self.boxes[:, sl],
            unstable=self.flagged[:, sl],
        )

    def freeze(self, state, mask):
        mask = np.asarray(mask)
        self.frozen_at[mask & (self.frozen_at < 0)] = state
        return state


def _water_lattice(n_side=4, spacing=3.1, seed=0):
    """64 rigid-geometry waters on a jittered cubic lattice (species, positions [n, 3], box)."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centres = (g + 0.5) * spacing
    oh, ang = 0.96, np.deg2rad(104.5)
    pos, species = [], []
    for c in centres:
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        h1 = q @ np.array([oh, 0.0, 0.0])
        h2 = q @ np.array([oh * np.cos(ang), oh * np.sin(ang), 0.0])
        pos += [c, c + h1, c + h2]
        species += [8, 1, 1]
    return np.array(species), np.array(pos), np.full(3, n_side * spacing)


# ------------------------------------------------------------------ 1. non-finite replicas


def test_non_finite_replicas_are_unstable_and_excluded():
    """2 of 4 replicas hit a NaN energy after a chosen number of steps: they are unstable
    from the first frame at or after it (cause 'non_finite'), the other two are censored,
    and the observables are those of the stable frames only (the failed replicas' frozen
    frames never enter them)."""
    # Two free atoms at 0 K; a constant force pulls atom 0 along +x, and the energy is
    # NaN beyond a wall at x = 0. Replicas 1 and 3 start where they reach the wall at
    # step `fail_step`; replicas 0 and 2 start far away and never do.
    from stablejax import units

    dt_fs, force, mass = 0.5, 0.02, 12.0  # fs, eV/Å, amu (carbon)
    species = np.array([6, 6])

    def energy_fn(params, x, edges, box):
        return jnp.where(x[0, 0] > 0.0, jnp.nan, -force * x[0, 0])

    fail_step = 130
    t_fail = fail_step * dt_fs * units.fs
    x_start = -0.5 * (force / mass) * t_fail**2  # velocity Verlet is exact here
    x0 = np.array([[0.0, 0.0, 0.0], [1.52, 0.0, 0.0]])
    shifts = np.array([-1e4, x_start, -2e4, x_start])[:, None, None] * np.array([1.0, 0, 0])
    init = x0[None] + shifts
    record_every = 10
    frame_ps = record_every * dt_fs / 1000

    def simulator():
        return md.Simulator(
            energy_fn, species=species, integrator=md.NVE(dt_fs=dt_fs), chunk_steps=50
        )

    settings = EvalSettings(
        time_ps=0.15, dt_fs=dt_fs, temperature_K=0.0, record_every=record_every, vacf_window=0
    )
    crit = stability.bond_length_criterion(np.array([[0, 1]]), np.array([1.52]), threshold=1e3)
    obs = {"r_max": 4.0, "dr": 0.01, "sigma": 0.0}
    res = evaluate_model(
        simulator(), None, init, settings=settings, criteria=[crit], species=species, box=None,
        observable_settings=obs, key=jax.random.PRNGKey(0), progress=False,
    )  # fmt: skip
    assert list(res.ever_unstable) == [False, True, False, True]
    assert res.unstable_cause == [None, "non_finite", None, "non_finite"]
    for r in (1, 3):  # within one recording interval of the failing step
        assert fail_step * dt_fs / 1000 - 1e-9 <= res.stable_time_ps[r]
        assert res.stable_time_ps[r] <= fail_step * dt_fs / 1000 + frame_ps + 1e-9
    np.testing.assert_allclose(res.stable_time_ps[[0, 2]], settings.n_steps * dt_fs / 1000)
    # The bond criterion alone never fires, but non-finite steps count for it too.
    _, ever = res.by_criterion["bond_length_deviation"]
    np.testing.assert_array_equal(ever, res.ever_unstable)
    # Observables from an independent construction: the same MD, frames before each
    # replica's stable time only.
    sim = simulator()
    state = sim.init(jax.random.PRNGKey(0), None, jnp.asarray(init), 0.0)
    _, traj = sim.run(None, state, settings.n_steps, record_every=record_every)
    assert traj.unstable[1].any() and not traj.unstable[0].any()
    times = frame_ps * np.arange(1, traj.position.shape[1] + 1)
    keep = times[None, :] < np.where(res.ever_unstable, res.stable_time_ps, np.inf)[:, None]
    expected = np.asarray(
        observables.distance_histogram(jnp.asarray(traj.position[keep]), **obs)
    ).mean(0)
    np.testing.assert_allclose(res.observables["h(r)"], expected, atol=1e-12)
    assert res.n_stable_frames == int(keep.sum()) == 2 * 30 + 2 * 13
    # The frozen frames differ from the healthy replicas' late frames: including them
    # would change h(r).
    wrong = np.asarray(
        observables.distance_histogram(jnp.asarray(traj.position.reshape(-1, 2, 3)), **obs)
    ).mean(0)
    assert np.abs(wrong - expected).max() > 0.1


# ------------------------------------------------------------------ 2. collapsed water


def _water_dataset():
    species, x, box = _water_lattice()
    rng = np.random.default_rng(1)
    frames = x[None] + 0.05 * rng.normal(size=(20,) + x.shape)
    return Dataset(species=species, positions=frames, box=box), x


def test_collapsed_water_is_unstable_under_the_water_evaluation_criteria():
    """A water box whose molecules sit inside each other passes the RDF-MAE criterion
    (one pair barely moves the RDF) but the water evaluation must count it unstable."""
    from stablejax.data import topology as topo

    dataset, x = _water_dataset()
    config = water_config.get_config("quick")
    system = pipeline.system_topology(dataset, dataset)
    ref_rdfs = {
        p: np.asarray(
            observables.radial_distribution_function(
                jnp.asarray(dataset.positions), dataset.species, dataset.box, pair=p,
                **pipeline.RDF_EVAL,
            )
        ).mean(0)
        for p in observables.WATER_PAIRS
    }  # fmt: skip
    record_every, dt_fs = 20, 1.0
    frame_ps = record_every * dt_fs / 1000
    criteria = pipeline.evaluation_criteria(config, system, frame_ps=frame_ps, ref_rdfs=ref_rdfs)
    names = [c.name for c in criteria]
    assert names == ["rdf_mae", "min_intermolecular_distance"]
    # Replica 1: from frame 10 on, molecule 1 sits on molecule 0 (O-O 1.0 Å).
    T, R = 40, 2
    rng = np.random.default_rng(2)
    traj = x[None, None] + 0.05 * rng.normal(size=(R, T) + x.shape)
    shift = (x[0] + [1.0, 0, 0]) - x[3]
    traj[1, 10:, 3:6] += shift
    assert len(topo.find_bonds(dataset.species, traj[1, 12], box=dataset.box)) > len(system.bonds)
    settings = EvalSettings(
        time_ps=T * frame_ps, dt_fs=dt_fs, temperature_K=300.0, record_every=record_every,
        vacf_window=0, segment_frames=7,
    )  # fmt: skip
    res = evaluate_model(
        ReplaySim(traj), None, traj[:, 0], settings=settings, criteria=criteria,
        species=dataset.species, box=dataset.box, observable_settings=pipeline.RDF_EVAL,
        key=jax.random.PRNGKey(0), progress=False,
    )  # fmt: skip
    rdf_t, rdf_ever = res.by_criterion["rdf_mae"]
    assert not rdf_ever.any()  # the paper's criterion alone misses it ...
    md_t, md_ever = res.by_criterion["min_intermolecular_distance"]
    np.testing.assert_array_equal(md_ever, [False, True])  # ... the physical one does not
    np.testing.assert_allclose(md_t[1], 11 * frame_ps)  # frame index 10 -> time 11 frames
    assert list(res.ever_unstable) == [False, True]
    assert res.unstable_cause == [None, "criterion"]
    assert res.unstable_criterion == [None, "min_intermolecular_distance"]
    # Only the 10 stable frames of replica 1 entered the RDFs (windows of 0.2 ps = 10
    # frames: the trailing partial window is judged per frame).
    assert res.n_stable_frames == T + 10
    summary = res.summary()
    assert summary["by_criterion"]["rdf_mae"]["n_unstable"] == 0
    assert summary["by_criterion"]["min_intermolecular_distance"]["n_unstable"] == 1


def test_molecule_guard_sees_a_molecule_folding_into_itself():
    """Bond lengths intact, two non-bonded atoms 0.5 Å apart: the guard fires, the bond
    criterion does not."""
    x = np.array([[0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]], float)
    bonds = np.array([[0, 1], [1, 2], [2, 3]])
    eq = np.ones(3)
    guard = stability.nonbonded_contact_criterion(4, bonds)
    bond = stability.bond_length_criterion(bonds, eq, threshold=0.5)
    folded = np.array([[0, 0, 0], [1.0, 0, 0], [1.0, 1.0, 0], [0.3, 0.4, 0.0]])
    assert not bool(guard.is_unstable(jnp.asarray(x)))
    assert bool(guard.is_unstable(jnp.asarray(folded)))
    assert not bool(bond.is_unstable(jnp.asarray(folded)))
    np.testing.assert_allclose(guard.metric(jnp.asarray(folded)), 0.5)
    assert guard.threshold == stability.NONBONDED_CONTACT_THRESHOLD == 0.8
    # The aspirin/tetrapeptide configs evaluate with the guard beside the paper's criterion.
    from experiments.configs import aspirin, tetrapeptide

    for module in (aspirin, tetrapeptide):
        c = module.get_config("quick")
        assert c.stability.eval_criterion == "bond_length_deviation"
        assert c.stability.eval_guard == "min_nonbonded_distance"


def test_paper_water_presets_use_the_reference_10_ps_rdf_window():
    for preset in ("paper", "npt"):
        c = water_config.get_config(preset)
        assert c.stability.rdf_window_ps == 10.0
        assert c.stability.eval_guard == "min_intermolecular_distance"
        assert c.stability.eval_guard_threshold == 1.2


# ------------------------------------------------------------------ NPT: per-frame boxes


def test_npt_observables_and_criteria_use_each_frames_box():
    """Ideal-gas frames in a box 6 % larger than the dataset's: g(r) must be ~1 (the
    dataset box would give (1/1.06)^3 = 0.84)."""
    n, T, R = 300, 12, 2
    box0 = np.full(3, 14.0)
    rng = np.random.default_rng(0)
    scale = np.linspace(1.0, 1.06, T)  # the box grows along the run
    boxes = np.broadcast_to((scale[:, None] * box0)[None], (R, T, 3)).copy()
    traj = rng.uniform(size=(R, T, n, 3)) * boxes[:, :, None, :]
    species = np.full(n, 18)
    obs = {"r_max": 6.0, "dr": 0.05, "sigma": 0.0}
    never = stability.intermolecular_distance_criterion(np.arange(n), threshold=0.0, box=box0)
    settings = EvalSettings(time_ps=T * 0.01, dt_fs=1.0, temperature_K=100.0, record_every=10,
                            vacf_window=0, segment_frames=5)  # fmt: skip
    res = evaluate_model(
        ReplaySim(traj, boxes), None, traj[:, 0], settings=settings, criteria=[never],
        species=species, box=box0, observable_settings=obs, key=jax.random.PRNGKey(0),
        progress=False,
    )  # fmt: skip
    r = observables.bin_centers(obs["r_max"], obs["dr"])
    g = res.observables["g(r)"][(r > 2.5) & (r < 6.0)]
    assert abs(g.mean() - 1.0) < 0.02, g.mean()
    # The criteria take per-frame boxes too: a pair across the boundary of the larger box.
    x = np.zeros((2, 3))
    x[1, 0] = 14.8  # 0.2 Å apart through the boundary of a 15 Å box, 0.8 Å in a 14 Å box
    crit = stability.intermolecular_distance_criterion(np.arange(2), threshold=0.5, box=box0)
    assert not bool(crit.is_unstable(jnp.asarray(x)))
    assert bool(crit.is_unstable(jnp.asarray(x), jnp.full(3, 15.0)))
    # RDF MAE over a window with per-frame boxes vs the ideal-gas reference.
    refs = {(18, 18): np.ones(observables.bin_centers(6.0, 0.01).size)}
    rdf = stability.rdf_mae_criterion(species, box0, refs, threshold=3.0)
    own = float(rdf.metric(jnp.asarray(traj[0, -4:]), jnp.asarray(boxes[0, -4:])))
    per_frame = np.stack([
        np.asarray(observables.radial_distribution_function(
            jnp.asarray(traj[0, f]), species, boxes[0, f], pair=(18, 18), r_max=6.0, dr=0.01,
            sigma=0.0))
        for f in range(T - 4, T)
    ])  # fmt: skip
    np.testing.assert_allclose(own, 0.01 * np.abs(per_frame.mean(0) - 1.0).sum(), rtol=1e-10)
    wrong = float(rdf.metric(jnp.asarray(traj[0, -4:])))
    assert abs(own - wrong) > 1e-3


# ------------------------------------------------------------------ 3. censored survival


@pytest.mark.parametrize("k", [0, 3, 8])
def test_survival_curve_ends_at_the_fraction_never_unstable(k):
    R, horizon = 8, 5.0
    t = np.full(R, horizon)
    t[k:] = np.linspace(0.5, 4.5, R - k)
    ever = np.arange(R) >= k
    grid = np.linspace(0, horizon, 101)
    surv, lo, hi = survival_estimate(t, ever, grid)
    assert surv[0] == 1.0
    np.testing.assert_allclose(surv[-1], k / R)
    assert np.all(np.diff(surv) <= 1e-12)
    assert np.all(lo <= surv + 1e-12) and np.all(hi >= surv - 1e-12)
    # Empirical fraction still stable at every grid time (all followed to the horizon).
    np.testing.assert_allclose(surv, [(np.where(ever, t, np.inf) > g).mean() for g in grid])


def test_report_has_by_criterion_and_causes(tmp_path):
    from stablejax.evaluation import EvalResult

    def result(times, ever, cause):
        return EvalResult(
            stable_time_ps=np.array(times), ever_unstable=np.array(ever), max_time_ps=2.0,
            resolution_ps=0.02, observables={}, n_stable_frames=3, vacf=None,
            diffusivity_A2_per_ps=None, unstable_cause=cause, unstable_criterion=[None] * 2,
            by_criterion={"rdf_mae": (np.array([2.0, 2.0]), np.array([False, False])),
                          "min_intermolecular_distance": (np.array(times), np.array(ever))},
        )  # fmt: skip

    results = {
        "baseline": result([0.4, 2.0], [True, False], ["criterion", None]),
        "stable": result([1.0, 2.0], [True, False], ["non_finite", None]),
    }
    final = write_report(str(tmp_path), results, reference={}, bins=np.zeros(1), dr=0.01,
                         qm_metrics={}, title="t")  # fmt: skip
    on_disk = json.loads((tmp_path / "final_metrics.json").read_text())
    assert on_disk["stable"]["unstable_cause"] == ["non_finite", None]
    assert on_disk["baseline"]["by_criterion"]["rdf_mae"]["n_unstable"] == 0
    assert on_disk["baseline"]["by_criterion"]["min_intermolecular_distance"]["n_unstable"] == 1
    report = (tmp_path / "report.md").read_text()
    assert "| rdf_mae |" in report and "| combined |" in report
    assert final["paired_test"]["n_longer"] == 1
    assert (tmp_path / "survival.png").exists()


# ------------------------------------------------------------------ 4. several seeds


def _final(base, stab):
    def model(t):
        t = np.asarray(t, float)
        return {
            "median_stable_time_ps": float(np.median(t)),
            "stable_times_ps": list(t),
            "n_unstable": int((t < 5).sum()),
            "unstable_cause": ["criterion" if v < 5 else None for v in t],
            "max_time_ps": 5.0,
            "force_mae_meV_per_A": 100.0,
            "by_criterion": {
                "bond_length_deviation": {
                    "median_stable_time_ps": float(np.median(t)),
                    "stable_times_ps": list(t),
                    "n_unstable": int((t < 5).sum()),
                }
            },
        }

    return {"baseline": model(base), "stable": model(stab), "paired_test": {}}


def test_summary_over_seeds_pools_pairs_by_seed_and_state():
    per_seed = {
        0: _final([1, 2, 3, 4], [2, 3, 4, 5]),
        1: _final([1, 1, 2, 2], [2, 2, 3, 3]),
        2: _final([2, 3, 3, 4], [3, 4, 4, 5]),
    }
    s = pipeline.summarize_seeds(per_seed)
    b = s["models"]["baseline"]["median_stable_time_ps"]
    assert b["per_seed"] == [2.5, 1.5, 3.0]
    assert b["mean"] == pytest.approx(7.0 / 3.0)
    lo, hi = b["interval_95"]
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * np.std([2.5, 1.5, 3.0], ddof=1) / np.sqrt(3)
    assert (lo, hi) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    t = s["paired_tests"]["stable vs baseline"]
    assert t["n"] == 12 and t["n_longer"] == 12 and t["p_value"] < 0.01
    assert s["models"]["stable"]["pooled"]["n_replicas"] == 12
    md_text = pipeline.summary_markdown(s, title="x")
    assert "mean of medians" in md_text and "p = " in md_text
    assert "Changed from" not in md_text
    s["config"] = {"preset": "quick", "overrides": {"stable.qm_weight": {"value": 10.0, "preset": 0.0}}}  # fmt: skip
    md_text = pipeline.summary_markdown(s, title="x")
    assert "Changed from the `quick` preset: stable.qm_weight = 10.0 (preset 0.0)." in md_text


def test_parse_seeds():
    assert pipeline.parse_seeds("0,1,2") == [0, 1, 2]
    assert pipeline.parse_seeds("3-5") == [3, 4, 5]
    for bad in ("a", "1,1", "", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            pipeline.parse_seeds(bad)


def test_evaluation_criterion_window_must_be_positive():
    crit = stability.intermolecular_distance_criterion(np.arange(2))
    with pytest.raises(ValueError, match="window_frames"):
        evaluate_model(
            ReplaySim(np.zeros((1, 2, 2, 3))), None, np.zeros((1, 2, 3)),
            settings=EvalSettings(time_ps=0.02, dt_fs=1.0, temperature_K=1.0, record_every=10),
            criteria=[EvalCriterion(crit, window_frames=0)], species=np.array([1, 1]),
            box=None, observable_settings={"r_max": 3.0, "dr": 0.1, "sigma": 0.0},
            key=jax.random.PRNGKey(0), progress=False,
        )  # fmt: skip


def test_trajectories_are_written_as_extxyz_with_the_unstable_frame_marked(tmp_path):
    """Two free carbons, one replica reaches a NaN wall: each replica's thinned trajectory
    reads back with ASE, times and units are right, and frames from the stable time on
    carry `unstable`."""
    import ase.io
    from ase.data import atomic_masses

    from stablejax import units

    dt_fs, force, mass = 0.5, 0.02, float(atomic_masses[6])  # fs, eV/Å, amu
    species = np.array([6, 6])

    def energy_fn(params, x, edges, box):
        return jnp.where(x[0, 0] > 0.0, jnp.nan, -force * x[0, 0])

    t_fail = 130 * dt_fs * units.fs
    x_start = -0.5 * (force / mass) * t_fail**2
    x0 = np.array([[0.0, 0.0, 0.0], [1.52, 0.0, 0.0]])
    init = x0[None] + np.array([-1e4, x_start])[:, None, None] * np.array([1.0, 0, 0])
    sim = md.Simulator(energy_fn, species=species, integrator=md.NVE(dt_fs=dt_fs), chunk_steps=50)
    settings = EvalSettings(
        time_ps=0.15, dt_fs=dt_fs, temperature_K=0.0, record_every=10, vacf_window=0
    )
    crit = stability.bond_length_criterion(np.array([[0, 1]]), np.array([1.52]), threshold=1e3)
    out = tmp_path / "traj"
    res = evaluate_model(
        sim, None, init, settings=settings, criteria=[crit], species=species, box=None,
        observable_settings={"r_max": 4.0, "dr": 0.01, "sigma": 0.0},
        key=jax.random.PRNGKey(0), progress=False, trajectory_dir=str(out), trajectory_frames=10,
    )  # fmt: skip
    n_recorded = settings.n_steps // settings.record_every  # 30 frames of 5 fs
    for r in range(2):
        frames = ase.io.read(out / f"replica_{r:03d}.extxyz", ":")
        assert len(frames) == 10  # every 3rd recorded frame
        times = np.array([a.info["time_ps"] for a in frames])
        np.testing.assert_allclose(times, 3 * 0.005 * np.arange(1, 11))
        assert all(a.get_chemical_symbols() == ["C", "C"] for a in frames)
        assert not frames[0].pbc.any()
        unstable = np.array([a.info["unstable"] for a in frames])
        if res.ever_unstable[r]:
            np.testing.assert_array_equal(unstable, times >= res.stable_time_ps[r])
            assert unstable.any() and not unstable.all()
        else:
            assert not unstable.any()
    # Replica 0 moves under a constant force from rest: x(t) = x0 + F t^2 / (2 m) (Å, ASE
    # time), and its velocity is F t / m, both as written in the file.
    frames = ase.io.read(out / "replica_000.extxyz", ":")
    for a in frames:
        t = a.info["time_ps"] * 1000 * units.fs
        np.testing.assert_allclose(
            a.positions[0, 0], init[0, 0, 0] + 0.5 * force / mass * t**2, rtol=1e-9
        )
        np.testing.assert_allclose(a.get_velocities()[0, 0], force / mass * t, rtol=1e-6)
    assert n_recorded == 30


def test_pipeline_evaluate_keeps_a_given_reference(tmp_path, monkeypatch):
    """The temperature transfer passes a reweighted reference; it must reach the report
    (it used to be overwritten by the unweighted data reference)."""
    from test_reliability import _test_study

    from experiments import pipeline

    config = _test_study(tmp_path)
    dataset = pipeline.load_data(config, str(tmp_path))
    train, _, test = pipeline.split(config, dataset)
    system = pipeline.system_topology(dataset, train)
    potential, params = pipeline.build_model(config, dataset, train)
    seen = {}

    class Stop(Exception):
        pass

    def capture(out_dir, results, *, reference, **kwargs):
        seen["reference"] = reference
        raise Stop

    monkeypatch.setattr(pipeline, "evaluate_model", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "write_report", capture)
    given = {"h(r)": np.full(3, 7.0)}
    with pytest.raises(Stop):
        pipeline.evaluate_models(config, potential, {"m": params}, dataset, test, system,
                          str(tmp_path), reference=given)  # fmt: skip
    assert seen["reference"] is given
    with pytest.raises(Stop):
        pipeline.evaluate_models(config, potential, {"m": params}, dataset, test, system,
                          str(tmp_path))  # fmt: skip
    assert seen["reference"] is not given and "h(r)" in seen["reference"]


def test_a_second_model_reuses_the_compiled_criteria_and_observables():
    """Evaluating a second model with the same criteria and system traces neither the
    criterion nor the observables again (one compile shared by every model)."""
    species = np.array([6, 6])
    traces = {"metric": 0}
    base = stability.bond_length_criterion(np.array([[0, 1]]), np.array([1.52]), threshold=1e3)

    def metric(x, box=None):
        traces["metric"] += 1  # runs only while tracing
        return base.metric(x, box)

    crit = base._replace(metric=metric)
    settings = EvalSettings(
        time_ps=0.01, dt_fs=0.5, temperature_K=300.0, record_every=5, vacf_window=0
    )
    obs = {"r_max": 4.0, "dr": 0.05, "sigma": 0.0}

    def energy_fn(params, x, edges, box):
        d = jnp.linalg.norm(x[1] - x[0])
        return params * (d - 1.52) ** 2

    sim = md.Simulator(energy_fn, species=species, integrator=md.NVE(dt_fs=0.5), chunk_steps=10)
    init = np.array([[[0.0, 0.0, 0.0], [1.52, 0.0, 0.0]]] * 2)
    counts = []
    for params in (jnp.asarray(1.0), jnp.asarray(2.0)):
        res = evaluate_model(
            sim, params, init, settings=settings, criteria=[crit], species=species, box=None,
            observable_settings=obs, key=jax.random.PRNGKey(0), progress=False,
        )  # fmt: skip
        assert res.n_stable_frames == 2 * 4
        counts.append((traces["metric"], evaluation._observables_fn.cache_info().misses))
    assert counts[0][0] >= 1
    assert counts[1] == counts[0]


def test_stability_stream_judges_whole_windows_whatever_the_segments():
    """A windowed criterion (2 frames) and a per-frame one fed in segments of 3, 5 and 2
    frames give the first crossings of one push of all 10 frames; a window straddling a
    segment boundary is judged once it is complete, and frames are released only when
    every criterion has judged them."""
    R, T = 3, 10
    x = np.zeros((R, T, 2, 3))
    x[0, 3, 0, 0] = 2.0  # window [2, 3] crosses (mean 1.0 > 0.5), straddles frames 3 | 4
    x[1, 9, 0, 0] = 2.0  # last window [8, 9]
    x[2, 7, 1, 0] = -1.0  # the per-frame criterion at frame 7
    times = 0.01 * np.arange(1, T + 1)
    windowed = EvalCriterion(
        stability.StabilityCriterion("window_mean", lambda p, box=None: p[..., 0, 0].mean(-1), 0.5),
        window_frames=2,
    )
    per_frame = EvalCriterion(
        stability.StabilityCriterion(
            "frame_min", lambda p, box=None: p[..., 1, 0], -0.5, unstable_below=True
        )
    )

    def stream_of(sizes):
        stream = evaluation._StabilityStream([windowed, per_frame], R)
        popped, start = [], 0
        for size in sizes:
            sl = slice(start, start + size)
            stream.push(x[:, sl], None, times[sl], np.zeros((R, size), bool))
            start += size
            n = stream.releasable()
            assert n == min(start - start % 2, start) - sum(len(t) for t in popped)
            _, box, t = stream.pop(n)
            assert box is None
            popped.append(t)
        assert stream.n_pending == 0
        np.testing.assert_array_equal(np.concatenate(popped), times)
        return stream

    whole, uneven = stream_of([T]), stream_of([3, 5, 2])
    for stream in (whole, uneven):
        np.testing.assert_array_equal(stream.first["window_mean"], [times[2], times[8], np.inf])
        np.testing.assert_array_equal(stream.first["frame_min"], [np.inf, np.inf, times[7]])
        np.testing.assert_array_equal(stream.combined(), [times[2], times[8], times[7]])
        np.testing.assert_array_equal(stream.finished(), [False, False, False])
    assert uneven.judged == whole.judged == {"window_mean": T, "frame_min": T}
