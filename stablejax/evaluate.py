"""Stability check of saved models: the evaluation stage of the experiments, alone.

Any model written by `stablejax.potentials.io.save_model` (a directory with model.json
and params/) runs long MD from frames of a data file (anything `stablejax.data.load`
reads: extended XYZ, sGDML/rMD17 npz, MDsim water .npy), judged by the same criteria
as the experiments' evaluation. The outputs are the experiments' too:
`final_metrics.json`, `report.md`, `survival.png`, observable and VACF plots, and one
extended-XYZ trajectory per replica under `<out>/<model name>/traj/`. With several
models every one starts from the same initial states, and each is compared with the
first by the paired test (`stablejax.evaluation.paired_stable_time_test`).

Defaults follow the experiments (`SYSTEM_DEFAULTS`):

* molecules (no box): max bond-length deviation > 0.5 Å (bonds from the first frame,
  equilibrium lengths the mean over all frames) and the closest non-bonded pair
  < 0.8 Å; Langevin (0.1/ps) at 500 K, 0.5 fs;
* water (a box with O and H): RDF MAE > 3.0 over windows of min(10 ps, time / 10) and
  the minimum intermolecular distance < 1.2 Å; Nose-Hoover at 300 K, 1 fs;
* other periodic systems: the minimum intermolecular distance (pass its threshold);
  Nose-Hoover at 300 K, 1 fs.

The temperature defaults to the data's own (`metadata['temperature_K']`) when recorded.

Usage:
  python -m stablejax.evaluate --model runs/aspirin/models/baseline \
      --model runs/aspirin/models/stable --data aspirin.xyz --energy-unit kcal/mol \
      --replicas 32 --time-ps 5 --out runs/aspirin_check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np

from stablejax import stability
from stablejax.logs import console_and_file, logger
from stablejax.md.integrators import INTEGRATORS  # the one table of integrator names

#: Defaults per kind of system ('molecule', 'water', 'periodic'); see the module docstring.
SYSTEM_DEFAULTS = {
    "molecule": {
        "criterion": "bond_length_deviation",
        "guard": "min_nonbonded_distance",
        "temperature_K": 500.0,
        "dt_fs": 0.5,
        "integrator": "langevin",
    },
    "water": {
        "criterion": "rdf_mae",
        "guard": "min_intermolecular_distance",
        "temperature_K": 300.0,
        "dt_fs": 1.0,
        "integrator": "nose_hoover",
    },
    "periodic": {
        "criterion": "min_intermolecular_distance",
        "guard": "",
        "temperature_K": 300.0,
        "dt_fs": 1.0,
        "integrator": "nose_hoover",
    },
}
#: Structural observables of molecules (h(r), Å): as the aspirin experiment.
MOLECULE_OBSERVABLES = {"r_max": 10.0, "dr": 0.02, "sigma": 0.01}


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """Settings of a stability check (units in names); None = the system's default.

    Attributes:
      n_replicas: replicas per model (initial states drawn from the data frames).
      time_ps: simulated time per replica.
      criterion: headline criterion (`stability.CRITERIA`).
      threshold: its threshold (Å; RDF-MAE units for 'rdf_mae').
      guard: second criterion judged beside it ('' = none).
      guard_threshold: its threshold.
      rdf_window_ps: averaging window of 'rdf_mae'.
      temperature_K, dt_fs, integrator: evaluation MD (`INTEGRATORS`).
      friction_per_ps: Langevin friction.
      tau_fs: Nose-Hoover / Berendsen temperature coupling time.
      pressure_bar, tau_P_fs: Berendsen NPT.
      frame_fs: time between recorded frames (the stable-time resolution).
      vacf_window: VACF window, steps (0 = no VACF).
      trajectory_frames: extended-XYZ frames written per replica (0 = none).
      qm_frames: data frames (evenly spaced) for energy/force errors (0 = none).
      seed: initial states, velocities and thermostat noise.
    """

    n_replicas: int = 8
    time_ps: float = 5.0
    criterion: str | None = None
    threshold: float | None = None
    guard: str | None = None
    guard_threshold: float | None = None
    rdf_window_ps: float | None = None
    temperature_K: float | None = None
    dt_fs: float | None = None
    integrator: str | None = None
    friction_per_ps: float = 0.1
    tau_fs: float = 20.0
    pressure_bar: float = 1.01325
    tau_P_fs: float = 2000.0
    frame_fs: float = 20.0
    vacf_window: int = 100
    trajectory_frames: int = 100
    qm_frames: int = 200
    seed: int = 0


def system_kind(dataset) -> str:
    """'molecule' (free space), 'water' (periodic, O and H only) or 'periodic'."""
    if dataset.box is None:
        return "molecule"
    if set(np.unique(dataset.species).tolist()) == {1, 8}:
        return "water"
    return "periodic"


def resolve_settings(settings: CheckSettings, dataset) -> CheckSettings:
    """`settings` with every None replaced by the default of the data's kind of system."""
    d = SYSTEM_DEFAULTS[system_kind(dataset)]
    temperature = settings.temperature_K
    if temperature is None:
        temperature = float(dataset.metadata.get("temperature_K", d["temperature_K"]))
    criterion = settings.criterion or d["criterion"]
    guard = d["guard"] if settings.guard is None else settings.guard
    if guard == criterion:
        guard = ""
    return dataclasses.replace(
        settings,
        criterion=criterion,
        threshold=(
            stability.EVAL_THRESHOLDS[criterion]
            if settings.threshold is None
            else settings.threshold
        ),
        guard=guard,
        guard_threshold=(
            stability.EVAL_THRESHOLDS.get(guard)
            if settings.guard_threshold is None
            else settings.guard_threshold
        ),
        rdf_window_ps=(
            min(10.0, settings.time_ps / 10.0)
            if settings.rdf_window_ps is None
            else settings.rdf_window_ps
        ),
        temperature_K=temperature,
        dt_fs=d["dt_fs"] if settings.dt_fs is None else settings.dt_fs,
        integrator=settings.integrator or d["integrator"],
    )


