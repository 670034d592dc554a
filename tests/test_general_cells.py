"""General (triclinic) periodic cells, small cells (supercells) and stress (float64).

Checks: a triclinic cell against the same lattice in an orthorhombic
description, a cell narrower than twice the cutoff against an independent
Lennard-Jones sum over ASE's neighbour list, the stress against ASE's finite
differences, free-space stress refusal, and loading a saved model.
"""

from __future__ import annotations

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.geometry import get_distances
from ase.neighborlist import neighbor_list

from stablejax.potentials import factory, io
from stablejax.potentials.ase_calculator import StablejaxCalculator, supercell_repeats
from stablejax.potentials.base import (
    all_pairs_edges,
    cutoff_fits_cell,
    minimum_image,
    perpendicular_widths,
)

CUTOFF = 3.0  # Å, both models


def _schnet():
    config = factory.default_config("schnet")
    config.species = [1, 8]
    config.cutoff = CUTOFF
    config.n_interactions = 2
    config.hidden_features = 8
    config.n_filters = 8
    config.head_features = 8
    config.n_gaussians = 8
    potential = factory.build(config)
    species = np.array([8, 1, 1, 8])
    params = potential.init(jax.random.key(0), species, np.eye(4, 3) * 1.5, None)
    # A non-trivial scale so energies, forces and stresses are O(1).
    params = dict(params, energy_shift=jnp.array([-0.3, -1.2]), energy_scale=jnp.asarray(4.0))
    return potential, params


def _lennard_jones(sigma=1.5, epsilon=0.2, cutoff=CUTOFF):
    config = factory.default_config("lennard_jones")
    config.sigma, config.epsilon, config.cutoff, config.shift = sigma, epsilon, cutoff, True
    potential = factory.build(config)
    return potential, potential.init(None, None, np.zeros((1, 3)), None)


MODELS = {"schnet": _schnet, "lennard_jones": _lennard_jones}


def random_atoms(cell, n, *, min_dist, seed):
    """n atoms at random in a periodic cell [3, 3] Å, no two (images) closer than min_dist Å."""
    rng = np.random.default_rng(seed)
    cell = np.asarray(cell, dtype=np.float64)
    positions = np.zeros((0, 3))
    while len(positions) < n:
        x = rng.uniform(size=3) @ cell
        if len(positions):
            _, d = get_distances(x[None], positions, cell=cell, pbc=True)
            if d.min() < min_dist:
                continue
        positions = np.vstack([positions, x])
    numbers = np.where(np.arange(n) % 3 == 0, 8, 1)
    return ase.Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)


def _results(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return dict(
        energy=atoms.get_potential_energy(),
        energies=atoms.get_potential_energies(),
        forces=atoms.get_forces(),
        stress=atoms.get_stress(voigt=False),
    )


def _random_rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_cell_geometry_helpers():
    a, b, c = 9.0, 10.0, 9.5
    skewed = np.array([[0, b, 0], [a, b, 0], [0, 0, c]])  # (b, a + b, c): same lattice
    widths = perpendicular_widths(skewed)
    np.testing.assert_allclose(widths, [a * b / np.hypot(a, b), a, c], rtol=1e-14)
    np.testing.assert_allclose(perpendicular_widths([a, b, c]), [a, b, c], rtol=1e-14)
    assert cutoff_fits_cell(3.3, skewed) and not cutoff_fits_cell(3.4, skewed)
    assert not cutoff_fits_cell(4.5, [a, b, c]) and cutoff_fits_cell(4.49, [a, b, c])
    np.testing.assert_array_equal(supercell_repeats(3.3, skewed), [1, 1, 1])
    np.testing.assert_array_equal(supercell_repeats(4.0, skewed), [2, 1, 1])
    np.testing.assert_array_equal(supercell_repeats(10.0, [a, b, c]), [3, 3, 3])
    with pytest.raises(ValueError, match="Degenerate"):
        perpendicular_widths([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]])
    # The nearest image in a sheared cell is not the one that rounding Cartesian
    # components would give.
    cell = jnp.array([[4.0, 0, 0], [2.0, 4.0, 0], [0, 0, 5.0]])
    np.testing.assert_allclose(minimum_image(jnp.array([3.5, 0.5, 0.0]), cell), [-0.5, 0.5, 0])
    np.testing.assert_allclose(minimum_image(jnp.array([1.5, 3.5, 0.0]), cell), [-0.5, -0.5, 0])


