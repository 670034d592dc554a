"""Periodic geometry (`stablejax.geometry`) and general (triclinic) cells end to end (float64).

Checks: minimum image (JAX and NumPy) against a brute-force search over
neighbouring images; host-side cutoff edges against ASE's neighbour list; NVE
MD of Lennard-Jones in a rotated skewed basis of an orthorhombic box against
the orthorhombic run (same trajectory, energy conserved, jax-md cell list
used); the RDF and the RDF criterion of a cell against the orthorhombic
description; an extended-XYZ / npz file with a triclinic cell through the
readers and the trajectory writers.
"""

from __future__ import annotations

import itertools

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import neighbor_list

from stablejax import evaluation, geometry, md, observables, stability, units
from stablejax.data import readers
from stablejax.potentials import factory


def _random_rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _random_cell(rng):
    """A triclinic cell (rows), neither triangular nor orthogonal, of moderate skew."""
    cell = np.diag(rng.uniform(4.0, 7.0, size=3)) + rng.uniform(-1.5, 1.5, size=(3, 3))
    return cell @ _random_rotation(int(rng.integers(1 << 30))).T


def _skewed(box):
    """Cell rows (a, b + a, c): another basis of the lattice of the orthorhombic `box` [3]."""
    assert np.shape(box) == (3,)
    a, b, c = np.diag(box)
    return np.stack([a, b + a, c])


def test_minimum_image_matches_brute_force_over_neighbouring_images():
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(5):
        cell = _random_cell(rng)
        half_width = 0.5 * geometry.perpendicular_widths(cell).min()
        s = rng.uniform(-0.5, 0.5, size=(1000, 3))
        d_in_cell = s @ cell
        # Brute force: the shortest of the 27 images n cell + d, n in {-1, 0, 1}^3.
        shifts = np.array(list(itertools.product((-1, 0, 1), repeat=3))) @ cell
        images = d_in_cell[:, None, :] + shifts[None]
        best = images[np.arange(len(s)), np.argmin(np.linalg.norm(images, axis=-1), axis=1)]
        # The same displacements, moved by random lattice vectors.
        far = rng.integers(-3, 4, size=(len(s), 3)) @ cell
        d = d_in_cell + far
        got_np = geometry.minimum_image_np(d, cell)
        got_jax = np.asarray(geometry.minimum_image(jnp.asarray(d), jnp.asarray(cell)))
        np.testing.assert_allclose(got_jax, got_np, rtol=0, atol=1e-12)
        # Always a lattice translate of the input.
        n = (d - got_np) @ np.linalg.inv(cell)
        np.testing.assert_allclose(n, np.round(n), atol=1e-9)
        # Exact whenever the nearest image is shorter than half the smallest width.
        exact = np.linalg.norm(best, axis=-1) < half_width
        np.testing.assert_allclose(got_np[exact], best[exact], atol=1e-10)
        compared += int(exact.sum())
    assert compared > 1000


def test_orthorhombic_minimum_image_is_unchanged():
    rng = np.random.default_rng(1)
    box = np.array([5.0, 6.5, 7.25])
    d = rng.uniform(-20, 20, size=(50, 3))
    old = d - box * np.round(d / box)  # the expression the module replaced
    np.testing.assert_array_equal(geometry.minimum_image_np(d, box), old)
    got = geometry.minimum_image(jnp.asarray(d), jnp.asarray(box))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(d - box * jnp.round(d / box)))
    np.testing.assert_array_equal(geometry.minimum_image_np(d, None), d)
    with pytest.raises(ValueError, match=r"\[3\] or \[3, 3\]"):
        geometry.minimum_image_np(d, np.ones(2))


def test_cutoff_edges_match_ase_neighbour_list():
    rng = np.random.default_rng(2)
    cell = np.array([[9.0, 0.0, 0.0], [3.0, 8.5, 0.0], [-2.0, 1.5, 9.5]])
    atoms = ase.Atoms("Ar30", positions=rng.uniform(size=(30, 3)) @ cell, cell=cell, pbc=True)
    cutoff = 3.5
    assert geometry.cutoff_fits_cell(cutoff, cell)
    edges = geometry.cutoff_edges_np(atoms.positions, cutoff, cell)
    i, j = neighbor_list("ij", atoms, cutoff)
    assert len(i) > 20
    assert set(zip(*edges.tolist(), strict=True)) == set(zip(i.tolist(), j.tolist(), strict=True))
    with pytest.raises(ValueError, match="half the shortest box side"):
        geometry.cutoff_edges_np(atoms.positions, 4.5, cell)


