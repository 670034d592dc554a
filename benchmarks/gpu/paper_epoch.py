"""Time one paper-size aspirin StABlE epoch, one learning step and an evaluation chunk.

Everything is built from the aspirin `paper` preset (`experiments/configs/aspirin.py`):
SchNet at paper size (64/64, 6 interactions, 5 Å), randomly initialised (the timings do
not depend on the weights, but the trajectories are not physical: a random model does
not hold the molecule together, so the unstable fractions below mean nothing), on noisy
copies of the MD17 aspirin frame bundled with the package
(`stablejax.potentials.testing.aspirin`). No data files, network or QM engine needed.

  (a) simulation epoch: `md.n_replicas` (128) replicas x `md.steps_per_epoch` (2000)
      Nose-Hoover steps with the trainer's own simulator and check (what
      `StableSetup.run_md` does: `md.make_simulator`, chunks of `md.chunk_steps`, frames
      every `md.check_every`, the bond-length stability criterion on them);
  (b) learning step: the trainer's jitted step (`make_learning_step`: the global
      Boltzmann estimator `stablejax.boltzmann_grad` on the h(r) observable over the
      epoch's samples, minibatches of `stable.batch_size`, plus lambda = 10 times the QM
      gradient over `--qm-frames` (950 = the paper's training set) synthetic labelled
      frames, clipped SGD), and the estimator's gradient alone;
  (c) evaluation chunk: `--eval-replicas` (256) x `--eval-steps` (1000) Langevin steps
      (the `eval` block: 0.1/ps, frames every `eval.record_every`).

Compile time is reported apart from run time: for MD, the XLA compile seconds of a
warm-up chunk (jax's compile events, `stablejax.compile_cache.CompileMeter`; the warm-up's
wall time is `first_call_s`); for the learning step, the wall time of the ahead-of-time
`lower(...).compile()`. Run times of the learning step are the minimum of
`--repeats` calls. Writes OUT/paper_epoch.json after each part (a part that fails or
times out leaves the earlier ones).

  python -m benchmarks.gpu.paper_epoch --out OUT                  # paper sizes (a GPU)
  python -m benchmarks.gpu.paper_epoch --tiny --out OUT           # CPU smoke test (~30 s)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import aspirin as aspirin_config
from stablejax import md, stability, units
from stablejax.compile_cache import CompileMeter
from stablejax.data.dataset import Dataset
from stablejax.data.topology import equilibrium_bond_lengths, find_bonds, molecules
from stablejax.estimator import boltzmann_grad
from stablejax.potentials import factory
from stablejax.potentials.base import all_pairs_edges
from stablejax.potentials.common import count_params
from stablejax.potentials.testing import aspirin
from stablejax.training import qm, targets
from stablejax.training.stable import StableSetup

#: Run sizes: the paper's (aspirin `paper` preset, 950 training frames) and the CPU smoke test's.
PAPER = {"replicas": 128, "steps": 2000, "eval_replicas": 256, "eval_steps": 1000, "qm_frames": 950}
TINY = {"replicas": 4, "steps": 20, "eval_replicas": 4, "eval_steps": 20, "qm_frames": 8}


def _record_every(default: int, steps: int) -> int:
    """The preset's frame interval, or half the run when the run is shorter (tiny runs)."""
    every = default if steps >= 2 * default else max(1, steps // 2)
    if steps % every:
        raise ValueError(f"steps ({steps}) must be a multiple of {every}")
    return every


def build_config(args):
    """The aspirin `paper` preset with the run sizes of `args`."""
    config = aspirin_config.get_config("paper")
    config.precision = "float32"
    if args.small_model:  # the `test` preset's model, for CPU smoke tests
        m = aspirin_config.get_config("test").model
        for key in (
            "hidden_features",
            "n_filters",
            "n_interactions",
            "n_gaussians",
            "head_features",
        ):
            config.model[key] = m[key]
    config.md.n_replicas = args.replicas
    config.md.steps_per_epoch = args.steps
    config.md.check_every = _record_every(config.md.check_every, args.steps)
    if args.steps < 2 * config.stable.sample_every:  # tiny runs: every recorded frame
        config.stable.sample_every = config.md.check_every
    config.md.chunk_steps = min(config.md.chunk_steps, args.steps)
    config.eval.n_replicas = args.eval_replicas
    config.eval.record_every = _record_every(config.eval.record_every, args.eval_steps)
    if args.qm_frames <= 0:
        config.stable.qm_weight = 0.0
    return config


def noisy_copies(x0, n, scale, seed):
    rng = np.random.default_rng(seed)
    return (x0[None] + scale * rng.normal(size=(n,) + x0.shape)).astype(np.float32)


def synthetic_qm_frames(species, x0, n_frames, potential):
    """`n_frames` labelled frames (noisy geometries, random labels): the QM term's cost
    depends only on their number."""
    rng = np.random.default_rng(3)
    ds = Dataset(
        species=species,
        positions=noisy_copies(x0, n_frames, 0.05, 2),
        energies=rng.normal(size=n_frames).astype(np.float32),
        forces=rng.normal(scale=0.5, size=(n_frames,) + x0.shape).astype(np.float32),
        source="synthetic (benchmarks.gpu.paper_epoch)",
    )
    return qm.prepare_frames(ds, potential, dtype=jnp.float32)


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def device_info() -> dict:
    devices = jax.devices()
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "python": platform.python_version(),
        "host": platform.node(),
    }


