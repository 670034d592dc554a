"""The whole StABlE study of one system, from a config: data -> QM pre-training ->
StABlE training -> evaluation of baseline and StABlE models -> report.

Every stage writes into the workdir and is resumable: data is cached, QM
pre-training and StABlE training resume from their orbax checkpoints, and a
finished stage is skipped when the run is started again with the same workdir.

Layout of a workdir:
  config.json            the resolved config
  data.json              where the data came from (path, generator, sanity figures)
  pretrain/              QM pre-training checkpoints and metrics.jsonl
  stable/                StABlE checkpoints, metrics.jsonl, training_progress.png
  models/{baseline,stable}/   saved models (params + config; `stablejax.potentials.io`)
  eval/                  final_metrics.json, report.md, survival.png, observables, VACF

With `--seeds=0,1,2` (`run_seeds`) each seed gets such a workdir, `workdir/seed_<k>/`, and
`workdir/summary.json` + `summary.md` summarise them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stablejax import observables, sharding, stability, units
from stablejax.data import load, sample_initial_conditions, split_dataset
from stablejax.data import topology as topo
from stablejax.estimator import reweight_observable
from stablejax.evaluation import (
    EvalSettings,
    evaluate_model,
    evaluation_criterion,
    reference_observables,
    reference_rdfs,
    structural_observables,
    write_report,
)
from stablejax.files import read_json, write_json, write_text
from stablejax.logs import logger
from stablejax.md import FREE_SPACE_EDGES, INTEGRATORS, make_integrator, make_simulator
from stablejax.potentials import factory, normalization
from stablejax.potentials import io as model_io
from stablejax.precision import PRECISIONS, current_precision, set_precision
from stablejax.training import qm, targets
from stablejax.training.metrics import plot_training_curves
from stablejax.training.stable import ObservableTarget, StableTrainer

#: Evaluation RDF settings for periodic systems (Å): as MDsim/StABlE (unsmeared, 0-6 Å).
RDF_EVAL = {"r_max": 6.0, "dr": 0.01, "sigma": 0.0}


def log(msg: str) -> None:
    """One line of the study's progress (`stablejax.logs`: console and WORKDIR/log.txt)."""
    logger.info(msg)


# Several processes (`jax.distributed`, `config.distributed`): every process runs the
# whole study (data, pre-training and the baseline_plus control replicated; MD, StABlE
# and evaluation replicas split over every device of every process by `replica_mesh`);
# process 0 alone writes the workdir (config.json, data.json, metrics, models, figures,
# reports); what one process finds on disk decides for all (`_exists`).


def _main() -> bool:
    """True in the process that writes the workdir (process 0; always with one process)."""
    return sharding.is_main_process()


def _exists(path) -> bool:
    """`os.path.exists(path)` as process 0 sees it, on every process: whether a stage is
    skipped is the same decision everywhere (a collective with several processes)."""
    return bool(sharding.from_process_0(os.path.exists(path)))


# ---------------------------------------------------------------------------------------------
# Config checks (fail before any work)
# ---------------------------------------------------------------------------------------------


OBSERVABLES = tuple(targets.TARGETS)

# The domain of every numeric field, in one table: (field, kind, low, high, unit/meaning).
# kind 'int' needs an integer, 'num' any finite number; low/high are inclusive bounds
# (None = unbounded) unless the bound is given as ('>', x) / ('<', x) for a strict one.
_GT0 = (">", 0.0)
FIELD_DOMAINS = (
    ("seed", "int", 0, None, ""),
    ("devices", "int", 0, None, "devices (0 = all)"),
    ("cluster.num_processes", "int", 1, None, "processes"),
    ("cluster.process_id", "int", 0, None, ""),
    ("data.n_frames", "int", 1, None, "frames"),
    ("data.n_train", "int", 2, None, "frames"),
    ("data.n_val", "int", 1, None, "frames"),
    ("data.n_test", "int", 0, None, "frames (0 = the rest)"),
    ("data.seed", "int", 0, None, ""),
    ("pretrain.epochs", "int", 0, None, ""),
    ("pretrain.batch_size", "int", 1, None, "frames"),
    ("pretrain.lr", "num", _GT0, None, ""),
    ("pretrain.warmup_steps", "int", 0, None, "steps"),
    ("pretrain.energy_weight", "num", 0.0, None, "1/eV^2"),
    ("pretrain.force_weight", "num", 0.0, None, "Å^2/eV^2"),
    ("pretrain.patience", "int", 0, None, "epochs (0 = off)"),
    ("pretrain.ema_decay", "num", 0.0, ("<", 1.0), ""),
    ("pretrain.max_time_s", "num", 0.0, None, "s (0 = none)"),
    ("md.temperature_K", "num", _GT0, None, "K"),
    ("md.dt_fs", "num", _GT0, None, "fs"),
    ("md.tau_fs", "num", _GT0, None, "fs"),
    ("md.friction_per_ps", "num", 0.0, None, "1/ps"),
    ("md.chain_length", "int", 1, None, ""),
    ("md.pressure_bar", "num", None, None, "bar"),
    ("md.tau_P_fs", "num", _GT0, None, "fs"),
    ("md.n_replicas", "int", 1, None, ""),
    ("md.steps_per_epoch", "int", 1, None, "steps"),
    ("md.check_every", "int", 1, None, "steps"),
    ("md.chunk_steps", "int", 1, None, "steps"),
    ("md.skin", "num", 0.0, None, "Å"),
    ("stability.threshold", "num", _GT0, None, "Å or RDF-MAE units"),
    ("stability.eval_threshold", "num", _GT0, None, "Å or RDF-MAE units"),
    ("stability.rdf_window_ps", "num", _GT0, None, "ps"),
    ("stability.eval_guard_threshold", "num", _GT0, None, "Å"),
    ("observable.r_max", "num", _GT0, None, "Å"),
    ("observable.dr", "num", _GT0, None, "Å"),
    ("observable.sigma", "num", 0.0, None, "Å"),
    ("stable.local_k_nearest", "int", 0, None, "molecules"),
    ("stable.local_bins", "int", 1, None, ""),
    ("stable.local_per_bin", "int", 1, None, "samples"),
    ("stable.lr", "num", _GT0, None, ""),
    ("stable.observable_weight", "num", _GT0, None, ""),
    ("stable.qm_weight", "num", 0.0, None, "lambda"),
    ("stable.qm_energy_weight", "num", 0.0, None, "1/eV^2"),
    ("stable.qm_force_weight", "num", 0.0, None, "Å^2/eV^2"),
    ("stable.qm_batch_size", "int", 0, None, "frames (0 = all)"),
    ("stable.qm_chunk_size", "int", 1, None, "frames"),
    ("stable.sample_every", "int", 1, None, "steps"),
    ("stable.batch_size", "int", 1, None, "samples per minibatch"),
    ("stable.grad_clip", "num", _GT0, None, "global norm"),
    ("stable.upper_threshold", "num", 0.0, 1.0, "fraction"),
    ("stable.lower_threshold", "num", -1.0, ("<", 1.0), "fraction (< 0: only lr ends)"),
    ("stable.reset_fraction", "num", 0.0, 1.0, "fraction"),
    ("stable.plateau_patience", "int", 0, None, "steps"),
    ("stable.plateau_factor", "num", _GT0, ("<", 1.0), ""),
    ("stable.max_lr_reductions", "int", 1, None, ""),
    ("stable.max_epochs", "int", 0, None, "epochs"),
    ("stable.max_learning_cycles", "int", 0, None, "(0 = no limit)"),
    ("stable.max_learning_steps", "int", 0, None, "(0 = no limit)"),
    ("stable.max_time_s", "num", 0.0, None, "s (0 = none)"),
    ("stable.history_depth", "int", 1, None, "stored states"),
    ("eval.n_replicas", "int", 1, None, ""),
    ("eval.time_ps", "num", _GT0, None, "ps"),
    ("eval.friction_per_ps", "num", 0.0, None, "1/ps"),
    ("eval.tau_fs", "num", _GT0, None, "fs"),
    ("eval.record_every", "int", 1, None, "steps"),
    ("eval.vacf_window", "int", 1, None, "steps"),
    ("eval.n_test_frames", "int", 0, None, "frames"),
    ("eval.trajectory_frames", "int", 0, None, "frames per replica (0 = none)"),
    ("lj.n_particles", "int", 2, None, ""),
    ("lj.sigma", "num", _GT0, None, "Å"),
    ("lj.epsilon", "num", _GT0, None, "eV"),
    ("lj.density", "num", _GT0, None, "reduced"),
    ("lj.cutoff", "num", _GT0, None, "Å"),
    ("lj.reference_frames", "int", 2, None, "frames"),
)