# ------------------------------------------------------------------------------- MD

L = 20.0  # Å, cubic box side; the skewed basis has perpendicular widths (L/sqrt2, L, L)
CUTOFF, SKIN = 3.0, 0.5  # Å; widths / (cutoff + skin) >= 4: the jax-md cell list is used


def _lj_system():
    config = factory.default_config("lennard_jones")
    config.sigma, config.epsilon, config.cutoff, config.shift = 1.2, 0.02, CUTOFF, True
    potential = factory.build(config)
    params = potential.init(None, None, np.zeros((1, 3)), None)
    rng = np.random.default_rng(3)
    g = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = (g + 0.5) * (L / 8) + rng.uniform(-0.3, 0.3, size=g.shape)  # 512 atoms, 2.5 Å apart
    species = np.full(len(x), 18)
    masses = np.full(len(x), 39.948)
    v = rng.normal(size=x.shape) * np.sqrt(units.kB * 300.0 / masses[:, None])
    v -= v.mean(axis=0)
    return potential, params, species, x, v


def _run_nve(potential, params, species, x, v, box, n_steps=100):
    def energy_fn(p, positions, edges, b):
        return potential.energy(p, species, positions, edges, b)

    sim = md.Simulator(
        energy_fn,
        species=species,
        box=box,
        integrator=md.NVE(dt_fs=2.0),
        cutoff=CUTOFF,
        skin=SKIN,
        chunk_steps=50,
    )
    state = sim.init(jax.random.key(0), params, x[None], 0.0, velocities=v[None])
    state, traj = sim.run(params, state, n_steps, record_every=10)
    return sim, state, traj


def test_nve_in_a_rotated_skewed_cell_matches_the_orthorhombic_run():
    potential, params, species, x, v = _lj_system()
    box = np.full(3, L)
    rot = _random_rotation(4)
    cell = _skewed(box) @ rot.T  # general (not triangular) cell matrix
    assert geometry.cutoff_fits_cell(CUTOFF, cell)
    sim_o, state_o, ref = _run_nve(potential, params, species, x, v, box)
    sim_t, state_t, got = _run_nve(potential, params, species, x @ rot.T, v @ rot.T, cell)
    # The triclinic run went through jax-md's cell list, not the all-pairs fallback.
    assert sim_t._layout.cell_list_fn is not None
    assert got.box.shape == (1, 10, 3, 3)
    np.testing.assert_allclose(got.box[0, -1], cell, rtol=0, atol=0)
    # Same trajectory (rotated) and energies; unwrapped positions agree directly.
    np.testing.assert_allclose(got.position @ rot, ref.position, rtol=0, atol=1e-8)
    np.testing.assert_allclose(got.potential_energy, ref.potential_energy, rtol=1e-9)
    np.testing.assert_allclose(got.kinetic_energy, ref.kinetic_energy, rtol=1e-9)
    # Positions modulo the lattice: wrapping into either description gives the same
    # fractional coordinates of the orthorhombic lattice.
    frac_o = np.mod(ref.position[0, -1] / L, 1.0)
    wrapped = geometry.wrap_positions_np(got.position[0, -1], cell) @ rot
    frac_t = np.mod(wrapped / L, 1.0)
    diff = frac_t - frac_o
    np.testing.assert_allclose(diff - np.round(diff), 0.0, atol=1e-9)
    # The atoms interact and move; NVE conserves the energy.
    assert np.ptp(ref.potential_energy) > 1e-3
    assert np.abs(got.position[0, -1] - got.position[0, 0]).max() > 0.1
    total = got.potential_energy[0] + got.kinetic_energy[0]
    assert np.abs(total - total[0]).max() < 2e-4 * got.kinetic_energy[0].mean()
    assert float(sim_t.conserved_energy(state_t)[0]) == pytest.approx(total[-1], rel=1e-12)