def check_system(dataset, settings: CheckSettings):
    """The system's topology, reference observables and evaluation criteria.

    Args:
      dataset: the data (`stablejax.data.Dataset`); its frames are the reference.
      settings: resolved `CheckSettings`.

    Returns:
      (criteria [EvalCriterion], reference {name: [bins]}, observable settings).

    Raises:
      ValueError: a criterion does not apply to the system (e.g. 'rdf_mae' without a
        box, bond criteria without bonds).
    """
    from stablejax.data import topology as topo
    from stablejax.evaluation import (
        evaluation_criterion,
        reference_observables,
        reference_rdfs,
    )

    box = dataset.box
    bonds = topo.find_bonds(dataset.species, dataset.positions[0], box=box)
    eq = topo.equilibrium_bond_lengths(dataset.positions, bonds, box=box)
    mol = topo.molecules(dataset.n_atoms, bonds)
    if box is None:
        x = np.asarray(dataset.positions[0])
        extent = float(np.max(np.linalg.norm(x[:, None] - x[None], axis=-1)))
        obs_settings = dict(MOLECULE_OBSERVABLES, r_max=max(10.0, float(np.ceil(extent + 2.0))))
    else:
        obs_settings = dict(stability.RDF_MAE_SETTINGS)
    specs = [(settings.criterion, settings.threshold)]
    if settings.guard:
        specs.append((settings.guard, settings.guard_threshold))
    ref_rdfs = None
    if "rdf_mae" in dict(specs):
        if box is None or not {1, 8} <= set(np.unique(dataset.species).tolist()):
            raise ValueError("criterion 'rdf_mae' needs periodic water (a box with O and H)")
        ref_rdfs = reference_rdfs(
            dataset.positions, dataset.species, box, rdf_settings=stability.RDF_MAE_SETTINGS
        )
    frame_ps = _record_every(settings) * settings.dt_fs / 1000.0
    criteria = []
    for name, threshold in specs:
        if name in ("bond_length_deviation", "min_nonbonded_distance") and len(bonds) == 0:
            raise ValueError(
                f"criterion {name!r} needs bonds; none found in the first frame "
                "(covalent radii x 1.2)"
            )
        crit = stability.make_criterion(
            name,
            threshold,
            species=dataset.species,
            box=box,
            bonds=bonds,
            equilibrium_lengths=eq,
            molecule_index=mol,
            reference_rdfs=ref_rdfs,
        )
        criteria.append(
            evaluation_criterion(crit, frame_ps=frame_ps, rdf_window_ps=settings.rdf_window_ps)
        )
    reference = reference_observables(
        dataset.positions, dataset.species, box, observable_settings=obs_settings
    )
    return criteria, reference, obs_settings