@pytest.mark.parametrize("model", MODELS)
def test_skewed_basis_of_an_orthorhombic_lattice_gives_the_same_results(model):
    """[3] box vs the [3, 3] cell (b, a + b, c) of the same lattice, directly and via ASE."""
    potential, params = MODELS[model]()
    a, b, c = 9.0, 10.0, 9.5
    box = np.array([a, b, c])
    skewed = np.array([[0, b, 0], [a, b, 0], [0, 0, c]])
    assert cutoff_fits_cell(potential.cutoff, skewed)
    atoms = random_atoms(np.diag(box), 24, min_dist=1.4, seed=1)
    species, x = atoms.numbers, atoms.positions
    edges = all_pairs_edges(len(atoms))
    e_box, f_box = potential.energy_and_forces(params, species, x, edges, box)
    e_cell, f_cell = potential.energy_and_forces(params, species, x, edges, skewed)
    np.testing.assert_allclose(e_cell, e_box, rtol=1e-12)
    np.testing.assert_allclose(f_cell, f_box, atol=1e-11)
    assert np.abs(f_box).max() > 1e-2  # atoms interact, across the boundaries too

    ortho = _results(StablejaxCalculator(potential, params, neighbors="jax_md"), atoms)
    atoms.set_cell(skewed, scale_atoms=False)
    tri = _results(StablejaxCalculator(potential, params), atoms)
    for key in ortho:
        np.testing.assert_allclose(tri[key], ortho[key], rtol=1e-11, atol=1e-11, err_msg=key)


