"""Fidelity to the paper and its reference code (docs/fidelity.md).

- one learning step of ours, with the paper presets' conversion, equals one step of a
  direct implementation of the reference code's formula on the same samples;
- every `paper` preset carries the values of the table in docs/fidelity.md;
- the localized estimator's neighbourhoods (k = 0, k = 2, per frame), per-bond
  observables and stratified sampling against brute-force constructions;
- the learning-phase rules: plateau semantics, cycle/step budgets, resets, rewinds.
"""

import math
import types

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from test_stable_training import harmonic_bond_dataset, make_trainer, tiny_config

from experiments import pipeline
from experiments.configs import aspirin as aspirin_config
from experiments.configs import tetrapeptide as tetrapeptide_config
from experiments.configs import water as water_config
from stablejax import observables, units
from stablejax.data import Dataset, System
from stablejax.estimator import boltzmann_grad_local, stratified_selection
from stablejax.potentials import factory
from stablejax.potentials.base import all_pairs_edges
from stablejax.training import qm
from stablejax.training.stable import (
    ObservableTarget,
    StableTrainer,
    budget_left,
    learning_epoch,
    learning_optimizer,
    learning_rate,
    make_learning_step,
    plateau_rule,
    plateau_start,
    reference_observable_weight,
    simulation_epoch,
)

# ---------------------------------------------------------------------------------------------
# The gradient convention: ours (beta, unbiased) x observable_weight == the reference's step
# ---------------------------------------------------------------------------------------------


def _reference_step(
    potential,
    params,
    species,
    samples,
    obs_scale,
    target_ours,
    qm_data,
    *,
    lr,
    lam,
    clip,
    qm_batches,
):
    """The reference code's learning step written out directly (boltzmann_estimator.py,
    simulator_utils.energy_force_gradient, stable_training.py), for one minibatch holding
    every sample: per-sample parameter gradients of U, the biased covariance without beta,
    the observable in the reference's units (s x ours), the QM loss 0.05 E_MSE + 0.95 F_MSE
    (eV) averaged over equal-size batches of the training set, clip, SGD."""
    species = jnp.asarray(species)
    edges = jnp.asarray(all_pairs_edges(len(species)))
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def energy(p_flat, x):
        return potential.energy(unravel(p_flat), species, x, edges, None)

    dU = jax.vmap(jax.grad(energy), in_axes=(None, 0))(flat, samples)  # [N, P]
    g = obs_scale * jax.vmap(
        lambda x: observables.distance_histogram(x, r_max=10.0, dr=0.02, sigma=0.01)
    )(samples)
    gt = obs_scale * target_ours
    mse_gradient = 2 * (g.mean(0) - gt)  # [d]
    jacobian = (dU.mean(0)[None, :] * g.mean(0)[:, None] - (dU[:, None, :] * g[:, :, None])).mean(
        0
    )  # [d, P]
    g_obs = mse_gradient @ jacobian

    pos, e_ref, f_ref = qm_data

    def qm_loss(p_flat, idx):
        def e_and_f(x):
            e, de = jax.value_and_grad(energy, argnums=1)(p_flat, x)
            return e, -de

        e, f = jax.vmap(e_and_f)(pos[idx])
        return 0.05 * jnp.mean((e - e_ref[idx]) ** 2) + 0.95 * jnp.mean((f - f_ref[idx]) ** 2)

    g_qm = jnp.mean(jnp.stack([jax.grad(qm_loss)(flat, b) for b in qm_batches]), axis=0)
    total = g_obs + lam * g_qm
    norm = jnp.linalg.norm(total)
    total = total * jnp.minimum(1.0, clip / (norm + 1e-6))  # torch clip_grad_norm_
    return unravel(flat - lr * total), float(norm)


