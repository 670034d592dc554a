"""Replica-batched MD throughput: atom-steps/s vs replicas, overhead, vs ASE, vs jax-md.

Systems (``--systems``, comma list; default all):

* ``lj_fluid``: 512 argon atoms (8 x 8 x 8 simple cubic start, 0.021 /Å^3, periodic,
  cutoff 7.5 Å, skin 1 Å: 3 cells per side, so jax-md builds cell lists), the
  library's Lennard-Jones (``stablejax.potentials.pair``);
* ``benzene_morse``: a free benzene molecule held by a Morse pair network (12 atoms);
* ``aspirin_schnet``: MD17 aspirin (21 atoms, free space, all-pairs edges) with the
  paper's SchNet (``factory.default_config("schnet")``, species [1, 6, 8], 0.11M
  parameters), random weights, energy x ``MODEL_ENERGY_SCALE``;
* ``water_quick`` / ``water_paper``: 64 waters (192 atoms, lattice start from
  ``potentials.testing.water_box``, periodic 12.44 Å box, skin 1 Å) with the ``model``
  block of ``experiments/configs/water.py``'s ``quick`` preset (a small SchNet, 2 x 32,
  cutoff 4 Å: the quick preset replaced GemNet-T by it) and of its ``paper`` preset
  (GemNet-T, 1.88M parameters, cutoff 5 Å, 64 neighbour slots), random weights, energy
  x ``MODEL_ENERGY_SCALE``.

Random weights do not hold molecules together; the energy scale keeps their forces
small so that every replica stays finite and the neighbour-list sizes stay near their
start (the cost of a step does not depend on the weights).

For each system and replica count R (per-system lists, ``--replicas`` overrides them):

* ``atom_steps_per_s``: R * n * steps / wall time of ``Simulator.run`` (one jitted chunk,
  one frame recorded), min over repeats, ``block_until_ready`` (``run`` returns host
  arrays); compile time reported apart;
* ``integrator_overhead``: MD time per step / time per step of a bare batched
  energy+force evaluation of the same batch (``lax.fori_loop`` under one jit);
* ``jax_md_atom_steps_per_s`` / ``vs_jax_md`` (Nose-Hoover rows): the same system
  written directly with jax-md (``JaxMDReference``: ``simulate.nvt_nose_hoover`` +
  ``partition.neighbor_list``, Sparse, capacity multiplier 1.25, cutoff + skin as ours,
  vmapped over replicas, ``lax.scan`` under one jit, lists refreshed with ``nbrs.update``
  inside the scan, overflow checked after each run) calling the SAME energy function,
  started from our state; ``vs_jax_md`` = ours / jax-md's (goal >= 1). At R = 1 also
  ``vs_jax_md_unbatched``: jax-md without ``vmap`` (its rebuild ``lax.cond`` stays a
  branch; under ``vmap`` it becomes a select that rebuilds every step).

Integrators: ``lj_fluid`` and ``benzene_morse`` run Langevin rows (BAOAB, 1/ps, as
before; their ``batching_efficiency``, ``integrator_overhead`` and ``speedup_vs_ase``)
and Nose-Hoover chain rows (``md.NoseHooverChain``, chain length 3 = jax-md's default,
``tau_fs`` per system; ``vs_jax_md``); the model systems run Nose-Hoover only (all
metrics). Per system: ``batching_efficiency`` = atom-steps/s at its largest R / at
R = 1 (goal >= 1), ``integrator_overhead`` at its largest R (goal <= 1.2),
``speedup_vs_ase`` at its largest R (the same R replicas one at a time with ASE's own
``Langevin`` / ``NoseHooverChainNVT`` and an ASE calculator wrapping the same jitted JAX
energy/forces; periodic: the calculator rebuilds its neighbour list each call, as an
ASE calculator must), ``vs_jax_md`` at its largest R.

``--quick`` (about 10 min on 2 CPU cores): fewer steps (LJ 50, benzene 100, aspirin and
water 20; free-space comparison 30), 3 repeats, LJ R = 1, 8 (the vmapped jax-md reference
rebuilds its cell lists every step), aspirin R = 1, 32, no ``water_paper`` (paper-size
GemNet-T: seconds per force call on a CPU) unless named in ``--systems``; the JSON lists
what was skipped and why (``skipped``).

``free_space_edges``: the MD step time of the Ac-Ala3-NHMe NequIP (the tetrapeptide
``quick`` model config, an RDKit conformer, Nose-Hoover at 500 K as in that config)
with dense all-pairs edges vs free-space cutoff lists
(``Simulator(free_space_edges="cutoff")``, list radius cutoff + ``md.skin``), 8 replicas
x 100 steps after a warm-up; ``ratio`` = cutoff / all-pairs step time (goal <= 0.6);
``--free-space-replicas/--free-space-steps`` change the 8 x 100. A section of
``--systems`` (name ``free_space_edges``), run by default.

The JSON is rewritten after every system, so an interrupted run keeps what it finished.

Usage:
  python -m benchmarks.md_throughput [--out DIR] [--quick] [--systems a,b,...]
      [--only-free-space-edges] [--replicas 1,8,32,128] [--free-space-replicas 8]
      [--free-space-steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax_md import partition, simulate, space

from stablejax import md, units
from stablejax.md import neighbors as md_neighbors
from stablejax.potentials import pair
from stablejax.potentials.base import all_pairs_edges, edge_vectors

REPLICAS = (1, 8, 32, 128)
SYSTEMS = ("lj_fluid", "benzene_morse", "aspirin_schnet", "water_quick", "water_paper")
SECTIONS = SYSTEMS + ("free_space_edges",)
#: Random-weight models: energy scale that keeps forces small (replicas stay finite).
MODEL_ENERGY_SCALE = 0.01
#: Neighbour-list skin (Å) of every periodic system, ours and jax-md's.
SKIN = 1.0
#: jax-md's default list capacity multiplier, which our layout also takes.
CAPACITY_MULTIPLIER = 1.25
#: jax-md error bits that invalidate a run.
_OVERFLOW_BITS = int(partition.PartitionErrorCode.NEIGHBOR_LIST_OVERFLOW) | int(
    partition.PartitionErrorCode.CELL_LIST_OVERFLOW
)
#: Timed repeats (after a compiling first call) and free-space steps per mode; the steps,
#: replica counts and ASE steps of each system are in its dict.
MODES = {
    "full": {"repeats": 3, "free_space_steps": 100},
    "quick": {"repeats": 3, "free_space_steps": 30},
    "tiny": {"repeats": 1, "free_space_steps": 4},
}


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


def model_energy_fn(potential, species, scale=MODEL_ENERGY_SCALE):
    """A built potential as an MD energy_fn (params: its parameter tree), energy x scale."""
    species = jnp.asarray(species)

    def energy_fn(params, positions, edges, box):
        return scale * potential.energy(params, species, positions, edges, box)

    return energy_fn


def lj_system(n_side: int = 8, cutoff: float = 7.5):
    """Argon fluid: n_side^3 atoms on a simple cubic lattice at 0.021 /Å^3 (512 by default,
    box 29.0 Å: cutoff + skin below a third of the box, so jax-md uses cell lists)."""
    density = 0.021  # atoms / Å^3, liquid argon
    n = n_side**3
    side = (n / density) ** (1 / 3)
    g = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = (g + 0.5) * side / n_side
    return {
        "name": "lj_fluid",
        "description": f"LJ argon fluid, {n} atoms, periodic {side:.2f} Å box, cutoff {cutoff} Å",
        "energy_fn": lj_energy_fn(cutoff),
        "params": 1.0,
        "species": np.full(n, 18),
        "positions": x,
        "box": np.full(3, side),
        "cutoff": cutoff,
        "temperature_K": 120.0,
        "dt_fs": 4.0,
        "tau_fs": 400.0,  # 100 dt (jax-md's default tau)
        "integrators": ("langevin", "nose_hoover"),
        # --quick: jax-md's vmapped lists rebuild every step (~70 s per 100-step run of
        # 32 replicas on 2 CPU cores), so the comparison stops at R = 8 there.
        "replicas": {"full": REPLICAS, "quick": (1, 8), "tiny": (1, 2)},
        "n_steps": {"full": 500, "quick": 50, "tiny": 4},
        "ase_steps": {"full": 200, "quick": 50, "tiny": 3},
    }


def molecule_system():
    from ase.build import molecule

    atoms = molecule("C6H6")
    x = atoms.positions - atoms.positions.mean(0)
    return {
        "name": "benzene_morse",
        "description": "benzene + Morse pair network, 12 atoms, free space (all pairs)",
        "energy_fn": morse_network_energy_fn(x),
        "params": 1.0,
        "species": atoms.numbers,
        "positions": x,
        "box": None,
        "cutoff": None,
        "temperature_K": 500.0,
        "dt_fs": 0.5,
        "tau_fs": 20.0,
        "integrators": ("langevin", "nose_hoover"),
        "replicas": {"full": REPLICAS, "quick": REPLICAS, "tiny": (1, 2)},
        "n_steps": {"full": 500, "quick": 100, "tiny": 4},
        "ase_steps": {"full": 200, "quick": 50, "tiny": 3},
    }


def _tiny_model(config):
    """The same architecture at a toy width (``--tiny``: checks the code path only)."""
    if config.name == "schnet":
        config.hidden_features = config.n_filters = 8
        config.n_interactions, config.n_gaussians, config.head_features = 1, 8, 8
    elif config.name == "gemnet_t":
        for key in ("emb_size_atom", "emb_size_edge"):
            config[key] = 8
        for key in ("emb_size_trip", "emb_size_bil_trip", "emb_size_rbf", "emb_size_cbf"):
            config[key] = 4
        config.num_blocks = 1
    return config


def _init_params(potential, species, x, box):
    box = None if box is None else jnp.asarray(box, jnp.float32)
    params = jax.jit(potential.init)(
        jax.random.PRNGKey(0), jnp.asarray(species), jnp.asarray(x, jnp.float32), box
    )
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _model_info(potential, params, tiny):
    from stablejax.potentials.common import count_params

    c = potential.config
    net = params["net"] if isinstance(params, dict) and "net" in params else params
    info = {"name": c.name, "n_params": int(count_params(net)), "cutoff_A": potential.cutoff}
    info["weights"] = f"random initialisation, energy x {MODEL_ENERGY_SCALE} (timing only)"
    if tiny:
        info["size"] = "toy width (--tiny)"
    return info


def aspirin_system(tiny: bool = False):
    from stablejax.potentials import factory
    from stablejax.potentials.testing import aspirin

    config = factory.default_config("schnet")
    config.species = [1, 6, 8]
    if tiny:
        config = _tiny_model(config)
    potential = factory.build(config)
    species, x = aspirin()
    params = _init_params(potential, species, x, None)
    return {
        "name": "aspirin_schnet",
        "description": "aspirin (MD17 frame), 21 atoms, free space (all pairs), paper SchNet",
        "model": _model_info(potential, params, tiny),
        "energy_fn": model_energy_fn(potential, species),
        "params": params,
        "species": species,
        "positions": x,
        "box": None,
        "cutoff": None,
        "temperature_K": 500.0,
        "dt_fs": 0.5,
        "tau_fs": 10.0,  # experiments/configs/aspirin.py
        "integrators": ("nose_hoover",),
        "replicas": {"full": (1, 32, 128), "quick": (1, 32), "tiny": (1, 2)},
        "n_steps": {"full": 200, "quick": 20, "tiny": 4},
        "ase_steps": {"full": 100, "quick": 20, "tiny": 3},
    }


def water_system(preset: str, tiny: bool = False):
    """64 waters (192 atoms) in the StABlE box with the water config's ``preset`` model."""
    from experiments.configs import water
    from stablejax.potentials import factory, testing

    config = factory.default_config(water.get_config(preset).model.name)
    config.update(water.get_config(preset).model.to_dict())
    if tiny:
        config = _tiny_model(config)
    potential = factory.build(config)
    species, x, box = testing.water_box()
    params = _init_params(potential, species, x, box)
    label = {"quick": "quick preset model: small SchNet", "paper": "paper preset model: GemNet-T"}
    return {
        "name": f"water_{preset}",
        "description": f"64 waters, 192 atoms, periodic {box[0]:.2f} Å box, {label[preset]}",
        "model": _model_info(potential, params, tiny),
        "energy_fn": model_energy_fn(potential, species),
        "params": params,
        "species": species,
        "positions": x,
        "box": box,
        "cutoff": float(potential.cutoff),
        "temperature_K": 300.0,
        "dt_fs": 1.0,
        "tau_fs": 20.0,  # experiments/configs/water.py
        "integrators": ("nose_hoover",),
        "replicas": {"full": (1, 8), "quick": (1, 8), "tiny": (1, 2)},
        "n_steps": {
            "full": 100 if preset == "paper" else 200,
            "quick": 10 if preset == "paper" else 20,
            "tiny": 4,
        },
        "ase_steps": {"full": 20 if preset == "paper" else 100, "quick": 20, "tiny": 3},
    }


