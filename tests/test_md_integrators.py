"""Physics of the replica-batched integrators on small Lennard-Jones systems.

Statistical tolerances come from the spread between independent replicas
(standard error of the replica means), not from guesses.
"""

import jax
import numpy as np
import pytest
from test_md_common import ARGON, cluster, lattice, lj_numpy_energy, make_lj

from stablejax import md, units

N_CLUSTER = 8
SPECIES = np.full(N_CLUSTER, 18)


def _cluster_positions(n_replicas, seed=0):
    rng = np.random.default_rng(seed)
    return cluster(2, 3.8)[None] + 0.05 * rng.normal(size=(n_replicas, N_CLUSTER, 3))


def test_maxwell_boltzmann_init_exact_kinetic_energy_and_zero_momentum():
    sim = md.Simulator(make_lj(), species=SPECIES, integrator=md.NVE(dt_fs=1.0))
    kT = np.array([0.0, 0.002, 0.01, 0.05])
    state = sim.init(jax.random.PRNGKey(0), ARGON, _cluster_positions(4), kT)
    p = np.asarray(state.momentum)
    np.testing.assert_allclose(p.sum(axis=1), 0.0, atol=1e-12)
    m = 39.948  # argon, amu
    ke = 0.5 * np.sum(p**2, axis=(1, 2)) / m
    np.testing.assert_allclose(ke, 0.5 * (3 * N_CLUSTER - 3) * kT, rtol=1e-12, atol=1e-15)


def test_nve_energy_error_shrinks_as_dt_squared():
    lj = make_lj()
    positions = _cluster_positions(4)
    dts = np.array([1.0, 2.0, 4.0])
    errors = []
    for dt in dts:
        sim = md.Simulator(lj, species=SPECIES, integrator=md.NVE(dt_fs=dt), chunk_steps=4000)
        state = sim.init(jax.random.PRNGKey(1), ARGON, positions, units.kT_from_kelvin(30.0))
        state, traj = sim.run(ARGON, state, int(2000 / dt), record_every=5)
        total = traj.potential_energy + traj.kinetic_energy
        errors.append(np.mean(np.max(np.abs(total - total[:, :1]), axis=1)))
        # Bounded: the error is a tiny fraction of the kinetic energy (no drift).
        assert errors[-1] < 1e-3 * np.mean(traj.kinetic_energy)
    order = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    assert 1.8 < order < 2.2, (order, errors)


def _canonical_checks(traj, kT, dof):
    """<K> and Var(K) per replica against dof kT / 2 and dof kT^2 / 2."""
    k = traj.kinetic_energy  # [R, F]
    means = k.mean(axis=1)
    variances = k.var(axis=1, ddof=1)
    R = k.shape[0]
    mean, se_mean = means.mean(), means.std(ddof=1) / np.sqrt(R)
    var, se_var = variances.mean(), variances.std(ddof=1) / np.sqrt(R)
    assert abs(mean - 0.5 * dof * kT) < 4 * se_mean, (mean, 0.5 * dof * kT, se_mean)
    assert abs(var - 0.5 * dof * kT**2) < 4 * se_var, (var, 0.5 * dof * kT**2, se_var)
    # The check can fail: 3n instead of 3n - 3 degrees of freedom is many SEs away.
    assert abs(mean - 0.5 * (dof + 3) * kT) > 4 * se_mean


@pytest.mark.parametrize(
    "integrator",
    [
        md.Langevin(dt_fs=4.0, friction_per_ps=10.0),
        md.NoseHooverChain(dt_fs=4.0, tau_fs=200.0, chain_length=3),
    ],
    ids=["langevin", "nose_hoover"],
)
def test_thermostat_samples_canonical_kinetic_energy(integrator):
    R = 32
    kT = units.kT_from_kelvin(25.0)
    sim = md.Simulator(make_lj(), species=SPECIES, integrator=integrator, chunk_steps=2000)
    state = sim.init(jax.random.PRNGKey(2), ARGON, _cluster_positions(R, seed=1), kT)
    state, _ = sim.run(ARGON, state, 1000, record_every=1000)
    state, traj = sim.run(ARGON, state, 6000, record_every=20)
    assert not np.any(np.asarray(state.unstable))
    _canonical_checks(traj, kT, sim.dof)
    if isinstance(integrator, md.NoseHooverChain):
        h = np.asarray(sim.conserved_energy(state))
        state2, _ = sim.run(ARGON, state, 2000, record_every=2000)
        drift = np.abs(np.asarray(sim.conserved_energy(state2)) - h)
        assert np.all(drift < 0.02 * sim.dof * kT), drift


