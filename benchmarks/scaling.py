"""Scaling over devices: MD throughput and Boltzmann-estimator time vs device count.

For k = 1, 2, 4, 8 devices (those available), with the replicas split over k
devices by `stablejax.sharding` (k = 1: no mesh, the single-device code path):

* ``md_atom_steps_per_s``: R * n * steps / wall time of ``Simulator.run`` for a
  periodic Lennard-Jones argon fluid (Langevin, neighbour lists, one frame
  recorded per chunk), R fixed (strong scaling);
* ``estimator_s``: one jitted ``boltzmann_grad`` value-and-grad over S samples
  of that fluid (a learning step's observable part), samples split over k.

Timings use ``block_until_ready`` (``Simulator.run`` returns host arrays), the
minimum of repeats, and report compile (first call) time separately. Forced host
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on a CPU) check
that the code runs, not speed: they share the same cores.

Usage:
  python -m benchmarks.scaling [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.md_throughput import lj_energy_fn
from stablejax import md, sharding, units
from stablejax.estimator import boltzmann_grad

DEVICE_COUNTS = (1, 2, 4, 8)
SIGMA = 3.405  # Å, argon


def _fluid(n_side, density=0.8):
    """Simple-cubic start of an LJ fluid at reduced density: ([n, 3] Å, box [3] Å)."""
    n = n_side**3
    side = (n / density) ** (1 / 3) * SIGMA
    g = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return (g + 0.5) * side / n_side, np.full(3, side)


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(k, *, n_side, n_replicas, steps, n_samples, repeats) -> dict:
    mesh = sharding.mesh_or_none(k)
    x0, box = _fluid(n_side)
    n = len(x0)
    cutoff = min(2.5 * SIGMA, 0.49 * box[0])
    energy_fn = lj_energy_fn(cutoff)
    sim = md.Simulator(
        energy_fn,
        species=np.full(n, 18),
        box=box,
        cutoff=cutoff,
        skin=1.0,
        integrator=md.Langevin(dt_fs=4.0, friction_per_ps=1.0),
        chunk_steps=steps,
        mesh=mesh,
    )
    rng = np.random.default_rng(0)
    pos = x0[None] + 0.05 * rng.normal(size=(n_replicas, n, 3))
    params = jnp.asarray(1.0)
    state = sim.init(jax.random.PRNGKey(0), params, pos, units.kT_from_kelvin(100.0))
    t0 = time.perf_counter()
    state, _ = sim.run(params, state, steps, record_every=steps)
    first = time.perf_counter() - t0
    holder = {"state": state}

    def run_md():
        holder["state"], traj = sim.run(params, holder["state"], steps, record_every=steps)
        return traj.position

    md_s = _time(run_md, repeats)

    # Estimator over samples of the fluid (edges from the Simulator's lists).
    samples = {
        "positions": jnp.asarray(np.resize(pos, (n_samples, n, 3))),
        "edges": jnp.asarray(
            np.resize(
                sharding.to_host(state.neighbors.edges),
                (n_samples,) + state.neighbors.edges.shape[1:],
            )
        ),
    }
    samples = sharding.shard_replicas(samples, mesh)

    def observable(s):
        return jnp.mean(jnp.sum(s["positions"] ** 2, axis=-1))

    vg = jax.jit(
        boltzmann_grad(
            lambda p, s: energy_fn(p, s["positions"], s["edges"], jnp.asarray(box)),
            observable,
            lambda o: (o - 1.0) ** 2,
            kT=units.kT_from_kelvin(100.0),
        )
    )
    p = sharding.replicate(params, mesh)
    t0 = time.perf_counter()
    jax.block_until_ready(vg(p, samples))
    est_first = time.perf_counter() - t0
    est_s = _time(lambda: vg(p, samples), repeats)
    return {
        "devices": k,
        "n_atoms": n,
        "n_replicas": n_replicas,
        "steps": steps,
        "md_s": md_s,
        "md_atom_steps_per_s": n_replicas * n * steps / md_s,
        "md_compile_and_first_s": first,
        "n_samples": n_samples,
        "estimator_s": est_s,
        "estimator_compile_and_first_s": est_first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    args = parser.parse_args()
    size = (
        dict(n_side=3, n_replicas=8, steps=20, n_samples=16, repeats=2)
        if args.quick
        else dict(n_side=6, n_replicas=128, steps=200, n_samples=512, repeats=3)
    )
    available = len(jax.devices())
    rows = []
    for k in DEVICE_COUNTS:
        if k > available:
            break
        row = measure(k, **size)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows:
        row["md_speedup"] = base["md_s"] / row["md_s"]
        row["estimator_speedup"] = base["estimator_s"] / row["estimator_s"]
    result = {
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "available_devices": available,
        "forced_host_devices": "xla_force_host_platform_device_count"
        in os.environ.get("XLA_FLAGS", ""),
        "sizes": size,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "scaling.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
