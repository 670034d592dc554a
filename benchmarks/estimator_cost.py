"""Cost of the Boltzmann estimator relative to one gradient of the summed energy.

For an aspirin-sized system (21 atoms, MD17 frame + Gaussian noise) and a SchNet model
(the paper's aspirin model; `--model pair_mlp` for a cheaper one), with the paper's
500-bin h(r) observable (0-10 Å, dr 0.02 Å, sigma 0.01 Å) and N = 2,560 samples, it
measures time and peak memory of

  estimator:   `stablejax.boltzmann_grad` (loss = ||<h> - h_ref||^2), one backward pass
               through sum_i c_i U(x_i);
  energy_grad: one `jax.grad` of sum_i U(x_i) over the same samples (the floor: any
               gradient-based estimator needs at least this);
  jacobian:    a per-sample-Jacobian implementation like the PyTorch reference's:
               per-sample parameter gradients J [N, P] (vmap of grad), then the
               covariance Jacobian d<h>/dtheta = -beta Cov(h, dU/dtheta) [bins, P] from
               the outer product of observables and gradients, then its product with
               dloss/d<h>. `jacobian_contracted` is the same with the outer product
               contracted on the fly (einsum): J [N, P] is still materialised.

All three use the same minibatch size over samples (`--batch-size`, exact accumulation in
`lax.scan`/`lax.map`), so the ratios compare algorithms, not batching. Memory is XLA's
compiled memory analysis (temp + arguments + outputs); time is the minimum over repeats
of a jitted call (compile excluded), float32.

Writes estimator_cost.json with time_ratio, memory_ratio (estimator / energy_grad; goal
<= 1.5 each) and per_sample_jacobian_memory_ratio / per_sample_jacobian_time_ratio
(jacobian / estimator).

Usage:
  python -m benchmarks.estimator_cost --out runs/estimator_cost
  python -m benchmarks.estimator_cost --quick --out runs/estimator_cost_quick
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from stablejax import units
from stablejax.estimator import boltzmann_grad
from stablejax.observables import distance_histogram
from stablejax.potentials import factory
from stablejax.potentials.base import all_pairs_edges
from stablejax.potentials.common import count_params
from stablejax.potentials.testing import aspirin


def build_model(name: str, species):
    config = factory.default_config(name)
    if name == "pair_mlp":
        config.prior = "none"
    else:
        config.species = sorted({int(z) for z in species})
    return factory.build(config)


def peak_memory_bytes(compiled) -> int:
    """temp + arguments + outputs - aliased bytes of XLA's buffer assignment."""
    s = compiled.memory_analysis()
    total = (
        s.temp_size_in_bytes + s.argument_size_in_bytes + s.output_size_in_bytes
    ) - s.alias_size_in_bytes
    return int(max(total, int(getattr(s, "peak_memory_in_bytes", 0) or 0)))