@pytest.mark.parametrize("clip", [1.0, 1e4])
def test_learning_step_equals_reference_step(clip):
    if True:  # float64 (tests/conftest.py)
        data = harmonic_bond_dataset(n_frames=12, seed=3)
        config = tiny_config()
        potential = factory.build(config.model)
        pos64 = jnp.asarray(data.positions, jnp.float64)
        params = potential.init(jax.random.PRNGKey(1), data.species, pos64[0], None)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        rng = np.random.default_rng(0)
        samples = pos64[:1] + 0.08 * rng.standard_normal((8,) + pos64.shape[1:])
        fn = lambda x: observables.distance_histogram(x, r_max=10.0, dr=0.02, sigma=0.01)  # noqa: E731
        reference = np.asarray(jax.vmap(fn)(pos64)).mean(0)
        target = ObservableTarget("h(r)", reference, observable_fn=fn)
        kT = units.kT_from_kelvin(500.0)
        s = 100 * 0.02
        lr, lam = 1e-3, 10.0
        frames = qm.prepare_frames(data, potential, dtype=jnp.float64)
        step = make_learning_step(
            potential,
            data.species,
            None,
            target,
            learning_optimizer(clip, lr),
            kT=kT,
            observable_weight=reference_observable_weight(kT, len(samples), s),
            qm_weight=lam,
            qm_loss=qm.make_qm_loss(potential, energy_weight=0.05, force_weight=0.95),
            qm_frames=frames,
        )
        # Every training frame in 3 chunks of 4 (the reference averages its batches).
        qm_idx = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
        qm_w = jnp.ones((3, 4), jnp.float64)
        opt_state = learning_optimizer(clip, lr).init(params)
        ours, _, metrics = jax.jit(step)(
            params, opt_state, {"positions": samples}, None, qm_idx, qm_w, jnp.asarray(lr)
        )
        ref, ref_norm = _reference_step(
            potential,
            params,
            data.species,
            samples,
            s,
            reference,
            (pos64, jnp.asarray(data.energies), jnp.asarray(data.forces)),
            lr=lr,
            lam=lam,
            clip=clip,
            qm_batches=[np.arange(4 * b, 4 * b + 4) for b in range(3)],
        )
        # The conversion is exact: the total gradient before clipping matches too.
        np.testing.assert_allclose(float(metrics["update_grad_norm"]), ref_norm, rtol=1e-8)
        if clip == 1.0:
            assert ref_norm > clip, "the clipped case must clip"
        moved = 0.0
        for a, b, p in zip(
            jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(params), strict=True
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-7, atol=1e-12)
            moved = max(moved, float(np.max(np.abs(np.asarray(b) - np.asarray(p)))))
        assert moved > 1e-8, "the step did not move the parameters"
        # Without the conversion our observable gradient is kT^-1 N/(N-1) s^-2 ~ 6x larger.
        w = reference_observable_weight(kT, len(samples), s)
        assert 0.1 < w < 0.2


# ---------------------------------------------------------------------------------------------
# The paper presets carry the table's values
# ---------------------------------------------------------------------------------------------


def _reference_lr_reductions(lr0: float, max_times_reduce_lr: int = 2) -> int:
    """stable_training.py: min_lr = lr / 5**max_times_reduce_lr; torch multiplies the rate
    by 0.2 per plateau; learning ends when lr < min_lr (in float64)."""
    min_lr = lr0 / (5**max_times_reduce_lr)
    lr, n = lr0, 0
    while not lr < min_lr:
        lr, n = lr * 0.2, n + 1
    return n


LOOP = dict(
    upper_threshold=0.75,
    lower_threshold=0.0,
    plateau_factor=0.2,
    plateau_patience=10,
    grad_clip=1.0,
    qm_batch_size=0,
)


