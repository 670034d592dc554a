"""Crash safety: a kill at any point leaves nothing half-written, and resume completes it."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from experiments import pipeline
from experiments.configs import aspirin as aspirin_config
from stablejax.data import write_sgdml_npz
from stablejax.files import read_json
from stablejax.potentials import factory
from stablejax.potentials import io as model_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_killed(script: str, tmp_path) -> int:
    """Runs `script` in a fresh interpreter; returns its exit code (-9 when killed)."""
    code = textwrap.dedent(script)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_ENABLE_X64": "1"},  # as tests/conftest.py
    )  # fmt: skip
    return proc.returncode, proc.stderr


def test_kill_inside_save_model_leaves_no_half_model(tmp_path):
    path = tmp_path / "models" / "stable"
    rc, err = _run_killed(
        f"""
        import os, signal, jax
        from stablejax.potentials import factory, io
        from experiments.configs import aspirin
        config = aspirin.get_config("test").model
        pot = factory.build(config)
        import numpy as np
        params = pot.init(jax.random.PRNGKey(0), np.array([6, 1, 8]), np.eye(3), None)
        # SIGKILL while the params are being written (model.json is already there).
        io.ocp.StandardCheckpointer.save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        io.save_model({str(path)!r}, config, params)
        """,
        tmp_path,
    )
    assert rc == -9, err
    assert not path.exists(), "a killed save left a model directory behind"
    config = aspirin_config.get_config("test").model
    pot = factory.build(config)
    params = pot.init(jax.random.PRNGKey(0), np.array([6, 1, 8]), np.eye(3), None)
    model_io.save_model(path, config, params)  # the rerun completes it
    _, back = model_io.load_model(path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not list(path.parent.glob("stable.tmp-*")), "stale temporary directory left"


def _test_study(tmp_path):
    path = tmp_path / "ethanol.npz"
    if not path.exists():
        from test_stable_training import harmonic_bond_dataset

        write_sgdml_npz(path, harmonic_bond_dataset(n_frames=40), energy_unit="eV")
    config = aspirin_config.get_config("test")
    with config.unlocked():
        config.data.path = str(path)
        config.data.energy_unit = "eV"
        config.model.species = [1, 6, 8]
    return config


def test_kill_between_report_and_final_metrics_redoes_the_evaluation(tmp_path):
    config = _test_study(tmp_path)
    full = pipeline.run(config, str(tmp_path / "full"))
    run = tmp_path / "killed"
    rc, err = _run_killed(
        f"""
        import os, signal, ml_collections, json
        from stablejax import evaluation
        from experiments import pipeline
        real = evaluation.write_json
        def kill_on_final(path, content, **kw):
            if str(path).endswith("final_metrics.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, content, **kw)
        evaluation.write_json = kill_on_final
        config = ml_collections.ConfigDict(json.loads({config.to_json()!r}))
        pipeline.run(config, {str(run)!r})
        """,
        tmp_path,
    )
    assert rc == -9, err
    assert (run / "eval" / "report.md").exists()
    assert not (run / "eval" / "final_metrics.json").exists()
    resumed = pipeline.run(config, str(run))  # evaluation not done: it runs again
    # baseline_plus's epoch count follows measured wall times, so only the two
    # deterministic models are compared with the uninterrupted run.
    for name in ("baseline", "stable"):
        assert resumed[name]["stable_times_ps"] == full[name]["stable_times_ps"]
        assert resumed[name]["force_mae_meV_per_A"] == pytest.approx(
            full[name]["force_mae_meV_per_A"], rel=1e-9
        )
    assert "baseline_plus" in resumed and (run / "eval" / "report.md").exists()


def test_torn_json_names_its_file(tmp_path):
    path = tmp_path / "final_metrics.json"
    path.write_text('{"baseline": {"median')
    with pytest.raises(ValueError, match=r"final_metrics\.json: not valid JSON"):
        read_json(path)
    path.write_text(json.dumps({"a": 1}))
    assert read_json(path) == {"a": 1}


@pytest.mark.parametrize(
    "field, value", [("seed", 7), ("md.n_replicas", 2), ("md.temperature_K", 300.0)]
)
def test_changed_training_fields_are_refused_before_any_work(tmp_path, field, value):
    config = _test_study(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    stored = config.to_json_best_effort(indent=2)
    (run / "config.json").write_text(stored)
    changed = config.copy_and_resolve_references()
    node = changed
    *parents, leaf = field.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(
        ValueError, match=rf"(?s)other settings.*{re.escape(field)}: .*another --workdir"
    ):
        pipeline.run(changed, str(run))
    assert (run / "config.json").read_text() == stored, "config.json was rewritten"
    assert sorted(p.name for p in run.iterdir()) == ["config.json"], "work was done"


def test_changed_evaluation_fields_rerun_only_the_evaluation(tmp_path):
    config = _test_study(tmp_path)
    run = tmp_path / "run"
    first = pipeline.run(config, str(run))
    assert first["stable"]["n_replicas"] == 4
    model_time = os.path.getmtime(run / "models" / "stable" / "model.json")
    again = config.copy_and_resolve_references()
    again.eval.n_replicas = 2
    second = pipeline.run(again, str(run))
    assert second["stable"]["n_replicas"] == 2
    assert os.path.getmtime(run / "models" / "stable" / "model.json") == model_time
    previous = list((run / "previous_eval").iterdir())
    assert len(previous) == 1 and (previous[0] / "final_metrics.json").exists()
    assert json.loads((run / "config.json").read_text())["eval"]["n_replicas"] == 2


def test_training_resumes_from_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path):
    """A damaged latest checkpoint costs one epoch: the run resumes from the previous one
    and ends exactly where an uninterrupted run ends."""
    from test_checkpoint import _flip_array_bytes
    from test_stable_training import harmonic_bond_dataset, make_trainer, tiny_config

    data = harmonic_bond_dataset()
    full = make_trainer(tiny_config(max_epochs=5), data, str(tmp_path / "a"))
    params_full = full.run()
    first = make_trainer(tiny_config(max_epochs=3), data, str(tmp_path / "b"))
    first.run()
    _flip_array_bytes(str(tmp_path / "b" / "checkpoints" / "3"))
    with pytest.warns(UserWarning, match="cannot be restored"):
        resumed = make_trainer(tiny_config(max_epochs=5), data, str(tmp_path / "b"))
    assert resumed.state["epoch"] == 2
    params = resumed.run()
    for a, b in zip(jax.tree.leaves(params_full), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_command_line_keeps_library_logs_out_of_the_console(tmp_path):
    """orbax's INFO blocks (one per checkpoint) go to WORKDIR/log.txt, not the terminal."""
    from test_stable_training import harmonic_bond_dataset

    path = tmp_path / "ethanol.npz"
    write_sgdml_npz(path, harmonic_bond_dataset(n_frames=40), energy_unit="eV")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.aspirin", "--config=experiments/configs/aspirin.py:test",
         f"--config.data.path={path}", "--config.data.energy_unit=eV",
         f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "[stablejax" in console and "median stable time" in console
    assert "orbax" not in console.lower() and "checkpoint" not in proc.stderr.lower()
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "orbax" in log.lower()
    assert "median stable time" in log  # our lines are in the file too
    # The default precision is float32 (no JAX_ENABLE_X64 in this subprocess's env).
    _, params = model_io.load_model(tmp_path / "run" / "models" / "stable")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


def test_same_dynamics_ignores_only_the_energy_shift():
    import numpy as np

    from experiments.pipeline import _same_dynamics

    base = {"energy_shift": np.array([1.0, 2.0]), "w": {"a": np.arange(3.0)}}
    shifted = {"energy_shift": np.array([1.0, 2.5]), "w": {"a": np.arange(3.0)}}
    changed = {"energy_shift": np.array([1.0, 2.0]), "w": {"a": np.arange(3.0) + 1e-7}}
    assert _same_dynamics(shifted, {"baseline": base}) == "baseline"
    assert _same_dynamics(changed, {"baseline": base}) is None
    assert _same_dynamics(base, {}) is None


def test_pretrain_summary_reports_the_kept_epoch_not_the_last():
    """A run that diverged after its best epoch keeps the best model: the log must say
    which epoch it kept and its validation error, not only the last (diverged) one."""
    history = [
        {"epoch": 1, "val_force_mae_meV_per_A": 300.0, "best_epoch": 1},
        {"epoch": 2, "val_force_mae_meV_per_A": 68.1, "best_epoch": 2},
        {"epoch": 3, "val_force_mae_meV_per_A": 816.2, "best_epoch": 2},
    ]
    line = pipeline.pretrain_summary(history)
    assert "after 3 epochs" in line and "kept epoch 2" in line
    assert "val force MAE 68.1 meV/Å" in line and "last epoch 816.2" in line


@pytest.mark.parametrize("system", ["water", "aspirin", "tetrapeptide", "lj"])
def test_preset_overrides_name_exactly_the_command_line_changes(system):
    import importlib

    module = importlib.import_module(f"experiments.configs.{system}")
    config = module.get_config("quick")
    assert pipeline.preset_overrides(config) == {}
    preset = module.get_config("quick")
    with config.unlocked():
        config.seed = preset.seed + 3
        config.stable.qm_weight = 123.0
        config.log.tensorboard = not preset.log.tensorboard  # a logging sink: left out
    assert pipeline.preset_overrides(config) == {
        "seed": (preset.seed + 3, preset.seed),
        "stable.qm_weight": (123.0, preset.stable.qm_weight),
    }
