"""TensorBoard mirroring of metrics, float64 runs and progress bars of the command line."""

import glob
import os
import struct
import subprocess
import sys

import numpy as np

from stablejax.data import write_sgdml_npz
from stablejax.training.metrics import MetricsWriter, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TFRecord event files under `logdir`."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(
        glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    ):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metrics_writer_mirrors_numeric_fields_to_tensorboard(tmp_path):
    path = tmp_path / "stable" / "metrics.jsonl"
    with MetricsWriter(path, tensorboard=True) as w:
        w.write({"epoch": 1, "phase": "simulation", "unstable_fraction": 0.5, "lr": 1e-3})
        w.write({"epoch": 2, "unstable_fraction": 0.25, "nested": {"a": 3.0}, "bad": float("nan")})
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2]
    scalars = read_scalars(tmp_path / "stable" / "tensorboard")
    assert scalars["unstable_fraction"] == [(1, 0.5), (2, 0.25)]
    assert scalars["nested/a"] == [(2, 3.0)]
    assert np.isclose(scalars["lr"][0][1], 1e-3)
    assert "phase" not in scalars and "bad" not in scalars  # strings and NaN are skipped
    assert [s for s, _ in scalars["epoch"]] == [1, 2]


def _dataset(tmp_path):
    from test_stable_training import harmonic_bond_dataset

    path = tmp_path / "ethanol.npz"
    write_sgdml_npz(path, harmonic_bond_dataset(n_frames=40), energy_unit="eV")
    return path


def _params_dtypes(model_dir) -> set:
    from stablejax.potentials import io as model_io

    _, params = model_io.load_model(model_dir)
    import jax

    return {str(x.dtype) for x in jax.tree.leaves(params) if np.issubdtype(x.dtype, np.floating)}


def test_float64_run_with_tensorboard_and_progress_bars(tmp_path):
    """`--config.precision=float64` trains and evaluates in float64; TensorBoard gets
    pre-training, StABlE and evaluation scalars; every stage shows a progress bar."""
    data = _dataset(tmp_path)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["STABLEJAX_PROGRESS"] = "1"  # bars although stderr is not a terminal
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.aspirin", "--config=experiments/configs/aspirin.py:test",
         f"--config.data.path={data}", "--config.data.energy_unit=eV",
         "--config.precision=float64", "--config.log.tensorboard=True", f"--workdir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision: float64" in proc.stdout
    for model in ("baseline", "stable", "baseline_plus"):
        assert _params_dtypes(run / "models" / model) == {"float64"}, model
    # Progress bars (tqdm writes them to stderr): pre-training, StABlE, evaluation.
    for desc in ("QM pre-training", "StABlE", "eval baseline", "eval stable"):
        assert desc in proc.stderr, desc
    assert "[StABlE] epoch" not in proc.stdout  # the bar replaces the per-epoch lines
    pre = read_scalars(run / "pretrain" / "tensorboard")
    assert "val_force_mae_meV_per_A" in pre
    stable = read_scalars(run / "stable" / "tensorboard")
    n_epochs = len(read_metrics(run / "stable" / "metrics.jsonl"))
    assert len(stable["unstable_fraction"]) == n_epochs > 0
    ev = read_scalars(run / "eval" / "tensorboard")
    curve = ev["stable/fraction_stable"]
    assert curve[0] == (0, 1.0) and len(curve) == 51
    values = [v for _, v in curve]
    assert np.all(np.diff(values) <= 0)  # survival never increases
    assert "baseline/median_stable_time_ps" in ev


def test_precision_is_checked_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.aspirin", "--config=experiments/configs/aspirin.py:test",
         "--config.precision=float16", f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "precision" in proc.stderr and "float64" in proc.stderr