def test_berendsen_npt_relaxes_lj_fluid_to_target_pressure():
    cutoff = 7.0
    lj = make_lj(cutoff)
    x, box = lattice(4, 17.0)  # 64 argon atoms, dense supercritical fluid start
    R = 4
    rng = np.random.default_rng(3)
    positions = x[None] + 0.1 * rng.normal(size=(R, 64, 3))
    kT = units.kT_from_kelvin(200.0)
    target = 500.0
    integ = md.BerendsenNPT(
        dt_fs=4.0, pressure_bar=target, tau_T_fs=100.0, tau_P_fs=400.0, compressibility_per_bar=2e-4
    )
    sim = md.Simulator(
        lj, species=np.full(64, 18), box=box, integrator=integ, cutoff=cutoff, chunk_steps=500
    )
    state = sim.init(jax.random.PRNGKey(4), ARGON, positions, kT)
    p0 = np.asarray(sim.pressure(state))

    # The virial pressure agrees with a finite-difference -dU/dV of the NumPy energy.
    r0, b0 = np.asarray(state.position[0]), np.asarray(state.box[0])
    h = 1e-5
    u = [lj_numpy_energy(s * r0, s * b0, 3.405, 0.0103, cutoff) for s in (1 + h, 1 - h)]
    dudv = (u[0] - u[1]) / (np.prod(b0) * ((1 + h) ** 3 - (1 - h) ** 3))
    ke = float(sim.kinetic_energy(state)[0])
    p_fd = (2 * ke / (3 * np.prod(b0)) - dudv) / units.bar
    np.testing.assert_allclose(p0[0], p_fd, rtol=1e-5)

    state, _ = sim.run(ARGON, state, 1500, record_every=500)
    state, traj = sim.run(ARGON, state, 2000, record_every=10)
    assert not np.any(np.asarray(state.unstable))
    means = traj.pressure_bar.mean(axis=1)
    se = means.std(ddof=1) / np.sqrt(R)
    # Started far from the target; relaxed to it within statistical error.
    assert abs(p0.mean() - target) > 500.0, p0
    assert abs(means.mean() - target) < 4 * se + 25.0, (means, se)
    assert abs(traj.temperature.mean() - 200.0) < 10.0
    # The box changed isotropically and stays cubic.
    boxes = traj.box[:, -1]
    np.testing.assert_allclose(boxes[:, 0], boxes[:, 1], rtol=1e-12)
    assert np.all(np.abs(boxes[:, 0] - 17.0) > 0.1)


def test_integrator_table_builds_every_integrator_from_md_fields():
    """`md.INTEGRATORS` is the one table of names: each entry builds its dataclass with the
    `md` fields it reads (the others are ignored), and unknown names are refused."""
    fields = dict(dt_fs=0.7, tau_fs=33.0, friction_per_ps=0.2, chain_length=4,
                  pressure_bar=2.0, tau_P_fs=900.0)  # fmt: skip
    built = {name: md.make_integrator(name, **fields) for name in md.INTEGRATORS}
    assert built["nve"] == md.NVE(dt_fs=0.7)
    assert built["langevin"] == md.Langevin(dt_fs=0.7, friction_per_ps=0.2)
    assert built["nose_hoover"] == md.NoseHooverChain(dt_fs=0.7, tau_fs=33.0, chain_length=4)
    assert built["berendsen_npt"] == md.BerendsenNPT(
        dt_fs=0.7, pressure_bar=2.0, tau_T_fs=33.0, tau_P_fs=900.0
    )
    assert set(built) == {"nve", "langevin", "nose_hoover", "berendsen_npt"}
    with pytest.raises(ValueError, match="unknown integrator 'verlet'"):
        md.make_integrator("verlet", dt_fs=1.0)
