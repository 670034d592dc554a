"""SchNet: size against the paper, physical property checks (float64), save/load,
and the ASE calculator."""

from __future__ import annotations

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax.potentials import factory, io, testing
from stablejax.potentials.ase_calculator import StablejaxCalculator
from stablejax.potentials.base import all_pairs_edges
from stablejax.potentials.common import count_params


def _config(**overrides):
    config = factory.default_config("schnet")
    config.species = [1, 6, 8]
    for k, v in overrides.items():
        config[k] = v
    return config


def _schnet_size(n_species, h=64, f=64, t=6, g=25, k=32):
    """Parameter count of SchNet written out layer by layer."""
    embedding = n_species * h
    filter_net = (g * f + f) + (f * f + f)
    interaction = filter_net + h * f + (f * h + h) + (h * h + h)
    head = (h * k + k) + (k + 1)
    return embedding + t * interaction + head


@pytest.fixture(scope="module")
def small():
    """A 2-interaction SchNet (fast) on aspirin, params in float64."""
    potential = factory.build(_config(n_interactions=2, hidden_features=16, n_filters=16))
    species, x = testing.aspirin()
    params = potential.init(jax.random.key(0), species, x, None)
    # Random shifts/scale so the factory's affine map is exercised by every check.
    params = dict(
        params, energy_shift=jnp.array([-13.6, -1029.0, -2041.0]), energy_scale=jnp.asarray(0.7)
    )
    return potential, params, species, x


def test_paper_size():
    species, x = testing.aspirin()
    potential = factory.build(_config())
    # Shapes only: eval_shape traces init without running it.
    params = jax.eval_shape(lambda: potential.init(jax.random.key(0), species, x, None))
    n = count_params(params["net"])
    assert n == _schnet_size(3) == 111_745
    # The paper's 0.12M counts an embedding table for 100 elements (PyG/MDsim SchNet).
    assert _schnet_size(100) == 117_953
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params))


def test_invariances_full_size():
    species, x = testing.aspirin()
    potential = factory.build(_config())
    params = potential.init(jax.random.key(1), species, x, None)
    errors = testing.check_invariances(
        potential, params, species, x, all_pairs_edges(21), atol=1e-10
    )
    assert errors["rotation_forces"] < 1e-10


def test_padding_and_cutoff(small):
    potential, params, species, x = small
    testing.check_padding(potential, params, species, x, all_pairs_edges(21), atol=1e-10)
    # Methyl H moves away from its carbon across the 5 Å cutoff; other pairs stay
    # put or cross smoothly too.
    testing.check_cutoff_smoothness(
        potential,
        params,
        species[[4, 19]],
        x[[4, 19]],
        moving_atom=1,
        anchor_atom=0,
        width=0.01,
        n_points=101,
        energy_atol=1e-9,
        force_atol=1e-3,
    )


def test_energy_is_sum_of_isolated_parts(small):
    potential, params, species, x = small
    # Two copies far apart (> cutoff x interactions) do not interact.
    pair = np.concatenate([x, x + [40.0, 0.0, 0.0]])
    e2 = potential.energy(params, np.tile(species, 2), pair, all_pairs_edges(42))
    e1 = potential.energy(params, species, x, all_pairs_edges(21))
    np.testing.assert_allclose(e2, 2 * e1, rtol=1e-12)


def test_periodic_images():
    # cutoff 2.5 Å, 2 interactions: receptive field 5 Å; box 5.6 Å > 2 x cutoff.
    potential = factory.build(
        _config(cutoff=2.5, n_interactions=2, hidden_features=16, n_filters=16)
    )
    rng = np.random.default_rng(0)
    box = np.array([5.6, 5.8, 6.0])
    while True:
        x = rng.uniform(size=(6, 3)) * box
        d = x[:, None] - x[None]
        d -= box * np.round(d / box)
        if (np.linalg.norm(d, axis=-1) + 9 * np.eye(6)).min() > 0.9:
            break
    species = np.array([8, 1, 1, 8, 1, 6])
    params = potential.init(jax.random.key(2), species, x, box)
    errors = testing.check_periodic_images(
        potential, params, species, x, box, receptive_field=5.0, atol=1e-10
    )
    assert errors["replication"] == 5
    testing.check_invariances(potential, params, species, x, all_pairs_edges(6), box, atol=1e-10)


def test_nve_energy_conservation(small):
    potential, params, species, x = small
    result = testing.check_nve_energy_conservation(
        potential, params, species, x, temperature_K=500.0, dt_fs=0.25, n_steps=200, max_drift=2e-4
    )
    # The run must actually move energy between kinetic and potential forms.
    assert np.ptp(result["kinetic_energy"]) > 100 * result["max_deviation"]


def test_save_load_roundtrip(small, tmp_path):
    potential, params, species, x = small
    path = io.save_model(tmp_path / "model", potential, params)
    with pytest.raises(FileExistsError):
        io.save_model(tmp_path / "model", potential, params)
    loaded, loaded_params = io.load_model(path)
    assert loaded.name == "schnet" and loaded.config.n_interactions == 2
    assert loaded.cutoff == potential.cutoff
    edges = all_pairs_edges(21)
    np.testing.assert_array_equal(
        loaded.per_atom_energies(loaded_params, species, x, edges),
        potential.per_atom_energies(params, species, x, edges),
    )


def test_ase_calculator_molecule(small):
    potential, params, species, x = small
    calc = StablejaxCalculator(potential, params)
    atoms = ase.Atoms(numbers=species, positions=x)
    atoms.calc = calc
    e, f = potential.energy_and_forces(params, species, x, all_pairs_edges(21))
    np.testing.assert_allclose(atoms.get_potential_energy(), e, rtol=1e-13)
    np.testing.assert_allclose(atoms.get_forces(), f, atol=1e-12)
    atoms.positions = x + 0.01
    atoms.get_forces()
    assert calc._eval._cache_size() == 1  # jitted once
    atoms.numbers[0] = 9
    with pytest.raises(ValueError, match=r"\[9\]"):
        atoms.get_potential_energy()


def test_ase_calculator_periodic_neighbour_list():
    potential = factory.build(
        _config(cutoff=3.0, n_interactions=2, hidden_features=16, n_filters=16)
    )
    species, x, box = testing.water_box(n_per_side=2, box_length=6.5)
    params = potential.init(jax.random.key(3), species, x, box)
    atoms = ase.Atoms(numbers=species, positions=x, cell=np.diag(box), pbc=True)
    ref = StablejaxCalculator(potential, params, neighbors="all_pairs")
    atoms.calc = ref
    e_ref, f_ref = atoms.get_potential_energy(), atoms.get_forces()
    calc = StablejaxCalculator(potential, params, neighbors="jax_md", skin=0.3)
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_potential_energy(), e_ref, rtol=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), f_ref, atol=1e-11)
    # Shift every atom, one across the box boundary: list update, same answer as all-pairs.
    atoms.positions = atoms.positions + [0.1, -0.05, 0.02]
    atoms.calc = ref
    e_ref = atoms.get_potential_energy()
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_potential_energy(), e_ref, rtol=1e-12)
    assert calc._eval._cache_size() == 1