def test_general_cell_refusals():
    potential, params, species, x, _ = _lj_system()
    cell = _skewed(np.full(3, L))

    def energy_fn(p, positions, edges, b):
        return potential.energy(p, species, positions, edges, b)

    with pytest.raises(ValueError, match="box: BerendsenNPT"):
        md.Simulator(
            energy_fn, species=species, box=cell, integrator=md.BerendsenNPT(), cutoff=CUTOFF
        )
    # A cutoff beyond half the width (L/sqrt2 = 14.1 Å) gets image-shift edges.
    sim = md.Simulator(energy_fn, species=species, box=cell, cutoff=7.5)
    assert md.neighbors.uses_images(sim.cutoff, sim.skin, cell[None])
    assert not md.neighbors.uses_images(CUTOFF, sim.skin, cell[None])
    with pytest.raises(ValueError, match="Degenerate"):
        md.Simulator(energy_fn, species=species, box=np.ones((3, 3)), cutoff=CUTOFF)


# ------------------------------------------------------------------- observables


def test_rdf_and_rdf_criterion_of_a_cell_match_the_orthorhombic_description():
    rng = np.random.default_rng(5)
    box = np.array([9.0, 10.0, 9.5])
    rot = _random_rotation(6)
    cell = _skewed(box) @ rot.T
    x = rng.uniform(size=(4, 60, 3)) * box  # 4 frames, 60 atoms
    species = np.where(np.arange(60) % 3 == 0, 8, 1)
    r_max = 3.0  # < half the smallest width 9 * 10 / hypot(9, 10) / 2 = 3.34 Å
    kw = dict(pair=(8, 1), r_max=r_max, dr=0.05, sigma=0.02)
    g_o = observables.radial_distribution_function(x, species, box, **kw)
    g_t = observables.radial_distribution_function(x @ rot.T, species, cell, **kw)
    np.testing.assert_allclose(g_t, g_o, rtol=1e-10, atol=1e-12)
    assert float(jnp.max(g_o)) > 0.5  # pairs across the boundaries are counted
    # The density uses the cell volume |det| (a rotated cell's diagonal is not its sides).
    assert float(geometry.cell_volume(cell)) == pytest.approx(float(np.prod(box)), rel=1e-12)
    # Beyond half the width the RDF counts periodic images (tests/test_image_edges.py);
    # the bins below it are unchanged.
    g_far = observables.radial_distribution_function(
        x @ rot.T, species, cell, **dict(kw, r_max=3.5)
    )
    np.testing.assert_allclose(g_far[:, :50], g_t[:, :50], rtol=1e-10, atol=1e-12)
    # The RDF criterion: shared cell and one cell per frame agree with the box.
    refs = {(8, 1): np.asarray(g_o).mean(0) * 0.9}
    settings = dict(r_max=r_max, dr=0.05, sigma=0.02)
    crit_o = stability.rdf_mae_criterion(species, box, refs, **settings)
    crit_t = stability.rdf_mae_criterion(species, cell, refs, **settings)
    m_o = crit_o.metric(x)
    np.testing.assert_allclose(crit_t.metric(x @ rot.T), m_o, rtol=1e-10)
    per_frame = np.broadcast_to(cell, (4, 3, 3))
    np.testing.assert_allclose(crit_t.metric(x @ rot.T, per_frame), m_o, rtol=1e-10)
    # Closest-pair metrics with per-frame cells [..., 3, 3].
    crit = stability.intermolecular_distance_criterion(np.arange(60), box=cell)
    np.testing.assert_allclose(
        crit.metric(x @ rot.T, per_frame),
        stability.intermolecular_distance_criterion(np.arange(60), box=box).metric(x),
        rtol=1e-12,
    )


# ------------------------------------------------------------------------ files


