"""Shared command line of the experiments: `python -m experiments.<system> --config=... --workdir=...`."""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DISTRIBUTED_FLAGS = {
    "--config.distributed": "mode",
    "--config.cluster.coordinator_address": "coordinator_address",
    "--config.cluster.num_processes": "num_processes",
    "--config.cluster.process_id": "process_id",
}


def _distributed_flags(argv) -> dict:
    """The `--config.distributed` and `--config.cluster.*` values of the command line
    (`--flag=value` or `--flag value`)."""
    found = {}
    i = 1
    while i < len(argv):
        arg = argv[i]
        for flag, key in _DISTRIBUTED_FLAGS.items():
            if arg.startswith(flag + "="):
                found[key] = arg.split("=", 1)[1]
            elif arg == flag and i + 1 < len(argv):
                found[key] = argv[i + 1]
                i += 1
        i += 1
    return found


def _initialize_distributed_early(argv) -> bool:
    """`jax.distributed.initialize` from the command line, before the config file loads:
    the system configs import the MD code, and importing jax_md starts JAX's backend,
    after which it is too late. Returns whether it was asked for."""
    values = _distributed_flags(argv)
    if not values.get("mode"):
        return False
    from stablejax import sharding

    try:
        sharding.initialize_distributed(
            values["mode"],
            coordinator_address=values.get("coordinator_address", ""),
            num_processes=int(values.get("num_processes", 1)),
            process_id=int(values.get("process_id", 0)),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return True


def main(system: str) -> None:
    """Defines the flags and runs the study of `system` (called by experiments/<system>.py)."""
    distributed_done = _initialize_distributed_early(sys.argv)
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
        config = flags.FLAGS.config
        if config.system != system:
            raise app.UsageError(
                f"--config is a {config.system!r} config; use experiments/configs/{system}.py"
            )
        from stablejax import sharding
        from stablejax.precision import PRECISIONS, set_precision

        try:  # before any other JAX call: it decides what jax.devices() lists
            if not distributed_done:  # (set in the config file rather than on the line)
                sharding.initialize_distributed(
                    config.get("distributed", ""),
                    coordinator_address=config.cluster.coordinator_address,
                    num_processes=config.cluster.num_processes,
                    process_id=config.cluster.process_id,
                )
        except ValueError as err:
            raise app.UsageError(str(err)) from err

        precision = config.get("precision", "float32")
        if precision not in PRECISIONS:
            raise app.UsageError(f"--config.precision={precision!r}: choose one of {PRECISIONS}")
        set_precision(precision)  # before any JAX array of the run is made
        from stablejax import compile_cache

        cache_dir = config.get("compilation_cache", compile_cache.DEFAULT_DIR)
        if cache_dir:
            try:
                compile_cache.enable(cache_dir)  # before the first compilation
            except OSError as err:
                raise app.UsageError(
                    f"--config.compilation_cache={cache_dir!r}: cannot use it as a folder ({err})"
                ) from err
        meter = compile_cache.CompileMeter()
        import jax

        from experiments import pipeline
        from stablejax.logs import console_and_file, logger

        workdir = os.path.expanduser(flags.FLAGS.workdir)
        # Several processes: process 0 writes log.txt (and every other output), process k
        # its own log.process<k>.txt.
        k = jax.process_index()
        log_name = "log.txt" if k == 0 else f"log.process{k}.txt"
        try:
            # Our lines on the console, libraries' records (orbax: one INFO block per
            # checkpoint) in WORKDIR/log.txt.
            with console_and_file(os.path.join(workdir, log_name)):
                if flags.FLAGS.seeds:
                    pipeline.run_seeds(config, workdir, pipeline.parse_seeds(flags.FLAGS.seeds))
                else:
                    pipeline.run(config, workdir)
                cache = f"cache {cache_dir}" if cache_dir else "no persistent cache"
                logger.info(f"{meter.summary()}; {cache}")
        except ValueError as err:
            if str(err).startswith(("config.", "--seeds")):
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            raise

    app.run(_run)
