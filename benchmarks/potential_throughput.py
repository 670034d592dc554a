"""Energy+forces throughput of the message-passing potentials.

Cases (float32, randomly initialised models at their default/paper sizes):
  aspirin_b{1,32,128}: 21-atom aspirin, dense all-pairs edges, batches of 1,
    32 and 128 frames via vmap (independently perturbed copies; `--batches`).
  water_192: 64 water molecules (192 atoms) in a periodic 12.44287777 Å box;
    each evaluation includes the jax-md Sparse neighbour-list update, as one
    MD step would.

For each (model, case): compile time (lower + compile of the jitted function)
measured separately, then evaluations (frames) per second as the best of
`--repeats` timed loops, each `block_until_ready`-ed.

  python -m benchmarks.potential_throughput [--out DIR] [--models schnet,nequip,gemnet_t]

Writes DIR/potential_throughput.json and prints a table. Models whose module
does not exist yet are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition, space

from stablejax.potentials import factory, testing
from stablejax.potentials.base import all_pairs_edges
from stablejax.potentials.common import count_params

ASPIRIN_BATCHES = (1, 32, 128)
SPECIES = [1, 6, 8]


def _time(fn, args, *, repeats: int, min_time: float) -> float:
    """Best seconds per call over `repeats` loops of at least `min_time` seconds."""
    jax.block_until_ready(fn(*args))
    n_calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n_calls):
            out = fn(*args)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or n_calls >= 1 << 14:
            break
        n_calls *= 2
    best = elapsed / n_calls
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(n_calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / n_calls)
    return best


def _compile(fn, args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _energy_forces(potential):
    def fn(params, species, positions, edges, box):
        e, g = jax.value_and_grad(potential.energy, argnums=2)(
            params, species, positions, edges, box
        )
        return e, -g

    return fn


def benchmark_model(name: str, *, repeats: int, min_time: float, batches=ASPIRIN_BATCHES) -> dict:
    config = factory.default_config(name)
    config.species = SPECIES
    potential = factory.build(config)
    ef = _energy_forces(potential)
    species, x = testing.aspirin()
    x = x.astype(np.float32)
    params = potential.init(jax.random.key(0), species, x, None)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    result = {"n_params": count_params(params["net"]), "cutoff": potential.cutoff, "cases": {}}

    edges = jnp.asarray(all_pairs_edges(species.size))
    species_j = jnp.asarray(species)
    rng = np.random.default_rng(0)
    for batch in batches:
        xs = jnp.asarray(x[None] + 0.02 * rng.normal(size=(batch, *x.shape)), jnp.float32)

        def batched(params, xs):
            return jax.vmap(lambda p: ef(params, species_j, p, edges, None))(xs)

        compiled, t_compile = _compile(batched, (params, xs))
        t = _time(compiled, (params, xs), repeats=repeats, min_time=min_time)
        result["cases"][f"aspirin_b{batch}"] = {
            "n_atoms": int(species.size),
            "batch": batch,
            "compile_s": t_compile,
            "ms_per_call": 1e3 * t,
            "evaluations_per_s": batch / t,
        }

    w_species, w_x, box = testing.water_box()
    box = jnp.asarray(box, jnp.float32)
    w_x = jnp.asarray(w_x, jnp.float32)
    displacement, _ = space.periodic(box)
    neighbor_fn = partition.neighbor_list(
        displacement,
        box,
        potential.cutoff,
        dr_threshold=0.5,
        capacity_multiplier=1.25,
        format=partition.NeighborListFormat.Sparse,
    )
    nbrs = neighbor_fn.allocate(w_x)
    w_species_j = jnp.asarray(w_species)

    def water_step(params, positions, nbrs):
        nbrs = nbrs.update(positions)
        e, f = ef(params, w_species_j, positions, nbrs.idx, box)
        return e, f, nbrs.did_buffer_overflow

    compiled, t_compile = _compile(water_step, (params, w_x, nbrs))
    if bool(compiled(params, w_x, nbrs)[2]):
        raise RuntimeError("Neighbour list overflowed in the water benchmark.")
    t = _time(compiled, (params, w_x, nbrs), repeats=repeats, min_time=min_time)
    result["cases"]["water_192"] = {
        "n_atoms": int(w_species.size),
        "batch": 1,
        "n_edges_capacity": int(nbrs.idx.shape[1]),
        "n_edges_within_cutoff": int(np.sum(np.asarray(nbrs.idx[0]) < w_species.size)),
        "compile_s": t_compile,
        "ms_per_call": 1e3 * t,
        "evaluations_per_s": 1.0 / t,
    }
    return result


def available(name: str) -> bool:
    return importlib.util.find_spec(f"stablejax.potentials.{name}") is not None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for potential_throughput.json")
    parser.add_argument("--models", default="schnet,nequip,gemnet_t")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timed loop")
    parser.add_argument(
        "--batches",
        default=",".join(map(str, ASPIRIN_BATCHES)),
        help="comma list of aspirin batch sizes (frames per vmapped call)",
    )
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(",") if b.strip())

    device = jax.devices()[0]
    report = {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "jax": jax.__version__,
        "host": platform.node(),
        "dtype": "float32",
        "models": {},
        "skipped": [],
    }
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if not available(name):
            report["skipped"].append(name)
            print(f"skipping {name}: stablejax.potentials.{name} does not exist")
            continue
        report["models"][name] = benchmark_model(
            name, repeats=args.repeats, min_time=args.min_time, batches=batches
        )

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "potential_throughput.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"device {report['device']}, {report['dtype']}; energy+forces evaluations/s")
    header = (
        f"{'model':<10}{'params':>10}  {'case':<13}{'eval/s':>12}{'ms/call':>10}{'compile s':>11}"
    )
    print(header)
    for name, res in report["models"].items():
        for case, c in res["cases"].items():
            print(
                f"{name:<10}{res['n_params']:>10}  {case:<13}{c['evaluations_per_s']:>12.1f}"
                f"{c['ms_per_call']:>10.2f}{c['compile_s']:>11.2f}"
            )
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
