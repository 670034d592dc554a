"""Free-space cutoff neighbour lists (``Simulator(free_space_edges="cutoff")``).

The lists hold the pairs within cutoff + skin (brute force, ``geometry.cutoff_edges``),
are rebuilt past a displacement of skin / 2 and grow on overflow. For models that
vanish beyond the cutoff, energies, forces and trajectories equal those with dense
all-pairs edges up to summation order; freeze/reset/rewind stay exact, and each
replica stays bitwise independent of the others.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_md_common import ARGON, cluster, make_lj

from stablejax import geometry, md, units
from stablejax.md import neighbors
from stablejax.potentials import factory, testing
from stablejax.potentials.base import all_pairs_edges

LJ_CUTOFF = 6.0
N_SIDE = 3
N = N_SIDE**3
KT = units.kT_from_kelvin(60.0)


def _cluster_positions(n_replicas, seed=0, spacing=3.8):
    rng = np.random.default_rng(seed)
    return cluster(N_SIDE, spacing)[None] + 0.05 * rng.normal(size=(n_replicas, N, 3))


def _lj_sim(mode="cutoff", **kw):
    kw.setdefault("integrator", md.NVE(dt_fs=4.0))
    kw.setdefault("chunk_steps", 20)
    return md.Simulator(
        make_lj(LJ_CUTOFF),
        species=np.full(N, 18),
        cutoff=LJ_CUTOFF,
        skin=0.5,
        free_space_edges=mode,
        **kw,
    )


def _replica(state, r):
    core = state.set(history=None)
    return [np.asarray(x[r]) for x in jax.tree_util.tree_leaves(core)]


def _assert_replica_bitwise(a, b, ra, rb=None):
    rb = ra if rb is None else rb
    for x, y in zip(_replica(a, ra), _replica(b, rb), strict=True):
        np.testing.assert_array_equal(x, y)


def test_cutoff_edges_match_numpy_and_report_overflow():
    x = _cluster_positions(1, seed=3)[0]
    radius = 5.0
    ref = geometry.cutoff_edges_np(x, radius)
    e = ref.shape[1]
    assert 0 < e < N * (N - 1)
    edges, count = jax.jit(geometry.cutoff_edges, static_argnums=(1, 2))(x, radius, e + 5)
    assert int(count) == e
    np.testing.assert_array_equal(np.asarray(edges[:, :e]), ref)
    np.testing.assert_array_equal(np.asarray(edges[:, e:]), N)  # padding n
    edges, count = geometry.cutoff_edges(jnp.asarray(x), radius, e - 3)
    assert int(count) == e and edges.shape == (2, e - 3)  # overflow: count > capacity
    np.testing.assert_array_equal(np.asarray(edges), ref[:, : e - 3])


@pytest.mark.parametrize("arch", ["schnet", pytest.param("nequip", marks=pytest.mark.slow)])
def test_model_energy_forces_cutoff_edges_equal_all_pairs(arch):
    config = factory.default_config(arch)
    config.species = [1, 6, 8]
    config.cutoff = 3.5  # Å: aspirin (~8 Å across) then has many pairs beyond it
    if arch == "schnet":
        config.n_interactions, config.hidden_features, config.n_filters = 2, 8, 8
    else:
        config.num_layers, config.num_features, config.radial_neurons = 2, 4, 8
    potential = factory.build(config)
    species, x = testing.aspirin()
    n = len(species)
    params = potential.init(jax.random.key(0), species, x, None)
    edges, count = geometry.cutoff_edges(jnp.asarray(x), config.cutoff + 0.5, n * (n - 1))
    assert int(count) < 0.6 * n * (n - 1)
    # A displaced geometry, so that some listed pairs lie beyond the cutoff.
    rng = np.random.default_rng(1)
    y = jnp.asarray(x + 0.1 * rng.normal(size=x.shape))
    cut = edges[:, : int(count) + 10]  # a few padded slots
    energy_and_forces = jax.jit(lambda e: potential.energy_and_forces(params, species, y, e))
    e_all, f_all = energy_and_forces(jnp.asarray(all_pairs_edges(n)))
    e_cut, f_cut = energy_and_forces(cut)
    np.testing.assert_allclose(float(e_cut), float(e_all), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(f_cut), np.asarray(f_all), rtol=0, atol=1e-11)


def test_md_with_cutoff_lists_equals_all_pairs_schnet():
    config = factory.default_config("schnet")
    config.species = [1, 6, 8]
    config.cutoff = 3.5
    config.n_interactions, config.hidden_features, config.n_filters = 2, 8, 8
    potential = factory.build(config)
    species, x = testing.aspirin()
    n = len(species)
    params = potential.init(jax.random.key(0), species, x, None)
    rng = np.random.default_rng(2)
    pos = x[None] + 0.02 * rng.normal(size=(3, n, 3))
    md_config = ml_collections.ConfigDict(
        dict(
            integrator="langevin",
            dt_fs=0.5,
            tau_fs=20.0,
            friction_per_ps=1.0,
            chain_length=3,
            pressure_bar=1.0,
            tau_P_fs=1000.0,
            skin=0.5,
            chunk_steps=100,
            free_space_edges="cutoff",
        )
    )
    traj = {}
    for mode in ("all_pairs", "cutoff"):
        md_config.free_space_edges = mode
        sim = md.make_simulator(potential, species, None, md_config)
        assert sim.free_space_edges == mode
        s0 = sim.init(jax.random.PRNGKey(4), params, pos, units.kT_from_kelvin(500.0))
        s, traj[mode] = sim.run(params, s0, 200, record_every=20)
        if mode == "cutoff":
            assert sim.cutoff == config.cutoff and sim.num_reallocations == 0
            e = s.neighbors.edges.shape[-1]
            assert s.neighbors.edges.shape == (3, 2, e) and e < 0.6 * n * (n - 1)
            # The lists were rebuilt on the way (references moved with the atoms).
            assert not np.array_equal(np.asarray(s.neighbors.reference), np.asarray(pos))
        else:
            assert s.neighbors is None
    np.testing.assert_allclose(traj["cutoff"].position, traj["all_pairs"].position, atol=1e-8)
    np.testing.assert_allclose(
        traj["cutoff"].potential_energy, traj["all_pairs"].potential_energy, atol=1e-9
    )
    # Old configs without the field keep dense edges.
    del md_config["free_space_edges"]
    assert md.make_simulator(potential, species, None, md_config).free_space_edges == "all_pairs"


def test_overflow_is_detected_and_recovered():
    # A sparse cluster falling inwards: its pair count within cutoff + skin grows far
    # past the initial capacity (1.1 x the initial count).
    x = _cluster_positions(2, seed=5, spacing=5.0)
    v = -0.005 * (x - x.mean(axis=1, keepdims=True))  # Å per ASE time unit, inwards
    runs = {}
    for mode in ("all_pairs", "cutoff"):
        sim = _lj_sim(mode, chunk_steps=50)
        s = sim.init(jax.random.PRNGKey(0), ARGON, x, KT, velocities=v)
        capacity0 = None if mode == "all_pairs" else s.neighbors.edges.shape[-1]
        s, runs[mode] = sim.run(ARGON, s, 200, record_every=10)
        if mode == "cutoff":
            assert sim.num_reallocations >= 1
            assert s.neighbors.edges.shape[-1] > capacity0
            assert int(np.bitwise_or.reduce(np.asarray(s.neighbors.error))) == 0
    assert np.ptp(runs["all_pairs"].position[0, -1, :, 0]) < 0.85 * np.ptp(x[0, :, 0])
    np.testing.assert_allclose(runs["cutoff"].position, runs["all_pairs"].position, atol=1e-10)


def test_freeze_rewind_reset_with_cutoff_lists():
    sim = _lj_sim(
        integrator=md.Langevin(dt_fs=4.0, friction_per_ps=5.0),
        history_every=10,
        history_depth=4,
        chunk_steps=10,
    )
    pos = _cluster_positions(3, seed=6)
    s0 = sim.init(jax.random.PRNGKey(3), ARGON, pos, units.kT_from_kelvin(120.0))
    s30, _ = sim.run(ARGON, s0, 30)
    s60, _ = sim.run(ARGON, s30, 30)
    # Freezing one replica leaves the others bitwise on their path (per-replica lists).
    frozen = sim.freeze(s30, np.array([False, True, False]))
    f60, _ = sim.run(ARGON, frozen, 30)
    _assert_replica_bitwise(f60.set(frozen=s60.frozen), s60, 0)
    _assert_replica_bitwise(f60.set(frozen=s60.frozen), s60, 2)
    _assert_replica_bitwise(f60.set(frozen=s30.frozen), s30, 1)
    # Partial rewind restores state and list exactly; the replay retraces the path bitwise.
    mask = np.array([True, False, True])
    back = sim.rewind(s60, 30, mask)
    for r in (0, 2):
        _assert_replica_bitwise(back, s30, r)
    _assert_replica_bitwise(back, s60, 1)
    replay, _ = sim.run(ARGON, back, 30)
    for r in (0, 2):
        _assert_replica_bitwise(replay, s60, r)
    with pytest.raises(ValueError, match="no snapshot"):
        sim.rewind(s60, 40, mask)
    # Reset to the initial state (smaller or equal capacity is padded) and rerun.
    reset = sim.reset(s60, s0, np.array([False, True, False]))
    _assert_replica_bitwise(reset, s0, 1)
    _assert_replica_bitwise(reset, s60, 0)
    again, _ = sim.run(ARGON, reset, 60)
    again_ref, _ = sim.run(ARGON, s0, 60)
    _assert_replica_bitwise(again, again_ref, 1)


def test_replica_bitwise_independent_of_the_others():
    pos = _cluster_positions(3, seed=7)
    other = pos.copy()
    other[[0, 2]] = _cluster_positions(2, seed=8, spacing=3.9)  # other neighbours of replica 1
    sim = _lj_sim(neighbor_capacity=N * (N - 1) // 2, chunk_steps=50)  # same static capacity
    v = np.asarray(sim.velocities(sim.init(jax.random.PRNGKey(1), ARGON, pos, KT)))
    a = sim.init(jax.random.PRNGKey(0), ARGON, pos, KT, velocities=v)
    b = sim.init(jax.random.PRNGKey(0), ARGON, other, KT, velocities=v)
    a, _ = sim.run(ARGON, a, 100)
    b, _ = sim.run(ARGON, b, 100)
    assert a.neighbors.edges.shape == b.neighbors.edges.shape
    assert not np.array_equal(np.asarray(a.position[0]), np.asarray(b.position[0]))
    _assert_replica_bitwise(a, b, 1)


def test_free_space_edges_validation():
    with pytest.raises(ValueError, match="free_space_edges must be one of"):
        _lj_sim("nearest")
    with pytest.raises(ValueError, match="needs the interaction cutoff"):
        md.Simulator(make_lj(), species=np.full(N, 18), free_space_edges="cutoff")
    assert isinstance(
        neighbors.make_free_layout(6.0, 0.5, _cluster_positions(1))[0], neighbors.FreeLayout
    )