def make_system(name: str, tiny: bool = False):
    if name == "lj_fluid":
        return lj_system()
    if name == "benzene_morse":
        return molecule_system()
    if name == "aspirin_schnet":
        return aspirin_system(tiny)
    if name in ("water_quick", "water_paper"):
        return water_system(name.split("_")[1], tiny)
    raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")


def nose_hoover(system) -> md.NoseHooverChain:
    """The Nose-Hoover chain of the vs-jax-md rows (chain length 3, jax-md's defaults
    chain_steps 2 and sy_steps 3)."""
    return md.NoseHooverChain(dt_fs=system["dt_fs"], tau_fs=system["tau_fs"], chain_length=3)


def make_integrator(system, name: str):
    if name == "langevin":
        return md.Langevin(dt_fs=system["dt_fs"], friction_per_ps=1.0)
    if name == "nose_hoover":
        return nose_hoover(system)
    raise ValueError(f"unknown integrator {name!r}")


def _params(system):
    p = system.get("params", 1.0)
    return jnp.asarray(p) if isinstance(p, float) else p


class JaxMDReference:
    """The system written directly with jax-md, R replicas under ``vmap``.

    ``simulate.nvt_nose_hoover`` (same dt, tau (ASE time units), chain length, chain
    and Suzuki-Yoshida steps, kT) on our energy function; periodic systems get
    ``space.periodic`` and a ``partition.neighbor_list`` (Sparse, r_cutoff = cutoff,
    dr_threshold = skin, capacity multiplier 1.25: list radius cutoff + skin and a
    rebuild past a displacement of skin / 2, as ours) whose ``idx`` [2, e] (padding n)
    is passed as the edges; free systems ``space.free()`` and the fixed all-pairs
    edges. One step = ``apply_fn(state, neighbor=nbrs)`` then ``nbrs.update(position)``
    (jax-md's usual loop); ``run`` scans ``n_steps`` of them under one jit, vmapped
    over replicas (``batched``) or on one replica.

    Degrees of freedom: jax-md's ``init_fn`` counts 3n; the chain is re-initialised
    with our 3n - 3 (zero total momentum) so both thermostats follow the same
    equations (same work either way). kT is handed over as an array of the position
    dtype (a Python float would make jax-md round the chain masses to float32).
    """

    def __init__(
        self,
        system,
        integrator: md.NoseHooverChain,
        *,
        skin: float = SKIN,
        capacity_multiplier: float = CAPACITY_MULTIPLIER,
        batched: bool = True,
        dtype=None,
    ):
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        self.dtype = dtype
        self.energy_fn = system["energy_fn"]
        self.n = len(system["species"])
        self.dof = 3 * self.n - 3
        self.batched = batched
        self.mass = jnp.asarray(_masses(system), dtype)
        self.kT = jnp.asarray(units.kT_from_kelvin(system["temperature_K"]), dtype)
        self.reallocations = 0
        self._extra_capacity = 0
        dt = integrator.dt_fs * units.fs
        tau = integrator.tau_fs * units.fs
        self.periodic = system["box"] is not None
        energy_fn = self.energy_fn
        if self.periodic:
            self.box = jnp.asarray(system["box"], dtype)
            box = self.box
            displacement, shift = space.periodic(box)
            self.neighbor_fn = partition.neighbor_list(
                displacement,
                box,
                r_cutoff=system["cutoff"],
                dr_threshold=skin,
                capacity_multiplier=capacity_multiplier,
                format=partition.NeighborListFormat.Sparse,
            )

            def energy(R, neighbor=None, params=None, **unused):
                return energy_fn(params, R, neighbor.idx, box)
        else:
            self.box = None
            _, shift = space.free()
            edges = jnp.asarray(all_pairs_edges(self.n))

            def energy(R, params=None, **unused):
                return energy_fn(params, R, edges, None)

        self.init_fn, self.apply_fn = simulate.nvt_nose_hoover(
            energy,
            shift,
            dt,
            self.kT,
            chain_length=integrator.chain_length,
            chain_steps=integrator.chain_steps,
            sy_steps=integrator.sy_steps,
            tau=tau,
        )
        # The chain helper exactly as nvt_nose_hoover builds it (float32 dt and tau).
        self.chain_fns = simulate.nose_hoover_chain(
            jnp.float32(dt),
            integrator.chain_length,
            integrator.chain_steps,
            integrator.sy_steps,
            jnp.float32(tau),
        )
        self._runs = {}

    # -------------------------------------------------------------- set-up

    def _allocate(self, positions, spread: bool = False):
        """Batched lists [R, ...] with one capacity: jax-md's ``allocate`` on replica 0
        (``spread``: on every replica, keeping the largest), then each replica rebuilt."""
        with warnings.catch_warnings():  # jax-md scatters int64 into int32 under x64
            warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")
            candidates = range(positions.shape[0]) if spread else (0,)
            template = None
            for r in candidates:
                t = self.neighbor_fn.allocate(positions[r], extra_capacity=self._extra_capacity)
                if template is None or t.max_occupancy > template.max_occupancy:
                    template = t
            # A reference half a box away: every replica's update rebuilds its list.
            far = template.set(
                reference_position=jnp.mod(template.reference_position + 0.5 * self.box, self.box)
            )
            update = self.neighbor_fn.update
            return jax.jit(jax.vmap(lambda r: update(r, far)))(positions)

    def init(self, params, positions, momenta):
        """Carry (state, neighbour lists or None) for positions and momenta [R, n, 3]."""
        positions = jnp.asarray(positions, self.dtype)
        momenta = jnp.asarray(momenta, self.dtype)
        nbrs = None
        if self.periodic:
            positions = jnp.mod(positions, self.box)
            nbrs = self._allocate(positions)
        return self._init_states(params, positions, momenta, nbrs)

    def _init_states(self, params, positions, momenta, nbrs):
        init_fn, chain_fns, mass, kT, dof = (
            self.init_fn,
            self.chain_fns,
            self.mass,
            self.kT,
            self.dof,
        )
        key = jax.random.PRNGKey(0)  # unused: momenta are given

        def one(r, p, nb):
            kw = {"params": params} if nb is None else {"params": params, "neighbor": nb}
            s = init_fn(key, r, mass=mass, momenta=p, **kw)
            ke = simulate.kinetic_energy(s)
            return s.set(chain=chain_fns.initialize(dof, ke, kT))

        with warnings.catch_warnings():  # jax-md asks for float64 sums under float32
            warnings.filterwarnings("ignore", message="Explicitly requested dtype")
            state = jax.jit(jax.vmap(one))(positions, momenta, nbrs)
        carry = (state, nbrs)
        if not self.batched:
            if positions.shape[0] != 1:
                raise ValueError("an unbatched reference runs one replica")
            carry = jax.tree.map(lambda a: a[0], carry)
        return carry

    # ----------------------------------------------------------------- run

    def _run_fn(self, n_steps: int):
        if n_steps in self._runs:
            return self._runs[n_steps]
        apply_fn = self.apply_fn

        def step(state, nbrs, params):
            if nbrs is None:
                return apply_fn(state, params=params), None
            state = apply_fn(state, neighbor=nbrs, params=params)
            return state, nbrs.update(state.position)

        if self.batched:
            step = jax.vmap(step, in_axes=(0, 0, None))

        def run(params, carry):
            def body(c, _):
                return step(c[0], c[1], params), None

            return lax.scan(body, carry, None, length=n_steps)[0]

        self._runs[n_steps] = jax.jit(run)
        return self._runs[n_steps]

    def overflowed(self, carry) -> bool:
        """Whether any replica's list (or cell list) overflowed: the run is invalid."""
        nbrs = carry[1]
        if nbrs is None:
            return False
        bits = np.bitwise_or.reduce(np.atleast_1d(np.asarray(nbrs.error.code)))
        return bool(int(bits) & _OVERFLOW_BITS)

    def run(self, params, carry, n_steps: int):
        """(new carry, whether it is valid) after ``n_steps``; blocks until done."""
        with warnings.catch_warnings():  # jax-md scatters int64 into int32 under x64
            warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")
            out = jax.block_until_ready(self._run_fn(n_steps)(params, carry))
        return out, not self.overflowed(out)

    def reallocate(self, carry):
        """Larger lists for the positions of ``carry`` (jax-md's overflow recipe:
        allocate again, here on every replica with one more unit of extra capacity)."""
        self.reallocations += 1
        self._extra_capacity += 1
        self._runs.clear()
        state, _ = carry
        if not self.batched:
            state = jax.tree.map(lambda a: a[None], state)
        nbrs = self._allocate(state.position, spread=True)
        if self.batched:
            return (state, nbrs)
        return jax.tree.map(lambda a: a[0], (state, nbrs))


