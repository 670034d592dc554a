"""The GPU run's scripts work on a CPU: benchmarks/gpu/paper_epoch.py at its tiniest size
(a subprocess, ~30-50 s on 2 cores) and the shell scripts' syntax."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"

TIMED_PARTS = {
    "simulation_epoch": (
        "first_call_s", "compile_s", "run_s", "ms_per_step", "replica_steps_per_s",
        "atom_steps_per_s",
    ),
    "learning_step": ("compile_s", "run_s", "samples_per_s"),
    "estimator": ("compile_s", "run_s", "samples_per_s"),
    "evaluation_chunk": (
        "first_call_s", "compile_s", "run_s", "ms_per_step", "replica_steps_per_s",
        "atom_steps_per_s",
    ),
}  # fmt: skip


@pytest.mark.parametrize("script", ["run.sh", "download_wheels.sh"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_paper_epoch_tiny_writes_finite_positive_timings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault(  # cheap compilation (conftest sets the same for the test process)
        "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    proc = subprocess.run(
        [sys.executable, str(GPU / "paper_epoch.py"), "--tiny", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "paper_epoch.json").read_text())

    assert report["status"] == {
        "epoch": "ok", "learning": "ok", "estimator": "ok", "eval": "ok"
    }  # fmt: skip
    assert report["sizes"] == {
        "replicas": 4, "steps": 20, "eval_replicas": 4, "eval_steps": 20, "qm_frames": 8
    }  # fmt: skip
    for key in ("jax", "backend", "devices", "device_kind", "model", "dtype", "total_s"):
        assert key in report, key
    assert report["backend"] == "cpu" and report["dtype"] == "float32"
    assert report["model"]["name"] == "schnet" and report["model"]["n_params"] > 0
    for part, keys in TIMED_PARTS.items():
        for key in keys:
            value = report[part][key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (part, key)
    sim = report["simulation_epoch"]
    assert (sim["replicas"], sim["steps"], sim["integrator"]) == (4, 20, "nose_hoover")
    ev = report["evaluation_chunk"]
    assert (ev["replicas"], ev["steps"], ev["integrator"]) == (4, 20, "langevin")
    # Replica-steps and atom-steps per second describe the same run (21 atoms).
    assert sim["atom_steps_per_s"] == pytest.approx(21 * sim["replica_steps_per_s"])
    assert sim["replica_steps_per_s"] == pytest.approx(4 * 20 / sim["run_s"])
    # 4 replicas x 2 frames (every 10 steps of 20); the QM term ran on the 8 frames.
    learn = report["learning_step"]
    assert learn["samples"] == report["estimator"]["samples"] == 8
    assert learn["qm_frames"] == 8 and learn["metrics"]["qm_loss"] is not None
    assert report["estimator"]["loss"] == pytest.approx(
        learn["metrics"]["observable_loss"], rel=1e-4
    )
