"""QM pre-training (stablejax.training.qm) and the metrics log (stablejax.training.metrics).

The model is a tiny pair MLP of our own (wrapped in base.Potential), the data a
Morse cluster whose energies and forces are computed in plain NumPy.
"""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax import geometry
from stablejax.data.dataset import Dataset
from stablejax.potentials.base import Potential, edge_vectors, safe_norm
from stablejax.training import qm
from stablejax.training.metrics import (
    MetricsWriter,
    format_metrics,
    plot_training_curves,
    read_metrics,
)

MORSE_D, MORSE_A, MORSE_R0 = 0.4, 1.6, 1.5  # eV, 1/Å, Å
CUTOFF = 6.0  # Å


# ----------------------------------------------------------------------------------------------
# A tiny model and Morse-cluster data
# ----------------------------------------------------------------------------------------------


class PairNet(nn.Module):
    """Pair energy e(r) [e] from distances [e] Å: Gaussian basis -> MLP."""

    @nn.compact
    def __call__(self, r):
        centres = jnp.linspace(0.8, CUTOFF, 12, dtype=r.dtype)
        rbf = jnp.exp(-(((r[:, None] - centres) / 0.5) ** 2))
        h = jnp.tanh(nn.Dense(16)(rbf))
        return nn.Dense(1)(h)[:, 0]


def make_pair_potential(counter=None) -> Potential:
    net = PairNet()

    def per_atom_energies(params, species, positions, edges, box=None):
        if counter is not None:
            counter.append(1)  # runs once per trace, never per jitted call
        vectors, mask = edge_vectors(positions, edges, box)
        r = safe_norm(vectors)
        envelope = jnp.where(
            r < CUTOFF, 0.5 * (jnp.cos(jnp.pi * jnp.minimum(r / CUTOFF, 1)) + 1), 0
        )
        e_edge = net.apply(params["net"], r) * envelope * mask
        n = positions.shape[0]
        return 0.5 * jax.ops.segment_sum(e_edge, edges[0], num_segments=n)

    def init(key, species, positions, box=None):
        r = jnp.linspace(1.0, 3.0, 4, dtype=jnp.asarray(positions).dtype)
        net_params = net.init(key, r)
        return {"net": jax.tree.map(lambda x: x.astype(r.dtype), net_params)}

    return Potential(
        name="test_pair",
        config=None,
        cutoff=CUTOFF,
        init=init,
        per_atom_energies=per_atom_energies,
    )


def morse_energy_forces(positions):
    """Total Morse energy (eV) and forces [n, 3] eV/Å of one free-space cluster, NumPy."""
    d = positions[None, :, :] - positions[:, None, :]  # r_j - r_i
    r = np.linalg.norm(d, axis=-1)
    n = len(positions)
    iu = np.triu_indices(n, 1)
    x = np.exp(-MORSE_A * (r - MORSE_R0))
    pair = MORSE_D * (1 - x) ** 2 - MORSE_D
    energy = pair[iu].sum()
    dpair_dr = 2 * MORSE_D * (1 - x) * MORSE_A * x
    np.fill_diagonal(r, 1.0)
    coef = dpair_dr / r
    np.fill_diagonal(coef, 0.0)
    # F_i = -dE/dr_i = sum_j dpair/dr * (r_j - r_i)/r
    forces = np.einsum("ij,ijk->ik", coef, d)
    return energy, forces


def morse_dataset(n_frames, seed, n_atoms=5, noise=0.15):
    rng = np.random.default_rng(seed)
    base = np.array(
        [[0, 0, 0], [1.5, 0, 0], [0.75, 1.3, 0], [0.75, 0.43, 1.22], [0.75, 0.43, -1.22]]
    )[:n_atoms]
    positions = base[None] + noise * rng.normal(size=(n_frames, n_atoms, 3))
    ef = [morse_energy_forces(p) for p in positions]
    return Dataset(
        species=np.full(n_atoms, 6),
        positions=positions,
        energies=np.array([e for e, _ in ef]),
        forces=np.stack([f for _, f in ef]),
        source=f"morse(seed={seed})",
    )


@pytest.fixture(scope="module")
def setup():
    potential = make_pair_potential()
    train, val = morse_dataset(48, seed=1), morse_dataset(16, seed=2)
    params = potential.init(jax.random.key(0), train.species, train.positions[0])
    return potential, params, train, val


