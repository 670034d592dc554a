"""Topology: bonds, molecules and equilibrium bond lengths on aspirin and a water box."""

import ase.io
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from stablejax.data import topology

ASPIRIN = "/work/shared/data/aspirin_md17_dft_frames.xyz"
WATER_BOX = 12.44287777  # Å, the MDsim/StABlE water box (64 molecules)


def water_box(rng, *, n_side=4, box=WATER_BOX, max_tilt_deg=15.0, jitter=0.05):
    """64 SPC/Fw-like waters (O,H,H order) on a jittered lattice, wrapped into the box."""
    r0, theta = 1.012, np.deg2rad(113.24)
    local = np.array(
        [
            [0, 0, 0],
            [r0 * np.sin(theta / 2), r0 * np.cos(theta / 2), 0],
            [-r0 * np.sin(theta / 2), r0 * np.cos(theta / 2), 0],
        ]
    )
    # a common orientation that points no O-H or H-H vector along a lattice axis, plus
    # small random tilts: closest intermolecular pairs ~1.6-1.9 Å, like hydrogen bonds
    local = local @ Rotation.from_euler("xyz", [35, 45, 10], degrees=True).as_matrix().T
    spacing = box / n_side
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    # offset so that molecules in the last layer straddle the periodic boundary
    centres = (grid + 0.9) * spacing + rng.normal(scale=jitter, size=grid.shape)
    rot = Rotation.from_rotvec(
        rng.normal(size=(len(grid), 3)) * np.deg2rad(max_tilt_deg) / np.sqrt(3)
    ).as_matrix()
    x = centres[:, None, :] + np.einsum("mij,aj->mai", rot, local)
    return np.mod(x.reshape(-1, 3), box), np.tile([8, 1, 1], len(grid)), np.full(3, box)


@pytest.fixture(scope="module")
def aspirin():
    return ase.io.read(ASPIRIN, index=":")


def test_aspirin_has_21_bonds_in_every_frame(aspirin):
    # C9H8O4: 6 ring C-C, 4 ring C-H, ring-COOH (C-C, C=O, C-O, O-H), ring-O-C(=O)-CH3
    # (C-O, O-C, C=O, C-C, 3 C-H) = 21 bonds, one connected molecule.
    ref = topology.find_bonds(aspirin[0].numbers, aspirin[0].positions)
    assert ref.shape == (21, 2)
    assert np.all(ref[:, 0] < ref[:, 1])
    z = aspirin[0].numbers
    counts = {}
    for i, j in ref:
        key = tuple(sorted((z[i], z[j])))
        counts[key] = counts.get(key, 0) + 1
    assert counts == {(6, 6): 8, (1, 6): 7, (6, 8): 5, (1, 8): 1}
    for atoms in aspirin:
        np.testing.assert_array_equal(topology.find_bonds(atoms.numbers, atoms.positions), ref)
    assert np.all(topology.molecules(21, ref) == 0)
    # ASE natural_cutoffs (scale 1.0) misses bonds: C-H ~1.09 Å > r_C + r_H = 1.07 Å
    assert len(topology.find_bonds(z, aspirin[0].positions, scale=1.0)) < 21


def test_aspirin_equilibrium_bond_lengths(aspirin):
    x = np.stack([a.positions for a in aspirin])
    bonds = topology.find_bonds(aspirin[0].numbers, x[0])
    eq = topology.equilibrium_bond_lengths(x, bonds)
    direct = np.mean([[np.linalg.norm(f[j] - f[i]) for i, j in bonds] for f in x], axis=0)
    np.testing.assert_allclose(eq, direct, atol=1e-12)
    z = aspirin[0].numbers
    ch = [k for k, (i, j) in enumerate(bonds) if {z[i], z[j]} == {1, 6}]
    assert np.all((eq[ch] > 1.0) & (eq[ch] < 1.2))  # C-H ~1.09 Å


def test_water_box_bonds_and_molecules_across_the_boundary():
    x, z, box = water_box(np.random.default_rng(1))
    bonds = topology.find_bonds(z, x, box=box)
    assert bonds.shape == (128, 2)
    expected = np.array([[3 * m, 3 * m + h] for m in range(64) for h in (1, 2)])
    np.testing.assert_array_equal(bonds, expected)
    mol = topology.molecules(192, bonds)
    np.testing.assert_array_equal(mol, np.arange(192) // 3)
    eq = topology.equilibrium_bond_lengths(x, bonds, box=box)
    np.testing.assert_allclose(eq, 1.012, atol=1e-9)
    # without the box, molecules split by the boundary lose their bonds
    assert len(topology.find_bonds(z, x)) < 128


def test_molecules_labels_follow_atom_order():
    bonds = np.array([[4, 1], [2, 5]])
    np.testing.assert_array_equal(topology.molecules(6, bonds), [0, 1, 2, 3, 1, 2])
    with pytest.raises(ValueError, match="bond indices"):
        topology.molecules(3, np.array([[0, 3]]))


def test_system_from_frames_water_box_across_the_boundary():
    """`system_from_frames`: bonds of the first frame (across the periodic boundary), their
    mean length over all frames, molecules k // 3, and the species and box passed in."""
    rng = np.random.default_rng(5)
    x0, z, box = water_box(rng)
    x1 = x0.copy()
    x1[1] = np.mod(x0[1] + 0.1 * (x0[1] - x0[0]) / np.linalg.norm(x0[1] - x0[0]), box)
    system = topology.system_from_frames(z, np.stack([x0, x1]), box=box)
    assert isinstance(system, topology.System)
    np.testing.assert_array_equal(system.species, z)
    np.testing.assert_array_equal(system.box, box)
    assert len(system.bonds) == 128
    np.testing.assert_array_equal(system.molecules, np.arange(192) // 3)
    first = np.flatnonzero((system.bonds == [0, 1]).all(axis=1))
    assert first.size == 1
    # The stretched bond 0-1 (1.012 Å, then 1.112 Å) averages to 1.062 Å; the rest stay rigid.
    np.testing.assert_allclose(system.equilibrium_lengths[first], 1.062, atol=1e-9)
    rest = np.delete(system.equilibrium_lengths, first)
    np.testing.assert_allclose(rest, 1.012, atol=1e-9)