def _masses(system):
    import ase.data

    return ase.data.atomic_masses[np.asarray(system["species"])]


def _reference_runner(ref, params, carry, n_steps):
    """A callable that advances ``ref`` by ``n_steps`` and returns the seconds of the
    last valid run (an overflow reallocates, recompiles untimed and runs again)."""
    holder = {"carry": carry}

    def call():
        for _ in range(5):
            t0 = time.perf_counter()
            new, ok = ref.run(params, holder["carry"], n_steps)
            elapsed = time.perf_counter() - t0
            if ok:
                holder["carry"] = new
                return elapsed
            holder["carry"] = ref.reallocate(holder["carry"])
            new, ok = ref.run(params, holder["carry"], n_steps)  # compile, untimed
            if ok:
                holder["carry"] = new
        raise RuntimeError("jax-md neighbour list kept overflowing")

    return call, holder


def bench_md(system, R, n_steps, repeats, integrator=None, jax_md=False):
    """One row: our Simulator at R replicas (and, with ``jax_md``, the jax-md reference
    from the same state, timed interleaved with ours); returns (row, sim)."""
    integrator = make_integrator(system, "langevin") if integrator is None else integrator
    sim = md.Simulator(
        system["energy_fn"],
        species=system["species"],
        box=system["box"],
        cutoff=system["cutoff"],
        skin=SKIN,
        integrator=integrator,
        chunk_steps=n_steps,
    )
    rng = np.random.default_rng(0)
    pos = system["positions"][None] + 0.02 * rng.normal(size=(R,) + system["positions"].shape)
    pos = jnp.asarray(pos, jnp.zeros(()).dtype)
    kT = units.kT_from_kelvin(system["temperature_K"])
    params = _params(system)
    holder = {"state": sim.init(jax.random.PRNGKey(0), params, pos, kT)}

    def md_run():
        t0 = time.perf_counter()
        holder["state"], _ = sim.run(params, holder["state"], n_steps, record_every=n_steps)
        return time.perf_counter() - t0

    runs = {"ours": md_run}
    first = {"ours": md_run()}  # compiles (and equilibrates)
    refs, ref_holders = {}, {}
    if jax_md:
        if not isinstance(integrator, md.NoseHooverChain):
            raise ValueError("the jax-md reference is Nose-Hoover")
        state = holder["state"]
        variants = {"jax_md": True}
        if R == 1:
            variants["jax_md_unbatched"] = False
        for name, batched in variants.items():
            ref = JaxMDReference(system, integrator, batched=batched)
            carry = ref.init(params, state.position, state.momentum)
            call, ref_holders[name] = _reference_runner(ref, params, carry, n_steps)
            refs[name] = ref
            runs[name] = call
            first[name] = call()  # compiles
    # Bare batched energy+force evaluation of the same batch, same loop length, in the
    # engine's own layout (`Simulator._batched_forces`: vmap, or passes of a few replicas
    # on a CPU, `stablejax.batching`).
    edges = sim._edges(holder["state"])
    box = holder["state"].box

    @jax.jit
    def bare(params, position):
        def body(_, r):
            _, f, _ = sim._batched_forces(params, r, edges, box)
            return r + 1e-30 * f  # carried, so the loop body cannot be hoisted

        return jax.lax.fori_loop(0, n_steps, body, position)

    position = holder["state"].position

    def bare_run():
        t0 = time.perf_counter()
        bare(params, position).block_until_ready()
        return time.perf_counter() - t0

    runs["force"] = bare_run
    first["force"] = bare_run()  # compiles
    best = {name: np.inf for name in runs}
    for _ in range(repeats):  # interleaved, so that load changes hit every engine alike
        for name, fn in runs.items():
            best[name] = min(best[name], fn())
    md_step = best["ours"] / n_steps
    force_step = best["force"] / n_steps
    n = len(system["species"])
    row = {
        "replicas": R,
        "atom_steps_per_s": R * n * n_steps / best["ours"],
        "md_step_s": md_step,
        "force_eval_s": force_step,
        "integrator_overhead": md_step / force_step,
        "compile_s": max(first["ours"] - best["ours"], 0.0),
        "traces": sim.num_traces,
        "reallocations": sim.num_reallocations,
        "unstable_replicas": int(np.sum(np.asarray(holder["state"].unstable))),
    }
    if sim._lists:
        row["edge_slots"] = int(holder["state"].neighbors.edges.shape[-1])
    for name, ref in refs.items():
        rate = R * n * n_steps / best[name]
        row[f"{name}_atom_steps_per_s"] = rate
        row[f"{name}_step_s"] = best[name] / n_steps
        row[f"{name}_compile_s"] = max(first[name] - best[name], 0.0)
        row[f"{name}_reallocations"] = ref.reallocations
        suffix = name[len("jax_md") :]
        row[f"vs_jax_md{suffix}"] = row["atom_steps_per_s"] / rate
    if "jax_md" in refs and refs["jax_md"].periodic:
        row["jax_md_edge_slots"] = int(ref_holders["jax_md"]["carry"][1].idx.shape[-1])
    return row, sim


