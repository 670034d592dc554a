"""Command line: ``python -m stablejax.data.generate {water,aspirin,tetrapeptide} ...``.

Examples::

    python -m stablejax.data.generate water --frames 20000 --out data/
    python -m stablejax.data.generate aspirin --frames 1000 --out data/ --workers 2
    python -m stablejax.data.generate tetrapeptide --frames 1000 --out data/ --stride 10

Prints the path of the data file and the report in its JSON sidecar. Re-running with
the same parameters returns the cached file at once; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from stablejax.data.generate import DATASETS, ensure_dataset
from stablejax.data.generate.cache import read_sidecar


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stablejax.data.generate",
        description="Generate reference data (OpenMM SPC/Fw water, GFN2-xTB molecules).",
    )
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--frames", type=int, required=True, help="number of frames")
    p.add_argument("--out", required=True, help="output (cache) directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, help="K (default: 300 water, 500 molecules)")
    p.add_argument("--dt", type=float, help="time step in fs (default 0.5)")
    p.add_argument("--equilibration-ps", type=float, help="equilibration length in ps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    w = p.add_argument_group("water")
    w.add_argument(
        "--force-constants",
        choices=("mdsim", "published"),
        help="SPC/Fw stiffness: 'mdsim' (default, as the MDsim/StABlE data) or 'published'",
    )
    w.add_argument("--frame-interval", type=float, help="fs between frames (default 10)")
    w.add_argument("--threads", type=int, help="OpenMM CPU threads (default 1)")
    m = p.add_argument_group("aspirin / tetrapeptide")
    m.add_argument("--stride", type=int, help="MD steps between frames (default 10)")
    m.add_argument("--trajectories", type=int, help="independent trajectories (default 2)")
    m.add_argument("--workers", type=int, help="processes at once (default 2)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    options = {}
    mapping = {
        "temperature": "temperature_K",
        "dt": "dt_fs",
        "equilibration_ps": "equilibration_ps",
    }
    if args.dataset == "water":
        mapping.update(
            force_constants="force_constants", frame_interval="frame_interval_fs", threads="threads"
        )
        bad = [a for a in ("stride", "trajectories", "workers") if getattr(args, a) is not None]
    else:
        mapping.update(stride="stride", trajectories="n_trajectories", workers="n_workers")
        bad = [
            a
            for a in ("force_constants", "frame_interval", "threads")
            if getattr(args, a) is not None
        ]
    if bad:
        _parser().error(f"option(s) {bad} do not apply to {args.dataset}")
    for arg, key in mapping.items():
        value = getattr(args, arg)
        if value is not None:
            options[key] = value
    t0 = time.perf_counter()
    path = ensure_dataset(
        args.dataset,
        out_dir=args.out,
        n_frames=args.frames,
        seed=args.seed,
        progress=not args.no_progress,
        **options,
    )
    report = read_sidecar(path.with_suffix(".json"))
    print(json.dumps(report, indent=2, sort_keys=True))
    print(f"{path}  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