def _field(config, dotted):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _check_domain(config, field, kind, low, high, unit) -> str | None:
    """None when `field` is absent or in its domain, else the reason."""
    value = _field(config, field)
    if value is _MISSING:
        return None
    where = f" ({unit})" if unit else ""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"must be a number{where}, got {value!r}"
    if kind == "int" and float(value) != int(value):
        return f"must be an integer{where}, got {value!r}"
    if not np.isfinite(float(value)):
        return f"must be finite{where}, got {value!r}"
    for bound, is_low in ((low, True), (high, False)):
        if bound is None:
            continue
        strict = isinstance(bound, tuple)
        b = bound[1] if strict else bound
        bad = (
            (value <= b if strict else value < b)
            if is_low
            else (value >= b if strict else value > b)
        )
        if bad:
            op = (">" if strict else ">=") if is_low else ("<" if strict else "<=")
            return f"must be {op} {b}{where}, got {value!r}"
    return None


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for values that would fail later."""

    def need(cond, field, msg):
        if not cond:
            raise ValueError(f"config.{field}: {msg}")

    for field, kind, low, high, unit in FIELD_DOMAINS:
        problem = _check_domain(config, field, kind, low, high, unit)
        need(problem is None, field, problem)
    for field in ("eval.temperature_K", "eval.dt_fs"):  # < 0 means "as in training"
        value = _field(config, field)
        need(
            value is _MISSING or (np.isfinite(value) and value != 0),
            field,
            f"must be > 0, or < 0 for the training value; got {value!r}",
        )

    # Choices (one line each) and cross-field rules.
    d, md, st, stab = config.data, config.md, config.stable, config.stability
    choices = (
        ("precision", config.get("precision", "float32"), PRECISIONS),
        ("distributed", config.get("distributed", ""), sharding.DISTRIBUTED_MODES),
        ("data.split", d.split, ("random", "contiguous", "percent")),
        ("md.integrator", md.integrator, tuple(INTEGRATORS)),
        ("md.free_space_edges", md.get("free_space_edges", "all_pairs"), FREE_SPACE_EDGES),
        ("eval.integrator", config.eval.integrator, tuple(INTEGRATORS)),
        ("stable.estimator", st.estimator, ("global", "local")),
        ("stable.local_sampling", st.local_sampling, ("all", "stratified")),
        ("stability.criterion", stab.criterion, CRITERIA),
        ("stability.eval_criterion", stab.eval_criterion, CRITERIA),
        ("stability.eval_guard", stab.eval_guard, CRITERIA + ("",)),
        ("observable.name", config.observable.name, OBSERVABLES),
        ("model.name", config.model.name, factory.MODEL_NAMES),
    )
    for field, value, allowed in choices:
        need(value in allowed, field, f"unknown {value!r}; choose one of {allowed}")
    if d.path:
        need(os.path.exists(os.path.expanduser(d.path)), "data.path", f"no such file {d.path!r}")
    else:
        need(
            d.generator in ("aspirin", "tetrapeptide", "water", "lj"),
            "data.generator",
            f"unknown generator {d.generator!r} (and no data.path given)",
        )
    need(
        md.steps_per_epoch % md.check_every == 0,
        "md.steps_per_epoch",
        f"must be a multiple of md.check_every ({md.check_every})",
    )
    need(
        st.sample_every % md.check_every == 0,
        "stable.sample_every",
        f"must be a multiple of md.check_every ({md.check_every})",
    )
    need(
        st.lower_threshold < st.upper_threshold,
        "stable.lower_threshold",
        f"must be < stable.upper_threshold ({st.upper_threshold})",
    )
    need(
        not (config.system == "lj" and stab.eval_guard == "min_nonbonded_distance"),
        "stability.eval_guard",
        "'min_nonbonded_distance' needs bonded molecules; the Lennard-Jones fluid has none",
    )
    need(
        not (
            config.observable.name in ("min_intermolecular_distance", "contact_shortfall")
            and st.estimator == "local"
            and st.local_k_nearest < 1
        ),
        "stable.local_k_nearest",
        f"the local {config.observable.name!r} observable needs neighbourhoods of several "
        "molecules (>= 1)",
    )
    # The replica counts must split evenly over the selected devices (no padding:
    # dummy replicas would change unstable fractions, resets and estimator samples).
    mesh = replica_mesh(config)
    sharding.check_divisible(md.n_replicas, mesh, field="md.n_replicas")
    sharding.check_divisible(config.eval.n_replicas, mesh, field="eval.n_replicas")
    need(
        config.observable.name not in ("oh_bond_length", "oh_bond_lengths")
        or d.generator in ("water", "")
        or bool(d.path),
        "observable.name",
        "the O-H bond-length observables need water",
    )


def replica_mesh(config):
    """The `stablejax.sharding` mesh of `config.devices`, or None for one device.

    `devices = 0` takes the most devices that divide both `md.n_replicas` and
    `eval.n_replicas` (all of them when the counts are multiples of the device count);
    an explicit count must divide them (checked by `validate_config`).
    """
    k = int(config.get("devices", 0))
    if k == 0 and jax.process_count() == 1:
        counts = (int(config.md.n_replicas), int(config.eval.n_replicas))
        k = max(d for d in range(1, len(jax.devices()) + 1) if all(c % d == 0 for c in counts))
    return sharding.mesh_or_none(k)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def load_data(config, workdir):
    """The dataset: the user's file, or the package's generated (cached) reference data."""
    d = config.data
    if d.path:
        options = {"energy_unit": d.energy_unit} if d.energy_unit else {}
        path = os.path.expanduser(d.path)
        info = {"source": "user file", "path": os.path.abspath(path)}
    else:
        from stablejax.data.generate import ensure_dataset

        cache = os.path.expanduser(d.cache_dir)
        log(f"generating/loading {d.generator} reference data ({d.n_frames} frames) in {cache}")
        path = str(ensure_dataset(d.generator, out_dir=cache, n_frames=d.n_frames, seed=d.seed))
        options = {}
        info = {"source": "generated by stablejax.data.generate", "path": path}
        side = os.path.splitext(path)[0] + ".json"
        if os.path.exists(side):
            with open(side) as f:
                info["generator"] = json.load(f)
    dataset = load(path, **options)
    info.update(n_frames=dataset.n_frames, n_atoms=dataset.n_atoms, metadata=str(dataset.metadata))
    if _main():
        with open(os.path.join(workdir, "data.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
    return dataset


def validate_data_sizes(config, dataset) -> None:
    """Checks the data-dependent sizes right after the data loads, naming the field."""
    d = config.data
    n = dataset.n_frames
    if d.split == "percent":
        return  # fractions of the data set
    used = d.n_train + d.n_val + (d.n_test or 0)
    if d.n_train + d.n_val >= n or used > n:
        raise ValueError(
            f"config.data.n_train/n_val/n_test: {d.n_train} + {d.n_val}"
            + (f" + {d.n_test}" if d.n_test else "")
            + f" frames requested but the data has {n} (at least one frame must remain "
            "for the test set, which holds the evaluation's initial states)"
        )


def split(config, dataset):
    d = config.data
    validate_data_sizes(config, dataset)
    if d.split == "percent":
        kw = dict(train=d.n_train / dataset.n_frames, val=d.n_val / dataset.n_frames)
        mode = "random"
    else:
        kw = dict(train=d.n_train, val=d.n_val)
        mode = d.split
    test = d.n_test if d.n_test else None
    return split_dataset(dataset, test=test, mode=mode, seed=config.seed, **kw)


def system_topology(dataset, train) -> topo.System:
    """The `System` (bonds, equilibrium lengths, molecules) of the training frames."""
    return topo.system_from_frames(dataset.species, train.positions, box=dataset.box)


def build_model(config, dataset, train):
    potential = factory.build(config.model)
    key = jax.random.PRNGKey(config.seed)
    factory.check_species(config.model, dataset.species)
    # Initialising under jit is much faster than op-by-op for the larger models.
    init = jax.jit(potential.init)
    params = init(key, jnp.asarray(dataset.species), jnp.asarray(train.positions[0]),
                  None if dataset.box is None else jnp.asarray(dataset.box))  # fmt: skip
    params = normalization.fit_energy_normalization(params, train, config.model)
    return potential, params


def pretrain(config, potential, params, train, val, workdir):
    if config.pretrain.checkpoint_path:
        _, loaded = model_io.load_model(os.path.expanduser(config.pretrain.checkpoint_path))
        log(f"pre-trained model loaded from {config.pretrain.checkpoint_path}")
        return loaded
    log(f"QM pre-training on {train.n_frames} frames ({val.n_frames} validation)")
    cfg = _qm_train_config(config)
    params, history = qm.train_qm(
        potential, params, train, val, config=cfg, workdir=os.path.join(workdir, "pretrain")
    )
    if history:
        log(pretrain_summary(history))
    return params


def pretrain_summary(history: list[dict]) -> str:
    """The log line of a finished pre-training: the kept (best validation) epoch and its
    force MAE, and the last epoch's (a run that diverged late stops on patience with a much
    worse last epoch than the model it keeps)."""
    last = history[-1]
    kept = next((h for h in history if h.get("epoch") == last.get("best_epoch")), last)
    nan = float("nan")
    return (
        f"pre-training done after {last.get('epoch')} epochs: kept epoch {kept.get('epoch')}"
        f" (val force MAE {kept.get('val_force_mae_meV_per_A', nan):.1f} meV/Å; last epoch"
        f" {last.get('val_force_mae_meV_per_A', nan):.1f})"
    )


def _qm_train_config(config, **overrides) -> dict:
    """`qm.train_qm`'s settings from the experiment config (pre-training and baseline_plus)."""
    cfg = {k: v for k, v in config.pretrain.items() if k in qm.default_config()}
    cfg.update(seed=int(config.seed), tensorboard=_tensorboard_on(config), **overrides)
    return cfg