def _record_every(settings: CheckSettings) -> int:
    return max(1, int(round(settings.frame_fs / settings.dt_fs)))


def evaluate_saved_models(
    models: Mapping[str, str],
    dataset,
    out_dir: str,
    settings: CheckSettings = CheckSettings(),
    *,
    data_path: str = "",
    progress: bool = True,
) -> dict:
    """Evaluates saved models on the same initial states drawn from `dataset`.

    Args:
      models: {name: saved model directory}; the first is the reference of the paired
        tests ("<other> vs <first>").
      dataset: `stablejax.data.Dataset` (initial states, reference observables,
        topology, and energy/force errors when it has labels).
      out_dir: output folder (`final_metrics.json`, `report.md`, figures,
        `<name>/traj/replica_<r>.extxyz`).
      settings: `CheckSettings` (None fields: the system's defaults).
      data_path: recorded in the outputs.
      progress: print progress lines.

    Returns:
      The `final_metrics.json` dict: per model the stable-time summary
      (`stable_times_ps` [n_replicas]), `by_criterion`, observable and QM errors;
      `paired_tests` with several models; `check_settings`.

    Example:
      >>> final = evaluate_saved_models({'stable': 'runs/aspirin/models/stable'},
      ...                               load('aspirin.xyz', energy_unit='kcal/mol'), 'check')
      >>> final['stable']['median_stable_time_ps']
    """
    import jax
    import ml_collections

    from stablejax.data import sample_initial_conditions
    from stablejax.evaluation import EvalSettings, evaluate_model, write_report
    from stablejax.md import make_integrator, make_simulator
    from stablejax.observables import bin_centers
    from stablejax.potentials import factory
    from stablejax.potentials import io as model_io
    from stablejax.training import qm

    if not models:
        raise ValueError("evaluate_saved_models needs at least one model")
    s = resolve_settings(settings, dataset)
    criteria, reference, obs_settings = check_system(dataset, s)
    record_every = _record_every(s)
    eval_settings = EvalSettings(
        time_ps=s.time_ps,
        dt_fs=s.dt_fs,
        temperature_K=s.temperature_K,
        record_every=record_every,
        vacf_window=s.vacf_window,
    )
    integrator = make_integrator(
        s.integrator,
        dt_fs=s.dt_fs,
        tau_fs=s.tau_fs,
        friction_per_ps=s.friction_per_ps,
        pressure_bar=s.pressure_bar,
        tau_P_fs=s.tau_P_fs,
    )
    md_config = ml_collections.ConfigDict({"skin": 1.0, "chunk_steps": 100})
    init = sample_initial_conditions(
        dataset, s.n_replicas, seed=s.seed, replace=s.n_replicas > dataset.n_frames
    )
    labelled = dataset.energies is not None and dataset.forces is not None
    n_qm = min(s.qm_frames, dataset.n_frames) if labelled else 0
    qm_set = dataset.subset(np.linspace(0, dataset.n_frames - 1, n_qm).round().astype(int))
    results, qm_metrics, simulators = {}, {}, {}
    for name, path in models.items():
        potential, params = model_io.load_model(path)
        if "species" in potential.config:
            factory.check_species(potential.config, dataset.species)
        key = potential.config.to_json_best_effort(sort_keys=True)
        if key not in simulators:  # models of one architecture share one compiled MD
            simulators[key] = make_simulator(
                potential, dataset.species, dataset.box, md_config, integrator=integrator
            )
        if progress:
            logger.info(
                f"evaluating {name} ({path}): {s.n_replicas} replicas x {s.time_ps:g} ps at "
                f"{s.temperature_K:g} K, {s.integrator}, dt {s.dt_fs:g} fs"
            )
        results[name] = evaluate_model(
            simulators[key],
            params,
            init.positions,
            settings=eval_settings,
            criteria=criteria,
            species=dataset.species,
            box=dataset.box,
            observable_settings=obs_settings,
            key=jax.random.PRNGKey(s.seed),
            progress=progress,
            label=name,
            trajectory_dir=(os.path.join(out_dir, name, "traj") if s.trajectory_frames else None),
            trajectory_frames=max(1, int(s.trajectory_frames)),
        )
        if n_qm:
            qm_metrics[name] = qm.evaluate(potential, params, qm_set, batch_size=8)
    frame_ps = eval_settings.frame_dt_ps
    names = list(models)
    notes = (
        f"Data: {data_path or dataset.source} ({dataset.n_frames} frames of "
        f"{dataset.n_atoms} atoms); initial states: frames {init.indices.tolist()} (seed "
        f"{s.seed}), the same for every model. Evaluation: {s.integrator}, "
        f"{s.temperature_K:g} K, dt {s.dt_fs:g} fs; criteria: "
        + "; ".join(
            f"{c.name} (threshold {c.criterion.threshold:g}"
            + (f", {c.window_frames * frame_ps:g} ps windows" if c.window_frames > 1 else "")
            + ")"
            for c in criteria
        )
        + ". A replica is unstable at the first crossing of any criterion (combined) or at "
        "the first frame after a non-finite step; `by_criterion` gives each one alone."
        + (
            f" Energy/force errors on {n_qm} evenly spaced data frames (they may include "
            "the models' training frames)."
            if n_qm
            else ""
        )
        + "\n\nModels: "
        + "; ".join(f"{n}: `{os.path.abspath(p)}`" for n, p in models.items())
    )
    extra = {
        "check_settings": dataclasses.asdict(s)
        | {
            "models": {n: os.path.abspath(p) for n, p in models.items()},
            "data": os.path.abspath(data_path) if data_path else str(dataset.source),
            "system": system_kind(dataset),
            "record_every": record_every,
            "initial_frames": init.indices.tolist(),
            "criteria": [
                {
                    "name": c.name,
                    "threshold": c.criterion.threshold,
                    "window_ps": c.window_frames * frame_ps,
                }
                for c in criteria
            ],
        }
    }
    return write_report(
        out_dir,
        results,
        reference=reference,
        bins=bin_centers(obs_settings["r_max"], obs_settings["dr"]),
        dr=obs_settings["dr"],
        qm_metrics=qm_metrics,
        title=f"Stability check: {', '.join(names)}",
        notes=notes,
        extra=extra,
        paired=[(names[0], other) for other in names[1:]],
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not np.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stablejax.evaluate",
        usage="%(prog)s --model [NAME=]DIR [--model ...] --data FILE [options]",
        description="Stability check of saved models: long MD from data frames, judged by "
        "the experiments' evaluation criteria; writes final_metrics.json, report.md, "
        "figures and per-replica trajectories. Several --model: the same initial states, "
        "each model compared with the first by a paired test.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                   help="saved model directory (model.json + params/); repeat to compare "
                   "(the first is the reference); NAME defaults to the directory name")  # fmt: skip
    p.add_argument("--data", required=True, metavar="FILE",
                   help="data file (extxyz, sGDML/rMD17 npz, MDsim water .npy): initial "
                   "states, reference observables, bonds")  # fmt: skip
    p.add_argument("--energy-unit", default=None,
                   help="energy unit of the data file (e.g. kcal/mol); default: the "
                   "format's own (only the energy/force errors use it)")  # fmt: skip
    p.add_argument("--out", default="stability_check", help="output folder")
    p.add_argument("--replicas", type=_positive(int), default=8, help="replicas per model")
    p.add_argument("--time-ps", type=_positive(float), default=5.0,
                   help="simulated time per replica (ps)")  # fmt: skip
    p.add_argument("--criterion", choices=stability.CRITERIA, default=None,
                   help="headline criterion (default: bond_length_deviation for molecules, "
                   "rdf_mae for water, min_intermolecular_distance otherwise)")  # fmt: skip
    p.add_argument("--threshold", type=_positive(float), default=None,
                   help="its threshold, Å or RDF-MAE units (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in stability.EVAL_THRESHOLDS.items())
                   + ")")  # fmt: skip
    p.add_argument("--guard", choices=stability.CRITERIA + ("none",), default=None,
                   help="second criterion judged beside it (default: min_nonbonded_distance "
                   "for molecules, min_intermolecular_distance for water, none otherwise)")  # fmt: skip
    p.add_argument("--guard-threshold", type=_positive(float), default=None,
                   help="its threshold (default as --threshold)")  # fmt: skip
    p.add_argument("--rdf-window-ps", type=_positive(float), default=None,
                   help="window of rdf_mae (default min(10, time / 10) ps)")  # fmt: skip
    p.add_argument("--temperature-K", type=_positive(float), default=None,
                   help="default: the data's, else 500 K molecules / 300 K periodic")  # fmt: skip
    p.add_argument("--dt-fs", type=_positive(float), default=None,
                   help="time step (default 0.5 fs molecules, 1 fs periodic)")  # fmt: skip
    p.add_argument("--integrator", choices=tuple(INTEGRATORS), default=None,
                   help="default: langevin for molecules, nose_hoover for periodic systems")  # fmt: skip
    p.add_argument("--friction-per-ps", type=float, default=0.1, help="Langevin friction (1/ps)")
    p.add_argument("--tau-fs", type=_positive(float), default=20.0,
                   help="Nose-Hoover/Berendsen coupling time (fs)")  # fmt: skip
    p.add_argument("--frame-fs", type=_positive(float), default=20.0,
                   help="time between judged frames (fs): the stable-time resolution")  # fmt: skip
    p.add_argument("--trajectory-frames", type=_non_negative_int, default=100,
                   help="extended-XYZ frames per replica (0 = none)")  # fmt: skip
    p.add_argument("--qm-frames", type=_non_negative_int, default=200,
                   help="data frames for energy/force errors (0 = none)")  # fmt: skip
    p.add_argument("--vacf-window", type=_non_negative_int, default=100,
                   help="VACF window (steps; 0 = none)")  # fmt: skip
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="initial states, velocities, thermostat noise")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _model_arguments(parser, values) -> dict[str, str]:
    """{name: directory} from --model values; parser.error on a bad one."""
    from stablejax.potentials import io as model_io

    models = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or os.path.isdir(value):
            name, path = "", value
        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            parser.error(f"--model {value}: no such directory {path!r}")
        if not os.path.exists(os.path.join(path, "model.json")):
            parser.error(
                f"--model {value}: {path!r} is not a saved stablejax model (no model.json; "
                "save with stablejax.potentials.io.save_model)"
            )
        try:
            model_io.load_config(path)
        except (ValueError, OSError, json.JSONDecodeError) as err:
            parser.error(f"--model {value}: {err}")
        if not name:
            parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
            name = parts[-1]
            for k in range(2, len(parts)):  # same directory name: add parents until unique
                if name not in models:
                    break
                name = "-".join(parts[-k:])
        if not name or os.sep in name or name in (".", ".."):
            parser.error(f"--model {value}: {name!r} is not a usable model name")
        if name in models:
            parser.error(f"--model {value}: the name {name!r} is given twice")
        models[name] = path
    return models