def test_aspirin_paper_preset_matches_the_reference():
    c = aspirin_config.get_config("paper")
    for k, v in LOOP.items():
        assert c.stable[k] == v, k
    assert c.stable.max_lr_reductions == _reference_lr_reductions(c.stable.lr) == 3
    assert (c.stable.lr, c.stable.qm_weight) == (1e-3, 10.0)
    assert (c.stable.qm_energy_weight, c.stable.qm_force_weight) == (0.05, 0.95)
    assert not c.stable.qm_per_atom_energy
    assert (c.md.n_replicas, c.md.steps_per_epoch, c.md.dt_fs, c.md.temperature_K) == (
        128,
        2000,
        0.5,
        500.0,
    )
    assert (c.stable.sample_every, c.md.check_every, c.stable.batch_size) == (100, 100, 40)
    assert c.md.integrator == "nose_hoover" and c.md.tau_fs == 10.0
    assert (c.stable.reset_fraction, c.stable.max_epochs, c.stable.max_learning_cycles) == (
        0.05,
        500,
        4,
    )
    assert c.stable.history_depth >= c.stable.max_epochs
    assert c.stable.estimator == "global" and c.observable.name == "distance_histogram"
    assert (c.observable.r_max, c.observable.dr, c.observable.sigma) == (10.0, 0.02, 0.01)
    kT = units.kT_from_kelvin(500.0)
    assert c.stable.observable_weight == pytest.approx(kT * 39 / 40 * 2.0**2)
    assert (c.stability.threshold, c.stability.eval_threshold) == (0.25, 0.5)
    assert (c.eval.n_replicas, c.eval.time_ps, c.eval.integrator) == (256, 1000.0, "langevin")


def test_tetrapeptide_paper_preset_matches_the_reference():
    c = tetrapeptide_config.get_config("paper")
    for k, v in LOOP.items():
        assert c.stable[k] == v, k
    assert c.stable.max_lr_reductions == _reference_lr_reductions(c.stable.lr) == 3
    assert (c.stable.lr, c.stable.qm_weight) == (1e-3, 10.0)
    assert (c.stable.qm_energy_weight, c.stable.qm_force_weight) == (1.0, 1000.0)
    assert c.stable.qm_per_atom_energy
    assert (c.md.n_replicas, c.md.steps_per_epoch, c.md.tau_fs) == (128, 2000, 10.0)
    assert (c.stable.sample_every, c.stable.batch_size) == (100, 40)
    assert (c.stable.max_epochs, c.stable.max_learning_cycles) == (600, 1)
    assert c.observable.r_max == 15.0
    assert (c.eval.n_replicas, c.eval.time_ps) == (48, 300.0)


@pytest.mark.parametrize("preset", ["paper", "npt"])
def test_water_paper_preset_matches_the_reference(preset):
    c = water_config.get_config(preset)
    for k, v in LOOP.items():
        assert c.stable[k] == v, k
    assert c.stable.max_lr_reductions == _reference_lr_reductions(c.stable.lr) == 3
    assert (c.stable.lr, c.stable.qm_weight, c.stable.batch_size) == (3e-3, 0.0, 4)
    assert (c.md.n_replicas, c.md.steps_per_epoch, c.md.dt_fs, c.md.tau_fs) == (8, 1000, 1.0, 20.0)
    assert (c.stable.sample_every, c.md.check_every) == (100, 100)
    assert c.stable.estimator == "local" and c.stable.local_k_nearest == 0
    assert c.observable.name == "oh_bond_lengths"
    assert (c.stable.local_sampling, c.stable.local_bins, c.stable.local_per_bin) == (
        "stratified",
        100,
        40,
    )
    assert c.stable.reset_fraction == 0.0
    assert (c.stable.max_learning_cycles, c.stable.max_learning_steps) == (1, 10)
    kT = units.kT_from_kelvin(300.0)
    assert c.stable.observable_weight == pytest.approx(kT * 3 / 4)
    assert (c.stability.criterion, c.stability.threshold) == ("min_intermolecular_distance", 1.2)
    assert (c.stability.eval_criterion, c.stability.eval_threshold) == ("rdf_mae", 3.0)
    assert c.stability.rdf_window_ps == 10.0
    assert (c.eval.n_replicas, c.eval.time_ps) == (5, 1000.0)


def test_reference_observable_weight_rejects_a_single_sample_minibatch():
    with pytest.raises(ValueError, match="minibatch_size"):
        reference_observable_weight(0.025, 1)