def test_triclinic_extxyz_and_npz_round_trip_through_the_readers(tmp_path):
    rng = np.random.default_rng(7)
    cell = np.array([[6.0, 0.0, 0.0], [2.0, 5.5, 0.0], [1.0, -1.5, 6.5]]) @ _random_rotation(8).T
    n, m = 6, 3
    species = np.array([8, 1, 1, 8, 1, 1])
    x = rng.uniform(-1.0, 2.0, size=(m, n, 3)) @ cell  # partly outside the cell
    energies = rng.normal(size=m)
    forces = rng.normal(size=(m, n, 3))
    frames = []
    for k in range(m):
        atoms = ase.Atoms(numbers=species, positions=x[k], cell=cell, pbc=True)
        atoms.info["energy"] = energies[k]
        atoms.arrays["forces"] = forces[k]
        frames.append(atoms)
    path = tmp_path / "tri.extxyz"
    ase.io.write(path, frames, format="extxyz")
    data = readers.load(path)
    assert data.box.shape == (3, 3)
    np.testing.assert_allclose(data.box, cell, atol=1e-7)
    np.testing.assert_allclose(data.energies, energies, rtol=1e-7)
    np.testing.assert_allclose(data.forces, forces, atol=1e-7)
    # Positions wrapped into the cell: fractional coordinates in [0, 1), same lattice sites.
    frac = data.positions @ np.linalg.inv(cell)
    assert np.all(frac > -1e-9) and np.all(frac < 1 + 1e-9)
    shift = (data.positions - x) @ np.linalg.inv(cell)
    np.testing.assert_allclose(shift, np.round(shift), atol=1e-6)
    assert np.abs(np.round(shift)).max() >= 1  # something was actually wrapped
    # npz (sGDML 'lattice') round trip keeps the full cell.
    npz = readers.write_sgdml_npz(tmp_path / "tri.npz", data, energy_unit="eV")
    again = readers.read_sgdml_npz(npz)
    np.testing.assert_allclose(again.box, data.box, rtol=1e-12)
    np.testing.assert_allclose(again.positions, data.positions, atol=1e-12)
    # An orthorhombic file still gives a [3] box.
    frames[0].set_cell(np.diag([6.0, 7.0, 8.0]), scale_atoms=False)
    ase.io.write(tmp_path / "ortho.extxyz", frames[:1], format="extxyz")
    np.testing.assert_array_equal(readers.load(tmp_path / "ortho.extxyz").box, [6.0, 7.0, 8.0])


def test_trajectory_writers_keep_the_cell(tmp_path):
    rng = np.random.default_rng(9)
    cell = np.array([[6.0, 0.0, 0.0], [2.0, 5.5, 0.0], [1.0, -1.5, 6.5]])
    species = np.array([18, 18, 18])
    pos = rng.uniform(size=(1, 2, 3, 3)) @ cell  # [R, K, n, 3]
    kept = {
        "pos": [pos],
        "vel": [None],
        "box": [np.broadcast_to(cell, (1, 2, 3, 3))],
        "energy": [np.zeros((1, 2))],
        "times": [np.array([0.1, 0.2])],
    }
    evaluation._write_trajectories(tmp_path, kept, species, cell, np.array([np.inf]))
    frames = ase.io.read(tmp_path / "replica_000.extxyz", index=":")
    assert len(frames) == 2
    np.testing.assert_allclose(np.asarray(frames[1].cell), cell, atol=1e-7)
    md.write_trajectory(tmp_path / "r.extxyz", pos[0], species, box=cell)
    np.testing.assert_allclose(readers.load(tmp_path / "r.extxyz").box, cell, atol=1e-7)
    md.write_trajectory(tmp_path / "r.npz", pos[0], species, box=cell)
    assert np.load(tmp_path / "r.npz")["box"].shape == (2, 3, 3)


def test_min_intermolecular_observable_uses_the_cell_minimum_image():
    """The training observable 'min_intermolecular_distance' in a skewed cell equals a
    brute force over the 27 nearest images (a private orthorhombic round was wrong here)."""

    import ml_collections

    from stablejax.data import System
    from stablejax.training import targets

    rng = np.random.default_rng(3)
    cell = np.array([[6.0, 0.0, 0.0], [4.5, 5.0, 0.0], [1.0, 2.0, 6.5]])
    mol = np.array([0, 0, 1, 1, 2, 2])
    frames = rng.uniform(0, 1, (4, 6, 3)) @ cell
    config = ml_collections.ConfigDict({"stable": {"estimator": "global", "local_k_nearest": 0}})
    system = System(species=np.ones(6, int), box=cell, molecules=mol)
    target = targets.min_intermolecular_target(config, system, frames)
    shifts = np.array(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij")).reshape(3, -1).T @ cell
    expected = []
    for x in frames:
        best = np.inf
        for a in range(6):
            for b in range(6):
                if mol[a] != mol[b]:
                    d = x[b] - x[a] + shifts
                    best = min(best, np.linalg.norm(d, axis=-1).min())
        expected.append(best)
    got = [float(target.observable_fn(jnp.asarray(x))[0]) for x in frames]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