def test_morse_reference_forces_are_minus_gradient():
    pos = morse_dataset(1, seed=5).positions[0]
    _, f = morse_energy_forces(pos)
    h = 1e-6
    for i, k in [(0, 0), (3, 2), (4, 1)]:
        p, m = pos.copy(), pos.copy()
        p[i, k] += h
        m[i, k] -= h
        fd = -(morse_energy_forces(p)[0] - morse_energy_forces(m)[0]) / (2 * h)
        assert abs(fd - f[i, k]) < 1e-6


# ----------------------------------------------------------------------------------------------
# Loss, metrics, edges
# ----------------------------------------------------------------------------------------------


def test_qm_loss_matches_numpy_and_ignores_padding(setup):
    potential, params, train, _ = setup
    frames = qm.prepare_frames(train, potential)
    loss_fn = jax.jit(qm.make_qm_loss(potential, energy_weight=2.0, force_weight=30.0))
    idx = jnp.array([3, 7, 11, 3])
    weight = jnp.array([1.0, 1.0, 1.0, 0.0])
    loss, aux = loss_fn(params, frames, idx, weight)
    # Independent: per-frame predictions, NumPy formula over the 3 real frames.
    e_err, f_sq = [], []
    energy_and_forces = jax.jit(potential.energy_and_forces)
    for k in [3, 7, 11]:
        e, f = energy_and_forces(params, frames.species, frames.positions[k], frames.edges, None)
        e_err.append(float(e) - train.energies[k])
        f_sq.append(np.mean((np.asarray(f) - train.forces[k]) ** 2))
    expected = 2.0 * np.mean(np.square(e_err)) + 30.0 * np.mean(f_sq)
    np.testing.assert_allclose(loss, expected, rtol=1e-10)
    np.testing.assert_allclose(aux.force_mse, np.mean(f_sq), rtol=1e-10)
    # Per-atom variant divides the energy error by n.
    loss_pa, _ = jax.jit(qm.make_qm_loss(potential, per_atom_energy=True, force_weight=0.0))(
        params, frames, idx, weight
    )
    np.testing.assert_allclose(loss_pa, np.mean(np.square(e_err)) / 25, rtol=1e-10)


def test_evaluate_exact_errors(setup):
    potential, params, _, val = setup
    # Labels made by the model itself, then shifted: the errors are known exactly.
    frames = qm.prepare_frames(val, potential)
    e, f = jax.jit(
        jax.vmap(lambda p: potential.energy_and_forces(params, frames.species, p, frames.edges))
    )(frames.positions)
    shift = np.where(np.arange(val.n_frames) % 2 == 0, 0.003, -0.001)  # eV
    labelled = Dataset(
        species=val.species,
        positions=val.positions,
        energies=np.asarray(e) + shift,
        forces=np.asarray(f) + 0.002,  # eV/Å on every component
    )
    m = qm.evaluate(potential, params, labelled, batch_size=5)  # 16 frames: padded last batch
    assert m["n_frames"] == 16
    np.testing.assert_allclose(m["energy_mae_meV"], 2.0, rtol=1e-8)
    np.testing.assert_allclose(m["energy_rmse_meV"], math.sqrt((9 + 1) / 2), rtol=1e-8)
    np.testing.assert_allclose(m["energy_mae_per_atom_meV"], 2.0 / 5, rtol=1e-8)
    np.testing.assert_allclose(m["force_mae_meV_per_A"], 2.0, rtol=1e-8)
    np.testing.assert_allclose(m["force_rmse_meV_per_A"], 2.0, rtol=1e-8)


def test_periodic_frames_use_minimum_image_cutoff_edges(setup):
    potential, params, _, _ = setup
    data = morse_dataset(4, seed=3)
    free = qm.prepare_frames(data, potential)
    e, f = jax.jit(
        jax.vmap(lambda p: potential.energy_and_forces(params, free.species, p, free.edges))
    )(free.positions)
    # The same clusters translated so that they straddle the box faces: with the
    # minimum image (box > 2 cutoffs) every pair and every energy is unchanged.
    box = np.array([13.0, 13.5, 14.0])
    wrapped = (data.positions + np.array([12.5, 0.3, 13.8])) % box
    periodic = Dataset(
        species=data.species,
        positions=wrapped,
        energies=np.asarray(e),
        forces=np.asarray(f),
        box=box,
    )
    frames = qm.prepare_frames(periodic, potential)
    assert frames.edges.shape == (4, 2, 20)  # every ordered pair of 5 atoms is within cutoff
    m = qm.evaluate(potential, params, periodic)
    assert m["energy_mae_meV"] < 1e-9 and m["force_mae_meV_per_A"] < 1e-9