# ---------------------------------------------------------------------------------------------
# The localized estimator: neighbourhoods, per-bond observables, stratified sampling
# ---------------------------------------------------------------------------------------------


def _water_frames(n_mol=8, n_frames=3, box=7.0, seed=0):
    rng = np.random.default_rng(seed)
    r0, theta = 0.96, np.deg2rad(104.5)
    frames = []
    for _ in range(n_frames):
        atoms = []
        for _ in range(n_mol):
            o = rng.uniform(0, box, 3)
            q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
            h1 = o + r0 * (1 + 0.05 * rng.standard_normal()) * q[0]
            h2 = o + r0 * (1 + 0.05 * rng.standard_normal()) * (
                np.cos(theta) * q[0] + np.sin(theta) * q[1]
            )
            atoms += [o, h1, h2]
        frames.append(np.mod(np.asarray(atoms), box))
    species = np.tile([8, 1, 1], n_mol)
    return np.asarray(frames), species, np.full(3, box)


def _brute_force_members(x, k, box):
    """Molecule m plus its k nearest molecules by minimum-image O-O distance."""
    n_mol = len(x) // 3
    o = x[::3]
    members = np.zeros((n_mol, len(x)), bool)
    for m in range(n_mol):
        d = o - o[m]
        d -= box * np.round(d / box)
        dist = np.linalg.norm(d, axis=1)
        dist[m] = np.inf
        chosen = [m] + list(np.argsort(dist)[:k])
        for c in chosen:
            members[m, 3 * c : 3 * c + 3] = True
    return members