def time_md(sim, params, state, n_steps, record_every, n_replicas, n_atoms, check=None):
    """(result dict, end state, trajectory) of a warm-up chunk then an `n_steps` run.

    `compile_s` is the XLA compile time of the warm-up (the MD chunk and `check`, from
    jax's compile events); `first_call_s` its wall time (compile + one chunk)."""
    chunk = max(record_every, (sim.chunk_steps // record_every) * record_every)
    chunk = min(chunk, n_steps)
    meter = CompileMeter()
    t0 = time.perf_counter()
    state, warm = sim.run(params, state, chunk, record_every=record_every)
    if check is not None:
        np.asarray(check(jnp.asarray(warm.position)))  # compiles the stability check
    first = time.perf_counter() - t0
    compile_s, n_compiled = meter.seconds, meter.count
    meter = CompileMeter()
    t0 = time.perf_counter()
    state, traj = sim.run(params, state, n_steps, record_every=record_every)
    flags = None
    if check is not None:
        flags = np.asarray(check(jnp.asarray(traj.position))).any(axis=1)
        flags |= np.asarray(state.unstable)
    run = time.perf_counter() - t0
    out = {
        "replicas": n_replicas,
        "steps": n_steps,
        "record_every": record_every,
        "chunk_steps": chunk,
        "first_call_s": first,
        "compile_s": compile_s,
        "programs_compiled": n_compiled,
        "compiles_during_run": meter.count,  # 0 unless a neighbour list had to grow
        "run_s": run,
        "ms_per_step": 1e3 * run / n_steps,
        "replica_steps_per_s": n_replicas * n_steps / run,
        "atom_steps_per_s": n_replicas * n_atoms * n_steps / run,
        "mean_temperature_K": _finite(np.nanmean(traj.temperature)),
        "non_finite_replicas": int(np.sum(np.asarray(state.unstable))),
    }
    if flags is not None:
        out["unstable_fraction"] = float(flags.mean())
    return out, state, traj


def time_compiled(fn, args, repeats):
    """(compile seconds, min run seconds, outputs) of `jax.jit(fn)` ahead of time."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return compile_s, best, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/paper_epoch", help="directory for paper_epoch.json")
    parser.add_argument("--replicas", type=int, default=None, help="training replicas (128)")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (2000)")
    parser.add_argument("--eval-replicas", type=int, default=None, help="(256)")
    parser.add_argument("--eval-steps", type=int, default=None, help="(1000)")
    parser.add_argument(
        "--qm-frames", type=int, default=None, help="QM frames of the learning step (950; 0: none)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed learning-step calls")
    parser.add_argument("--small-model", action="store_true", help="the `test` preset's SchNet")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke test: 4 replicas x 20 steps, 8 QM frames, small SchNet (explicit "
        "size options still win)",
    )
    parser.add_argument(
        "--skip", default="", help="comma list of parts to skip: epoch,learning,estimator,eval"
    )
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny:
        args.small_model = True
        args.repeats = 1
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    jax.config.update("jax_enable_x64", False)

    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "paper_epoch.json")
    config = build_config(args)
    species, x0 = aspirin()
    n = len(species)
    potential = factory.build(config.model)
    params = jax.jit(potential.init)(
        jax.random.PRNGKey(0), jnp.asarray(species), jnp.asarray(x0, jnp.float32), None
    )
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    report = {
        "benchmark": "paper_epoch",
        "system": f"aspirin ({n} atoms, free space), MD17 frame + noise",
        "preset": "aspirin paper" + (" (small model)" if args.small_model else ""),
        "model": {
            "name": config.model.name,
            "n_params": count_params(params),
            "hidden_features": int(config.model.hidden_features),
            "n_interactions": int(config.model.n_interactions),
            "cutoff_A": float(potential.cutoff),
            "weights": "random initialisation (timing only)",
        },
        "dtype": "float32",
        **device_info(),
        "sizes": {
            "replicas": args.replicas,
            "steps": args.steps,
            "eval_replicas": args.eval_replicas,
            "eval_steps": args.eval_steps,
            "qm_frames": max(args.qm_frames, 0),
        },
        "status": {},
    }

    def dump():
        report["total_s"] = time.perf_counter() - t_start
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, path)

    def part(name, fn):
        if name in skip:
            report["status"][name] = "skipped"
            return None
        try:
            result = fn()
            report["status"][name] = "ok"
            return result
        except Exception as exc:  # keep going: the other parts still get timed
            traceback.print_exc()
            report["status"][name] = f"failed: {type(exc).__name__}: {exc}"[:500]
            return None
        finally:
            dump()

    # Topology, criterion, h(r) target and the trainer's set-up, as the pipeline builds them.
    ref_frames = noisy_copies(x0, 16, 0.02, 1)
    bonds = find_bonds(species, x0)
    eq = equilibrium_bond_lengths(ref_frames, bonds)
    mol = molecules(n, bonds)
    criterion = stability.make_criterion(
        config.stability.criterion,
        config.stability.threshold,
        species=species,
        bonds=bonds,
        equilibrium_lengths=eq,
        molecule_index=mol,
    )
    system = targets.System(species=species, box=None, bonds=bonds, molecules=mol)
    target = targets.make_target(config, system, ref_frames)
    qm_frames = (
        synthetic_qm_frames(species, x0, args.qm_frames, potential) if args.qm_frames > 0 else None
    )
    setup = StableSetup(
        potential=potential,
        species=species,
        box=None,
        config=config,
        criterion=criterion,
        target=target,
        qm_frames=qm_frames,
    )
    kT = units.kT_from_kelvin(config.md.temperature_K)
    held = {}

    def epoch():
        init = noisy_copies(x0, args.replicas, 0.02, 4)
        state = setup.sim.init(jax.random.PRNGKey(1), params, jnp.asarray(init), kT)
        res, _, traj = time_md(
            setup.sim, params, state, args.steps, config.md.check_every, args.replicas, n,
            check=setup.check,
        )  # fmt: skip
        res["integrator"] = config.md.integrator
        res["temperature_K"] = float(config.md.temperature_K)
        res["dt_fs"] = float(config.md.dt_fs)
        held["traj"] = traj
        report["simulation_epoch"] = res
        print(
            f"simulation epoch: {args.replicas} x {args.steps} steps in {res['run_s']:.2f} s "
            f"({res['replica_steps_per_s']:.4g} replica-steps/s, {res['atom_steps_per_s']:.4g} "
            f"atom-steps/s); compile {res['compile_s']:.1f} s",
            flush=True,
        )

    def epoch_samples():
        """The estimator samples of the simulation epoch, on the device."""
        if "traj" not in held:
            raise RuntimeError("needs the simulation epoch's frames")
        samples = setup.on_devices(setup.samples(held["traj"]))
        return samples, int(samples["positions"].shape[0])

    def learning():
        samples, n_samples = epoch_samples()
        opt_state = setup.optimizer.init(params)
        qm_idx, qm_w = setup.qm_chunks(jax.random.PRNGKey(5))
        lr = jnp.asarray(float(config.stable.lr), jnp.float32)
        step_args = (params, opt_state, samples, None, qm_idx, qm_w, lr)
        c_s, r_s, out = time_compiled(setup.learn_step, step_args, args.repeats)
        metrics = {k: _finite(v) for k, v in out[2].items()}
        report["learning_step"] = {
            "samples": n_samples,
            "estimator_batch_size": int(config.stable.batch_size),
            "qm_frames": max(args.qm_frames, 0),
            "qm_weight": float(config.stable.qm_weight),
            "compile_s": c_s,
            "run_s": r_s,
            "samples_per_s": n_samples / r_s,
            "metrics": metrics,
        }
        print(f"learning step: {n_samples} samples, {r_s:.3f} s (compile {c_s:.1f} s)", flush=True)

    def estimator_alone():
        """The estimator's gradient alone (no QM term, no optimizer) on the same samples."""
        samples, n_samples = epoch_samples()
        edges = jnp.asarray(all_pairs_edges(n))
        species_j = jnp.asarray(species, jnp.int32)
        estimator = boltzmann_grad(
            lambda p, x: potential.energy(p, species_j, x, edges, None),
            target.observable_fn,
            target.loss,
            kT=setup.kT,
            batch_size=int(config.stable.batch_size),
        )
        c_e, r_e, (value_aux, grads) = time_compiled(
            estimator, (params, samples["positions"]), args.repeats
        )
        report["estimator"] = {
            "samples": n_samples,
            "batch_size": int(config.stable.batch_size),
            "observable": f"{config.observable.name} (r_max {config.observable.r_max} Å, "
            f"dr {config.observable.dr} Å)",
            "compile_s": c_e,
            "run_s": r_e,
            "samples_per_s": n_samples / r_e,
            "loss": _finite(value_aux[0]),
            "grad_norm": _finite(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))),
        }
        print(f"estimator alone: {r_e:.3f} s (compile {c_e:.1f} s)", flush=True)

    def evaluation():
        e = config.eval
        integrator = md.make_integrator(
            e.integrator,
            dt_fs=config.md.dt_fs if e.dt_fs < 0 else e.dt_fs,
            tau_fs=e.tau_fs,
            friction_per_ps=e.friction_per_ps,
        )
        sim = md.make_simulator(potential, species, None, config.md, integrator=integrator)
        init = noisy_copies(x0, args.eval_replicas, 0.02, 6)
        temperature = config.md.temperature_K if e.temperature_K < 0 else e.temperature_K
        state = sim.init(
            jax.random.PRNGKey(2), params, jnp.asarray(init), units.kT_from_kelvin(temperature)
        )
        res, _, _ = time_md(
            sim, params, state, args.eval_steps, e.record_every, args.eval_replicas, n
        )
        res["integrator"] = e.integrator
        res["friction_per_ps"] = float(e.friction_per_ps)
        report["evaluation_chunk"] = res
        print(
            f"evaluation chunk: {args.eval_replicas} x {args.eval_steps} steps in "
            f"{res['run_s']:.2f} s ({res['replica_steps_per_s']:.4g} replica-steps/s); "
            f"compile {res['compile_s']:.1f} s",
            flush=True,
        )

    part("epoch", epoch)
    part("learning", learning)
    part("estimator", estimator_alone)
    part("eval", evaluation)
    dump()
    print(f"wrote {path} ({report['total_s']:.1f} s)")
    failed = [k for k, v in report["status"].items() if v.startswith("failed")]
    if failed:
        raise SystemExit(f"failed parts: {failed}")
    return report


if __name__ == "__main__":
    main()
