"""Energy+forces throughput of the message-passing potentials.

Cases (float32, randomly initialised models at their default/paper sizes):
  aspirin_b{1,32,128}: 21-atom aspirin, dense all-pairs edges, batches of 1,
    32 and 128 frames (independently perturbed copies; `--batches`), in two
    batching layouts of the same energy+forces call (below).
  water_192: 64 water molecules (192 atoms) in a periodic 12.44287777 Å box;
    each evaluation includes the jax-md Sparse neighbour-list update, as one
    MD step would.

Batching layouts (aspirin):
  vmap: `jax.vmap` of the one-frame call over frames (per-frame gathers and
    scatters); the case's top-level figures are this layout's.
  disjoint: the frames as one disjoint graph (jraph/PyG style, `disjoint_graph`):
    B frames of n atoms become one graph of B n atoms whose edges are all
    frames' edges with the atom indices of frame b offset by b n (padded edges
    go to the padding index B n), one module call, per-frame energies by summing
    the per-atom energies reshaped [B, n]. GemNet-T's slot count
    K = min(max_neighbors, atoms - 1) is capped at the frame's n - 1 (exact with
    [2, e] edges: no atom of a frame has more neighbours), else the flat graph
    would pay for 50 slots where a frame has 20. Before timing, its energies and
    forces are checked against the vmap layout (float32 tolerance).

For each (model, case, layout): compile time (lower + compile of the jitted
function) measured separately; evaluations (frames) per second as the best of
`--repeats` timed loops, each `block_until_ready`-ed; `flops_per_call` from
XLA's cost analysis of the compiled call (None where the backend gives none)
and `achieved_gflops` = flops_per_call x calls/s / 1e9.
  passes: the library's own layout (`stablejax.batching`, used by the MD engine
    and the QM trainer): one vmap on an accelerator; on a CPU `lax.map` over
    passes of `frames_per_pass` frames (about `CPU_EDGES_PER_PASS` edges each),
    checked against vmap like the disjoint one; `passes_speedup` = its
    evaluations/s / vmap's, `batching_efficiency_passes` its b_large / b1.

Per model: `batching_efficiency` = frame evaluations/s at the largest aspirin
batch (128 by default; `batching_efficiency_batch`) / at batch 1, for the vmap
layout and (`batching_efficiency_disjoint`) the disjoint one; per aspirin case
`disjoint_speedup` = disjoint evaluations/s / vmap evaluations/s.

  python -m benchmarks.potential_throughput [--out DIR] [--models schnet,nequip,gemnet_t]
      [--batches 1,32,128] [--repeats 3] [--min-time 0.5] [--no-disjoint] [--tiny]

Writes DIR/potential_throughput.json and prints a table. Models whose module
does not exist yet are skipped. `--tiny` uses reduced model widths (tests).
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

from stablejax import batching
from stablejax.potentials import factory, testing
from stablejax.potentials.base import all_pairs_edges
from stablejax.potentials.common import count_params

ASPIRIN_BATCHES = (1, 32, 128)
SPECIES = [1, 6, 8]
#: Relative float32 tolerance of the disjoint layout against vmap (error / largest |value|).
DISJOINT_RTOL = 1e-4

#: Reduced widths for `--tiny` (tests): seconds, not minutes, to compile.
TINY = {
    "schnet": dict(hidden_features=8, n_filters=8, n_interactions=2, n_gaussians=8, head_features=8),
    "nequip": dict(num_layers=2, num_features=4, num_basis=4, radial_neurons=8, output_hidden=4),
    "gemnet_t": dict(
        num_blocks=1, num_atom=1, num_radial=4, num_spherical=4, emb_size_atom=16,
        emb_size_edge=16, emb_size_trip=8, emb_size_rbf=4, emb_size_cbf=4, emb_size_bil_trip=8,
    ),
}  # fmt: skip


def model_config(name: str, *, tiny: bool = False):
    """The benchmark's config of a model: its default (paper) size, or `TINY`."""
    config = factory.default_config(name)
    config.species = SPECIES
    if tiny:
        for key, value in TINY.get(name, {}).items():
            config[key] = value
    return config


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