@pytest.mark.parametrize("model", MODELS)
def test_triclinic_cell_matches_its_orthorhombic_supercell(model):
    """A rotated triclinic cell vs the 4x larger orthorhombic cell of its lattice.

    Lattice a = (4.4, 0, 0), b = (2.2, 4.1, 0), c = (2.2, 0, 4.6) contains
    a, 2b - a and 2c - a: the box (4.4, 8.2, 9.2) holds the copies x, x + b,
    x + c, x + b + c. Both cells are narrower than twice the cutoff
    (supercell path).
    """
    potential, params = MODELS[model]()
    cell = np.array([[4.4, 0, 0], [2.2, 4.1, 0], [2.2, 0, 4.6]])
    atoms = random_atoms(cell, 5, min_dist=1.4, seed=2)
    n = len(atoms)
    box = np.array([4.4, 8.2, 9.2])
    copies = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]]) @ cell
    big = ase.Atoms(
        numbers=np.tile(atoms.numbers, 4),
        positions=(atoms.positions[None] + copies[:, None]).reshape(-1, 3),
        cell=np.diag(box),
        pbc=True,
    )
    big.wrap()
    assert not cutoff_fits_cell(potential.cutoff, cell)
    ref = _results(StablejaxCalculator(potential, params, neighbors="jax_md"), big)
    # Rotate the triclinic system: a general (not upper-triangular) cell matrix.
    rot = _random_rotation(3)
    atoms.set_cell(cell @ rot.T, scale_atoms=False)
    atoms.positions = atoms.positions @ rot.T
    got = _results(StablejaxCalculator(potential, params), atoms)
    np.testing.assert_allclose(got["energy"], ref["energy"] / 4, rtol=1e-11)
    np.testing.assert_allclose(got["energies"], ref["energies"][:n], rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(got["forces"] @ rot, ref["forces"][:n], atol=1e-10)
    np.testing.assert_allclose(rot.T @ got["stress"] @ rot, ref["stress"], atol=1e-11)
    assert np.abs(ref["forces"]).max() > 1e-2 and np.abs(ref["stress"]).max() > 1e-4


def _lennard_jones_reference(atoms, sigma, epsilon, cutoff):
    """Energy, per-atom energies, forces and stress of shifted LJ from ASE's neighbour list."""
    i, d, vec = neighbor_list("idD", atoms, cutoff)  # every ordered pair and image once

    def lj(r):
        return 4 * epsilon * ((sigma / r) ** 12 - (sigma / r) ** 6)

    phi = lj(d) - lj(cutoff)
    dphi = 4 * epsilon * (-12 * sigma**12 / d**13 + 6 * sigma**6 / d**7)
    n = len(atoms)
    energies = 0.5 * np.bincount(i, weights=phi, minlength=n)
    forces = np.zeros((n, 3))
    np.add.at(forces, i, (dphi / d)[:, None] * vec)
    virial = 0.5 * np.einsum("p,pa,pb->ab", dphi / d, vec, vec)
    return energies.sum(), energies, forces, virial / atoms.get_volume()


@pytest.mark.parametrize(
    "cell",
    [
        np.diag([3.2, 3.5, 3.8]),
        np.array([[3.4, 0.0, 0.0], [1.0, 3.3, 0.0], [0.6, -0.8, 3.6]]),
    ],
    ids=["orthorhombic", "triclinic"],
)
@pytest.mark.parametrize("neighbors", ["jax_md", "all_pairs"])
def test_small_cell_matches_ase_neighbour_list_lennard_jones(cell, neighbors):
    """Cutoff 4 Å > every cell side: many images of each atom, its own included."""
    sigma, epsilon, cutoff = 1.2, 0.3, 4.0
    potential, params = _lennard_jones(sigma, epsilon, cutoff)
    atoms = random_atoms(cell, 3, min_dist=1.3, seed=4)
    assert np.all(supercell_repeats(cutoff, cell) == 3)
    atoms.calc = StablejaxCalculator(potential, params, neighbors=neighbors)
    energy, energies, forces, stress = _lennard_jones_reference(atoms, sigma, epsilon, cutoff)
    np.testing.assert_allclose(atoms.get_potential_energy(), energy, rtol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energies(), energies, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(atoms.get_forces(), forces, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), stress, rtol=1e-11, atol=1e-14)
    assert np.abs(forces).max() > 1e-2


@pytest.mark.parametrize(
    "cell",
    [
        np.diag([5.0, 5.5, 6.3]),
        np.array([[5.0, 0.0, 0.0], [1.5, 5.2, 0.0], [0.8, -1.0, 5.6]]),
    ],
    ids=["orthorhombic", "triclinic"],
)
def test_stress_matches_finite_differences(cell):
    potential, params = _schnet()
    atoms = random_atoms(cell, 6, min_dist=1.2, seed=5)
    atoms.calc = StablejaxCalculator(potential, params, neighbors="all_pairs")
    stress = atoms.get_stress()
    assert np.abs(stress).max() > 1e-3
    numerical = calculate_numerical_stress(atoms, eps=1e-5)  # central differences
    np.testing.assert_allclose(stress, numerical, rtol=1e-5, atol=1e-9)
    assert atoms.calc._eval._cache_size() == 1  # deformed cells reuse the compiled function
    # The jax-md neighbour-list path gives the same stress.
    atoms.calc = StablejaxCalculator(potential, params, neighbors="jax_md")
    np.testing.assert_allclose(atoms.get_stress(), stress, rtol=1e-11, atol=1e-13)


def test_free_space_stress_raises():
    potential, params = _lennard_jones()
    atoms = ase.Atoms("H3", positions=[[0, 0, 0], [1.6, 0, 0], [0, 1.7, 0.2]])
    atoms.calc = StablejaxCalculator(potential, params)
    assert np.isfinite(atoms.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        atoms.get_stress()


def test_from_saved_model_round_trip(tmp_path):
    potential, params = _schnet()
    path = io.save_model(tmp_path / "model", potential, params)
    atoms = random_atoms(
        np.array([[5.0, 0, 0], [1.5, 5.2, 0], [0.8, -1.0, 5.6]]), 6, min_dist=1.2, seed=6
    )
    loaded = StablejaxCalculator.from_saved_model(path, neighbors="all_pairs")
    assert loaded.potential.name == "schnet" and loaded.neighbors == "all_pairs"
    got = _results(loaded, atoms)
    ref = _results(StablejaxCalculator(potential, params, neighbors="all_pairs"), atoms)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