def test_cutoff_edges_match_brute_force_with_images():
    rng = np.random.default_rng(0)
    box = np.array([6.0, 7.0, 8.0])
    pos = rng.uniform(0, 1, size=(3, 10, 3)) * box
    edges = qm.cutoff_edges(pos, 2.9, box)
    for k in range(3):
        expected = set()
        for i in range(10):
            for j in range(10):
                if i == j:
                    continue
                for s in np.ndindex(3, 3, 3):
                    d = pos[k, j] + (np.array(s) - 1) * box - pos[k, i]
                    if np.linalg.norm(d) < 2.9:
                        expected.add((i, j))
        got = {(int(i), int(j)) for i, j in edges[k].T if i < 10}
        assert got == expected
        assert np.all(edges[k][:, len(got) :] == 10)
    # A cutoff beyond half the box: every periodic image, as edges with lattice shifts.
    image_edges = qm.cutoff_edges(pos, 3.5, box)
    assert image_edges.shape[:2] == (3, 5)
    for k in range(3):
        expected = {tuple(e) for e in geometry.image_edges_np(pos[k], box, 3.5).T.tolist()}
        got = {tuple(e) for e in image_edges[k].T.tolist() if e[0] < 10}
        assert got == expected
        assert np.all(image_edges[k][:2, len(got) :] == 10)
        assert np.all(image_edges[k][2:, len(got) :] == 0)


def test_bad_inputs_are_clear_errors(setup):
    potential, params, train, val = setup
    no_forces = Dataset(species=train.species, positions=train.positions, energies=train.energies)
    with pytest.raises(ValueError, match="lacks forces"):
        qm.prepare_frames(no_forces, potential)
    with pytest.raises(ValueError, match="unknown QM training config field 'epoch'"):
        qm.train_qm(potential, params, train, val, config={"epoch": 3})
    with pytest.raises(ValueError, match="'lr' must be float"):
        qm.train_qm(potential, params, train, val, config={"lr": "fast"})


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

FAST = {
    "batch_size": 8,
    "lr": 3e-2,
    "warmup_steps": 6,
    "energy_weight": 1.0,
    "force_weight": 100.0,
    "patience": 0,
    "progress": False,
}


def test_training_learns_morse_forces(setup, tmp_path):
    potential, params, train, val = setup
    before = qm.evaluate(potential, params, val)
    trained, history = qm.train_qm(
        potential, params, train, val, config={**FAST, "epochs": 60}, workdir=tmp_path
    )
    after = qm.evaluate(potential, trained, val)
    assert after["force_mae_meV_per_A"] < before["force_mae_meV_per_A"] / 10, (before, after)
    assert after["energy_mae_meV"] < before["energy_mae_meV"] / 10, (before, after)
    # The returned params are the best-validation ones, and the log says so.
    best = min(history, key=lambda r: r["val_force_mae_meV_per_A"])
    np.testing.assert_allclose(after["force_mae_meV_per_A"], best["val_force_mae_meV_per_A"])
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 61))
    # Linear warm-up over 6 steps from 0.2 lr; the lr logged is the epoch's last step's
    # (step 5 of epoch 1); later only the plateau factor can lower it.
    assert history[0]["lr"] == pytest.approx(FAST["lr"] * (0.2 + 0.8 * 5 / 6))
    assert all(r["lr"] <= FAST["lr"] for r in history)


def test_one_compilation_regardless_of_epochs(setup):
    _, params, train, val = setup
    counts = []
    for epochs in (1, 3):
        counter = []
        potential = make_pair_potential(counter)
        qm.train_qm(potential, params, train, val, config={**FAST, "epochs": epochs})
        counts.append(len(counter))
    # 48 frames / batch 8 = 6 steps per epoch; 16 val frames; a retrace per step or
    # per epoch would make the 3-epoch count larger.
    assert counts[0] == counts[1]


