"""Training metrics: a JSON-lines log, a live progress bar, and training-curve plots.

Optionally each record is mirrored to TensorBoard (`tensorboard=True`, needs the
`tensorboard` extra: `pip install "stablejax[tensorboard]"`): the numeric fields
become scalars under `<folder of the .jsonl>/tensorboard/`, so `tensorboard
--logdir WORKDIR` shows pre-training, StABlE and evaluation side by side.

One JSON object per line (per epoch), flushed as it is written, so that a run
killed at any moment leaves a readable file. A resumed run reopens the file in
append mode after dropping the records newer than the checkpoint it resumed
from, so the log shows every epoch exactly once.

Example:
  >>> log = MetricsWriter(workdir / "metrics.jsonl", resume_step=start_epoch - 1)
  >>> log.write({"epoch": epoch, "train_loss": 0.1, "lr": 1e-3})
  >>> records = read_metrics(workdir / "metrics.jsonl")
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def _to_json_value(value: Any) -> Any:
    """NumPy/jax scalars and small arrays -> plain Python for json."""
    if isinstance(value, Mapping):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if hasattr(value, "__array__"):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    raise ValueError(f"metric value of type {type(value).__name__} is not JSON-serialisable")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a JSON-lines metrics file, in order.

    A last line cut short by a crash is skipped; a malformed line elsewhere is
    an error (the file was not written by `MetricsWriter`). A missing file
    gives an empty list.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # unterminated final line: the writer died mid-write
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({err})") from err
    return records


class MetricsWriter:
    """Appends one JSON record per call to a JSON-lines file, flushed line by line.

    Args:
      path: the .jsonl file (its folder is created).
      resume_step: when resuming from a checkpoint taken after step k, pass k:
        records with `record[step_key] > k` (written after that checkpoint by
        the run that died) are dropped first. None keeps everything (plain append).
      step_key: the record field holding the step (epoch) number.
      tensorboard: also write each record's numeric fields as TensorBoard scalars
        (step = `record[step_key]`) into `<folder of path>/tensorboard/`.

    With several processes (`jax.distributed`) only process 0 writes (the file and
    TensorBoard); the others keep their records in memory, so `records()` answers
    the same everywhere.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume_step: int | None = None,
        step_key: str = "epoch",
        tensorboard: bool = False,
    ):
        import jax

        self.path = os.fspath(path)
        self.step_key = step_key
        self._file = self._tb = None
        self._records = None  # in memory, processes other than 0 only
        if jax.process_index() != 0:
            records = read_metrics(self.path) if os.path.exists(self.path) else []
            if resume_step is not None:
                records = [r for r in records if r.get(step_key, -math.inf) <= resume_step]
            self._records = records
            return
        self._tb = (
            tensorboard_writer(
                os.path.join(os.path.dirname(os.path.abspath(self.path)), "tensorboard")
            )
            if tensorboard
            else None
        )
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.exists(self.path):
            records = read_metrics(self.path)
            if resume_step is not None:
                records = [r for r in records if r.get(step_key, -math.inf) <= resume_step]
            # Rewrite atomically: also drops a line half-written by a crashed run.
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends `record` (NumPy/jax scalars become Python numbers) and flushes."""
        values = _to_json_value(dict(record))
        line = json.dumps(values)
        if self._records is not None:  # not process 0: nothing written
            self._records.append(json.loads(line))
            return
        self._file.write(line + "\n")
        self._file.flush()
        if self._tb is not None:
            write_scalars(self._tb, values, step=int(values.get(self.step_key, 0)))

    def records(self) -> list[dict]:
        """Every record of the run so far (earlier sessions' too), oldest first."""
        if self._records is not None:
            return [dict(r) for r in self._records]
        return read_metrics(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tensorboard_writer(logdir: str | os.PathLike):
    """A `tensorboardX.SummaryWriter` for `logdir`, or a clear error without the extra."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "TensorBoard logging (log.tensorboard=True) needs tensorboardX: "
            'pip install "stablejax[tensorboard]"'
        ) from err
    return SummaryWriter(logdir=os.fspath(logdir))


def write_scalars(writer, record: Mapping[str, Any], *, step: int, prefix: str = "") -> int:
    """Writes the finite numeric fields of `record` (nested dicts as `a/b`) as scalars.

    Returns the number of scalars written; strings, lists and booleans are skipped.
    """
    n = 0
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            n += write_scalars(writer, value, step=step, prefix=f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                writer.add_scalar(name, float(value), global_step=step)
                n += 1
    writer.flush()
    return n


def format_metrics(record: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """A compact one-line summary, e.g. 'loss=0.0123 f_mae=45.6 lr=1.0e-03'."""
    parts = []
    for key in keys if keys is not None else record.keys():
        if key not in record:
            continue
        value = _to_json_value(record[key])
        if isinstance(value, float):
            text = f"{value:.2e}" if value != 0 and not 1e-2 <= abs(value) < 1e4 else f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def progress_bar(
    total: int | None,
    *,
    desc: str = "",
    initial: int = 0,
    unit: str = "epoch",
    disable: bool | None = None,
):
    """A tqdm bar for a training loop; `bar.set_postfix_str(format_metrics(...))` per epoch.

    Args:
      total: number of epochs (None if unknown).
      desc: label in front of the bar.
      initial: epochs already done (resumed runs start the bar there).
      unit: what one tick is.
      disable: True hides the bar; None hides it when stderr is not a terminal
        unless the env variable STABLEJAX_PROGRESS=1 is set.
    """
    from tqdm.auto import tqdm

    if disable is None and os.environ.get("STABLEJAX_PROGRESS") == "1":
        disable = False  # tqdm's None means: hide when not attached to a terminal
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True
    )


def plot_training_curves(
    records: Iterable[Mapping[str, Any]],
    keys: Sequence[str],
    path: str | os.PathLike,
    *,
    x: str = "epoch",
    log_y: Sequence[str] = (),
    title: str | None = None,
) -> str:
    """Plots metric curves against `x`, one panel per key, and saves a PNG.

    Args:
      records: metrics records (e.g. `read_metrics(...)`); records missing a key
        or holding a non-finite value are skipped for that panel.
      keys: record fields to plot.
      path: output image file.
      x: field on the horizontal axis.
      log_y: keys drawn with a logarithmic y axis.
      title: figure title.

    Returns:
      The path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = list(records)
    if not keys:
        raise ValueError("plot_training_curves needs at least one key")
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        xs, ys = [], []
        for r in records:
            if x in r and key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key]):
                xs.append(r[x])
                ys.append(r[key])
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_ylabel(key)
        if key in log_y and ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
