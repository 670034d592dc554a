"""The StABlE loop: phases, resume equality, and config errors that stop before any work."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from ase.build import molecule

from experiments import pipeline
from experiments.configs import aspirin as aspirin_config
from stablejax import stability
from stablejax.data import Dataset, write_sgdml_npz
from stablejax.data import topology as topo
from stablejax.potentials import factory
from stablejax.training import qm
from stablejax.training.stable import StableTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def harmonic_bond_dataset(n_frames=24, seed=0) -> Dataset:
    """Ethanol frames around equilibrium with energies/forces of harmonic bonds (eV, Å)."""
    mol = molecule("CH3CH2OH")
    z = mol.get_atomic_numbers()
    x0 = mol.get_positions()
    bonds = topo.find_bonds(z, x0)
    r0 = np.linalg.norm(x0[bonds[:, 1]] - x0[bonds[:, 0]], axis=1)
    rng = np.random.default_rng(seed)
    pos = x0[None] + 0.05 * rng.standard_normal((n_frames,) + x0.shape)
    d = pos[:, bonds[:, 1]] - pos[:, bonds[:, 0]]
    r = np.linalg.norm(d, axis=-1)
    k = 20.0  # eV/Å^2
    energies = (k * (r - r0) ** 2).sum(axis=1) - 100.0
    g = (2 * k * (r - r0) / r)[..., None] * d  # dE/d(pos_j) for each bond
    forces = np.zeros_like(pos)
    np.add.at(forces, (slice(None), bonds[:, 1]), -g)
    np.add.at(forces, (slice(None), bonds[:, 0]), g)
    return Dataset(species=z, positions=pos, energies=energies, forces=forces, source="synthetic")


def tiny_config(**stable):
    c = aspirin_config.get_config("test")
    with c.unlocked():
        c.model.species = [1, 6, 8]
        c.md.integrator = "langevin"
        c.md.friction_per_ps = 10.0
        c.md.n_replicas = 4
        c.md.steps_per_epoch = 10
        c.md.check_every = 5
        c.md.chunk_steps = 10
        c.stability.threshold = 0.08
        c.stable.sample_every = 5
        c.stable.batch_size = 4
        c.stable.qm_batch_size = 4
        c.stable.plateau_patience = 1
        c.stable.max_lr_reductions = 1
        c.stable.reset_fraction = 0.5
        c.stable.history_depth = 3
        for k, v in stable.items():
            c.stable[k] = v
    return c


def make_trainer(config, dataset, workdir, mesh=None):
    potential = factory.build(config.model)
    params = potential.init(jax.random.PRNGKey(0), dataset.species, dataset.positions[0], None)
    bonds = topo.find_bonds(dataset.species, dataset.positions[0])
    eq = topo.equilibrium_bond_lengths(dataset.positions, bonds)
    criterion = stability.bond_length_criterion(bonds, eq, threshold=config.stability.threshold)
    target = pipeline.observable_target(
        config, topo.System(dataset.species, dataset.box, bonds), dataset
    )
    return StableTrainer(
        potential=potential,
        params=params,
        species=dataset.species,
        box=None,
        config=config,
        criterion=criterion,
        target=target,
        qm_frames=qm.prepare_frames(dataset, potential),
        initial_positions=dataset.positions[: config.md.n_replicas],
        workdir=workdir,
        progress=False,
        mesh=mesh,
    )


TIMING_FIELDS = (
    "wall_time_s",
    "md_time_s",
    "md_steps_per_s",
    "md_replica_steps_per_s",
    "learning_step_time_s",
)


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_records_carry_md_speed_and_learning_step_time(tmp_path):
    config = tiny_config(max_epochs=4)
    trainer = make_trainer(config, harmonic_bond_dataset(), str(tmp_path / "run"))
    trainer.run()
    records = trainer.history
    assert {r["phase"] for r in records} == {"simulation", "learning"}
    steps = config.md.steps_per_epoch
    for r in records:
        assert r["md_time_s"] > 0
        assert r["md_steps_per_s"] == pytest.approx(steps / r["md_time_s"])
        assert r["md_replica_steps_per_s"] == pytest.approx(
            steps * config.md.n_replicas / r["md_time_s"]
        )
        assert ("learning_step_time_s" in r) == (r["phase"] == "learning")


def test_resume_equals_uninterrupted(tmp_path):
    data = harmonic_bond_dataset()
    full = make_trainer(tiny_config(max_epochs=5), data, str(tmp_path / "a"))
    params_full = full.run()
    history = full.history
    phases = [r["phase"] for r in history]
    assert "learning" in phases and phases[0] == "simulation"
    assert any(r.get("phase_end") for r in history), "the learning phase never ended"
    assert phases.count("simulation") >= 2, "no second simulation phase"
    assert any(r.get("replicas_reset", 0) > 0 for r in history[1:]), "no random resets"

    # "Killed" after 3 epochs (the last checkpoint), then resumed from the workdir.
    first = make_trainer(tiny_config(max_epochs=3), data, str(tmp_path / "b"))
    first.run()
    resumed = make_trainer(tiny_config(max_epochs=5), data, str(tmp_path / "b"))
    assert resumed.state["epoch"] == 3
    params_resumed = resumed.run()

    for a, b in zip(jax.tree.leaves(params_full), jax.tree.leaves(params_resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _strip(resumed.history) == _strip(history)
    # The learning steps really changed the model.
    first_params = factory.build(tiny_config().model).init(
        jax.random.PRNGKey(0), data.species, data.positions[0], None
    )
    changed = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(first_params), jax.tree.leaves(params_full), strict=True)
    ]
    assert any(changed)


def test_resume_in_the_middle_of_a_learning_phase_is_bitwise(tmp_path):
    """Killed after two learning epochs of one phase (with an lr reduction), resumed from
    that checkpoint: the state and the records equal an uninterrupted run's bit for bit;
    the checkpoint reads with plain orbax as a tree named like `StableState`."""
    import orbax.checkpoint as ocp

    from stablejax.training.stable import LEARNING, StableState

    data = harmonic_bond_dataset()
    rules = dict(upper_threshold=0.0, lower_threshold=-1.0, max_lr_reductions=10)
    full = make_trainer(tiny_config(max_epochs=5, **rules), data, str(tmp_path / "a"))
    full.run()
    first = make_trainer(tiny_config(max_epochs=3, **rules), data, str(tmp_path / "b"))
    first.run()
    mid = first.state
    assert int(mid.phase) == LEARNING and int(mid.learning_steps) == 2
    assert int(mid.lr_reductions) == 1 and int(mid.cycles) == 0

    plain = ocp.StandardCheckpointer().restore(first.ckpt.state_path(3))
    assert set(plain) == {f.name for f in dataclasses.fields(StableState)}
    assert int(plain["epoch"]) == 3 and int(plain["lr_reductions"]) == 1
    assert "learning_rate" in plain["opt_state"]["hyperparams"]
    for a, b in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(mid.params), strict=True):
        np.testing.assert_array_equal(a, b)

    resumed = make_trainer(tiny_config(max_epochs=5, **rules), data, str(tmp_path / "b"))
    assert int(resumed.state.epoch) == 3 and int(resumed.state.phase) == LEARNING
    resumed.run()
    a_state = full.state.replace(time_s=np.asarray(0.0))
    b_state = resumed.state.replace(time_s=np.asarray(0.0))
    assert jax.tree.structure(a_state) == jax.tree.structure(b_state)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(a_state), jax.tree.leaves(b_state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    assert _strip(resumed.history) == _strip(full.history)
    assert [r["phase"] for r in full.history] == ["simulation"] + ["learning"] * 4
    lr, factor = full.scfg.lr, full.scfg.plateau_factor
    assert [r["lr"] for r in full.history[1:]] == [lr, lr, lr * factor, lr * factor]


@pytest.mark.parametrize(
    "override, field",
    [
        ("--config.md.n_replicas=abc", "n_replicas"),
        ("--config.no_such_field=1", "no_such_field"),
        ("--config.data.path=/no/such/file.npz", "data.path"),
        ("--config.md.integrator=verlet", "md.integrator"),
        ("--config.md.free_space_edges=some", "md.free_space_edges"),
        ("--config.compilation_cache=/dev/null/xla", "config.compilation_cache"),
        ("--config.stability.eval_guard=nonsense", "stability.eval_guard"),
        ("--config.stability.eval_guard_threshold=-1", "stability.eval_guard_threshold"),
        ("--config.data.seed=-2", "data.seed"),
        ("--config.distributed=bogus", "config.distributed"),
        ("--config.devices=99999", "config.devices"),
        ("--seeds=a,b", "--seeds"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, override, field):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.aspirin",
            "--config=experiments/configs/aspirin.py:test",
            override,
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert field in proc.stderr + proc.stdout
    # Nothing was generated or trained.
    assert not (tmp_path / "run" / "pretrain").exists()


def test_pipeline_test_preset_end_to_end(tmp_path):
    """The `test` preset runs the whole study on a user data file and writes its outputs."""
    path = tmp_path / "ethanol.npz"
    data = harmonic_bond_dataset(n_frames=40)
    write_sgdml_npz(path, data, energy_unit="eV")
    config = aspirin_config.get_config("test")
    with config.unlocked():
        config.data.path = str(path)
        config.data.energy_unit = "eV"
        config.model.species = [1, 6, 8]
    final = pipeline.run(config, str(tmp_path / "run"))
    for name in ("baseline", "stable", "baseline_plus"):
        for key in (
            "median_stable_time_ps",
            "mean_stable_time_ps",
            "n_replicas",
            "max_time_ps",
            "energy_mae_meV",
            "force_mae_meV_per_A",
        ):
            assert key in final[name]
    for f in ("eval/final_metrics.json", "eval/report.md", "eval/survival.png", "config.json"):
        assert (tmp_path / "run" / f).exists(), f
    # The control got at least StABlE's learning budget, and both paired tests exist.
    assert set(final["paired_tests"]) == {"stable vs baseline", "stable vs baseline_plus"}
    info = json.loads((tmp_path / "run" / "models" / "baseline_plus.json").read_text())
    history = [
        json.loads(line)
        for line in (tmp_path / "run" / "stable" / "metrics.jsonl").read_text().splitlines()
    ]
    n_learning = sum(r["phase"] == "learning" for r in history)
    assert info["stable_learning_steps"] == n_learning
    assert n_learning > 0, "the test preset must exercise a learning phase"
    assert info["optimizer_steps"] >= n_learning
    assert info["train_time_s"] >= info["stable_learning_time_s"] > 0
    assert info["val_force_mae_continued_meV_per_A"] > 0
    report = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "baseline_plus" in report
    for name in ("baseline", "stable", "baseline_plus"):
        assert (tmp_path / "run" / "eval" / name / "traj" / "replica_000.extxyz").exists()


def test_learning_budget_counts_learning_epochs():
    history = [
        {"phase": "simulation", "wall_time_s": 10.0},
        {"phase": "learning", "wall_time_s": 25.0},
        {"phase": "learning", "wall_time_s": 45.0},
        {"phase": "simulation", "wall_time_s": 50.0},
    ]
    assert pipeline.learning_budget(history) == (2, 35.0)


@pytest.mark.parametrize("system", ["aspirin", "tetrapeptide", "water", "lj"])
def test_every_preset_is_valid_and_builds(system):
    """Every shipped preset passes validation, states its reductions and builds its model."""
    import importlib

    module = importlib.import_module(f"experiments.configs.{system}")
    for preset in module.PRESETS:
        config = module.get_config(preset)
        pipeline.validate_config(config)
        assert config.preset == preset
        if preset not in ("paper", "npt"):  # npt: the paper's water settings + barostat
            assert config.reductions, f"{system}:{preset} does not list its reductions"
        factory.build(config.model)
    with pytest.raises(ValueError, match="unknown preset"):
        module.get_config("nonsense")


def _outside(kind, low, high):
    """A value just outside a FIELD_DOMAINS domain (NaN where it is unbounded)."""
    if low is not None:
        b = low[1] if isinstance(low, tuple) else low
        value = b if isinstance(low, tuple) else b - 1
    elif high is not None:
        b = high[1] if isinstance(high, tuple) else high
        value = b if isinstance(high, tuple) else b + 1
    else:
        return float("nan")
    return int(value) if kind == "int" else float(value)


@pytest.mark.parametrize("system", ["aspirin", "tetrapeptide", "water", "lj"])
def test_every_numeric_field_of_every_preset_is_checked(system):
    """For each preset, each numeric field set just outside its domain fails validation,
    naming the field (the README promises this for every field)."""
    import importlib

    module = importlib.import_module(f"experiments.configs.{system}")
    for preset in module.PRESETS:
        for field, kind, low, high, _ in pipeline.FIELD_DOMAINS:
            config = module.get_config(preset)
            if pipeline._field(config, field) is pipeline._MISSING:
                continue
            node = config
            *parents, leaf = field.split(".")
            for part in parents:
                node = node[part]
            with config.unlocked():
                node[leaf] = _outside(kind, low, high)
            with pytest.raises(ValueError, match=rf"config\.{re.escape(field)}:"):
                pipeline.validate_config(config)


@pytest.mark.parametrize(
    "field, value",
    [
        ("md.temperature_K", 0.0),
        ("md.temperature_K", -300.0),
        ("md.check_every", 0),
        ("eval.record_every", 0),
        ("eval.n_replicas", 0),
        ("stable.upper_threshold", 2.0),
        ("md.chunk_steps", 0),
        ("stable.lr", -1.0),
        ("stable.batch_size", 0),
        ("eval.temperature_K", 0.0),
    ],
)
def test_reported_bad_fields_fail_validation(field, value):
    config = aspirin_config.get_config("quick")
    section, leaf = field.split(".")
    config[section][leaf] = value
    with pytest.raises(ValueError, match=rf"config\.{re.escape(field)}:"):
        pipeline.validate_config(config)


def test_data_sizes_are_checked_after_loading():
    data = harmonic_bond_dataset(n_frames=20)
    config = aspirin_config.get_config("quick")
    config.data.n_train, config.data.n_val = 18, 2
    with pytest.raises(ValueError, match=r"config\.data\.n_train/n_val/n_test: 18 \+ 2 .* has 20"):
        pipeline.split(config, data)
    config.data.n_train, config.data.n_val = 15, 2
    train, val, test = pipeline.split(config, data)
    assert (train.n_frames, val.n_frames, test.n_frames) == (15, 2, 3)


@pytest.mark.parametrize("observable", ["min_intermolecular_distance", "contact_shortfall"])
def test_local_min_intermolecular_observable_needs_neighbours_before_work(observable):
    from experiments.configs import water as water_config

    config = water_config.get_config("quick")
    config.observable.name = observable
    config.stable.local_k_nearest = 0
    with pytest.raises(ValueError, match=r"config\.stable\.local_k_nearest:"):
        pipeline.validate_config(config)
