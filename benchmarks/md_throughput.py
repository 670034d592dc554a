"""Replica-batched MD throughput: atom-steps/s vs replicas, integrator overhead, vs ASE.

For two systems (a periodic Lennard-Jones argon fluid and a free benzene
molecule held by a Morse pair network) and R = 1, 8, 32, 128 replicas:

* ``atom_steps_per_s``: R * n * steps / wall time of ``Simulator.run``
  (Langevin, one jitted chunk, one frame recorded);
* ``integrator_overhead``: MD time per step divided by the time per step of a
  bare batched energy+force evaluation of the same batch (``lax.fori_loop``
  under one jit, so no dispatch cost on either side); goal <= 1.2;
* ``speedup_vs_ase``: the same R replicas run one at a time with ASE's own
  ``ase.md.langevin.Langevin`` and an ASE calculator wrapping the same jitted
  JAX energy/forces (periodic: the calculator rebuilds its neighbour list
  each call, as an ASE calculator must), measured in the same process.

Timings use ``block_until_ready`` (``run`` returns host arrays), the minimum
of repeats, and report compile time separately.

``free_space_edges``: the MD step time of the Ac-Ala3-NHMe NequIP (the
tetrapeptide ``quick`` model config, an RDKit conformer, Nose-Hoover at
500 K as in that config) with dense all-pairs edges vs free-space cutoff lists
(``Simulator(free_space_edges="cutoff")``, list radius cutoff + ``md.skin``),
8 replicas x 100 steps after a warm-up; ``ratio`` = cutoff / all-pairs step
time (goal <= 0.6); `--free-space-replicas/--free-space-steps` change the 8 x 100.

Usage:
  python -m benchmarks.md_throughput [--out DIR] [--quick] [--only-free-space-edges]
      [--replicas 1,8,32,128] [--free-space-replicas 8] [--free-space-steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from stablejax import md, units
from stablejax.md import neighbors as md_neighbors
from stablejax.potentials import pair
from stablejax.potentials.base import all_pairs_edges, edge_vectors

REPLICAS = (1, 8, 32, 128)


def lj_energy_fn(cutoff, sigma=3.405, eps=0.0103):
    """The library's Lennard-Jones (`stablejax.potentials.pair`, argon, shifted at the
    cutoff) as an MD energy_fn; `params` is a scalar scale."""
    config = pair.default_config("lennard_jones")
    config.sigma, config.epsilon, config.cutoff = sigma, eps, cutoff
    potential = pair.build(config)
    lj_params = {"sigma": sigma, "epsilon": eps}

    def energy_fn(params, positions, edges, box):
        return params * potential.energy(lj_params, None, positions, edges, box)

    return energy_fn


def morse_network_energy_fn(reference):
    """Morse pair network holding a molecule near its reference geometry [n, 3] Å."""
    ref = np.linalg.norm(reference[:, None] - reference[None], axis=-1)
    depth = np.where(ref < 1.6, 4.0, np.where(ref < 2.6, 1.0, 0.05))  # eV
    np.fill_diagonal(depth, 0.0)
    r0 = jnp.asarray(ref)
    D = jnp.asarray(depth)

    def energy_fn(params, positions, edges, box):
        d, mask = edge_vectors(positions, edges, box)
        r = jnp.sqrt(jnp.sum(d * d, axis=-1))
        i = jnp.where(mask, edges[0], 0)
        j = jnp.where(mask, edges[1], 0)
        x = 1.0 - jnp.exp(-2.0 * (r - r0[i, j]))
        return params * 0.5 * jnp.sum(jnp.where(mask, D[i, j] * x * x, 0.0))

    return energy_fn


def lj_system():
    n_side = 5
    density = 0.021  # atoms / Å^3, liquid argon
    n = n_side**3
    side = (n / density) ** (1 / 3)
    g = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = (g + 0.5) * side / n_side
    cutoff = 7.5
    return {
        "name": "lj_fluid",
        "energy_fn": lj_energy_fn(cutoff),
        "species": np.full(n, 18),
        "positions": x,
        "box": np.full(3, side),
        "cutoff": cutoff,
        "temperature_K": 120.0,
        "dt_fs": 4.0,
    }


def molecule_system():
    from ase.build import molecule

    atoms = molecule("C6H6")
    x = atoms.positions - atoms.positions.mean(0)
    return {
        "name": "benzene_morse",
        "energy_fn": morse_network_energy_fn(x),
        "species": atoms.numbers,
        "positions": x,
        "box": None,
        "cutoff": None,
        "temperature_K": 500.0,
        "dt_fs": 0.5,
    }


def _timed(fn, repeats):
    """(first call time, min of the following repeats) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return first, best