def flops(compiled) -> float | None:
    """XLA's flop count of a compiled call (None when the backend reports none).

    `Compiled.cost_analysis()` returns a dict, or (older jax) a list of dicts,
    one per HLO module; the flops of the list's entries are summed.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if analysis is None:
        return None
    entries = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    values = [float(a["flops"]) for a in entries if a and "flops" in a]
    if not values or sum(values) <= 0:
        return None
    return sum(values)


def _timing(
    compiled, args, batch: int, t_compile: float, *, repeats, min_time, flops_per_call=None
) -> dict:
    t = _time(compiled, args, repeats=repeats, min_time=min_time)
    f = flops(compiled) if flops_per_call is None else flops_per_call
    return {
        "compile_s": t_compile,
        "ms_per_call": 1e3 * t,
        "evaluations_per_s": batch / t,
        "flops_per_call": f,
        "achieved_gflops": None if f is None else f / t / 1e9,
    }


def _energy_forces(potential):
    def fn(params, species, positions, edges, box):
        e, g = jax.value_and_grad(potential.energy, argnums=2)(
            params, species, positions, edges, box
        )
        return e, -g

    return fn


# --------------------------------------------------------------------------------------
# Disjoint-graph batching.
# --------------------------------------------------------------------------------------


def disjoint_graph(edges, batch: int, n_atoms: int) -> jax.Array:
    """One edge list for `batch` frames of `n_atoms` atoms as a disjoint graph.

    Args:
      edges: [2 | 5, e] int edges shared by all frames, or [batch, 2 | 5, e] per
        frame; padding n_atoms (an edge with either index >= n_atoms is padding).
      batch: B frames.
      n_atoms: n atoms per frame.

    Returns:
      [2 | 5, B e] int32: frame b's atom indices offset by b n (atom b n + i of the
      flat graph is atom i of frame b), padded edges at the flat padding index B n
      (both rows), lattice-shift rows (if any) unchanged.
    """
    edges = jnp.asarray(edges, jnp.int32)
    if edges.ndim == 2:
        edges = jnp.broadcast_to(edges, (batch, *edges.shape))
    rows, e = edges.shape[1], edges.shape[2]
    ij = edges[:, :2]
    pad = jnp.any(ij >= n_atoms, axis=1, keepdims=True)
    offset = (jnp.arange(batch, dtype=jnp.int32) * n_atoms)[:, None, None]
    flat = jnp.where(pad, batch * n_atoms, ij + offset)
    flat = jnp.concatenate([flat, edges[:, 2:]], axis=1)  # [B, rows, e]
    return jnp.moveaxis(flat, 0, 1).reshape(rows, batch * e)


def disjoint_energy_forces(potential, params, species, positions, edges, box=None):
    """Energies [B] eV and forces [B, n, 3] eV/Å of B frames in one disjoint-graph call.

    Args:
      potential: a `Potential` (batchless); it is called once on the flat graph of
        B n atoms. For GemNet-T pass one built by `layout_potential`.
      params: its params.
      species: [n] atomic numbers shared by all frames, or [B, n].
      positions: [B, n, 3] Å.
      edges: [2 | 5, e] shared or [B, 2 | 5, e] per-frame edges, padding n.
      box: None (free space) or one box shared by all frames.
    """
    batch, n = positions.shape[0], positions.shape[1]
    flat_edges = disjoint_graph(edges, batch, n)
    if isinstance(species, np.ndarray):  # concrete: keeps the potential's species check
        flat_species = np.broadcast_to(species, (batch, n)).reshape(batch * n)
    else:
        flat_species = jnp.broadcast_to(species, (batch, n)).reshape(batch * n)

    def total(x):
        per_atom = potential.per_atom_energies(
            params, flat_species, x.reshape(batch * n, 3), flat_edges, box
        )
        energies = per_atom.reshape(batch, n).sum(axis=1)
        return energies.sum(), energies

    (_, energies), grad = jax.value_and_grad(total, has_aux=True)(positions)
    return energies, -grad


def layout_potential(config, n_atoms: int):
    """The potential that evaluates the disjoint graph of frames of `n_atoms` atoms.

    Same params as `factory.build(config)`. For models with neighbour slots
    (GemNet-T, K = min(max_neighbors, atoms - 1)) `max_neighbors` is capped at
    n_atoms - 1, the per-frame K: exact with [2, e] edges (an atom of a frame has
    at most n - 1 neighbours) and no slot padding beyond what one frame has.
    """
    if "max_neighbors" in config and config.max_neighbors > n_atoms - 1:
        config = config.copy_and_resolve_references()
        config.max_neighbors = max(1, n_atoms - 1)
    return factory.build(config)


def _max_rel_err(actual, expected) -> float:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(actual - expected))) / scale


# --------------------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------------------


def benchmark_model(
    name: str,
    *,
    repeats: int,
    min_time: float,
    batches=ASPIRIN_BATCHES,
    disjoint: bool = True,
    tiny: bool = False,
    water: bool = True,
) -> dict:
    config = model_config(name, tiny=tiny)
    potential = factory.build(config)
    ef = _energy_forces(potential)
    species, x = testing.aspirin()
    x = x.astype(np.float32)
    params = jax.jit(potential.init)(jax.random.key(0), species, x, None)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    result = {"n_params": count_params(params["net"]), "cutoff": potential.cutoff, "cases": {}}
    flat_potential = layout_potential(config, int(species.size)) if disjoint else None

    edges = jnp.asarray(all_pairs_edges(species.size))
    species_j = jnp.asarray(species)
    rng = np.random.default_rng(0)
    for batch in batches:
        xs = jnp.asarray(x[None] + 0.02 * rng.normal(size=(batch, *x.shape)), jnp.float32)

        def batched(params, xs):
            return jax.vmap(lambda p: ef(params, species_j, p, edges, None))(xs)

        compiled, t_compile = _compile(batched, (params, xs))
        case = {"n_atoms": int(species.size), "batch": batch, "layout": "vmap"}
        case.update(
            _timing(compiled, (params, xs), batch, t_compile, repeats=repeats, min_time=min_time)
        )
        if disjoint:

            def flat(params, xs):
                return disjoint_energy_forces(flat_potential, params, species, xs, edges, None)

            compiled_flat, t_compile_flat = _compile(flat, (params, xs))
            e_ref, f_ref = compiled(params, xs)
            e_flat, f_flat = compiled_flat(params, xs)
            err_e, err_f = _max_rel_err(e_flat, e_ref), _max_rel_err(f_flat, f_ref)
            if not (err_e <= DISJOINT_RTOL and err_f <= DISJOINT_RTOL):
                raise RuntimeError(
                    f"{name} aspirin_b{batch}: the disjoint layout differs from vmap "
                    f"(relative error energies {err_e:.2e}, forces {err_f:.2e})."
                )
            case["disjoint"] = {
                "rel_err_energy": err_e,
                "rel_err_forces": err_f,
                **_timing(
                    compiled_flat, (params, xs), batch, t_compile_flat,
                    repeats=repeats, min_time=min_time,
                ),
            }  # fmt: skip
            case["disjoint_speedup"] = (
                case["disjoint"]["evaluations_per_s"] / case["evaluations_per_s"]
            )
        # The library's own layout (`stablejax.batching`, what the MD engine and the QM
        # trainer use): one vmap on an accelerator, passes of a few frames on a CPU.
        per_pass = batching.frames_per_pass(batch, edges_per_frame=int(edges.shape[-1]))

        def passes(params, xs):
            return batching.map_frames(
                lambda p: ef(params, species_j, p, edges, None), xs, per_pass=per_pass
            )

        compiled_p, t_compile_p = _compile(passes, (params, xs))
        e_ref, f_ref = compiled(params, xs)
        e_p, f_p = compiled_p(params, xs)
        err_e, err_f = _max_rel_err(e_p, e_ref), _max_rel_err(f_p, f_ref)
        if not (err_e <= DISJOINT_RTOL and err_f <= DISJOINT_RTOL):
            raise RuntimeError(f"{name} aspirin_b{batch}: the passes layout differs from vmap")
        # XLA's cost analysis counts a loop body once, so the passes' flops would be those
        # of one pass; they do the vmapped call's arithmetic, so take its count.
        case["passes"] = {
            "frames_per_pass": per_pass,
            "rel_err_energy": err_e,
            "rel_err_forces": err_f,
            "flops_source": "the vmap layout's (same arithmetic; a loop body counts once)",
            **_timing(
                compiled_p, (params, xs), batch, t_compile_p, repeats=repeats,
                min_time=min_time, flops_per_call=case["flops_per_call"],
            ),
        }  # fmt: skip
        case["passes_speedup"] = case["passes"]["evaluations_per_s"] / case["evaluations_per_s"]
        result["cases"][f"aspirin_b{batch}"] = case
        _progress(name, f"aspirin_b{batch}", case)

    b_small, b_large = min(batches), max(batches)
    if b_small == 1 and b_large > 1:
        small, large = result["cases"]["aspirin_b1"], result["cases"][f"aspirin_b{b_large}"]
        result["batching_efficiency_batch"] = b_large
        result["batching_efficiency"] = large["evaluations_per_s"] / small["evaluations_per_s"]
        result["batching_efficiency_passes"] = (
            large["passes"]["evaluations_per_s"] / small["passes"]["evaluations_per_s"]
        )
        if disjoint:
            result["batching_efficiency_disjoint"] = (
                large["disjoint"]["evaluations_per_s"] / small["disjoint"]["evaluations_per_s"]
            )
    if water:
        result["cases"]["water_192"] = _water_case(
            potential, ef, params, repeats=repeats, min_time=min_time
        )
        _progress(name, "water_192", result["cases"]["water_192"])
    return result


def _progress(name: str, case: str, c: dict) -> None:
    line = f"  {name} {case}: {c['evaluations_per_s']:.1f} evaluations/s"
    if "disjoint" in c:
        line += f", disjoint {c['disjoint']['evaluations_per_s']:.1f}"
    print(line, flush=True)


def _water_case(potential, ef, params, *, repeats: int, min_time: float) -> dict:
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
    case = {
        "n_atoms": int(w_species.size),
        "batch": 1,
        "n_edges_capacity": int(nbrs.idx.shape[1]),
        "n_edges_within_cutoff": int(np.sum(np.asarray(nbrs.idx[0]) < w_species.size)),
    }
    case.update(
        _timing(compiled, (params, w_x, nbrs), 1, t_compile, repeats=repeats, min_time=min_time)
    )
    return case


def available(name: str) -> bool:
    return importlib.util.find_spec(f"stablejax.potentials.{name}") is not None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for potential_throughput.json")
    parser.add_argument("--models", default="schnet,nequip,gemnet_t")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timed loop")
    parser.add_argument(
        "--batches",
        default=",".join(map(str, ASPIRIN_BATCHES)),
        help="comma list of aspirin batch sizes (frames per batched call)",
    )
    parser.add_argument(
        "--no-disjoint", action="store_true", help="time only the vmap layout (no disjoint graph)"
    )
    parser.add_argument("--tiny", action="store_true", help="reduced model widths (tests)")
    parser.add_argument("--no-water", action="store_true", help="skip the water_192 case")
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(",") if b.strip())

    device = jax.devices()[0]
    report = {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "jax": jax.__version__,
        "host": platform.node(),
        "dtype": "float32",
        "tiny": args.tiny,
        "models": {},
        "skipped": [],
    }
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if not available(name):
            report["skipped"].append(name)
            print(f"skipping {name}: stablejax.potentials.{name} does not exist")
            continue
        report["models"][name] = benchmark_model(
            name,
            repeats=args.repeats,
            min_time=args.min_time,
            batches=batches,
            disjoint=not args.no_disjoint,
            tiny=args.tiny,
            water=not args.no_water,
        )

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "potential_throughput.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"device {report['device']}, {report['dtype']}; energy+forces evaluations/s")
    print(
        f"{'model':<10}{'params':>10}  {'case':<13}{'layout':<9}{'eval/s':>11}{'ms/call':>10}"
        f"{'compile s':>10}{'MFLOP/call':>12}{'GFLOP/s':>9}{'speedup':>9}"
    )
    for name, res in report["models"].items():
        for case, c in res["cases"].items():
            rows = [(c.get("layout", "-"), c, None)]
            if "disjoint" in c:
                rows.append(("disjoint", c["disjoint"], c["disjoint_speedup"]))
            if "passes" in c:
                rows.append(("passes", c["passes"], c["passes_speedup"]))
            for layout, r, speedup in rows:
                mflop = None if r["flops_per_call"] is None else r["flops_per_call"] / 1e6
                print(
                    f"{name:<10}{res['n_params']:>10}  {case:<13}{layout:<9}"
                    f"{r['evaluations_per_s']:>11.1f}{r['ms_per_call']:>10.2f}"
                    f"{r['compile_s']:>10.2f}{_fmt(mflop, '.1f'):>12}"
                    f"{_fmt(r['achieved_gflops'], '.2f'):>9}{_fmt(speedup, '.2f'):>9}"
                )
        if "batching_efficiency" in res:
            line = (
                f"{name}: batching efficiency (b{res['batching_efficiency_batch']} / b1) "
                f"vmap {res['batching_efficiency']:.2f}"
            )
            if "batching_efficiency_disjoint" in res:
                line += f", disjoint {res['batching_efficiency_disjoint']:.2f}"
            line += f", passes {res['batching_efficiency_passes']:.2f}"
            print(line)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