def _tensorboard_on(config) -> bool:
    return bool("log" in config and config.log.get("tensorboard", False))


def learning_budget(stable_history: list[dict]) -> tuple[int, float]:
    """(optimizer steps, wall seconds) that StABlE spent in learning epochs."""
    steps, seconds, prev = 0, 0.0, 0.0
    for r in stable_history:
        dt = float(r["wall_time_s"]) - prev
        prev = float(r["wall_time_s"])
        if r["phase"] == "learning":
            steps += 1
            seconds += max(dt, 0.0)
    return steps, seconds


def baseline_plus_model(config, potential, baseline, train, val, workdir):
    """The control `baseline_plus`: the baseline trained further on the QM loss alone.

    Pre-training continues from the baseline with the pre-training's own optimizer and
    learning-rate rules (warm-up, plateau; early stopping off) for at least as many
    optimizer steps as StABlE took learning steps and at least as much wall time as its
    learning epochs took: the epoch count estimated from the pre-training's epoch time, and
    training goes on past it until that wall time has passed (`min_time_s`; before, the
    estimate alone gave the control 0.5-1.2x StABlE's time). The result is
    the best of the baseline and every continued epoch by validation force MAE, so the
    control is never worse than the baseline on the QM data. Saved in
    `models/baseline_plus`, its budget in `models/baseline_plus.json`.
    """
    path = os.path.join(workdir, "models", "baseline_plus")
    info_path = path + ".json"
    if _exists(path) and _exists(info_path):
        _, params = model_io.load_model(path)
        log(f"baseline_plus model loaded from {path}")
        return params
    from stablejax.training.metrics import read_metrics

    stable_log = os.path.join(workdir, "stable", "metrics.jsonl")
    history = read_metrics(stable_log) if os.path.exists(stable_log) else []
    steps, seconds = learning_budget(history)
    pre_log = os.path.join(workdir, "pretrain", "metrics.jsonl")
    pre = read_metrics(pre_log) if os.path.exists(pre_log) else []
    epoch_time = float(np.median([r["epoch_time_s"] for r in pre])) if pre else float("inf")
    # Process 0's wall times decide the budget on every process.
    steps, seconds, epoch_time = sharding.from_process_0((steps, seconds, epoch_time))
    info = {"stable_learning_steps": steps, "stable_learning_time_s": seconds}
    if steps == 0:
        params, info["chosen"], info["epochs"] = baseline, "baseline (no learning step ran)", 0
    else:
        steps_per_epoch = max(1, -(-train.n_frames // int(config.pretrain.batch_size)))
        epochs = max(-(-steps // steps_per_epoch), int(np.ceil(seconds / epoch_time)), 1)
        log(
            f"baseline_plus: {epochs} more QM epochs ({epochs * steps_per_epoch} steps; StABlE "
            f"took {steps} learning steps in {seconds:.0f} s)"
        )
        cfg = _qm_train_config(
            config, epochs=epochs, patience=0, max_time_s=0.0, min_time_s=float(seconds)
        )
        more, hist = qm.train_qm(
            potential, baseline, train, val, config=cfg,
            workdir=os.path.join(workdir, "baseline_plus"),
        )  # fmt: skip
        frames = qm.prepare_frames(val, potential, dtype=jax.tree.leaves(baseline)[0].dtype)
        evaluator = qm.make_evaluator(potential)
        mae_base = float(evaluator(baseline, frames)["force_mae_meV_per_A"])
        mae_more = float(evaluator(more, frames)["force_mae_meV_per_A"])
        better = mae_more < mae_base
        params = more if better else baseline
        epochs = len(hist)  # the time bound may have added epochs
        info.update(
            epochs=epochs,
            optimizer_steps=epochs * steps_per_epoch,
            train_time_s=float(hist[-1]["time_s"]) if hist else 0.0,
            val_force_mae_baseline_meV_per_A=mae_base,
            val_force_mae_continued_meV_per_A=mae_more,
            chosen="continued"
            if better
            else "baseline (continued training did not improve the validation force MAE)",
        )
        params = refit_shift(config, potential, params, train, "baseline_plus")
    model_io.save_model(path, config.model, params, overwrite=True)  # process 0 writes
    if _main():
        write_json(info_path, info)
    return params


def _ci_text(metrics: dict) -> str:
    ci = metrics.get("median_stable_time_ci_ps")
    if not ci:  # evaluations written before the CI existed
        return ""
    level = metrics.get("median_stable_time_ci_level", float("nan"))
    return f" [{ci[0]:.2f}, {ci[1]:.2f}] at {100 * level:.0f} % coverage"


def refit_shift(config, potential, params, train, label):
    """`qm.refit_energy_shift` on the training set when config.refit_energy_shift (logged)."""
    if not config.refit_energy_shift or train.energies is None:
        return params
    params, delta = qm.refit_energy_shift(potential, params, train)
    counts = normalization.species_counts(train.species, config.model.species)
    log(
        f"{label} model: energy zero re-fitted on the training set "
        f"(constant offset {1e3 * float(counts @ delta):+.1f} meV; forces unchanged)"
    )
    return params


CRITERIA = stability.CRITERIA


def make_criterion(name, threshold, system: topo.System, *, ref_rdfs=None):
    """The `stability` criterion `name` with `threshold` for `system`
    (`stability.make_criterion`; RDF-MAE settings `RDF_EVAL`)."""
    try:  # the names and what each criterion needs are `stability.make_criterion`'s
        return stability.make_criterion(
            name,
            threshold,
            species=system.species,
            box=system.box,
            bonds=system.bonds,
            equilibrium_lengths=system.equilibrium_lengths,
            molecule_index=system.molecules,
            reference_rdfs=ref_rdfs,
            rdf_settings=RDF_EVAL,
        )
    except ValueError as err:
        raise ValueError(f"config.stability: {err}") from None


def stability_criterion(config, system, *, evaluation=False, ref_rdfs=None):
    """The training criterion, or (evaluation=True) the headline evaluation criterion."""
    s = config.stability
    name = s.eval_criterion if evaluation else s.criterion
    threshold = s.eval_threshold if evaluation else s.threshold
    return make_criterion(name, threshold, system, ref_rdfs=ref_rdfs)


def evaluation_criteria(config, system, *, frame_ps, ref_rdfs=None):
    """[EvalCriterion]: the headline evaluation criterion and the guard (if any)."""
    s = config.stability
    specs = [(s.eval_criterion, s.eval_threshold)]
    if s.eval_guard and s.eval_guard != s.eval_criterion:
        specs.append((s.eval_guard, s.eval_guard_threshold))
    out = []
    for name, threshold in specs:
        crit = make_criterion(name, threshold, system, ref_rdfs=ref_rdfs)
        out.append(evaluation_criterion(crit, frame_ps=frame_ps, rdf_window_ps=s.rdf_window_ps))
    return out


def observable_target(config, system, train) -> ObservableTarget:
    """The training observable and its reference (the training frames' average); the
    observables and their builders are `stablejax.training.targets.TARGETS`."""
    return targets.make_target(config, system, train.positions)


def stable_train(config, potential, params, dataset, train, target, criterion, workdir):
    R = config.md.n_replicas
    init = sample_initial_conditions(
        train, R, seed=config.seed, replace=R > train.n_frames
    ).positions
    qm_frames = None
    if config.stable.qm_weight > 0:
        qm_frames = qm.prepare_frames(train, potential, dtype=jax.tree.leaves(params)[0].dtype)
    out = os.path.join(workdir, "stable")
    trainer = StableTrainer(
        potential=potential,
        params=params,
        species=dataset.species,
        box=dataset.box,
        config=config,
        criterion=criterion,
        target=target,
        qm_frames=qm_frames,
        initial_positions=init,
        workdir=out,
        mesh=replica_mesh(config),
    )
    log(
        f"StABlE training: {R} replicas, {config.md.steps_per_epoch} steps/epoch, "
        f"up to {config.stable.max_epochs} epochs"
    )
    params = trainer.run()
    if jax.process_count() > 1:  # replicated over every process's devices: local copies
        params = jax.tree.map(jnp.asarray, sharding.to_host(params))
    history = trainer.history
    if history and _main():
        plot_training_curves(
            history,
            ("unstable_fraction", "lr", "observable_loss", "qm_loss"),
            os.path.join(out, "training_progress.png"),
            x="epoch",
            title=f"StABlE training: {config.system}",
        )
    return params, history


def evaluate_models(
    config,
    potential,
    models,
    dataset,
    test,
    system,
    workdir,
    *,
    suffix="",
    temperature_K=None,
    dt_fs=None,
    reference=None,
    extra=None,
):
    """Evaluates every model in `models` on the same held-out initial states of
    `test` (else `dataset`); `system` (`stablejax.data.System`) defines the criteria.

    `temperature_K` / `dt_fs` override the evaluation temperature and time step;
    `reference` replaces the reference observables (e.g. reweighted to another
    temperature); `extra` is added to final_metrics.json.
    """
    e = config.eval
    temperature = e.temperature_K if e.temperature_K > 0 else config.md.temperature_K
    dt = e.dt_fs if e.dt_fs > 0 else config.md.dt_fs
    temperature = temperature_K or temperature
    dt = dt_fs or dt
    box = dataset.box
    if box is not None:
        obs_settings = dict(RDF_EVAL)
    else:
        o = config.observable
        r_max = o.r_max if o.name == "distance_histogram" else 10.0
        obs_settings = {"r_max": r_max, "dr": o.dr, "sigma": o.sigma}
    if reference is None:  # the transfer study passes its reweighted reference
        reference = reference_observables(
            dataset.positions, dataset.species, box, observable_settings=obs_settings
        )
    ref_rdfs = None
    if "rdf_mae" in (config.stability.eval_criterion, config.stability.eval_guard):
        ref_rdfs = reference_rdfs(dataset.positions, dataset.species, box, rdf_settings=RDF_EVAL)
    frame_ps = e.record_every * dt / 1000.0
    criteria = evaluation_criteria(config, system, frame_ps=frame_ps, ref_rdfs=ref_rdfs)
    settings = EvalSettings(
        time_ps=e.time_ps,
        dt_fs=dt,
        temperature_K=temperature,
        record_every=e.record_every,
        vacf_window=e.vacf_window,
    )
    integrator = make_integrator(
        e.integrator,
        dt_fs=dt,
        tau_fs=e.tau_fs,
        friction_per_ps=e.friction_per_ps,
        chain_length=config.md.chain_length,
        pressure_bar=config.md.pressure_bar,
        tau_P_fs=config.md.tau_P_fs,
    )
    sim = make_simulator(
        potential, dataset.species, box, config.md, integrator=integrator, mesh=replica_mesh(config)
    )
    pool = test if test.n_frames > 0 else dataset
    init = sample_initial_conditions(
        pool, e.n_replicas, seed=config.seed + 1, replace=e.n_replicas > pool.n_frames
    ).positions
    n_test = min(e.n_test_frames, test.n_frames) if test.energies is not None else 0
    results, qm_metrics = {}, {}
    for name, params in models.items():
        twin = _same_dynamics(params, {k: models[k] for k in results})
        if twin is not None:
            # Same forces, initial states and key: the MD would repeat the twin's
            # trajectories exactly (e.g. StABlE never started a learning phase). Energy
            # errors are still this model's own (its energy zero may differ).
            log(f"{name}{suffix}: same forces as {twin}; its MD evaluation is reused")
            results[name] = copy.deepcopy(results[twin])
            if n_test:
                qm_metrics[name] = qm.evaluate(
                    potential, params, test.subset(np.arange(n_test)), batch_size=8
                )
            twin_traj = os.path.join(workdir, "eval" + suffix, twin, "traj")
            if config.eval.trajectory_frames and _main() and os.path.isdir(twin_traj):
                shutil.copytree(
                    twin_traj, os.path.join(workdir, "eval" + suffix, name, "traj"),
                    dirs_exist_ok=True,
                )  # fmt: skip
            continue
        log(
            f"evaluating {name}{suffix}: {e.n_replicas} replicas x {e.time_ps} ps at {temperature} K"
        )
        results[name] = evaluate_model(
            sim,
            params,
            init,
            settings=settings,
            criteria=criteria,
            species=dataset.species,
            box=box,
            observable_settings=obs_settings,
            key=jax.random.PRNGKey(config.seed + 7),
            label=name,
            trajectory_dir=(
                os.path.join(workdir, "eval" + suffix, name, "traj")
                if config.eval.trajectory_frames
                else None
            ),
            trajectory_frames=max(1, int(config.eval.trajectory_frames)),
        )
        if n_test:
            qm_metrics[name] = qm.evaluate(
                potential, params, test.subset(np.arange(n_test)), batch_size=8
            )
    bins = observables.bin_centers(obs_settings["r_max"], obs_settings["dr"])
    out_dir = os.path.join(workdir, "eval" + suffix)
    title = f"StABlE evaluation: {config.system} ({config.preset}){suffix}"
    notes = (
        f"Evaluation: {e.integrator}, {temperature} K, dt {dt} fs; criteria: "
        + "; ".join(
            f"{c.name} (threshold {c.criterion.threshold}"
            + (f", {c.window_frames * frame_ps:g} ps windows" if c.window_frames > 1 else "")
            + ")"
            for c in criteria
        )
        + (
            ". A replica is unstable at the first crossing of any criterion (combined) or at "
            "the first frame after a non-finite step; `by_criterion` gives each one alone."
        )
    )
    if config.refit_energy_shift:
        notes += (
            " Energy errors are after re-fitting each model's constant per-species energy "
            "shift on the training set (`refit_energy_shift`; forces and dynamics unchanged)."
        )
    if config.reductions:
        notes += f"\n\nPreset reductions w.r.t. the paper: {config.reductions}"
    overrides = preset_overrides(config)
    if overrides:
        notes += "\n\n" + _overrides_text(overrides, config.preset) + "."
    final = write_report(
        out_dir,
        results,
        reference=reference,
        bins=bins,
        dr=obs_settings["dr"],
        qm_metrics=qm_metrics,
        title=title,
        notes=notes,
        extra=extra,
    )
    if _tensorboard_on(config) and _main():
        _tensorboard_evaluation(os.path.join(out_dir, "tensorboard"), final)
    return final, out_dir


def _same_dynamics(params, evaluated: dict) -> str | None:
    """The name of an already evaluated model whose parameters equal `params` bitwise,
    apart from the per-species energy shift (a constant energy per composition: no force
    changes), or None."""

    def without_shift(p):
        return {k: v for k, v in p.items() if k != "energy_shift"} if isinstance(p, dict) else p

    params = without_shift(params)
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    structure = jax.tree.structure(params)
    for name, other in evaluated.items():
        other = without_shift(other)
        if jax.tree.structure(other) != structure:
            continue
        others = [np.asarray(x) for x in jax.tree.leaves(other)]
        if all(
            a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
            for a, b in zip(leaves, others, strict=True)
        ):
            return name
    return None


def _tensorboard_evaluation(logdir: str, final: dict) -> None:
    """Each model's survival curve (fraction still stable vs time, step = fs) and its
    scalar metrics (step 0) as TensorBoard scalars."""
    from stablejax.training.metrics import tensorboard_writer, write_scalars

    writer = tensorboard_writer(logdir)
    for name, m in final.items():
        if not isinstance(m, dict) or "stable_times_ps" not in m:
            continue
        times = np.asarray(m["stable_times_ps"], dtype=float)
        # Replicas never marked unstable (cause None) are censored: stable at every time.
        censored = np.array([c is None for c in m.get("unstable_cause", [])] or [False])
        for t in np.linspace(0.0, float(m["max_time_ps"]), 51):
            frac = float(np.mean((times > t) | censored))
            writer.add_scalar(f"{name}/fraction_stable", frac, global_step=int(round(t * 1000)))
        write_scalars(writer, m, step=0, prefix=f"{name}/")
    writer.close()


def reweighted_reference(config, dataset, temperature_K):
    """Reference observables at `temperature_K` reweighted from the data (and the ESS)."""
    o = config.observable
    obs_settings = {"r_max": o.r_max, "dr": o.dr, "sigma": o.sigma}
    if dataset.energies is None:
        raise ValueError("temperature transfer needs the reference data's energies")
    frames = jnp.asarray(dataset.positions)
    per_frame = jax.jit(
        jax.vmap(lambda x: structural_observables(x, dataset.species, dataset.box, **obs_settings))
    )(frames)
    T0 = dataset.metadata.get("temperature_K", config.md.temperature_K)
    ref, ess = reweight_observable(
        {k: np.asarray(v) for k, v in per_frame.items()},
        jnp.asarray(dataset.energies),
        kT_from=units.kT_from_kelvin(float(T0)),
        kT_to=units.kT_from_kelvin(temperature_K),
    )
    return {k: np.asarray(v) for k, v in ref.items()}, float(ess), float(T0)


def extra_evaluations(config, potential, models, dataset, test, system, workdir):
    """Temperature transfer and time-step study (config.eval.transfer_temperatures_K,
    config.eval.timestep_study_fs); each writes its own eval_<...>/ folder."""
    results = {}
    for T in config.eval.transfer_temperatures_K:
        ref, ess, T0 = reweighted_reference(config, dataset, float(T))
        log(f"temperature transfer to {T} K: reference reweighted from {T0} K, ESS {ess:.1f}")
        final, _ = evaluate_models(
            config, potential, models, dataset, test, system, workdir,
            suffix=f"_T{float(T):g}K", temperature_K=float(T), reference=ref,
            extra={"reference_reweighted_from_K": T0, "reference_ess": ess,
                   "n_reference_frames": dataset.n_frames},
        )  # fmt: skip
        results[f"T{float(T):g}K"] = final
    for dt in config.eval.timestep_study_fs:
        final, _ = evaluate_models(
            config, potential, models, dataset, test, system, workdir,
            suffix=f"_dt{float(dt):g}fs", dt_fs=float(dt),
        )  # fmt: skip
        results[f"dt{float(dt):g}fs"] = final
    return results


# ---------------------------------------------------------------------------------------------
# The whole study
# ---------------------------------------------------------------------------------------------


# Fields that only change what happens after training: a finished workdir accepts new
# values for them (the affected evaluations run again); every other field is part of
# what the workdir's data, models and training state were made with.
_LATER_STAGE_FIELDS = (
    "eval.",
    "stability.eval_criterion",
    "stability.eval_threshold",
    "stability.eval_guard",
    "stability.eval_guard_threshold",
    "stability.rdf_window_ps",
    "preset",
    "reductions",
    "data.cache_dir",
)
# Fields that change neither results nor outputs that exist (logging sinks).
# `devices` and `runtime.*` (device and process counts, recorded in config.json): a run
# may resume on another number of devices (results differ by summation order only).
_IGNORED_FIELDS = (
    "log.",
    "devices",
    "runtime.",
    "distributed",
    "cluster.",
    "compilation_cache",
)
# Fields added after workdirs were written: an absent one had this value.
_ADDED_FIELD_DEFAULTS = {"precision": "float32", "md.free_space_edges": "all_pairs"}
# Among those, fields that only add evaluations of their own (eval_<...>/ folders).
_EXTRA_EVALUATION_FIELDS = ("eval.transfer_temperatures_K", "eval.timestep_study_fs")


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_workdir_config(config, workdir) -> list[str]:
    """Compares `config` with the one stored in `workdir/config.json` (if any).

    Returns the changed later-stage fields (evaluation settings). Raises ValueError
    naming every other changed field: they would make the workdir's data, models or
    training state disagree with its config, so they are refused before any work.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    old = {**_ADDED_FIELD_DEFAULTS, **_flatten(read_json(path))}
    new = {**_ADDED_FIELD_DEFAULTS, **_flatten(json.loads(config.to_json_best_effort()))}
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k, "<absent>") != new.get(k, "<absent>") and not k.startswith(_IGNORED_FIELDS)
    )
    later = [k for k in changed if k.startswith(_LATER_STAGE_FIELDS)]
    refused = [k for k in changed if k not in later]
    if refused:
        lines = "\n".join(
            f"  {k}: {old.get(k, '<absent>')!r} in the workdir, {new.get(k, '<absent>')!r} now"
            for k in refused
        )
        raise ValueError(
            f"{workdir} holds a run made with other settings, and these fields decide its "
            f"data, pre-training or StABlE training:\n{lines}\nStart fresh with another "
            f"--workdir (or delete {workdir}), or run again with the stored values "
            f"({path}). Evaluation settings (eval.*, stability.eval_*) may change: the "
            "evaluation then runs again."
        )
    return later


def preset_overrides(config) -> dict[str, tuple]:
    """Fields of `config` that differ from its preset in `experiments/configs/<system>.py`
    (command-line overrides such as `--config.observable.name=...`): {field: (value,
    preset value)}. Logging, device and cache fields are left out; empty when the system
    or preset is not one of ours."""
    import importlib

    try:
        module = importlib.import_module(f"experiments.configs.{config.system}")
        preset = module.get_config(config.preset)
    except (ImportError, ValueError, AttributeError, TypeError):
        return {}
    ours = _flatten(json.loads(config.to_json_best_effort()))
    theirs = _flatten(json.loads(preset.to_json_best_effort()))
    return {
        k: (ours.get(k, "<absent>"), theirs.get(k, "<absent>"))
        for k in sorted(ours.keys() | theirs.keys())
        if ours.get(k, "<absent>") != theirs.get(k, "<absent>")
        and not k.startswith(_IGNORED_FIELDS + ("data.cache_dir",))
    }


def _overrides_text(overrides: dict, preset: str) -> str:
    return f"Changed from the `{preset}` preset: " + "; ".join(
        f"{k} = {v!r} (preset {p!r})" for k, (v, p) in overrides.items()
    )


def write_config(config, workdir) -> None:
    """`workdir/config.json`: the resolved config plus `runtime` (n_devices, n_processes,
    platform) of this run."""
    resolved = json.loads(config.to_json_best_effort())
    resolved["runtime"] = sharding.runtime_info(replica_mesh(config))
    write_text(os.path.join(workdir, "config.json"), json.dumps(resolved, indent=2) + "\n")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the study described by `config` in `workdir` (resumable); returns final metrics."""
    validate_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    changed = check_workdir_config(config, workdir)
    redo = [
        k for k in changed if not k.startswith(_EXTRA_EVALUATION_FIELDS + ("preset", "reductions"))
    ]
    if redo and _exists(os.path.join(workdir, "eval")):
        previous = os.path.join(workdir, "previous_eval", time.strftime("%Y%m%d-%H%M%S"))
        if _main():
            os.makedirs(os.path.dirname(previous), exist_ok=True)
            os.replace(os.path.join(workdir, "eval"), previous)
        log(
            f"evaluation settings changed ({', '.join(redo)}): the evaluation runs again; the "
            f"previous one is in {previous}"
        )
    if _main():
        write_config(config, workdir)
    # Every process has read the workdir's config.json before process 0 moves on.
    sharding.sync_processes("pipeline: config written")
    t0 = time.time()
    if config.get("precision", "float32") == "float64" and current_precision() != "float64":
        set_precision("float64")  # the command line sets it before any array is made
    log(f"precision: {current_precision()}")
    runtime = sharding.runtime_info(replica_mesh(config))
    if runtime["n_devices"] > 1 or len(jax.devices()) > 1:
        log(
            f"replicas split over {runtime['n_devices']} of {len(jax.devices())} "
            f"{runtime['platform']} devices"
        )
    if config.system == "lj":
        return run_lj(config, workdir)
    dataset = load_data(config, workdir)
    train, val, test = split(config, dataset)
    log(
        f"data: {dataset.n_frames} frames of {dataset.n_atoms} atoms "
        f"(train {train.n_frames}, val {val.n_frames}, test {test.n_frames})"
    )
    system = system_topology(dataset, train)
    potential, params = build_model(config, dataset, train)

    models_dir = os.path.join(workdir, "models")
    base_path = os.path.join(models_dir, "baseline")
    if _exists(base_path):
        _, baseline = model_io.load_model(base_path)
        log(f"baseline model loaded from {base_path}")
    else:
        baseline = pretrain(config, potential, params, train, val, workdir)
        baseline = refit_shift(config, potential, baseline, train, "baseline")
        model_io.save_model(base_path, config.model, baseline)

    stable_path = os.path.join(models_dir, "stable")
    criterion = stability_criterion(config, system)
    target = observable_target(config, system, train)
    if _exists(stable_path):
        _, stable_params = model_io.load_model(stable_path)
        log(f"StABlE model loaded from {stable_path}")
    else:
        stable_params, _ = stable_train(
            config, potential, baseline, dataset, train, target, criterion, workdir
        )
        stable_params = refit_shift(config, potential, stable_params, train, "StABlE")
        model_io.save_model(stable_path, config.model, stable_params)

    models = {"baseline": baseline, "stable": stable_params}
    if config.eval.baseline_plus:
        models["baseline_plus"] = baseline_plus_model(
            config, potential, baseline, train, val, workdir
        )
    out_dir = os.path.join(workdir, "eval")
    done_path = os.path.join(out_dir, "final_metrics.json")
    if _exists(done_path):
        # A finished evaluation is kept (delete eval/ to redo it); later presets such as
        # `transfer` reuse the trained models and only add their own evaluations.
        log(f"evaluation already done: {done_path}")
        final = read_json(done_path)
    else:
        final, out_dir = evaluate_models(config, potential, models, dataset, test, system, workdir)
    extra_evaluations(config, potential, models, dataset, test, system, workdir)
    log(f"done in {time.time() - t0:.0f} s")
    for name in models:
        m = final[name]
        log(
            f"{name:>8}: median stable time {m['median_stable_time_ps']:.2f} ps"
            + _ci_text(m)
            + f" (mean {m['mean_stable_time_ps']:.2f} ps, "
            f"{m['n_unstable']}/{m['n_replicas']} unstable)"
        )
    for pair, t in final.get("paired_tests", {}).items():
        log(
            f"paired test {pair}: longer in {t['n_longer']} of {t['n']}, shorter in "
            f"{t['n_shorter']}, p = {t['p_value']:.3g}"
        )
    log(f"outputs: {workdir} (report: {os.path.join(out_dir, 'report.md')})")
    return final


# ---------------------------------------------------------------------------------------------
# Several seeds: the whole study per seed, then one summary
# ---------------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' -> [0, 1, 2] / [0, 1, 2, 3, 4]; raises ValueError naming --seeds."""
    seeds = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError as err:
        raise ValueError(f"--seeds: expected e.g. '0,1,2' or '0-2', got {text!r}") from err
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: need distinct non-negative seeds, got {text!r}")
    return seeds


def run_seeds(config: ml_collections.ConfigDict, workdir: str, seeds) -> dict:
    """The whole study once per seed into `workdir/seed_<k>/`, then `summary.json`/`.md`.

    Each seed changes the model initialisation, data split, MD initial states and noise
    (`config.seed`); the reference data stay the same (`config.data.seed`). Every
    seed's run is resumable on its own.
    """
    validate_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    per_seed, wall = {}, {}
    for k in seeds:
        cfg = config.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.seed = int(k)
        log(f"=== seed {k} ({list(seeds).index(k) + 1} of {len(seeds)}) ===")
        t0 = time.time()
        per_seed[int(k)] = run(cfg, os.path.join(workdir, f"seed_{k}"))
        wall[int(k)] = time.time() - t0
    summary = summarize_seeds(per_seed, wall_time_s=wall)
    summary["config"] = {
        "system": config.system,
        "preset": config.preset,
        # `seed` is set per seed by --seeds; any other difference came from the command line.
        "overrides": {
            k: {"value": v, "preset": p}
            for k, (v, p) in preset_overrides(config).items()
            if k != "seed"
        },
    }
    if _main():
        write_text(
            os.path.join(workdir, "summary.md"),
            summary_markdown(summary, title=f"{config.system} `{config.preset}`"),
        )
        write_json(os.path.join(workdir, "summary.json"), summary)
    for name, m in summary["models"].items():
        lo, hi = m["median_stable_time_ps"]["interval_95"]
        log(
            f"{name:>8}: per-seed median stable times {m['median_stable_time_ps']['per_seed']} "
            f"ps; mean {m['median_stable_time_ps']['mean']:.2f} ps, 95 % interval "
            f"[{lo:.2f}, {hi:.2f}]"
        )
    for pair, t in summary["paired_tests"].items():
        log(f"paired test {pair} (pooled over seeds): p = {t['p_value']:.3g}")
    log(f"summary: {os.path.join(workdir, 'summary.md')}")
    return summary


def _mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of a few per-seed values (no interval for one value)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - half, m + half


def summarize_seeds(per_seed: dict, *, wall_time_s: dict | None = None) -> dict:
    """Summary over seeds of `final_metrics.json` dicts {seed: final}.

    Per model: the per-seed medians of the stable time (combined criterion), their mean
    with a 95 % Student-t interval, the pooled median of all replicas with its
    order-statistic CI, counts, force MAE and observable errors per seed, and the same
    medians per criterion. Paired tests: each model against the first ('baseline'),
    one-sided Wilcoxon over all replicas of all seeds, paired by seed and initial state.
    """
    from stablejax.evaluation import median_confidence_interval, paired_stable_time_test

    seeds = sorted(per_seed)
    if not seeds:
        raise ValueError("summarize_seeds needs at least one seed")
    first = per_seed[seeds[0]]
    models = [k for k, v in first.items() if isinstance(v, dict) and "stable_times_ps" in v]
    out = {"seeds": seeds, "models": {}, "paired_tests": {}}
    if wall_time_s:
        out["wall_time_s"] = {str(k): float(v) for k, v in wall_time_s.items()}
    for name in models:
        runs = [per_seed[s][name] for s in seeds]
        medians = [r["median_stable_time_ps"] for r in runs]
        mean, lo, hi = _mean_interval(medians)
        # Stable times live in [0, run length]: the t interval is clipped to that range.
        t_max = runs[0].get("max_time_ps") or np.inf
        lo, hi = max(lo, 0.0), min(hi, t_max)
        pooled = np.concatenate([r["stable_times_ps"] for r in runs])
        plo, phi, plevel = median_confidence_interval(pooled)
        m = {
            "median_stable_time_ps": {
                "per_seed": medians,
                "mean": mean,
                "interval_95": [lo, hi],
                "interval": "Student-t 95 % interval of the mean of per-seed medians, "
                "clipped to [0, max_time_ps]",
            },
            "pooled": {
                "median_stable_time_ps": float(np.median(pooled)),
                "median_ci_ps": [plo, phi],
                "median_ci_level": plevel,
                "mean_stable_time_ps": float(np.mean(pooled)),
                "n_replicas": int(pooled.size),
                "n_unstable": int(sum(r["n_unstable"] for r in runs)),
                "n_non_finite": int(
                    sum(c == "non_finite" for r in runs for c in r.get("unstable_cause", []))
                ),
            },
            "max_time_ps": runs[0].get("max_time_ps"),
        }
        for key in ("force_mae_meV_per_A", "energy_mae_meV", "diffusivity_A2_per_ps") + tuple(
            k for k in runs[0] if k.endswith("_mae") and k not in ("energy_mae", "force_mae")
        ):
            vals = [r.get(key) for r in runs]
            if any(v is not None for v in vals):
                mean_k, lo_k, hi_k = _mean_interval(vals)
                m[key] = {"per_seed": vals, "mean": mean_k, "interval_95": [lo_k, hi_k]}
        by = {}
        for crit in runs[0].get("by_criterion", {}):
            meds = [r["by_criterion"][crit]["median_stable_time_ps"] for r in runs]
            cm, clo, chi = _mean_interval(meds)
            times = np.concatenate([r["by_criterion"][crit]["stable_times_ps"] for r in runs])
            by[crit] = {
                "per_seed_median_ps": meds,
                "mean_of_medians_ps": cm,
                "interval_95": [clo, chi],
                "pooled_median_ps": float(np.median(times)),
                "n_unstable": int(sum(r["by_criterion"][crit]["n_unstable"] for r in runs)),
            }
        m["by_criterion"] = by
        out["models"][name] = m
    # The trained model against each other model ("stable vs baseline", "stable vs
    # baseline_plus"), paired by seed and initial state.
    target = "stable" if "stable" in models else models[1]
    for name in models:
        if name == target:
            continue
        a = np.concatenate([per_seed[s][name]["stable_times_ps"] for s in seeds])
        b = np.concatenate([per_seed[s][target]["stable_times_ps"] for s in seeds])
        out["paired_tests"][f"{target} vs {name}"] = paired_stable_time_test(a, b)
    return out


def summary_markdown(summary: dict, *, title: str) -> str:
    """summary.md: the seeds summary as tables."""

    def f(x):
        return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3g}"

    seeds = summary["seeds"]
    names = list(summary["models"])
    lines = [
        f"# Summary over seeds {seeds}: {title}",
        "",
        "Stable times use the combined evaluation criterion (first crossing of any "
        "criterion, or a non-finite step). Interval: Student-t 95 % interval of the mean "
        "of the per-seed medians; pooled: all replicas of all seeds, median with its "
        "order-statistic CI.",
        "",
    ]
    overrides = summary.get("config", {}).get("overrides") or {}
    if overrides:
        preset = summary["config"].get("preset", "")
        text = {k: (o["value"], o["preset"]) for k, o in overrides.items()}
        lines += [_overrides_text(text, preset) + ".", ""]
    lines += [
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    row = []
    for n in names:
        m = summary["models"][n]["median_stable_time_ps"]
        row.append(", ".join(f(v) for v in m["per_seed"]))
    lines.append("| median stable time per seed (ps) | " + " | ".join(row) + " |")
    row = []
    for n in names:
        m = summary["models"][n]["median_stable_time_ps"]
        row.append(f"{f(m['mean'])} [{f(m['interval_95'][0])}, {f(m['interval_95'][1])}]")
    lines.append("| mean of medians [95 %] (ps) | " + " | ".join(row) + " |")
    row = []
    for n in names:
        p = summary["models"][n]["pooled"]
        row.append(
            f"{f(p['median_stable_time_ps'])} [{f(p['median_ci_ps'][0])}, "
            f"{f(p['median_ci_ps'][1])}]"
        )
    lines.append("| pooled median [CI] (ps) | " + " | ".join(row) + " |")
    row = []
    for n in names:
        p = summary["models"][n]["pooled"]
        row.append(f"{p['n_unstable']}/{p['n_replicas']} ({p['n_non_finite']} non-finite)")
    lines.append("| unstable replicas | " + " | ".join(row) + " |")
    keys = [k for k in summary["models"][names[0]] if isinstance(summary["models"][names[0]][k], dict) and "per_seed" in summary["models"][names[0]][k] and k != "median_stable_time_ps"]  # fmt: skip
    for k in keys:
        row = []
        for n in names:
            m = summary["models"][n].get(k)
            row.append(
                "–" if m is None else f"{f(m['mean'])} ({', '.join(f(v) for v in m['per_seed'])})"
            )
        lines.append(f"| {k}: mean (per seed) | " + " | ".join(row) + " |")  # fmt: skip
    lines.append("")
    crits = list(summary["models"][names[0]]["by_criterion"])
    if crits:
        lines += [
            "By criterion alone (per-seed medians, ps; unstable replicas):",
            "",
            "| criterion | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for c in crits:
            row = []
            for n in names:
                b = summary["models"][n]["by_criterion"][c]
                row.append(
                    ", ".join(f(v) for v in b["per_seed_median_ps"]) + f"; {b['n_unstable']}"
                )
            lines.append(f"| {c} | " + " | ".join(row) + " |")
        lines.append("")
    for pair, t in summary["paired_tests"].items():
        lines.append(
            f"Paired test {pair}, pooled over seeds ({t['test']}): longer in {t['n_longer']} "
            f"of {t['n']} pairs, shorter in {t['n_shorter']}; median difference "
            f"{t['median_difference_ps']:.3g} ps; p = {t['p_value']:.3g}."
        )
    if "wall_time_s" in summary:
        lines += [
            "",
            "Wall time of this invocation per seed (s; a resumed seed counts only what "
            "ran): " + ", ".join(f"{k}: {v:.0f}" for k, v in summary["wall_time_s"].items()),
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Lennard-Jones: no QM data; the reference is the full LJ potential simulated by the package
# ---------------------------------------------------------------------------------------------


def lj_reference(config, workdir):
    """Frames of the full LJ fluid (our own MD; cached in workdir/data/) as a Dataset."""
    from stablejax.data import Dataset
    from stablejax.potentials import pair

    lj = config.lj
    n = int(lj.n_particles)
    box_len = (n / lj.density) ** (1.0 / 3.0) * lj.sigma
    box = np.full(3, box_len)
    path = os.path.join(workdir, "data", "lj_reference.npz")
    if _exists(path):
        with np.load(path) as f:
            return Dataset(species=f["species"], positions=f["positions"], box=f["box"],
                           source=path)  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ref_cfg = pair.default_config("lennard_jones")
    ref_cfg.sigma, ref_cfg.epsilon, ref_cfg.cutoff = lj.sigma, lj.epsilon, lj.cutoff
    potential = factory.build(ref_cfg)
    species = np.full(n, 18)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    x0 = (grid + 0.5) * box_len / side
    R = config.md.n_replicas
    sim = make_simulator(potential, species, box, config.md, mesh=replica_mesh(config))
    params = potential.init(jax.random.PRNGKey(0), species, x0, box)
    kT = units.kT_from_kelvin(config.md.temperature_K)
    state = sim.init(jax.random.PRNGKey(config.seed), params, np.broadcast_to(x0, (R, n, 3)), kT)
    log(f"LJ reference: equilibrating {R} replicas of the full LJ fluid (box {box_len:.2f} Å)")
    state, _ = sim.run(
        params, state, 20 * config.md.check_every, record_every=config.md.check_every
    )
    per_replica = int(np.ceil(lj.reference_frames / R))
    every = 5 * config.md.check_every
    state, traj = sim.run(params, state, per_replica * every, record_every=every)
    pos = np.asarray(traj.position).reshape(-1, n, 3)[: lj.reference_frames]
    pos = np.mod(pos, box_len)
    if _main():
        np.savez(path, species=species, positions=pos, box=box)
    return Dataset(species=species, positions=pos, box=box, source="full LJ (stablejax MD)")


def run_lj(config, workdir) -> dict:
    dataset = lj_reference(config, workdir)
    if _main():
        with open(os.path.join(workdir, "data.json"), "w") as f:
            json.dump({"source": dataset.source, "n_frames": dataset.n_frames}, f, indent=2)
    # Every LJ atom is its own molecule; no bonds.
    system = topo.System(dataset.species, dataset.box, molecules=np.arange(dataset.n_atoms))
    potential = factory.build(config.model)
    baseline = potential.init(
        jax.random.PRNGKey(config.seed), dataset.species, dataset.positions[0], dataset.box
    )
    criterion = stability_criterion(config, system)
    target = observable_target(config, system, dataset)
    models_dir = os.path.join(workdir, "models")
    stable_path = os.path.join(models_dir, "stable")
    if _exists(stable_path):
        _, stable_params = model_io.load_model(stable_path)
    else:
        stable_params, _ = stable_train(
            config, potential, baseline, dataset, dataset, target, criterion, workdir
        )
        model_io.save_model(stable_path, config.model, stable_params)
    empty = dataset.subset(np.arange(0))
    final, out_dir = evaluate_models(
        config,
        potential,
        {"prior only (baseline)": baseline, "stable": stable_params},
        dataset,
        empty,
        system,
        workdir,
    )
    for pair, t in final.get("paired_tests", {}).items():
        log(
            f"paired test {pair}: longer in {t['n_longer']} of {t['n']}, shorter in "
            f"{t['n_shorter']}, p = {t['p_value']:.3g}"
        )
    log(f"outputs: {workdir} (report: {os.path.join(out_dir, 'report.md')})")
    return final