def bench_ase(system, n_steps, integrator="langevin"):
    """Seconds per step of ASE's own integrator on one replica with the same JAX forces
    (``langevin``: ``ase.md.langevin.Langevin``, 1/ps; ``nose_hoover``:
    ``ase.md.nose_hoover_chain.NoseHooverChainNVT``, same tau, chain length 3)."""
    import ase
    from ase.calculators.calculator import Calculator, all_changes

    energy_fn = system["energy_fn"]
    params = _params(system)
    n = len(system["species"])
    if system["box"] is None:
        edges = jnp.asarray(all_pairs_edges(n))

        @jax.jit
        def energy_forces(r):
            e, g = jax.value_and_grad(lambda x: energy_fn(params, x, edges, None))(r)
            return e, -g
    else:
        box = jnp.asarray(system["box"], jnp.float32)
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
            r = jnp.asarray(self.atoms.positions, jnp.float32)
            e, f = energy_forces(r)
            self.results = {"energy": float(e), "forces": np.asarray(f, np.float64)}

    atoms = ase.Atoms(numbers=system["species"], positions=system["positions"])
    if system["box"] is not None:
        atoms.set_cell(np.diag(system["box"]))
        atoms.set_pbc(True)
    atoms.calc = JaxCalculator()
    if integrator == "langevin":
        from ase.md.langevin import Langevin

        dyn = Langevin(
            atoms,
            timestep=system["dt_fs"] * units.fs,
            temperature_K=system["temperature_K"],
            friction=1.0 / units.ps,
        )
    else:
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        dyn = NoseHooverChainNVT(
            atoms,
            timestep=system["dt_fs"] * units.fs,
            temperature_K=system["temperature_K"],
            tdamp=system["tau_fs"] * units.fs,
            tchain=3,
        )
    dyn.run(min(5, n_steps))  # compile
    t0 = time.perf_counter()
    dyn.run(n_steps)
    return (time.perf_counter() - t0) / n_steps


