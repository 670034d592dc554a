"""Reference-data generation: cache, OpenMM SPC/Fw water vs JAX Ewald, GFN2-xTB molecules.

Tests that run an engine are marked ``reference`` and skipped without the extra.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from stablejax.data import load
from stablejax.data.generate import ensure_dataset
from stablejax.data.generate.cache import ChunkStore, cache_paths, params_hash

KCAL_PER_EV = 23.06052


# ---------------------------------------------------------------- no engines needed


def test_params_hash_is_order_independent_and_sensitive():
    a = {"n_frames": 10, "seed": 0, "temperature_K": 300.0}
    b = {"temperature_K": 300.0, "seed": 0, "n_frames": 10}
    assert params_hash(a) == params_hash(b)
    assert params_hash(a) != params_hash({**a, "temperature_K": 300.0001})
    data, side, partial = cache_paths("/x", "water", a, "npy")
    assert data.name == f"water_{params_hash(a)}.npy" and side.suffix == ".json"
    assert partial.name.endswith(".partial")


def test_chunk_store_counts_consecutive_chunks(tmp_path):
    store = ChunkStore(tmp_path, prefix="traj0")
    for i in range(3):
        store.save(i, x=np.full((2, 3), i))
    assert store.completed() == 3
    store.path(1).unlink()
    assert store.completed() == 1  # a gap ends the run: chunk 2 is redone
    assert not list(tmp_path.glob(".*tmp*"))  # no temporaries left behind


def test_ensure_dataset_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        ensure_dataset("benzene", out_dir=tmp_path, n_frames=10)


# ------------------------------------------------------------------------- water

WATER_SHORT = dict(n_frames=200, seed=7, equilibration_ps=2.0)


@pytest.fixture(scope="module")
def water_run(tmp_path_factory):
    pytest.importorskip("openmm")
    out = tmp_path_factory.mktemp("water")
    path = ensure_dataset(
        "water", out_dir=out, chunk_frames=100, keep_partial=True, progress=False, **WATER_SHORT
    )
    return out, path


@pytest.mark.reference
def test_water_sanity_figures_short_run(water_run):
    _, path = water_run
    report = json.loads(path.with_suffix(".json").read_text())
    s = report["sanity"]
    assert 1.01 <= s["oh_bond_mean"] <= 1.04
    assert 2.7 <= s["goo_peak_position"] <= 2.9
    assert 2.2 <= s["goo_peak_height"] <= 3.8
    assert abs(s["T_mean_K"] - 300.0) < max(4 * s["T_sem_K"], 20.0)
    assert report["frames_per_minute"] > 0
    ds = load(path)
    assert ds.n_frames == 200 and ds.n_atoms == 192 and ds.frame_interval_fs == 10.0
    np.testing.assert_allclose(ds.box, 12.44287777)
    assert ds.metadata["units_on_disk"]["velocity"] == "Angstrom/fs"
    # Unwrapped trajectory is continuous (no jumps of a box length between frames).
    step = np.abs(np.diff(ds.unwrapped_positions, axis=0))
    assert step.max() < 1.0
    np.testing.assert_allclose(np.mod(ds.unwrapped_positions, ds.box), ds.positions, atol=1e-9)
    # Velocities match the displacement between frames to first order (10 fs apart).
    fd = (ds.unwrapped_positions[2:] - ds.unwrapped_positions[:-2]) / (2 * 10.0)  # Å/fs
    v = ds.velocities[1:-1] / 10.180505  # Å/(ASE time) -> Å/fs
    o = slice(0, None, 3)  # oxygens move smoothly on 10 fs; hydrogens vibrate faster
    corr = np.corrcoef(fd[:, o].ravel(), v[:, o].ravel())[0, 1]
    assert corr > 0.9


@pytest.mark.reference
def test_water_openmm_energies_forces_match_jax_ewald(water_run):
    from stablejax.data.generate.spcfw_jax import spcfw_energy_fn

    jax = pytest.importorskip("jax")
    _, path = water_run
    ds = load(path)
    energy = spcfw_energy_fn(box=ds.box, n_molecules=64)  # OpenMM's alpha for 6 Å, 1e-5
    grad = jax.jit(jax.value_and_grad(energy))
    for i in (0, 199):
        e, g = grad(ds.unwrapped_positions[i])
        assert abs(float(e) - ds.energies[i]) < 1e-4  # eV, of about -27 eV
        f = -np.asarray(g)
        rel = np.sqrt(np.mean((f - ds.forces[i]) ** 2) / np.mean(ds.forces[i] ** 2))
        assert rel < 1e-4, rel


@pytest.mark.reference
def test_jax_ewald_independent_of_splitting_parameter(water_run):
    from stablejax.data.generate.spcfw_jax import spcfw_energy_fn

    jax = pytest.importorskip("jax")
    _, path = water_run
    x = load(path).unwrapped_positions[0]

    def total(**kw):
        return float(jax.jit(spcfw_energy_fn(box=[12.44287777] * 3, n_molecules=64, **kw))(x))

    e = [total(alpha=a) for a in (0.6, 0.7)]
    # erfc(0.6 * 6) = 3.6e-7: both real-space sums converged, so the total must agree.
    assert abs(e[0] - e[1]) < 2e-5
    # A broken Ewald sum (no reciprocal part) fails the same check.
    broken = [total(alpha=a, kmax=0) for a in (0.6, 0.7)]
    assert abs(broken[0] - broken[1]) > 1e-2


@pytest.mark.reference
def test_water_force_constant_option(water_run):
    import openmm

    from stablejax.data.generate.water import build_spcfw_system

    _, path = water_run
    x = load(path).unwrapped_positions[0] * 0.1  # nm
    e = {}
    for fc in ("mdsim", "published"):
        system = build_spcfw_system(n_molecules=64, box=12.44287777, force_constants=fc)
        ctx = openmm.Context(
            system, openmm.VerletIntegrator(1e-4), openmm.Platform.getPlatformByName("Reference")
        )
        ctx.setPositions(x)
        e[fc] = [
            ctx.getState(getEnergy=True, groups={g}).getPotentialEnergy()._value for g in (0, 1, 2)
        ]
    # Bond and angle energies exactly double; nonbonded unchanged.
    np.testing.assert_allclose(e["mdsim"][:2], 2 * np.array(e["published"][:2]), rtol=1e-10)
    np.testing.assert_allclose(e["mdsim"][2], e["published"][2], rtol=1e-10)


@pytest.mark.reference
def test_water_cache_hit_resume_and_cli(water_run, capsys):
    from stablejax.data.generate.__main__ import main

    out, path = water_run
    mtime = path.stat().st_mtime_ns
    # Same parameters: the cached file is returned without regenerating.
    again = ensure_dataset("water", out_dir=out, progress=False, **WATER_SHORT)
    assert again == path and path.stat().st_mtime_ns == mtime
    assert (
        main(
            [
                "water",
                "--frames",
                "200",
                "--seed",
                "7",
                "--equilibration-ps",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert str(path) in capsys.readouterr().out
    # Interrupted run: final file gone and the last chunk lost; rerun redoes one chunk.
    original = load(path)
    partial = path.with_suffix(".partial")
    first_chunk = partial / "chunk_00000.npz"
    t_first = first_chunk.stat().st_mtime_ns
    path.unlink()
    (partial / "chunk_00001.npz").unlink()
    resumed = load(
        ensure_dataset(
            "water", out_dir=out, chunk_frames=100, keep_partial=True, progress=False, **WATER_SHORT
        )
    )
    assert first_chunk.stat().st_mtime_ns == t_first
    np.testing.assert_allclose(resumed.positions[:100], original.positions[:100])
    # The redone chunk continues from the saved state with the same seed.
    np.testing.assert_allclose(resumed.energies, original.energies, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- molecules


@pytest.fixture(scope="module")
def aspirin_run(tmp_path_factory):
    pytest.importorskip("tblite")
    pytest.importorskip("rdkit")
    out = tmp_path_factory.mktemp("aspirin")
    kw = dict(n_frames=6, seed=3, stride=2, equilibration_ps=0.01, optimize_steps=5, chunk_frames=2)
    path = ensure_dataset("aspirin", out_dir=out, keep_partial=True, progress=False, **kw)
    return out, path, kw


@pytest.mark.reference
def test_aspirin_xtb_dataset_labels_units_and_energies(aspirin_run):
    _, path, _ = aspirin_run
    ds = load(path)
    assert ds.metadata["theory"] == "GFN2-xTB"
    assert "DFT" not in json.dumps(json.loads(path.with_suffix(".json").read_text()))
    assert ds.n_frames == 6 and ds.n_atoms == 21
    assert sorted(np.bincount(ds.species)[[1, 6, 8]]) == [4, 8, 9]
    np.testing.assert_array_equal(ds.metadata["trajectory_starts"], [0, 3])
    assert ds.frame_interval_fs == 1.0
    with np.load(path) as f:
        assert str(f["e_unit"]) == "kcal/mol"
        np.testing.assert_allclose(f["E"][:, 0], ds.energies * KCAL_PER_EV, rtol=2e-6)
    # Recompute frame 0 with tblite directly (eV) to check labels and unit conversion.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ase import Atoms
    from tblite.ase import TBLite

    atoms = Atoms(numbers=ds.species, positions=ds.positions[0])
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    assert abs(atoms.get_potential_energy() - ds.energies[0]) < 1e-5
    # SCF restarts differ between an MD run and a fresh call: ~3e-4 eV/Å. (Storing the
    # FixCom-constrained forces instead, a real bug once, differs by ~0.2 eV/Å.)
    np.testing.assert_allclose(atoms.get_forces(), ds.forces[0], atol=2e-3)


@pytest.mark.reference
def test_aspirin_resume_reproduces_uninterrupted_run(aspirin_run):
    out, path, kw = aspirin_run
    original = load(path)
    partial = path.with_suffix(".partial")
    path.unlink()
    (partial / "traj1_00001.npz").unlink()
    kept = partial / "traj1_00000.npz"
    t_kept = kept.stat().st_mtime_ns
    resumed = load(ensure_dataset("aspirin", out_dir=out, progress=False, keep_partial=True, **kw))
    assert kept.stat().st_mtime_ns == t_kept
    np.testing.assert_allclose(resumed.positions, original.positions, atol=1e-8)
    np.testing.assert_allclose(resumed.energies, original.energies, atol=1e-6)


@pytest.mark.reference
def test_tetrapeptide_geometry_and_one_trajectory(tmp_path):
    pytest.importorskip("tblite")
    pytest.importorskip("rdkit")
    from stablejax.data.generate.xtb import MOLECULES, rdkit_geometry

    z, x = rdkit_geometry(MOLECULES["tetrapeptide"], seed=0)
    assert len(z) == 42  # Ac-Ala3-NHMe, as in MD22
    counts = np.bincount(z)
    assert (counts[1], counts[6], counts[7], counts[8]) == (22, 12, 4, 4)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1) + 10 * np.eye(42)
    assert d.min() > 0.9  # no overlapping atoms in the MMFF geometry
    path = ensure_dataset(
        "tetrapeptide",
        out_dir=tmp_path,
        n_frames=2,
        n_trajectories=1,
        stride=1,
        equilibration_ps=0.002,
        optimize_steps=0,
        progress=False,
    )
    assert not path.with_suffix(".partial").exists()  # chunks removed once assembled
    ds = load(path)
    assert ds.n_atoms == 42 and ds.metadata["theory"] == "GFN2-xTB"
    assert np.all(np.isfinite(ds.forces))


# ------------------------------------------------- molecule thermostat and its error bar


def test_molecule_temperature_sem_matches_langevin_replicas():
    """The sidecar's T_sem_K must match the scatter of <T> between independent runs.

    Plain-NumPy Langevin (BAOAB) of methane in mass-weighted normal coordinates: 9
    harmonic vibrations and 3 free modes (rotations), centre of mass fixed, 500 K,
    friction 1/ps, 3 ps sampled every 5 fs: the generator's production settings. The
    10-block estimate once reported as T_sem_K is several-fold too small here, which
    made a 2-sigma fluctuation of GFN2-xTB aspirin (435 and 445 K) look like a bias.
    """
    from ase.data import atomic_masses

    from stablejax import units
    from stablejax.data.generate.xtb import molecule_sanity

    rng = np.random.default_rng(0)
    species = np.array([6, 1, 1, 1, 1])
    n, reps, temp, gamma = 5, 300, 500.0, 1.0
    geometry = 0.63 * np.array([[0, 0, 0], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1.0]])
    masses = atomic_masses[species]
    # Orthonormal mass-weighted basis orthogonal to the three translations.
    trans = np.zeros((3 * n, 3))
    for a in range(3):
        trans[a::3, a] = np.sqrt(masses)
    basis = np.linalg.qr(np.hstack([trans, rng.normal(size=(3 * n, 3 * n - 3))]))[0][:, 3:]
    periods_fs = np.concatenate([np.zeros(3), np.linspace(100.0, 600.0, 3 * n - 6)])
    omega = np.where(periods_fs > 0, 2 * np.pi / np.maximum(periods_fs, 1) / units.fs, 0.0)
    kT = units.kB * temp
    h, stride, n_frames = 1.0 * units.fs, 5, 600
    c = np.exp(-gamma / units.ps * h)
    # Stationary start: Boltzmann positions of the vibrations, Maxwell momenta.
    q = rng.normal(size=(reps, 3 * n - 3)) * np.sqrt(kT) / np.where(omega > 0, omega, np.inf)
    p = rng.normal(size=(reps, 3 * n - 3)) * np.sqrt(kT)
    frames = np.empty((n_frames, reps, 3 * n - 3))
    for step in range(n_frames * stride):
        p -= 0.5 * h * omega**2 * q
        q += 0.5 * h * p
        p = c * p + np.sqrt((1 - c**2) * kT) * rng.normal(size=p.shape)
        q += 0.5 * h * p
        p -= 0.5 * h * omega**2 * q
        if step % stride == stride - 1:
            frames[step // stride] = p
    # Cartesian velocities (Å/ASE time) of each replica: M^-1/2 B p.
    v = np.einsum("ik,mrk->rmi", basis, frames) / np.repeat(np.sqrt(masses), 3)
    v = v.reshape(reps, n_frames, n, 3)
    positions = np.broadcast_to(geometry, (n_frames, n, 3))
    results = [
        molecule_sanity(
            species,
            positions,
            v[r],
            np.zeros(n_frames),
            temperature_K=temp,
            friction_per_ps=gamma,
            frame_interval_fs=stride * h / units.fs,
        )
        for r in range(reps)
    ]
    means = np.array([s["T_mean_K"] for s in results])
    sem = results[0]["T_sem_K"]
    spread = means.std(ddof=1)
    # Relative standard error of a standard deviation from 300 samples: 4 %.
    assert 0.85 < spread / sem < 1.15, (spread, sem)
    assert abs(means.mean() - temp) < 4 * spread / np.sqrt(reps)
    blocks = np.mean([s["T_sem_blocks_K"] for s in results])
    assert blocks < 0.6 * spread  # the old estimate: why this test exists


class _SpringNetwork:
    """Harmonic springs between atoms closer than 3 Å in a reference geometry (eV, Å)."""

    def __init__(self, positions, k=20.0):
        d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
        i, j = np.triu_indices(len(positions), 1)
        keep = d[i, j] < 3.0
        self.i, self.j, self.d0, self.k = i[keep], j[keep], d[i, j][keep], k
        self.n = len(positions)

    def _terms(self, atoms):
        r = atoms.positions
        v = r[self.i] - r[self.j]
        d = np.linalg.norm(v, axis=1)
        return v, d

    def get_potential_energy(self, atoms=None, **_):
        _, d = self._terms(atoms)
        return 0.5 * self.k * np.sum((d - self.d0) ** 2)

    def get_forces(self, atoms=None, **_):
        v, d = self._terms(atoms)
        g = (self.k * (d - self.d0) / d)[:, None] * v
        f = np.zeros((self.n, 3))
        for a in range(3):
            f[:, a] = np.bincount(self.j, g[:, a], self.n) - np.bincount(self.i, g[:, a], self.n)
        return f


def test_generator_langevin_thermostat_reaches_target_temperature():
    """The generator's thermostat (ASE Langevin + FixCom, 0.5 fs) on a cheap aspirin."""
    pytest.importorskip("rdkit")
    from ase import Atoms
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from stablejax.data.generate.xtb import (
        MOLECULES,
        langevin_dynamics,
        langevin_temperature_sem,
        molecule_sanity,
        rdkit_geometry,
    )

    species, positions = rdkit_geometry(MOLECULES["aspirin"], seed=0)
    atoms = Atoms(numbers=species, positions=positions)
    atoms.calc = _SpringNetwork(positions)
    rng = np.random.default_rng(1)
    MaxwellBoltzmannDistribution(atoms, temperature_K=1000.0, rng=rng)
    temp, gamma, stride, n_frames = 500.0, 10.0, 10, 1000
    dyn = langevin_dynamics(atoms, dt_fs=0.5, temperature_K=temp, friction_per_ps=gamma, rng=rng)
    dyn.run(1000)  # 0.5 ps = 5 / gamma
    assert np.allclose(atoms.get_momenta().sum(axis=0), 0.0, atol=1e-10)
    velocities = np.empty((n_frames, len(species), 3))
    for m in range(n_frames):
        dyn.run(stride)
        velocities[m] = atoms.get_velocities()
    # Same estimator as ASE's (3n - 3 degrees of freedom under FixCom).
    last = molecule_sanity(species, positions[None], velocities[-1:], [0.0])
    assert last["T_mean_K"] == pytest.approx(atoms.get_temperature(), rel=1e-12)
    s = molecule_sanity(
        species,
        np.broadcast_to(positions, velocities.shape),
        velocities,
        np.zeros(n_frames),
        temperature_K=temp,
        friction_per_ps=gamma,
        frame_interval_fs=stride * 0.5,
    )
    sem = langevin_temperature_sem(
        temp, n_atoms=len(species), friction_per_ps=gamma, duration_ps=5.0, n_frames=n_frames
    )
    assert s["T_sem_K"] == pytest.approx(sem)
    assert abs(s["T_mean_K"] - temp) < 4 * sem, (s["T_mean_K"], sem)