def main(argv=None) -> dict:
    """The command line (`python -m stablejax.evaluate --help`); returns final metrics.

    Bad input (missing model or data, criteria that do not fit the system) exits with
    status 2 and a one-line message.
    """
    from stablejax.data import DataFormatError, load

    parser = build_parser()
    args = parser.parse_args(argv)
    models = _model_arguments(parser, args.model)
    if not os.path.isfile(os.path.expanduser(args.data)):
        parser.error(f"--data: no such file {args.data!r}")
    options = {"energy_unit": args.energy_unit} if args.energy_unit else {}
    out = os.path.abspath(os.path.expanduser(args.out))
    os.makedirs(out, exist_ok=True)
    with console_and_file(os.path.join(out, "log.txt")):
        try:
            dataset = load(os.path.expanduser(args.data), **options)
        except (DataFormatError, ValueError, TypeError) as err:
            parser.error(f"--data: {err}")
        settings = CheckSettings(
            n_replicas=args.replicas,
            time_ps=args.time_ps,
            criterion=args.criterion,
            threshold=args.threshold,
            guard="" if args.guard == "none" else args.guard,
            guard_threshold=args.guard_threshold,
            rdf_window_ps=args.rdf_window_ps,
            temperature_K=args.temperature_K,
            dt_fs=args.dt_fs,
            integrator=args.integrator,
            friction_per_ps=args.friction_per_ps,
            tau_fs=args.tau_fs,
            frame_fs=args.frame_fs,
            vacf_window=args.vacf_window,
            trajectory_frames=args.trajectory_frames,
            qm_frames=args.qm_frames,
            seed=args.seed,
        )
        resolved = resolve_settings(settings, dataset)
        if resolved.frame_fs < resolved.dt_fs or resolved.time_ps * 1000.0 < resolved.frame_fs:
            parser.error(
                f"--frame-fs {resolved.frame_fs:g} must lie between the time step "
                f"({resolved.dt_fs:g} fs) and the run length ({resolved.time_ps * 1000:g} fs)"
            )
        try:
            check_system(dataset, resolved)
        except ValueError as err:
            parser.error(str(err))
        progress = not args.quiet
        if progress:
            logger.info(
                f"stability check of {', '.join(models)} on {args.data} ({dataset.n_frames} "
                f"frames of {dataset.n_atoms} atoms, {system_kind(dataset)}); criteria "
                f"{resolved.criterion} ({resolved.threshold:g})"
                + (
                    f" and {resolved.guard} ({resolved.guard_threshold:g})"
                    if resolved.guard
                    else ""
                )
                + f"; outputs in {out}"
            )
        try:
            final = evaluate_saved_models(
                models, dataset, out, settings, data_path=args.data, progress=progress
            )
        except ValueError as err:
            if "not supported by this model" in str(err):  # factory.check_species
                parser.error(str(err))
            raise
        if progress:
            for name in models:
                m = final[name]
                logger.info(
                    f"{name}: median stable time {m['median_stable_time_ps']:.3g} ps (mean "
                    f"{m['mean_stable_time_ps']:.3g} ps, {m['n_unstable']}/{m['n_replicas']} unstable)"
                )
            for pair, t in final.get("paired_tests", {}).items():
                logger.info(
                    f"paired test {pair}: longer in {t['n_longer']} of {t['n']}, shorter in "
                    f"{t['n_shorter']}, p = {t['p_value']:.3g}"
                )
            logger.info(f"report: {os.path.join(out, 'report.md')}")
    return final


if __name__ == "__main__":
    main()