def _ratio(a, b):
    return a / b if b and np.isfinite(a) and np.isfinite(b) else None


def bench_system(system, replicas, n_steps, repeats, ase_steps, log=print):
    """All rows of one system and its summary metrics (see the module docstring)."""
    n = len(system["species"])
    rows = {}
    for integ in system["integrators"]:
        rows[integ] = {}
        for R in replicas:
            row, _ = bench_md(
                system,
                R,
                n_steps,
                repeats,
                integrator=make_integrator(system, integ),
                jax_md=integ == "nose_hoover",
            )
            rows[integ][str(R)] = row
            msg = (
                f"  {system['name']:15s} {integ:11s} R={R:<4d} {row['atom_steps_per_s']:10.4g}"
                f" atom-steps/s  overhead {row['integrator_overhead']:5.2f}"
            )
            if "vs_jax_md" in row:
                msg += f"  vs jax-md {row['vs_jax_md']:5.2f}"
            if "vs_jax_md_unbatched" in row:
                msg += f" (unbatched jax-md: {row['vs_jax_md_unbatched']:5.2f})"
            log(msg)
    metrics = "langevin" if "langevin" in rows else "nose_hoover"
    top, one = str(replicas[-1]), str(replicas[0])
    ase_step = bench_ase(system, ase_steps, metrics)
    ase_atom_steps = n / ase_step
    main_rows = rows[metrics]
    nh = rows.get("nose_hoover", {})
    out = {
        "description": system["description"],
        "n_atoms": n,
        "periodic": system["box"] is not None,
        "temperature_K": system["temperature_K"],
        "dt_fs": system["dt_fs"],
        "tau_fs": system["tau_fs"],
        "n_steps": n_steps,
        "replica_counts": list(replicas),
        "rows": rows,
        "metrics_integrator": metrics,
        "ase_integrator": "Langevin" if metrics == "langevin" else "NoseHooverChainNVT",
        "ase_steps": ase_steps,
        "ase_step_s": ase_step,
        "ase_atom_steps_per_s": ase_atom_steps,
        "batching_efficiency": _ratio(
            main_rows[top]["atom_steps_per_s"], main_rows[one]["atom_steps_per_s"]
        ),
        "integrator_overhead": main_rows[top]["integrator_overhead"],
        "speedup_vs_ase": main_rows[top]["atom_steps_per_s"] / ase_atom_steps,
        "vs_jax_md": nh[top]["vs_jax_md"] if top in nh else None,
        "vs_jax_md_by_replicas": {R: r["vs_jax_md"] for R, r in nh.items()},
    }
    if one in nh and "vs_jax_md_unbatched" in nh[one]:
        out["vs_jax_md_unbatched_r1"] = nh[one]["vs_jax_md_unbatched"]
    if "nose_hoover" in rows and metrics != "nose_hoover":
        out["nose_hoover_batching_efficiency"] = _ratio(
            nh[top]["atom_steps_per_s"], nh[one]["atom_steps_per_s"]
        )
        out["nose_hoover_integrator_overhead"] = nh[top]["integrator_overhead"]
    if "model" in system:
        out["model"] = system["model"]
    return out


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
        edges = sim._edges(state)

        @jax.jit
        def bare(position):
            def body(_, r):
                _, f, _ = sim._batched_forces(params, r, edges, None)
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