def make_functions(potential, species, h_ref, *, kT, batch_size):
    edges = all_pairs_edges(len(species))

    def energy(params, x):
        return potential.energy(params, species, x, edges, None)

    def observable(x):
        return distance_histogram(x, r_max=10.0, dr=0.02, sigma=0.01)

    def loss(h):
        return jnp.sum((h - h_ref) ** 2)

    estimator = boltzmann_grad(energy, observable, loss, kT=kT, batch_size=batch_size)

    def run_estimator(params, samples):
        (value, _), grads = estimator(params, samples)
        return value, grads

    def batches(samples):
        n = samples.shape[0]
        if n % batch_size:
            raise ValueError(f"--samples ({n}) must be a multiple of --batch-size ({batch_size})")
        return samples.reshape((n // batch_size, batch_size) + samples.shape[1:])

    def energy_grad(params, samples):
        # One gradient of the summed energy, accumulated over the same minibatches.
        def step(acc, xb):
            g = jax.grad(lambda p: jnp.sum(jax.vmap(energy, (None, 0))(p, xb)))(params)
            return jax.tree.map(jnp.add, acc, g), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, _ = jax.lax.scan(step, zeros, batches(samples))
        return grads

    def jacobian(params, samples, contract):
        n = samples.shape[0]
        per_sample = jax.lax.map(
            lambda x: jax.grad(energy)(params, x), samples, batch_size=batch_size
        )  # leaves [N, ...]
        flat_j = jnp.concatenate([j.reshape(n, -1) for j in jax.tree.leaves(per_sample)], axis=1)
        obs = jax.lax.map(observable, samples, batch_size=batch_size)  # [N, bins]
        mean_obs = jnp.mean(obs, axis=0)
        # d<O>/dtheta = -beta (<O dU> - <O><dU>), from the [N, bins, P] outer product (as
        # the reference does; XLA may fuse it into the reduction).
        if contract:
            o_du = jnp.einsum("nd,np->dp", obs, flat_j) / n
        else:
            o_du = jnp.mean(obs[:, :, None] * flat_j[:, None, :], axis=0)
        d_obs = -(o_du - mean_obs[:, None] * jnp.mean(flat_j, axis=0)[None, :]) / kT
        w = jax.grad(loss)(mean_obs)
        return loss(mean_obs), (w @ d_obs) * n / (n - 1)

    def observables_only(samples):
        return jax.lax.map(observable, samples, batch_size=batch_size)

    return {
        "energy_grad": energy_grad,
        "estimator": run_estimator,
        "observables": observables_only,
        "jacobian": lambda p, x: jacobian(p, x, contract=False),
        "jacobian_contracted": lambda p, x: jacobian(p, x, contract=True),
    }


def compile_all(fns, arg_sets, max_run_bytes):
    """Compile every function (timed) and read XLA's memory analysis."""
    compiled, results = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*arg_sets[name]).compile()
        memory = peak_memory_bytes(compiled[name])
        results[name] = {
            "compile_s": time.perf_counter() - t0,
            "peak_memory_bytes": memory,
            "run": memory <= max_run_bytes,
            "times_s": [],
        }
        print(f"{name:20s} compiled, peak memory {memory / 2**20:10.1f} MiB", flush=True)
    return compiled, results


def time_interleaved(compiled, arg_sets, results, repeats):
    """Run the functions round-robin `repeats` times (drifting machine load then hits all
    of them alike) and keep the minimum time of each."""
    outputs = {name: None for name in compiled}
    for _ in range(repeats):
        for name, c in compiled.items():
            if not results[name]["run"]:
                continue
            t = time.perf_counter()
            outputs[name] = jax.block_until_ready(c(*arg_sets[name]))
            results[name]["times_s"].append(time.perf_counter() - t)
    for r in results.values():
        r["time_s"] = min(r["times_s"]) if r["times_s"] else None
    return outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/estimator_cost")
    parser.add_argument("--model", default="schnet", help="schnet | pair_mlp | nequip | ...")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer samples (minutes on 2 CPUs)")
    parser.add_argument(
        "--max-run-memory-gb",
        type=float,
        default=8.0,
        help="compile (and report memory of) but do not run functions needing more",
    )
    args = parser.parse_args(argv)
    n_samples = args.samples or (512 if args.quick else 2560)
    batch_size = args.batch_size or (128 if args.quick else 256)
    os.makedirs(args.out, exist_ok=True)

    species, positions = aspirin()
    potential = build_model(args.model, species)
    rng = np.random.default_rng(0)
    samples = jnp.asarray(
        positions[None] + 0.05 * rng.normal(size=(n_samples,) + positions.shape), jnp.float32
    )
    params = potential.init(jax.random.PRNGKey(0), species, jnp.asarray(positions, jnp.float32))
    kT = units.kT_from_kelvin(500.0)
    h_ref = distance_histogram(jnp.asarray(positions, jnp.float32), r_max=10.0, dr=0.02, sigma=0.01)
    fns = make_functions(potential, species, h_ref, kT=kT, batch_size=batch_size)

    arg_sets = {name: (params, samples) for name in fns}
    arg_sets["observables"] = (samples,)
    compiled, results = compile_all(fns, arg_sets, args.max_run_memory_gb * 2**30)
    outputs = time_interleaved(compiled, arg_sets, results, args.repeats)
    for name, r in results.items():
        print(f"{name:20s} time {r['time_s']} s", flush=True)

    # The two estimators agree (float32): a sanity check on the comparison itself.
    agreement = None
    if outputs["estimator"] is not None and outputs["jacobian_contracted"] is not None:
        g_est = jnp.concatenate([x.ravel() for x in jax.tree.leaves(outputs["estimator"][1])])
        g_jac = outputs["jacobian_contracted"][1]
        agreement = float(jnp.linalg.norm(g_est - g_jac) / jnp.linalg.norm(g_jac))

    def ratio(a, b, key):
        x, y = results[a][key], results[b][key]
        return None if x is None or y is None else x / y

    out = {
        "model": args.model,
        "n_params": count_params(params),
        "n_samples": n_samples,
        "n_atoms": len(species),
        "n_bins": int(h_ref.shape[0]),
        "batch_size": batch_size,
        "device": jax.devices()[0].device_kind,
        "results": results,
        "time_ratio": ratio("estimator", "energy_grad", "time_s"),
        "memory_ratio": ratio("estimator", "energy_grad", "peak_memory_bytes"),
        "per_sample_jacobian_time_ratio": ratio("jacobian", "estimator", "time_s"),
        "per_sample_jacobian_memory_ratio": ratio("jacobian", "estimator", "peak_memory_bytes"),
        "contracted_jacobian_time_ratio": ratio("jacobian_contracted", "estimator", "time_s"),
        "contracted_jacobian_memory_ratio": ratio(
            "jacobian_contracted", "estimator", "peak_memory_bytes"
        ),
        "observables_time_fraction": ratio("observables", "estimator", "time_s"),
        "estimator_vs_jacobian_relative_difference": agreement,
    }
    with open(os.path.join(args.out, "estimator_cost.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=1))
    return out


if __name__ == "__main__":
    main()