def bench_md(system, R, n_steps, repeats):
    sim = md.Simulator(
        system["energy_fn"],
        species=system["species"],
        box=system["box"],
        cutoff=system["cutoff"],
        skin=1.0,
        integrator=md.Langevin(dt_fs=system["dt_fs"], friction_per_ps=1.0),
        chunk_steps=n_steps,
    )
    rng = np.random.default_rng(0)
    pos = system["positions"][None] + 0.02 * rng.normal(size=(R,) + system["positions"].shape)
    kT = units.kT_from_kelvin(system["temperature_K"])
    params = jnp.asarray(1.0)
    holder = {"state": sim.init(jax.random.PRNGKey(0), params, pos, kT)}

    def md_run():
        holder["state"], _ = sim.run(params, holder["state"], n_steps, record_every=n_steps)

    first, best = _timed(md_run, repeats)  # the first call compiles (and equilibrates)
    md_step = best / n_steps
    n = len(system["species"])

    # Bare batched energy+force evaluation of the same batch, same loop length.
    edges = sim._edges(holder["state"])
    box = holder["state"].box
    forces = jax.vmap(
        sim._energy_force,
        in_axes=(None, 0, sim._edges_in_axes(), None if box is None else 0),
    )

    @jax.jit
    def bare(position):
        def body(_, r):
            _, f, _ = forces(params, r, edges, box)
            return r + 1e-30 * f  # carried, so the loop body cannot be hoisted

        return jax.lax.fori_loop(0, n_steps, body, position)

    position = holder["state"].position
    _, f_best = _timed(lambda: bare(position).block_until_ready(), repeats)
    force_step = f_best / n_steps
    return {
        "replicas": R,
        "atom_steps_per_s": R * n * n_steps / best,
        "md_step_s": md_step,
        "force_eval_s": force_step,
        "integrator_overhead": md_step / force_step,
        "compile_s": max(first - best, 0.0),
        "traces": sim.num_traces,
    }, sim