QUICK_SKIPS = {
    "water_paper": "paper-size GemNet-T (1.88M parameters) on 192 atoms takes seconds per force "
    "call on a CPU; --quick skips it (name it in --systems to run it)",
    "aspirin_schnet R=128": "--quick caps aspirin at R = 32 (the paper SchNet at 128 replicas "
    "takes ~2 s per step on 2 CPU cores)",
    "lj_fluid R=32,128": "--quick caps the LJ fluid at R = 8: the jax-md reference's vmapped "
    "lists rebuild every step (~70 s per 100-step run at R = 32 on 2 CPU cores)",
}


def _select(args, mode):
    """(selected section names, skipped {what: why})."""
    if args.only_free_space_edges:
        return ["free_space_edges"], {}
    if args.systems:
        names = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in names if s not in SECTIONS]
        if unknown:
            raise SystemExit(f"unknown --systems {unknown}; choose from {', '.join(SECTIONS)}")
        return names, {}
    if mode == "tiny":
        return list(SYSTEMS), {"free_space_edges": "--tiny runs the systems only"}
    names = list(SECTIONS)
    skipped = {}
    if mode == "quick":
        names.remove("water_paper")
        skipped["water_paper"] = QUICK_SKIPS["water_paper"]
    return names, skipped


def _dump(results, out):
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "md_throughput.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2)
    return path


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(results):
    print(f"device: {results['device']}  (float32, mode {results['mode']})")
    head = f"{'system':15s} {'integrator':11s} {'R':>4s} {'atom-steps/s':>13s} {'overhead':>8s}"
    print(head + f" {'jax-md':>11s} {'vs jax-md':>9s} {'compile s':>9s}")
    for name, res in results["systems"].items():
        for integ, rows in res["rows"].items():
            for R, row in rows.items():
                print(
                    f"{name:15s} {integ:11s} {R:>4s} {row['atom_steps_per_s']:13.4g} "
                    f"{row['integrator_overhead']:8.2f} "
                    f"{_fmt(row.get('jax_md_atom_steps_per_s'), '11.4g')} "
                    f"{_fmt(row.get('vs_jax_md'), '9.2f')} {row['compile_s']:9.1f}"
                )
        top = res["replica_counts"][-1]
        print(
            f"{name:15s} batching efficiency {_fmt(res['batching_efficiency'], '.2f')}, "
            f"overhead @{top} {res['integrator_overhead']:.2f}, "
            f"vs ASE {res['ase_integrator']} @{top} {res['speedup_vs_ase']:.1f}x, "
            f"vs jax-md @{top} {_fmt(res['vs_jax_md'], '.2f')}"
            + (
                f" (R=1 unbatched jax-md: {res['vs_jax_md_unbatched_r1']:.2f})"
                if "vs_jax_md_unbatched_r1" in res
                else ""
            )
        )
    for what, why in results["skipped"].items():
        print(f"skipped {what}: {why}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for md_throughput.json")
    parser.add_argument("--quick", action="store_true", help="fewer steps, repeats and sizes")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only
    parser.add_argument(
        "--systems",
        default=None,
        help=f"comma list of sections to run, from {','.join(SECTIONS)} (default: all; "
        "--quick without it skips water_paper)",
    )
    parser.add_argument(
        "--replicas",
        default=None,
        help="comma list of replica counts for every system (default: per system, "
        "lj_fluid 1,8,32,128 (quick 1,8), benzene_morse 1,8,32,128, aspirin 1,32,128 "
        "(quick 1,32), water 1,8); "
        "the last one gives the overhead, ASE and jax-md ratios",
    )
    parser.add_argument(
        "--free-space-replicas", type=int, default=8, help="replicas of the free-space comparison"
    )
    parser.add_argument(
        "--free-space-steps",
        type=int,
        default=None,
        help="steps per timed free-space run (default 100, --quick 30)",
    )
    parser.add_argument(
        "--only-free-space-edges",
        action="store_true",
        help="run only the free-space all-pairs vs cutoff-list comparison",
    )
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    jax.config.update("jax_enable_x64", False)
    repeats = MODES[mode]["repeats"]
    selected, skipped = _select(args, mode)
    override = None
    if args.replicas:
        override = tuple(int(r) for r in args.replicas.split(",") if r.strip())

    results = {
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "dtype": "float32",
        "mode": mode,
        "repeats": repeats,
        "load_average_start": list(os.getloadavg()),
        "goals": {
            "vs_jax_md": ">= 1.0",
            "batching_efficiency": ">= 1.0 (CPU)",
            "integrator_overhead": "<= 1.2",
            "free_space_edges.ratio": "<= 0.6",
        },
        "systems": {},
        "skipped": skipped,
    }
    t_start = time.perf_counter()
    if "free_space_edges" in selected:
        fse = bench_free_space_edges(
            n_replicas=args.free_space_replicas,
            n_steps=args.free_space_steps or MODES[mode]["free_space_steps"],
            repeats=repeats,
        )
        results["free_space_edges"] = fse
        print(f"free-space edges ({fse['system']}, {fse['replicas']} replicas):")
        for name, row in fse.items():
            if isinstance(row, dict):
                print(
                    f"  {name:18s} skin {row['skin_A']:.2f} A  {row['edge_slots']:5d} edge slots  "
                    f"MD {1e3 * row['md_step_s']:7.2f} ms/step  force "
                    f"{1e3 * row['force_eval_s']:7.2f} ms  ratio {row.get('ratio', 1.0):.2f} "
                    f"(force {row.get('force_eval_ratio', 1.0):.2f})"
                )
        _dump(results, args.out)
    for name in selected:
        if name == "free_space_edges":
            continue
        t0 = time.perf_counter()
        system = make_system(name, tiny=mode == "tiny")
        replicas = override or system["replicas"][mode]
        if override is None and mode == "quick":
            dropped = [R for R in system["replicas"]["full"] if R not in replicas]
            if dropped:
                key = f"{name} R={','.join(map(str, dropped))}"
                skipped[key] = QUICK_SKIPS.get(key, "--quick caps the replica counts")
        res = bench_system(
            system,
            replicas,
            system["n_steps"][mode],
            repeats,
            system["ase_steps"][mode],
        )
        res["wall_s"] = time.perf_counter() - t0
        results["systems"][name] = res
        _dump(results, args.out)
    results["load_average_end"] = list(os.getloadavg())
    results["total_s"] = time.perf_counter() - t_start
    print_table(results)
    path = _dump(results, args.out)
    if path:
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