def test_resume_after_crash_equals_uninterrupted(setup, tmp_path):
    potential, params, train, val = setup
    cfg = {**FAST, "epochs": 5, "batch_size": 20, "ema_decay": 0.9, "plateau_patience": 1}
    full, full_hist = qm.train_qm(potential, params, train, val, config=cfg, workdir=tmp_path / "a")
    # "Crash" after 2 epochs, leaving a metrics record of an epoch that never got
    # its checkpoint and a half-written line.
    qm.train_qm(potential, params, train, val, config={**cfg, "epochs": 2}, workdir=tmp_path / "b")
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "train_loss": 1.0}) + "\n" + '{"epoch": 4, "tr')
    resumed, _ = qm.train_qm(potential, params, train, val, config=cfg, workdir=tmp_path / "b")
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    records = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    for r_full, r_res in zip(full_hist, records, strict=True):
        assert r_full["val_force_mae_meV_per_A"] == r_res["val_force_mae_meV_per_A"]
        assert r_full["lr"] == r_res["lr"]
    # Calling again on a finished run trains nothing and returns the same params.
    again, _ = qm.train_qm(potential, params, train, val, config=cfg, workdir=tmp_path / "b")
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ema_follows_its_recurrence_and_is_what_is_evaluated(setup, tmp_path):
    potential, params, train, val = setup
    decay = 0.8
    cfg = {**FAST, "batch_size": train.n_frames, "ema_decay": decay, "epochs": 1}
    raw = [params]
    for epochs in (1, 2, 3):  # one step per epoch; resume epoch by epoch
        _, history = qm.train_qm(
            potential, params, train, val, config={**cfg, "epochs": epochs}, workdir=tmp_path
        )
        state = qm.load_qm_state(tmp_path, params, config=cfg)
        raw.append(state["params"])
    ema = params
    for t in range(3):
        d = min(decay, (1 + t) / (10 + t))
        ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema, raw[t + 1])
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state["ema_params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # The EMA differs from the raw params, and validation used the EMA.
    assert not np.allclose(jax.tree.leaves(ema)[0], jax.tree.leaves(raw[-1])[0])
    val_ema = qm.evaluate(potential, state["ema_params"], val)
    np.testing.assert_allclose(
        history[-1]["val_force_mae_meV_per_A"], val_ema["force_mae_meV_per_A"], rtol=1e-10
    )


def test_qm_gradient_is_mean_over_all_frames(setup):
    potential, params, train, _ = setup
    frames = qm.prepare_frames(train, potential)
    loss_fn = qm.make_qm_loss(potential, force_weight=10.0)
    full = jax.jit(jax.grad(lambda p: loss_fn(p, frames, jnp.arange(48), jnp.ones(48))[0]))(params)
    loss, grads = qm.make_qm_gradient(potential, frames, batch_size=20, force_weight=10.0)(params)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_early_stopping_and_time_budget(setup):
    potential, params, train, val = setup
    # lr so small that the val force MAE can barely move: early stopping after `patience`.
    _, hist = qm.train_qm(
        potential,
        params,
        train,
        val,
        config={**FAST, "lr": 1e-12, "epochs": 50, "patience": 3},
    )
    assert len(hist) == 4  # epoch 1 sets the reference; 2, 3, 4 do not improve it by 0.1%
    _, hist = qm.train_qm(
        potential, params, train, val, config={**FAST, "epochs": 50, "max_time_s": 1e-9}
    )
    assert len(hist) == 1


def test_min_time_trains_past_the_epoch_count_until_the_time_has_passed(setup):
    potential, params, train, val = setup
    _, first = qm.train_qm(potential, params, train, val, config={**FAST, "epochs": 1})
    # At least two more epochs' worth of time (the first epoch carries no compilation now).
    min_time = 3.0 * first[-1]["time_s"]
    _, hist = qm.train_qm(
        potential, params, train, val, config={**FAST, "epochs": 1, "min_time_s": min_time}
    )
    assert len(hist) >= 2
    assert hist[-1]["time_s"] >= min_time  # the bound holds ...
    assert hist[-2]["time_s"] < min_time  # ... and training stops at the first epoch past it
    # Once the epochs are done and the time has passed, the epoch count decides as before.
    _, hist = qm.train_qm(
        potential, params, train, val, config={**FAST, "epochs": 3, "min_time_s": 1e-9}
    )
    assert len(hist) == 3
    with pytest.raises(ValueError, match="min_time_s"):
        qm.train_qm(
            potential, params, train, val, config={**FAST, "min_time_s": 5.0, "max_time_s": 1.0}
        )


# ----------------------------------------------------------------------------------------------
# Metrics log
# ----------------------------------------------------------------------------------------------


def test_metrics_writer_appends_and_resumes(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    with MetricsWriter(path) as w:
        for epoch in (1, 2, 3):
            w.write({"epoch": epoch, "loss": np.float32(0.5 * epoch), "v": jnp.arange(2)})
    assert read_metrics(path) == [{"epoch": e, "loss": 0.5 * e, "v": [0, 1]} for e in (1, 2, 3)]
    with open(path, "a") as f:
        f.write('{"epoch": 4, "lo')  # crash mid-line
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2, 3]
    with MetricsWriter(path, resume_step=2) as w:
        w.write({"epoch": 3, "loss": 9.0})
    assert [(r["epoch"], r["loss"]) for r in read_metrics(path)] == [(1, 0.5), (2, 1.0), (3, 9.0)]
    with open(path, "a") as f:
        f.write("not json\n{}\n")
    with pytest.raises(ValueError, match="line 4"):
        read_metrics(path)
    assert read_metrics(tmp_path / "missing.jsonl") == []
    assert format_metrics({"loss": 0.00012, "epoch": 3, "mae": 12.345}) == (
        "loss=1.20e-04 epoch=3 mae=12.35"
    )


def test_plot_training_curves(tmp_path):
    records = [{"epoch": e, "loss": 1.0 / e, "lr": 1e-3} for e in range(1, 6)]
    records.append({"epoch": 6, "loss": float("nan")})
    out = plot_training_curves(records, ["loss", "lr"], tmp_path / "curves.png", log_y=["loss"])
    assert os.path.getsize(out) > 1000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_refit_energy_shift_removes_constant_offsets_and_keeps_forces():
    """Reference energies = model energies + counts . s_true (three compositions): the
    refit recovers s_true, the residuals vanish, and the forces are bitwise unchanged."""
    from stablejax.potentials import factory

    cfg = factory.default_config("schnet")
    cfg.species = [1, 6, 8]
    cfg.hidden_features, cfg.n_filters, cfg.n_interactions = 8, 8, 1
    cfg.n_gaussians, cfg.head_features = 6, 4
    potential = factory.build(cfg)
    rng = np.random.default_rng(3)
    molecules = {"C2H6O": [6, 6, 8, 1, 1, 1, 1, 1, 1], "H2O": [8, 1, 1], "CH4": [6, 1, 1, 1, 1]}
    s_true = np.array([-0.37, -2.9, 1.15])  # eV per H, C, O
    params = potential.init(
        jax.random.PRNGKey(0), np.array(molecules["H2O"]), rng.normal(size=(3, 3)) * 1.2
    )
    datasets = []
    for z in molecules.values():
        z = np.array(z)
        pos = rng.normal(size=(4, len(z), 3)) * 1.3
        blank = Dataset(
            species=z, positions=pos, energies=np.zeros(4), forces=np.zeros((4, len(z), 3))
        )
        e_model = qm.predict_energies(potential, params, blank)
        counts = np.array([np.sum(z == k) for k in (1, 6, 8)], float)
        energies = e_model + counts @ s_true
        datasets.append(Dataset(species=z, positions=pos, energies=energies, forces=blank.forces))
    refit, delta = qm.refit_energy_shift(potential, params, datasets)
    np.testing.assert_allclose(delta, s_true, atol=1e-4)
    for d in datasets:
        np.testing.assert_allclose(qm.predict_energies(potential, refit, d), d.energies, atol=1e-4)
        edges = np.asarray(qm.all_pairs_edges(d.n_atoms))
        f0 = potential.forces(params, d.species, d.positions[0], edges)
        f1 = potential.forces(refit, d.species, d.positions[0], edges)
        np.testing.assert_array_equal(np.asarray(f0), np.asarray(f1))
    with pytest.raises(ValueError, match="no energies"):
        qm.refit_energy_shift(
            potential, params, Dataset(species=np.array([1, 1]), positions=np.zeros((1, 2, 3)))
        )


def test_warmup_schedule_is_linear_from_warmup_factor_and_applied_by_the_step(setup):
    import ml_collections

    cfg = ml_collections.ConfigDict({"lr": 1e-2, "warmup_steps": 10, "warmup_factor": 0.2})
    schedule = qm.learning_rate_schedule(cfg)
    for k in (0, 3, 9, 10, 50):
        expected = 1e-2 * (0.2 + 0.8 * min(k, 10) / 10)
        assert float(schedule(k)) == pytest.approx(expected, rel=1e-6)
    # One Adam step (all frames in one batch): each parameter with a gradient moves by
    # ~ the step's rate (Adam's first update is lr * g / |g|), i.e. warmup_factor * lr.
    potential, params, train, val = setup
    trained, history = qm.train_qm(
        potential, params, train, val,
        config={"epochs": 1, "batch_size": train.n_frames, "lr": 1e-2, "warmup_steps": 10,
                "warmup_factor": 0.2, "patience": 0, "progress": False},
    )  # fmt: skip
    moved = np.concatenate(
        [np.abs(np.ravel(a - b)) for a, b in zip(jax.tree.leaves(trained),
                                                   jax.tree.leaves(params), strict=True)]
    )  # fmt: skip
    moved = moved[moved > 0]
    np.testing.assert_allclose(np.max(moved), 2e-3, rtol=1e-3)
    assert history[0]["lr"] == pytest.approx(2e-3)
