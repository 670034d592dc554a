"""Shared command line of the experiments: `python -m experiments.<system> --config=... --workdir=...`."""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags


def _route_library_logs(workdir: str) -> None:
    """Libraries' log records (orbax writes an INFO block per checkpoint) go to
    WORKDIR/log.txt; the console keeps our progress lines and warnings or worse."""
    import logging
    import os

    from absl import logging as absl_logging

    os.makedirs(os.path.expanduser(workdir), exist_ok=True)
    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    to_file = logging.FileHandler(os.path.join(os.path.expanduser(workdir), "log.txt"))
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_file)
    root.addHandler(to_console)
    root.setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)


def main(system: str) -> None:
    """Defines the flags and runs the study of `system` (called by experiments/<system>.py)."""
    config_flags.DEFINE_config_file(
        "config",
        f"experiments/configs/{system}.py:quick",
        f"Experiment config, e.g. experiments/configs/{system}.py:quick (presets: paper, "
        "quick, test). Override fields with --config.a.b=value.",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", f"runs/{system}", "Output folder (resumable).")
    flags.DEFINE_string(
        "seeds",
        "",
        "Run the whole study once per seed (e.g. '0,1,2') into WORKDIR/seed_<k>/ and write "
        "WORKDIR/summary.json and summary.md (per-seed medians, their mean and 95 % "
        "interval, paired test pooled over seeds). Empty: one run with --config.seed.",
    )

    def _run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        from experiments import pipeline

        config = flags.FLAGS.config
        if config.system != system:
            raise app.UsageError(
                f"--config is a {config.system!r} config; use experiments/configs/{system}.py"
            )
        from stablejax.precision import PRECISIONS, set_precision

        precision = config.get("precision", "float32")
        if precision not in PRECISIONS:
            raise app.UsageError(f"--config.precision={precision!r}: choose one of {PRECISIONS}")
        set_precision(precision)  # before any JAX array of the run is made
        _route_library_logs(flags.FLAGS.workdir)
        try:
            if flags.FLAGS.seeds:
                pipeline.run_seeds(
                    config, flags.FLAGS.workdir, pipeline.parse_seeds(flags.FLAGS.seeds)
                )
            else:
                pipeline.run(config, flags.FLAGS.workdir)
        except ValueError as err:
            if str(err).startswith(("config.", "--seeds")):
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            raise

    app.run(_run)