def _brute_force_bonds(x, members_row, box):
    """[mean first O-H bond, mean second O-H bond] over the molecules in the row."""
    out = []
    for slot in (1, 2):
        vals = []
        for m in range(len(x) // 3):
            if members_row[3 * m]:
                d = x[3 * m + slot] - x[3 * m]
                d -= box * np.round(d / box)
                vals.append(np.linalg.norm(d))
        out.append(np.mean(vals))
    return np.asarray(out)


def _water_target(k, frames, species, box, sampling="all"):
    c = water_config.get_config("test")
    with c.unlocked():
        c.stable.local_k_nearest = k
        c.stable.local_sampling = sampling
    mol = np.repeat(np.arange(len(species) // 3), 3)
    n_mol = len(species) // 3
    bonds = np.asarray([(3 * m, 3 * m + h) for m in range(n_mol) for h in (1, 2)])
    data = Dataset(
        species=species,
        positions=frames,
        energies=np.zeros(len(frames)),
        forces=np.zeros_like(frames),
        box=box,
        source="synthetic",
    )
    return pipeline.observable_target(c, System(species, box, bonds, molecules=mol), data), mol


@pytest.mark.parametrize("k", [0, 2])
def test_neighbourhoods_and_per_bond_observable_match_brute_force(k):
    frames, species, box = _water_frames()
    target, _ = _water_target(k, frames, species, box)
    assert target.local and target.name == "O-H bond lengths"
    seen = []
    for x in frames:
        members = np.asarray(target.neighbourhoods(jnp.asarray(x), jnp.asarray(box)))
        expect = _brute_force_members(x, k, box)
        np.testing.assert_array_equal(members, expect)
        seen.append(members)
        for m in range(len(members)):
            obs = np.asarray(target.local_observable_fn(jnp.asarray(x), jnp.asarray(members[m])))
            np.testing.assert_allclose(obs, _brute_force_bonds(x, members[m], box), rtol=1e-5)
    if k:
        # Neighbourhoods are recomputed per frame: the random frames differ.
        assert not np.array_equal(seen[0], seen[1])
    # Reference: the training frames' mean first and second O-H bond.
    all_bonds = np.stack([_brute_force_bonds(x, np.ones(len(x), bool), box) for x in frames])
    np.testing.assert_allclose(target.reference, all_bonds.mean(0), rtol=1e-5)


def test_learning_step_uses_each_frames_neighbourhoods():
    """The trainer's step equals the localized estimator fed brute-force per-frame
    memberships (k = 2), with and without a stratified selection."""
    frames, species, box = _water_frames(n_frames=4, seed=1)
    target, _ = _water_target(2, frames, species, box)
    c = water_config.get_config("test")
    with c.unlocked():
        c.model.cutoff = 3.0  # under half the 7 Å box
    potential = factory.build(c.model)
    params = potential.init(jax.random.PRNGKey(0), species, frames[0], box)
    kT = units.kT_from_kelvin(300.0)
    edges = qm.cutoff_edges(frames, potential.cutoff, box)
    samples = {
        "positions": jnp.asarray(frames, jnp.float32),
        "edges": jnp.asarray(edges),
        "box": jnp.asarray(np.broadcast_to(box, (len(frames), 3)), jnp.float32),
    }
    opt = learning_optimizer(1e9, 1.0)
    step = jax.jit(make_learning_step(potential, species, box, target, opt, kT=kT))
    spc = jnp.asarray(species)

    def per_atom(p, s):
        return potential.per_atom_energies(p, spc, s["positions"], s["edges"], s["box"])

    direct = boltzmann_grad_local(
        per_atom, lambda s, m: target.local_observable_fn(s["positions"], m), target.loss, kT=kT
    )
    members = np.stack([_brute_force_members(x, 2, box) for x in frames])
    rng = np.random.default_rng(0)
    for selected in (None, rng.random(members.shape[:2]) < 0.5):
        new, _, metrics = step(
            params,
            opt.init(params),
            samples,
            selected,
            jnp.zeros((1, 1), jnp.int32),
            jnp.zeros((1, 1)),
            jnp.asarray(1.0),
        )
        (loss, aux), g = direct(params, samples, members, selected)
        assert float(metrics["observable_loss"]) == pytest.approx(float(loss), rel=1e-5)
        n_sel = members.shape[0] * members.shape[1] if selected is None else int(selected.sum())
        assert int(metrics["samples_used"]) == n_sel
        for p, n, gg in zip(
            jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(g), strict=True
        ):
            np.testing.assert_allclose(
                np.asarray(p) - np.asarray(n), np.asarray(gg), rtol=2e-4, atol=1e-9
            )


def test_stratified_selection_draws_the_requested_counts_per_bin():
    rng = np.random.default_rng(0)
    dev = np.concatenate([rng.exponential(0.01, 5000), [0.5, 0.49, np.nan, np.inf]])
    dev = dev.reshape(2, -1)
    sel = stratified_selection(dev, n_bins=20, per_bin=30, rng=np.random.default_rng(1))
    assert sel.shape == dev.shape
    assert not sel[~np.isfinite(dev)].any()
    values = dev[np.isfinite(dev)]
    edges = np.histogram_bin_edges(values, bins=20)
    counts, _ = np.histogram(values, bins=edges)
    got, _ = np.histogram(dev[sel], bins=edges)
    np.testing.assert_array_equal(got, np.minimum(counts, 30))
    assert sel[np.isclose(dev, 0.5)].all() and sel[np.isclose(dev, 0.49)].all()
    # Deterministic for a seed, different for another.
    again = stratified_selection(dev, n_bins=20, per_bin=30, rng=np.random.default_rng(1))
    other = stratified_selection(dev, n_bins=20, per_bin=30, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(sel, again)
    assert not np.array_equal(sel, other)
    with pytest.raises(ValueError, match="per_bin"):
        stratified_selection(dev, n_bins=20, per_bin=0, rng=rng)


def test_water_trainer_stratified_learning_epoch_runs(tmp_path):
    """k = 1 neighbourhoods and stratified sampling through the real trainer (the
    `local_k_nearest > 0` path used to crash)."""
    frames, species, box = _water_frames(n_mol=8, n_frames=2, box=7.0, seed=2)
    target, _ = _water_target(1, frames, species, box, sampling="stratified")
    c = water_config.get_config("test")
    with c.unlocked():
        c.stable.local_k_nearest = 1
        c.stable.local_bins = 4
        c.stable.local_per_bin = 3
        c.stable.upper_threshold = 0.01  # learn right away
        c.stability.threshold = 100.0  # every replica "unstable"
        c.md.integrator = "langevin"
        c.md.skin = 0.0
        c.model.cutoff = 3.0
    potential = factory.build(c.model)
    params = potential.init(jax.random.PRNGKey(0), species, frames[0], box)
    from stablejax import stability

    criterion = stability.intermolecular_distance_criterion(
        np.repeat(np.arange(8), 3), threshold=100.0, box=box
    )
    trainer = StableTrainer(
        potential=potential,
        params=params,
        species=species,
        box=box,
        config=c,
        criterion=criterion,
        target=target,
        qm_frames=None,
        initial_positions=frames,
        workdir=None,
        progress=False,
    )
    trainer.run()
    st = trainer.state
    assert st["learning_steps"] == 1
    # 2 replicas x 2 sampled frames x 8 neighbourhoods = 32 candidates, <= 4 x 3 selected.
    assert st["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# Learning-phase rules
# ---------------------------------------------------------------------------------------------


def test_plateau_has_pytorch_semantics():
    """ReduceLROnPlateau(factor, patience): the rate drops on the (patience + 1)-th step in
    a row without a relative improvement of 1e-4 (optax's rule, started at the fraction
    that began the phase)."""
    scfg = types.SimpleNamespace(plateau_patience=10, plateau_factor=0.2, lr=1e-3)
    rule = plateau_rule(scfg)
    update = jax.jit(lambda st, v: rule.update(None, st, value=v)[1])
    st = plateau_start(rule, {"w": jnp.zeros(2)}, 0.8)
    reductions = 0

    def step(st, fraction):
        new = update(st, fraction)
        return new, int(bool(new.scale < st.scale))

    for i in range(10):
        st, r = step(st, 0.8)
        assert r == 0, i
    st, reductions = step(st, 0.8)
    assert reductions == 1 and learning_rate(scfg, reductions) == pytest.approx(2e-4)
    assert learning_rate(scfg, 2) == 1e-3 * 0.2 * 0.2  # one multiplication per reduction
    st, r = step(st, 0.5)  # improvement resets the count
    assert r == 0 and int(st.plateau_count) == 0 and float(st.best_value) == 0.5
    st, r = step(st, 0.5 * (1 - 1e-5))  # below the 1e-4 relative threshold
    assert r == 0 and int(st.plateau_count) == 1


def test_cycle_and_step_budgets_stop_training(tmp_path):
    data = harmonic_bond_dataset()
    t = make_trainer(tiny_config(max_epochs=40, max_learning_cycles=1), data, None)
    t.run()
    assert t.state["cycles"] == 1 and t.state["phase"] == 0
    assert t.state["epoch"] < 40
    t2 = make_trainer(
        tiny_config(
            max_epochs=40, max_learning_steps=2, max_lr_reductions=10, lower_threshold=-1.0
        ),
        data,
        None,
    )
    t2.run()
    assert t2.state["learning_steps"] == 2 and t2.state["epoch"] < 40


def test_resets_and_learning_start_follow_the_reference(tmp_path):
    data = harmonic_bond_dataset()
    t = make_trainer(tiny_config(max_epochs=8, reset_fraction=0.4), data, str(tmp_path / "r"))
    R = t.n_replicas
    learn_start = None
    state = t.state
    while budget_left(state, t.scfg):
        before = state
        if int(before.phase) == 0:
            state, record = simulation_epoch(before, t.setup)
            slot = int(before.n_stored) % int(t.scfg.history_depth)
            stored = np.asarray(state.stored_starts.position[slot])
            if int(state.phase) == 1:
                # Learning starts from every replica's state at the start of this epoch
                # (the stored one), the stable replicas rewound too.
                learn_start = np.asarray(state.learn_start.position)
                np.testing.assert_array_equal(learn_start, stored)
            if record["replicas_reset"]:
                assert record["replicas_reset"] == math.ceil(0.4 * R)
        else:
            state, _ = learning_epoch(before, t.setup)
        # The epoch functions return a new state and leave their argument as it was.
        assert int(state.epoch) == int(before.epoch) + 1
    assert learn_start is not None, "no learning phase"


def _brute_force_min_intermolecular(x, members_row, box):
    best = np.inf
    n = len(x)
    for a in range(n):
        for b in range(a + 1, n):
            if a // 3 == b // 3 or not (members_row[a] and members_row[b]):
                continue
            d = x[b] - x[a]
            d -= box * np.round(d / box)
            best = min(best, np.linalg.norm(d))
    return best


def _six_water_target(observable, n_frames, seed):
    """Random 6-water frames, the `test` water config with `observable` over neighbourhoods
    of a molecule and its 2 nearest, its System and Dataset, and the built target."""
    frames, species, box = _water_frames(n_mol=6, n_frames=n_frames, seed=seed)
    c = water_config.get_config("test")
    with c.unlocked():
        c.observable.name = observable
        c.stable.local_k_nearest = 2
    mol = np.repeat(np.arange(6), 3)
    bonds = np.asarray([(3 * m, 3 * m + h) for m in range(6) for h in (1, 2)])
    data = Dataset(species=species, positions=frames, energies=np.zeros(n_frames),
                   forces=np.zeros_like(frames), box=box, source="synthetic")  # fmt: skip
    system = System(species, box, bonds, molecules=mol)
    return frames, box, c, system, data, pipeline.observable_target(c, system, data)


def test_min_intermolecular_distance_observable_matches_brute_force():
    frames, box, c, system, data, target = _six_water_target("min_intermolecular_distance", 2, 4)
    values = []
    for x in frames:
        members = np.asarray(target.neighbourhoods(jnp.asarray(x), jnp.asarray(box)))
        np.testing.assert_array_equal(members, _brute_force_members(x, 2, box))
        for row in members:
            got = float(target.local_observable_fn(jnp.asarray(x), jnp.asarray(row))[0])
            expect = _brute_force_min_intermolecular(x, row, box)
            assert got == pytest.approx(expect, rel=1e-6)
            values.append(expect)
    np.testing.assert_allclose(target.reference, [np.mean(values)], rtol=1e-6)
    with c.unlocked():
        c.stable.estimator = "global"
    glob = pipeline.observable_target(c, system, data)
    whole = [_brute_force_min_intermolecular(x, np.ones(18, bool), box) for x in frames]
    np.testing.assert_allclose(glob.reference, [np.mean(whole)], rtol=1e-6)
    with c.unlocked():
        c.stable.estimator, c.stable.local_k_nearest = "local", 0
    with pytest.raises(ValueError, match="local_k_nearest"):
        pipeline.observable_target(c, system, data)


def test_contact_shortfall_observable_matches_brute_force():
    """s = max(0, d_ref - d) per neighbourhood with d_ref the training mean of d (the
    closest intermolecular pair); its reference is the training mean of s; globally the
    same over whole frames. One-sided: pulling a neighbourhood's molecules apart beyond
    d_ref gives s = 0, pushing two of them together raises s by the distance lost."""
    frames, box, c, system, data, target = _six_water_target("contact_shortfall", 3, 5)
    rows, d = [], []
    for x in frames:
        members = np.asarray(target.neighbourhoods(jnp.asarray(x), jnp.asarray(box)))
        for row in members:
            rows.append((x, row))
            d.append(_brute_force_min_intermolecular(x, row, box))
    d_ref = np.mean(d)
    s = np.maximum(d_ref - np.asarray(d), 0.0)
    assert 0 < np.count_nonzero(s) < len(s)  # the test frames have both kinds
    for (x, row), expect in zip(rows, s, strict=True):
        got = float(target.local_observable_fn(jnp.asarray(x), jnp.asarray(row))[0])
        assert got == pytest.approx(expect, abs=1e-6)
    np.testing.assert_allclose(target.reference, [s.mean()], rtol=1e-6)

    # One-sided: two molecules whose hydrogens point away from each other, so that their
    # oxygens are the closest pair, in a neighbourhood of the two only.
    def pair_frame(separation):
        x = frames[0].copy()
        o0 = np.array([2.0, 2.0, 2.0])
        o1 = o0 + np.array([separation, 0.0, 0.0])
        away = 0.96 * np.array([[-0.6, 0.8, 0.0], [-0.6, -0.8, 0.0]])
        x[0:3] = [o0, o0 + away[0], o0 + away[1]]
        x[3:6] = [o1, o1 - away[0] * [1, -1, 1], o1 - away[1] * [1, -1, 1]]
        return x

    row = np.zeros(18, bool)
    row[:6] = True  # molecules 0 and 1
    for separation, expect in ((d_ref + 0.5, 0.0), (d_ref - 0.3, 0.3)):
        x = pair_frame(separation)
        assert _brute_force_min_intermolecular(x, row, box) == pytest.approx(separation)
        got = float(target.local_observable_fn(jnp.asarray(x), jnp.asarray(row))[0])
        assert got == pytest.approx(expect, abs=1e-5)

    with c.unlocked():
        c.stable.estimator = "global"
    glob = pipeline.observable_target(c, system, data)
    whole = np.array([_brute_force_min_intermolecular(x, np.ones(18, bool), box) for x in frames])
    expect = np.maximum(whole.mean() - whole, 0.0)
    np.testing.assert_allclose(glob.reference, [expect.mean()], rtol=1e-6)
    for x, e in zip(frames, expect, strict=True):
        assert float(glob.observable_fn(jnp.asarray(x))[0]) == pytest.approx(e, abs=1e-6)
    with c.unlocked():
        c.stable.estimator, c.stable.local_k_nearest = "local", 0
    with pytest.raises(ValueError, match="local_k_nearest"):
        pipeline.observable_target(c, system, data)


def test_learning_step_compiles_once_across_steps():
    """New samples, selections, QM chunk weights, lr and optimizer state never retrace
    the jitted learning step (chex fails a second trace)."""
    chex.clear_trace_counter()  # counts are per function code, across tests
    data = harmonic_bond_dataset(n_frames=12, seed=3)
    config = tiny_config()
    potential = factory.build(config.model)
    pos = jnp.asarray(data.positions)
    params = potential.init(jax.random.PRNGKey(1), data.species, pos[0], None)
    fn = lambda x: observables.distance_histogram(x, r_max=10.0, dr=0.02, sigma=0.01)  # noqa: E731
    target = ObservableTarget("h(r)", np.asarray(jax.vmap(fn)(pos)).mean(0), observable_fn=fn)
    optimizer = learning_optimizer(1.0, 1e-3)
    step = make_learning_step(
        potential,
        data.species,
        None,
        target,
        optimizer,
        kT=units.kT_from_kelvin(500.0),
        qm_weight=1.0,
        qm_loss=qm.make_qm_loss(potential, energy_weight=0.05, force_weight=0.95),
        qm_frames=qm.prepare_frames(data, potential, dtype=pos.dtype),
    )
    jitted = jax.jit(chex.assert_max_traces(step, n=1))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    before = params
    for i, lr in enumerate((1e-3, 5e-4, 2e-4)):
        samples = pos[:1] + 0.08 * rng.standard_normal((8,) + pos.shape[1:])
        selected = jnp.asarray(rng.random(8) < 0.75)
        qm_idx = jnp.asarray(rng.permutation(12)[:8].reshape(2, 4), jnp.int32)
        qm_w = jnp.asarray(rng.random((2, 4)) < 0.9, pos.dtype)
        params, opt_state, metrics = jitted(
            params, opt_state, {"positions": samples}, selected, qm_idx, qm_w, jnp.asarray(lr)
        )
        assert np.isfinite(float(metrics["observable_loss"])), i
    assert jitted._cache_size() == 1
    with pytest.raises(AssertionError):  # the params did change
        chex.assert_trees_all_close(params, before)
