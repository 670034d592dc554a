"""Per-replica control (freeze, reset, rewind), NaN isolation, neighbour-list
overflow, recompilation, input validation, trajectory files and checkpoints."""

import ase.data
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_md_common import ARGON, cluster, lattice, lj_numpy_energy, make_lj

from stablejax import md, units

N = 8
SPECIES = np.full(N, 18)
KT = units.kT_from_kelvin(30.0)


def _positions(n_replicas, seed=0):
    rng = np.random.default_rng(seed)
    return cluster(2, 3.8)[None] + 0.05 * rng.normal(size=(n_replicas, N, 3))


def _replica(state, r):
    """Leaves of replica r (history excluded), as NumPy arrays."""
    core = state.set(history=None)
    return [np.asarray(x[r]) for x in jax.tree_util.tree_leaves(core)]


def assert_replica_bitwise(a, b, ra, rb=None, skip_flags=False):
    rb = ra if rb is None else rb
    if skip_flags:
        a = a.set(frozen=b.frozen)
    for x, y in zip(_replica(a, ra), _replica(b, rb), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def nve_sim():
    return md.Simulator(make_lj(), species=SPECIES, integrator=md.NVE(dt_fs=2.0), chunk_steps=20)


def test_freeze_keeps_state_bitwise_and_others_unaffected(nve_sim):
    sim = nve_sim
    s0 = sim.init(jax.random.PRNGKey(0), ARGON, _positions(3), KT)
    ref, _ = sim.run(ARGON, s0, 40)
    frozen = sim.freeze(s0, np.array([False, True, False]))
    out, traj = sim.run(ARGON, frozen, 40)
    assert_replica_bitwise(out, s0, 1, skip_flags=True)
    np.testing.assert_array_equal(traj.position[1], np.broadcast_to(s0.position[1], (4, N, 3)))
    assert_replica_bitwise(out, ref, 0)
    assert_replica_bitwise(out, ref, 2)
    assert np.asarray(out.step).tolist() == [40, 0, 40]
    # Unfrozen, it continues exactly as if it had never stopped.
    out, _ = sim.run(ARGON, sim.unfreeze(out, np.array([False, True, False])), 40)
    assert_replica_bitwise(out, ref, 1)


def test_reset_restores_masked_replicas_exactly(nve_sim):
    sim = nve_sim
    s0 = sim.init(jax.random.PRNGKey(1), ARGON, _positions(3, seed=1), KT)
    s40, _ = sim.run(ARGON, s0, 40)
    mask = np.array([False, True, False])
    r = sim.reset(s40, s0, mask)
    assert_replica_bitwise(r, s0, 1)
    assert_replica_bitwise(r, s40, 0)
    again, _ = sim.run(ARGON, r, 40)
    assert_replica_bitwise(again, s40, 1)  # NVE is deterministic: bitwise the same path
    assert not np.array_equal(np.asarray(s40.position[1]), np.asarray(s0.position[1]))


def test_rewind_from_history_is_exact_periodic_langevin():
    cutoff = 5.0
    x, box = lattice(3, 11.0)
    rng = np.random.default_rng(2)
    pos = x[None] + 0.1 * rng.normal(size=(3, 27, 3))
    sim = md.Simulator(
        make_lj(cutoff),
        species=np.full(27, 18),
        box=box,
        cutoff=cutoff,
        skin=0.5,
        integrator=md.Langevin(dt_fs=4.0, friction_per_ps=5.0),
        chunk_steps=10,
        history_every=10,
        history_depth=4,
    )
    s0 = sim.init(jax.random.PRNGKey(3), ARGON, pos, units.kT_from_kelvin(120.0))
    s30, _ = sim.run(ARGON, s0, 30)
    s60, _ = sim.run(ARGON, s30, 30)
    mask = np.array([True, False, True])
    back = sim.rewind(s60, 30, mask)
    assert_replica_bitwise(back, s30, 0)
    assert_replica_bitwise(back, s30, 2)
    assert_replica_bitwise(back, s60, 1)
    # Replaying (same noise: the PRNG state is part of the snapshot) retraces the path.
    # Periodic lists rebuild on one shared schedule, which differs now that only some
    # replicas were rewound: same path up to summation order.
    replay, _ = sim.run(ARGON, back, 30)
    for r in (0, 2):
        np.testing.assert_allclose(replay.position[r], s60.position[r], rtol=0, atol=1e-9)
    # Rewinding the whole batch replays it bitwise.
    everyone = sim.rewind(s60, 30, np.ones(3, bool))
    replay_all, _ = sim.run(ARGON, everyone, 30)
    for r in range(3):
        assert_replica_bitwise(replay_all, s60, r)
    # Rewinding further than the ring buffer holds is refused.
    with pytest.raises(ValueError, match="no snapshot"):
        sim.rewind(s60, 40, mask)
    # A fresh key gives the rewound replicas new noise.
    fresh = sim.rewind(s60, 30, mask, key=jax.random.PRNGKey(9))
    diverged, _ = sim.run(ARGON, fresh, 30)
    assert not np.array_equal(np.asarray(diverged.position[0]), np.asarray(s60.position[0]))
    # The untouched replica is unaffected (up to summation order of its edges).
    np.testing.assert_allclose(diverged.position[1], replay.position[1], rtol=0, atol=1e-9)


def test_nan_in_one_replica_freezes_it_and_leaves_others_bitwise():
    lj = make_lj()
    wall = 2.0

    def poisoned(params, positions, edges, box):
        e = lj(params, positions, edges, box)
        return e + jnp.where(positions[0, 0] > wall, jnp.nan, 0.0)

    sim = md.Simulator(poisoned, species=SPECIES, integrator=md.NVE(dt_fs=2.0), chunk_steps=50)
    pos = _positions(3, seed=4)
    p = sim.maxwell_boltzmann_momenta(jax.random.PRNGKey(5), KT, 3)
    v = np.asarray(p) / ase.data.atomic_masses[18]
    v_kick = v.copy()
    v_kick[1, :, 0] += 0.1  # Å per ASE time unit: replica 1 drifts to +x into the NaN wall
    clean = sim.init(jax.random.PRNGKey(0), ARGON, pos, KT, velocities=v)
    kicked = sim.init(jax.random.PRNGKey(0), ARGON, pos, KT, velocities=v_kick)
    clean, _ = sim.run(ARGON, clean, 300)
    kicked, traj = sim.run(ARGON, kicked, 300)
    assert np.asarray(kicked.unstable).tolist() == [False, True, False]
    assert not np.any(np.asarray(clean.unstable))
    assert_replica_bitwise(kicked, clean, 0)
    assert_replica_bitwise(kicked, clean, 2)
    stopped = int(kicked.step[1])
    assert 0 < stopped < 300
    for leaf in _replica(kicked, 1):
        assert np.all(np.isfinite(leaf))
    assert np.all(np.isfinite(traj.position)) and np.all(np.isfinite(traj.potential_energy))
    assert np.asarray(kicked.position[1, 0, 0]) <= wall  # the last finite state is kept


def _compressing_sim(**kw):
    cutoff = 6.0
    integ = md.BerendsenNPT(
        dt_fs=4.0, pressure_bar=5000.0, tau_T_fs=100.0, tau_P_fs=400.0, compressibility_per_bar=1e-2
    )
    return md.Simulator(
        make_lj(cutoff),
        species=np.full(64, 18),
        box=np.full(3, 24.0),
        cutoff=cutoff,
        skin=1.0,
        integrator=integ,
        chunk_steps=20,
        **kw,
    )


def test_neighbor_overflow_is_caught_and_chunk_redone():
    x, box = lattice(4, 24.0)
    pos = x[None] + 0.1 * np.random.default_rng(6).normal(size=(2, 64, 3))
    kT = units.kT_from_kelvin(100.0)
    sim = _compressing_sim()
    s0 = sim.init(jax.random.PRNGKey(7), ARGON, pos, kT)
    cap0 = s0.neighbors.edges.shape[-1]
    state, traj = sim.run(ARGON, s0, 100, record_every=5)
    assert sim.num_reallocations >= 1
    assert state.neighbors.edges.shape[-1] > cap0
    assert traj.box[0, -1, 0] < 0.8 * 24.0  # compressed by > 20 % in length
    # No pair was ever missed: recorded energies equal an all-pairs NumPy sum.
    for r in range(2):
        for f in (0, 9, 19):
            e = lj_numpy_energy(traj.position[r, f], traj.box[r, f], 3.405, 0.0103, 6.0)
            np.testing.assert_allclose(traj.potential_energy[r, f], e, rtol=1e-9, atol=1e-12)
    # Same trajectory as a run with ample edge capacity from the start (it may still
    # re-layout its cell list as the box shrinks, which changes only summation order).
    big = _compressing_sim(neighbor_capacity=64 * 63)
    s_big = big.init(jax.random.PRNGKey(7), ARGON, pos, kT)
    _, traj_big = big.run(ARGON, s_big, 100, record_every=5)
    assert big.num_reallocations < sim.num_reallocations
    np.testing.assert_allclose(traj.position, traj_big.position, rtol=0, atol=1e-8)


def test_second_run_does_not_recompile(nve_sim):
    sim = md.Simulator(
        make_lj(), species=SPECIES, integrator=md.Langevin(dt_fs=2.0), chunk_steps=20
    )
    s = sim.init(jax.random.PRNGKey(0), ARGON, _positions(2), KT)
    s, _ = sim.run(ARGON, s, 40)
    traces = sim.num_traces
    assert traces == 1
    other = {"sigma": 3.3, "epsilon": 0.011}  # new params and temperatures: runtime values
    s = s.set(kT=jnp.array([0.001, 0.004]))
    s = sim.freeze(s, np.array([True, False]))
    with jax.log_compiles(True):
        s, _ = sim.run(other, s, 60)
    assert sim.num_traces == traces


def test_cutoff_larger_than_half_box():
    # Fixed boxes: image-shift edges ([5, e]; tests/test_image_edges.py).
    sim = md.Simulator(make_lj(6.0), species=SPECIES, box=[20.0, 11.0, 20.0], cutoff=6.0)
    assert sim.init(jax.random.PRNGKey(0), ARGON, _positions(1), KT).neighbors.edges.shape[1] == 5
    sim = md.Simulator(make_lj(5.0), species=SPECIES, box=[20.0, 20.0, 20.0], cutoff=5.0)
    assert sim.init(jax.random.PRNGKey(0), ARGON, _positions(1), KT).neighbors.edges.shape[1] == 2
    small = sim.init(jax.random.PRNGKey(0), ARGON, _positions(1), KT, box=[[9.0, 20.0, 20.0]])
    assert small.neighbors.edges.shape[1] == 5
    # The barostat changes the box: minimum image only.
    npt = md.BerendsenNPT()
    with pytest.raises(ValueError, match="half the smallest box side"):
        md.Simulator(
            make_lj(6.0), species=SPECIES, box=[20.0, 11.0, 20.0], cutoff=6.0, integrator=npt
        )
    sim = md.Simulator(
        make_lj(5.0), species=SPECIES, box=[20.0, 20.0, 20.0], cutoff=5.0, integrator=npt
    )
    with pytest.raises(ValueError, match="half the smallest box side"):
        sim.init(jax.random.PRNGKey(0), ARGON, _positions(1), KT, box=[[9.0, 20.0, 20.0]])
    with pytest.raises(ValueError, match="cutoff"):
        md.Simulator(make_lj(), species=SPECIES, box=[20.0, 20.0, 20.0])
    with pytest.raises(ValueError, match="periodic box"):
        md.Simulator(make_lj(), species=SPECIES, integrator=md.BerendsenNPT())


def test_trajectory_writers_roundtrip(tmp_path, nve_sim):
    sim = nve_sim
    s = sim.init(jax.random.PRNGKey(0), ARGON, _positions(2), KT)
    _, traj = sim.run(ARGON, s, 20, record_every=5, record_velocities=True)
    box = np.array([30.0, 31.0, 32.0])
    path = tmp_path / "r0.extxyz"
    md.write_trajectory(path, traj.position[0], SPECIES, box=box, velocities=traj.velocity[0])
    frames = ase.io.read(path, index=":")
    assert len(frames) == 4
    for k, atoms in enumerate(frames):
        np.testing.assert_allclose(atoms.positions, traj.position[0, k], atol=1e-6)
        np.testing.assert_allclose(atoms.get_velocities(), traj.velocity[0, k], atol=1e-6)
        np.testing.assert_allclose(atoms.cell.lengths(), box)
        assert atoms.pbc.all() and atoms.numbers.tolist() == SPECIES.tolist()
    md.write_trajectory(tmp_path / "free.xyz", traj.position[1], SPECIES)
    assert not ase.io.read(tmp_path / "free.xyz").pbc.any()
    md.write_trajectory(tmp_path / "r0.npz", traj.position[0], SPECIES, box=box)
    data = np.load(tmp_path / "r0.npz")
    np.testing.assert_array_equal(data["positions"], traj.position[0])
    np.testing.assert_array_equal(data["box"], np.broadcast_to(box, (4, 3)))


def test_state_checkpoint_roundtrip_continues_bitwise(tmp_path, nve_sim):
    from stablejax.training.checkpoint import CheckpointManager

    sim = nve_sim
    s = sim.init(jax.random.PRNGKey(0), ARGON, _positions(2), KT)
    s, _ = sim.run(ARGON, s, 20)
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, s)
        ckpt.wait_until_finished()
        restored = ckpt.restore(sim.init(jax.random.PRNGKey(1), ARGON, _positions(2), KT))
    a, _ = sim.run(ARGON, s, 20)
    b, _ = sim.run(ARGON, restored, 20)
    for r in range(2):
        assert_replica_bitwise(a, b, r)