def bench_ase(system, n_steps):
    """Seconds per step of ASE's Langevin on one replica with the same JAX forces."""
    import ase
    from ase.calculators.calculator import Calculator, all_changes
    from ase.md.langevin import Langevin

    energy_fn = system["energy_fn"]
    params = jnp.asarray(1.0)
    n = len(system["species"])
    if system["box"] is None:
        edges = jnp.asarray(all_pairs_edges(n))

        @jax.jit
        def energy_forces(r):
            e, g = jax.value_and_grad(lambda x: energy_fn(params, x, edges, None))(r)
            return e, -g
    else:
        box = jnp.asarray(system["box"])
        layout, cap = md_neighbors.make_layout(
            system["cutoff"], 0.0, system["positions"][None], system["box"][None]
        )
        cap = int(1.5 * cap)

        @jax.jit
        def energy_forces(r):
            nb = md_neighbors.build(layout, r, box, cap)
            e, g = jax.value_and_grad(lambda x: energy_fn(params, x, nb.edges, box))(r)
            return e, -g

    class JaxCalculator(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            e, f = energy_forces(jnp.asarray(self.atoms.positions))
            self.results = {"energy": float(e), "forces": np.asarray(f)}

    atoms = ase.Atoms(numbers=system["species"], positions=system["positions"])
    if system["box"] is not None:
        atoms.set_cell(np.diag(system["box"]))
        atoms.set_pbc(True)
    atoms.calc = JaxCalculator()
    dyn = Langevin(
        atoms,
        timestep=system["dt_fs"] * units.fs,
        temperature_K=system["temperature_K"],
        friction=1.0 / units.ps,
    )
    dyn.run(5)  # compile
    t0 = time.perf_counter()
    dyn.run(n_steps)
    return (time.perf_counter() - t0) / n_steps


def tetrapeptide_geometry(seed: int = 0):
    """(species [42], positions [42, 3] Å) of Ac-Ala3-NHMe: an RDKit conformer if RDKit
    is installed, else a chain-like random geometry of the same size and composition."""
    try:
        from stablejax.data.generate.xtb import MOLECULES, rdkit_geometry

        return rdkit_geometry(MOLECULES["tetrapeptide"], seed=seed)
    except ImportError:
        rng = np.random.default_rng(seed)
        heavy = np.cumsum(rng.normal(size=(21, 3)) * 0.5 + [1.2, 0.4, 0.0], axis=0)
        hydrogens = heavy + 1.05 * rng.normal(size=(21, 3)) / np.sqrt(3)
        species = np.array([6] * 12 + [7] * 4 + [8] * 5 + [1] * 21)
        return species, np.concatenate([heavy, hydrogens])


def bench_free_space_edges(
    n_replicas: int = 8, n_steps: int = 100, repeats: int = 2, extra_skins=(0.5,)
):
    """Step time of the tetrapeptide NequIP, all-pairs vs cutoff edges (same start).

    Rows: ``all_pairs``, ``cutoff`` (the config's ``md.skin``) and ``cutoff_skin_<s>``
    for each of ``extra_skins`` (Å); each with the MD step time and the time of a bare
    batched energy+force evaluation with the same edges (``force_eval_s``).
    """
    import ml_collections

    from experiments.configs import tetrapeptide
    from stablejax.potentials import factory

    config = tetrapeptide.get_config("quick")
    potential = factory.build(config.model)
    species, x = tetrapeptide_geometry()
    n = len(species)
    params = potential.init(jax.random.key(0), species, x, None)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    rng = np.random.default_rng(0)
    pos = (x[None] + 0.02 * rng.normal(size=(n_replicas, n, 3))).astype(np.float32)
    kT = units.kT_from_kelvin(config.md.temperature_K)
    md_config = ml_collections.ConfigDict(config.md.to_dict())
    out = {
        "system": "Ac-Ala3-NHMe NequIP (tetrapeptide quick model)",
        "n_atoms": n,
        "replicas": n_replicas,
        "n_steps": n_steps,
        "cutoff_A": potential.cutoff,
        "skin_A": md_config.skin,
        "pairs_all": n * (n - 1),
        "pairs_within_cutoff": int(
            np.sum(np.linalg.norm(x[:, None] - x[None], axis=-1) < potential.cutoff) - n
        ),
    }
    modes = {"all_pairs": ("all_pairs", md_config.skin), "cutoff": ("cutoff", md_config.skin)}
    modes.update({f"cutoff_skin_{s:g}": ("cutoff", float(s)) for s in extra_skins})
    sims, holders = {}, {}
    for name, (mode, skin) in modes.items():
        md_config.free_space_edges = mode
        md_config.skin = skin
        sims[name] = md.make_simulator(potential, species, None, md_config, chunk_steps=n_steps)
        holders[name] = {"state": sims[name].init(jax.random.PRNGKey(0), params, pos, kT)}

    def md_run(name):
        h = holders[name]
        t0 = time.perf_counter()
        h["state"], h["traj"] = sims[name].run(params, h["state"], n_steps, record_every=n_steps)
        return time.perf_counter() - t0

    def force_fn(name):
        sim, state = sims[name], holders[name]["state"]
        forces = jax.vmap(sim._energy_force, in_axes=(None, 0, sim._edges_in_axes(), None))
        edges = sim._edges(state)

        @jax.jit
        def bare(position):
            def body(_, r):
                _, f, _ = forces(params, r, edges, None)
                return r + 1e-30 * f  # carried, so the loop body cannot be hoisted

            return jax.lax.fori_loop(0, 10, body, position)

        bare(state.position).block_until_ready()  # compile
        return lambda: bare(state.position).block_until_ready()

    first = {name: md_run(name) for name in sims}  # compiles and warms up
    bare = {name: force_fn(name) for name in sims}
    best = {name: np.inf for name in sims}
    best_force = {name: np.inf for name in sims}
    for _ in range(repeats):  # interleaved, so that load changes hit every row alike
        for name in sims:
            best[name] = min(best[name], md_run(name))
            t0 = time.perf_counter()
            bare[name]()
            best_force[name] = min(best_force[name], (time.perf_counter() - t0) / 10)
    for name, sim in sims.items():
        state = holders[name]["state"]
        out[name] = {
            "skin_A": modes[name][1],
            "md_step_s": best[name] / n_steps,
            "force_eval_s": best_force[name],
            "compile_s": max(first[name] - best[name], 0.0),
            "edge_slots": n * (n - 1)
            if state.neighbors is None
            else int(state.neighbors.edges.shape[-1]),
            "reallocations": sim.num_reallocations,
            "unstable_replicas": int(np.sum(np.asarray(state.unstable))),
        }
    ref = out["all_pairs"]
    for name in sims:
        if name != "all_pairs":
            out[name]["ratio"] = out[name]["md_step_s"] / ref["md_step_s"]
            out[name]["force_eval_ratio"] = out[name]["force_eval_s"] / ref["force_eval_s"]
            # Same start, same noise: equal up to float32 summation order (chaos grows it).
            diff = holders[name]["traj"].position - holders["all_pairs"]["traj"].position
            out[name]["max_position_difference_A"] = float(np.max(np.abs(diff)))
    out["ratio"] = out["cutoff"]["ratio"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for md_throughput.json")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument(
        "--replicas",
        default=",".join(map(str, REPLICAS)),
        help="comma list of replica counts (the last one gives the overhead and ASE ratios)",
    )
    parser.add_argument(
        "--free-space-replicas", type=int, default=8, help="replicas of the free-space comparison"
    )
    parser.add_argument(
        "--free-space-steps", type=int, default=100, help="steps per timed free-space run"
    )
    parser.add_argument(
        "--only-free-space-edges",
        action="store_true",
        help="run only the free-space all-pairs vs cutoff-list comparison",
    )
    args = parser.parse_args(argv)
    replicas = tuple(int(r) for r in args.replicas.split(",") if r.strip())
    jax.config.update("jax_enable_x64", False)
    n_steps = 100 if args.quick else 500
    repeats = 2 if args.quick else 3
    ase_steps = 50 if args.quick else 200

    results = {"device": str(jax.devices()[0]), "n_steps": n_steps, "systems": {}}
    fse = bench_free_space_edges(
        n_replicas=args.free_space_replicas, n_steps=args.free_space_steps, repeats=repeats
    )
    results["free_space_edges"] = fse
    print(f"free-space edges ({fse['system']}, {fse['replicas']} replicas):")
    for name, row in fse.items():
        if isinstance(row, dict):
            print(
                f"  {name:18s} skin {row['skin_A']:.2f} A  {row['edge_slots']:5d} edge slots  "
                f"MD {1e3 * row['md_step_s']:7.2f} ms/step  force {1e3 * row['force_eval_s']:7.2f}"
                f" ms  ratio {row.get('ratio', 1.0):.2f} (force {row.get('force_eval_ratio', 1.0):.2f})"
            )
    systems = () if args.only_free_space_edges else (lj_system(), molecule_system())
    for system in systems:
        n = len(system["species"])
        per_r = {}
        for R in replicas:
            row, _ = bench_md(system, R, n_steps, repeats)
            per_r[str(R)] = row
        ase_step = bench_ase(system, ase_steps)
        ase_atom_steps = n / ase_step
        top = per_r[str(replicas[-1])]
        results["systems"][system["name"]] = {
            "n_atoms": n,
            "periodic": system["box"] is not None,
            "replicas": per_r,
            "ase_atom_steps_per_s": ase_atom_steps,
            "ase_step_s": ase_step,
            "integrator_overhead": top["integrator_overhead"],
            "speedup_vs_ase": top["atom_steps_per_s"] / ase_atom_steps,
        }

    print(f"device: {results['device']}  (float32, {n_steps} steps per timed run)")
    print(f"{'system':15s} {'R':>4s} {'atom-steps/s':>14s} {'overhead':>9s} {'compile s':>10s}")
    for name, res in results["systems"].items():
        for R, row in res["replicas"].items():
            print(
                f"{name:15s} {R:>4s} {row['atom_steps_per_s']:14.4g} "
                f"{row['integrator_overhead']:9.2f} {row['compile_s']:10.1f}"
            )
        print(
            f"{name:15s} ASE Langevin one replica: {res['ase_atom_steps_per_s']:.4g} atom-steps/s;"
            f" speedup at R={replicas[-1]}: {res['speedup_vs_ase']:.1f}x"
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "md_throughput.json")
        with open(path, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
