"""Readers, unit conversion, bad-input errors, splits and initial conditions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from stablejax import data
from stablejax.data import DataFormatError, load
from stablejax.data.readers import write_mdsim_water, write_sgdml_npz
from stablejax.data.splits import sample_initial_conditions, split_dataset, split_indices

# Independent of stablejax.units: the MD17/MDsim convention quoted in DESIGN.md.
KCAL_PER_EV = 23.06052
SHARED_ASPIRIN = Path(__file__).resolve().parents[2] / "shared/data/aspirin_md17_dft_frames.xyz"
if not SHARED_ASPIRIN.exists():
    SHARED_ASPIRIN = Path("/work/shared/data/aspirin_md17_dft_frames.xyz")


def _molecule(m=5, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        z=np.array([6, 8, 1, 1][:n]),
        R=rng.normal(size=(m, n, 3)) * 1.5,
        E_kcal=-1000.0 + rng.normal(size=m),
        F_kcal=rng.normal(size=(m, n, 3)) * 30,
    )


def _water_velocities_A_per_fs(m, n_mol, T, rng):
    """Maxwell-Boltzmann velocities in Å/fs, computed without ASE: v = sqrt(kT/m)."""
    kB_J = 1.380649e-23
    amu = 1.66053906660e-27
    masses = np.tile([15.999, 1.008, 1.008], n_mol) * amu
    sigma = np.sqrt(kB_J * T / masses) * 1e10 / 1e15  # m/s -> Å/fs
    return rng.normal(size=(m, 3 * n_mol, 3)) * sigma[None, :, None]


def _mdsim_dict(m=6, n_mol=4, box=6.0, seed=0, velocity_scale=1.0):
    rng = np.random.default_rng(seed)
    unwrapped = rng.uniform(-2, 8, size=(m, 3 * n_mol, 3))
    return {
        "wrapped_coords": np.mod(unwrapped, box),
        "unwrapped_coords": unwrapped,
        "velocities": _water_velocities_A_per_fs(m, n_mol, 300.0, rng) * velocity_scale,
        "energy": (-50.0 + rng.normal(size=m))[:, None],
        "forces": rng.normal(size=(m, 3 * n_mol, 3)) * 20,
        "atom_types": np.tile([8, 1, 1], n_mol),
        "lengths": np.full((m, 3), box),
        "angles": np.full((m, 3), 90.0),
    }


# ----------------------------------------------------------------------- round trips


@pytest.mark.parametrize("e_shape", ["flat", "column"])
def test_sgdml_npz_reads_kcal_and_converts_to_ev(tmp_path, e_shape):
    mol = _molecule()
    E = mol["E_kcal"] if e_shape == "flat" else mol["E_kcal"][:, None]
    path = tmp_path / "md17.npz"
    np.savez(path, R=mol["R"], z=mol["z"], E=E, F=mol["F_kcal"])
    ds = load(path)
    assert ds.metadata["format"] == "sgdml_npz"
    np.testing.assert_array_equal(ds.species, mol["z"])
    np.testing.assert_allclose(ds.positions, mol["R"])
    np.testing.assert_allclose(ds.energies * KCAL_PER_EV, mol["E_kcal"], rtol=2e-6)
    np.testing.assert_allclose(ds.forces * KCAL_PER_EV, mol["F_kcal"], rtol=2e-6)
    assert ds.box is None and ds.velocities is None and ds.frame_interval_fs is None
    # An explicit unit overrides the MD17 convention.
    ds_ev = load(path, energy_unit="eV")
    np.testing.assert_allclose(ds_ev.energies, mol["E_kcal"])


def test_sgdml_writer_round_trip_with_units_and_theory(tmp_path):
    mol = _molecule(seed=1)
    ds = data.Dataset(
        species=mol["z"],
        positions=mol["R"],
        energies=mol["E_kcal"] / KCAL_PER_EV,
        forces=mol["F_kcal"] / KCAL_PER_EV,
        frame_interval_fs=5.0,
    )
    for unit in ("kcal/mol", "eV", "Hartree", "kJ/mol"):
        path = write_sgdml_npz(
            tmp_path / f"x_{unit.replace('/', '_')}.npz", ds, energy_unit=unit, theory="GFN2-xTB"
        )
        back = load(path)
        np.testing.assert_allclose(back.energies, ds.energies, rtol=1e-12)
        np.testing.assert_allclose(back.forces, ds.forces, rtol=1e-12)
        assert back.metadata["theory"] == "GFN2-xTB"
        assert back.frame_interval_fs == 5.0
    with np.load(tmp_path / "x_Hartree.npz") as f:
        # 1 Hartree = 27.211386 eV, independent constant.
        np.testing.assert_allclose(f["E"][:, 0] * 27.211386, ds.energies, rtol=1e-6)


def test_rmd17_npz_round_trip(tmp_path):
    mol = _molecule(seed=2)
    path = tmp_path / "rmd17_aspirin.npz"
    np.savez(
        path,
        coords=mol["R"],
        energies=mol["E_kcal"],
        forces=mol["F_kcal"],
        nuclear_charges=mol["z"],
        old_indices=np.arange(5),
    )
    ds = load(path)
    assert ds.metadata["format"] == "rmd17_npz"
    np.testing.assert_allclose(ds.energies * KCAL_PER_EV, mol["E_kcal"], rtol=2e-6)
    np.testing.assert_allclose(ds.forces * KCAL_PER_EV, mol["F_kcal"], rtol=2e-6)
    np.testing.assert_allclose(ds.positions, mol["R"])
    nm = load(path, length_unit="nm")
    np.testing.assert_allclose(nm.positions, 10 * mol["R"])
    np.testing.assert_allclose(nm.forces, ds.forces / 10)


def test_mdsim_water_round_trip_velocities_in_angstrom_per_fs(tmp_path):
    raw = _mdsim_dict()
    path = tmp_path / "water.npy"
    np.save(path, raw, allow_pickle=True)
    ds = load(path)
    assert ds.metadata["format"] == "mdsim_water_npy"
    assert ds.metadata["units_on_disk"]["velocity"] == "Angstrom/fs"
    np.testing.assert_allclose(ds.box, [6.0, 6.0, 6.0])
    assert ds.frame_interval_fs == 10.0
    np.testing.assert_allclose(ds.positions, raw["wrapped_coords"])
    np.testing.assert_allclose(ds.unwrapped_positions, raw["unwrapped_coords"])
    np.testing.assert_allclose(ds.energies * KCAL_PER_EV, raw["energy"][:, 0], rtol=2e-6)
    np.testing.assert_allclose(ds.forces * KCAL_PER_EV, raw["forces"], rtol=2e-6)
    # ASE time unit = 10.1805 fs: Å/(ASE time) = Å/fs * 10.1805.
    np.testing.assert_allclose(ds.velocities, raw["velocities"] * 10.180505, rtol=1e-6)
    # Our writer reproduces the file.
    back = load(write_mdsim_water(tmp_path / "again.npy", ds))
    for name in ("positions", "unwrapped_positions", "energies", "forces", "velocities"):
        np.testing.assert_allclose(getattr(back, name), getattr(ds, name), rtol=1e-12)


@pytest.mark.parametrize(("scale", "unit"), [(100.0, "nm/ps"), (1000.0, "Angstrom/ps")])
def test_mdsim_velocity_unit_detected_from_temperature(tmp_path, scale, unit):
    raw = _mdsim_dict(m=20, n_mol=16, box=8.0, velocity_scale=scale)
    path = tmp_path / "water.npy"
    np.save(path, raw, allow_pickle=True)
    ds = load(path)
    assert ds.metadata["units_on_disk"]["velocity"] == unit
    reference = load(path, velocity_unit=unit)
    np.testing.assert_allclose(ds.velocities, reference.velocities)
    # Forcing the wrong unit is allowed and changes the result by the exact factor.
    wrong = load(path, velocity_unit="Angstrom/fs")
    np.testing.assert_allclose(wrong.velocities, ds.velocities * scale)
    assert load(path, velocity_unit=None).velocities is None


def test_extxyz_units_default_hint_and_option(tmp_path):
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    mol = _molecule(seed=3)
    frames = []
    for R, E, F in zip(mol["R"], mol["E_kcal"], mol["F_kcal"], strict=True):
        atoms = Atoms(numbers=mol["z"], positions=R)
        atoms.calc = SinglePointCalculator(atoms, energy=E, forces=F)
        frames.append(atoms)
    path = tmp_path / "frames.extxyz"
    ase.io.write(path, frames, format="extxyz")
    ds = load(path)
    assert ds.metadata["units_on_disk"]["energy"] == "eV"
    np.testing.assert_allclose(ds.energies, mol["E_kcal"], rtol=1e-10)
    ds = load(path, energy_unit="kcal/mol")
    np.testing.assert_allclose(ds.energies * KCAL_PER_EV, mol["E_kcal"], rtol=2e-6)
    np.testing.assert_allclose(ds.forces * KCAL_PER_EV, mol["F_kcal"], rtol=2e-6)

    # A unit hint on the comment line is honoured.
    for atoms in frames:
        atoms.info["energy_unit"] = "kcal/mol"
    hinted = tmp_path / "hinted.extxyz"
    ase.io.write(hinted, frames, format="extxyz")
    ds = load(hinted)
    assert ds.metadata["units_on_disk"]["energy_unit_from"] == "file"
    np.testing.assert_allclose(ds.energies * KCAL_PER_EV, mol["E_kcal"], rtol=2e-6)


def test_extxyz_periodic_gives_box_and_wrapped_positions(tmp_path):
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(4)
    frames = []
    for _ in range(3):
        atoms = Atoms("H2O", positions=rng.uniform(-3, 9, (3, 3)), cell=[5, 6, 7], pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((3, 3)))
        frames.append(atoms)
    path = tmp_path / "pbc.xyz"
    ase.io.write(path, frames, format="extxyz")
    ds = load(path)
    np.testing.assert_allclose(ds.box, [5, 6, 7])
    assert np.all(ds.positions >= 0) and np.all(ds.positions < ds.box)


def test_shared_md17_aspirin_frames_energy_scale():
    if not SHARED_ASPIRIN.exists():
        pytest.skip("shared aspirin frames not available")
    ds = load(SHARED_ASPIRIN, energy_unit="kcal/mol")
    assert ds.n_frames == 15 and ds.n_atoms == 21
    counts = {z: int(np.sum(ds.species == z)) for z in (1, 6, 8)}
    assert counts == {1: 8, 6: 9, 8: 4}  # C9H8O4
    # Raw kcal/mol values read independently from the comment lines.
    text = SHARED_ASPIRIN.read_text().splitlines()
    raw = np.array([float(re.search(r"energy=(\S+)", line).group(1)) for line in text[1::23]])
    np.testing.assert_allclose(ds.energies * KCAL_PER_EV, raw, rtol=2e-6)
    # MD17 aspirin (PBE+vdW-TS) total energies: about -406,000 kcal/mol = -17,600 eV.
    assert np.all((ds.energies > -17_700) & (ds.energies < -17_550))
    assert np.ptp(ds.energies) < 2.0  # thermal fluctuations at 500 K are ~0.1-1 eV
    f_rms = np.sqrt(np.mean(ds.forces**2))
    assert 0.5 < f_rms < 3.0  # eV/Å at 500 K
    # Without the option the (hint-less) file is read as eV: 23x too large, flagged.
    raw_ds = load(SHARED_ASPIRIN)
    assert raw_ds.metadata["units_on_disk"]["energy_unit_from"] == "default"
    np.testing.assert_allclose(raw_ds.energies, raw)


# ------------------------------------------------------------------------ bad input


def _err(path, match, **kw):
    with pytest.raises(DataFormatError) as info:
        load(path, **kw)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert re.search(match, msg), msg


def test_missing_keys(tmp_path):
    mol = _molecule()
    p = tmp_path / "no_forces.npz"
    np.savez(p, R=mol["R"], z=mol["z"], E=mol["E_kcal"])
    _err(p, r"missing key.*'F'")
    p = tmp_path / "rmd17_no_energy.npz"
    np.savez(p, coords=mol["R"], nuclear_charges=mol["z"], forces=mol["F_kcal"])
    _err(p, r"missing key.*'energies'")
    raw = _mdsim_dict()
    del raw["unwrapped_coords"]
    p = tmp_path / "water.npy"
    np.save(p, raw, allow_pickle=True)
    _err(p, r"missing key.*unwrapped_coords")
    p = tmp_path / "other.npz"
    np.savez(p, foo=np.zeros(3))
    _err(p, r"unrecognised npz")


def test_shape_mismatches(tmp_path):
    mol = _molecule()
    p = tmp_path / "short_E.npz"
    np.savez(p, R=mol["R"], z=mol["z"], E=mol["E_kcal"][:3], F=mol["F_kcal"])
    _err(p, r"energies have shape \(3,\), expected \(5,\)")
    p = tmp_path / "bad_F.npz"
    np.savez(p, R=mol["R"], z=mol["z"], E=mol["E_kcal"], F=mol["F_kcal"][:, :3])
    _err(p, r"forces have shape")
    p = tmp_path / "bad_z.npz"
    np.savez(p, R=mol["R"], z=mol["z"][:3], E=mol["E_kcal"], F=mol["F_kcal"])
    _err(p, r"positions have shape .* for 3 atoms")
    raw = _mdsim_dict()
    raw["velocities"] = raw["velocities"][:2]
    p = tmp_path / "water.npy"
    np.save(p, raw, allow_pickle=True)
    _err(p, r"velocities have shape")
    raw = _mdsim_dict()
    raw["angles"][:, 2] = 60.0
    np.save(p, raw, allow_pickle=True)
    _err(p, r"orthorhombic")


def test_non_finite_values(tmp_path):
    mol = _molecule()
    F = mol["F_kcal"].copy()
    F[2, 1, 0] = np.nan
    p = tmp_path / "nan.npz"
    np.savez(p, R=mol["R"], z=mol["z"], E=mol["E_kcal"], F=F)
    _err(p, r"forces contains non-finite.*\[2\]")
    E = mol["E_kcal"].copy()
    E[4] = np.inf
    np.savez(p, R=mol["R"], z=mol["z"], E=E, F=mol["F_kcal"])
    _err(p, r"energies contains non-finite.*\[4\]")


def test_unknown_units(tmp_path):
    mol = _molecule()
    p = tmp_path / "md17.npz"
    np.savez(p, R=mol["R"], z=mol["z"], E=mol["E_kcal"], F=mol["F_kcal"])
    _err(p, r"unknown energy unit 'furlongs'", energy_unit="furlongs")
    _err(p, r"unknown length unit 'parsec'", length_unit="parsec")
    np.savez(p, R=mol["R"], z=mol["z"], E=mol["E_kcal"], F=mol["F_kcal"], e_unit="erg")
    _err(p, r"unknown energy unit 'erg'")
    raw = _mdsim_dict()
    pw = tmp_path / "water.npy"
    np.save(pw, raw, allow_pickle=True)
    _err(pw, r"unknown velocity unit", velocity_unit="mph")


def test_zero_frames(tmp_path):
    p = tmp_path / "empty.npz"
    np.savez(p, R=np.zeros((0, 3, 3)), z=np.array([8, 1, 1]), E=np.zeros(0), F=np.zeros((0, 3, 3)))
    _err(p, r"zero frames")
    px = tmp_path / "empty.xyz"
    px.write_text("")
    with pytest.raises(DataFormatError, match=re.escape(str(px))):
        load(px)


def test_missing_file_and_bad_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load(tmp_path / "nope.npz")
    mol = _molecule()
    p = tmp_path / "md17.npz"
    np.savez(p, R=mol["R"], z=mol["z"], E=mol["E_kcal"], F=mol["F_kcal"])
    with pytest.raises(TypeError, match="velocity_unit"):
        load(p, velocity_unit="nm/ps")


# ------------------------------------------------------------------ splits and ICs


def test_random_split_sizes_disjoint_and_test_set_fixed():
    s = split_indices(2000, train=950, val=50, test=500, seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (950, 50, 500)
    all_idx = np.concatenate(s)
    assert len(np.unique(all_idx)) == len(all_idx)
    # Test frames do not depend on the training-set size (drawn first, as MDsim).
    s2 = split_indices(2000, train=100, val=10, test=500, seed=3)
    np.testing.assert_array_equal(s.test, s2.test)
    # Reproducible with the seed, different with another.
    again = split_indices(2000, train=950, val=50, test=500, seed=3)
    np.testing.assert_array_equal(again.train, s.train)
    other = split_indices(2000, train=950, val=50, test=500, seed=4)
    assert not np.array_equal(other.train, s.train)
    # test=None takes all remaining frames.
    rest = split_indices(1000, train=950, val=50, seed=0)
    assert len(rest.test) == 0


def test_percentage_and_contiguous_splits():
    s = split_indices(1234, train=0.8, val=0.1, test=0.1, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (987, 123, 123)
    c = split_indices(100, train=60, val=20, test=10, mode="contiguous")
    np.testing.assert_array_equal(c.train, np.arange(60))
    np.testing.assert_array_equal(c.val, np.arange(60, 80))
    np.testing.assert_array_equal(c.test, np.arange(90, 100))
    with pytest.raises(ValueError, match="exceed"):
        split_indices(100, train=90, val=20)
    with pytest.raises(ValueError, match="fraction"):
        split_indices(100, train=1.5, val=0)
    with pytest.raises(ValueError, match="mode"):
        split_indices(100, train=10, val=10, mode="shuffled")


def test_split_dataset_and_initial_conditions(tmp_path):
    raw = _mdsim_dict(m=30)
    p = tmp_path / "water.npy"
    np.save(p, raw, allow_pickle=True)
    ds = load(p)
    train, val, test = split_dataset(ds, train=20, val=5, test=5, seed=1)
    assert (train.n_frames, val.n_frames, test.n_frames) == (20, 5, 5)
    idx = train.metadata["frame_indices"]
    np.testing.assert_allclose(train.energies, ds.energies[idx])
    ic = sample_initial_conditions(ds, 8, seed=0, pool=idx)
    assert ic.positions.shape == (8, ds.n_atoms, 3)
    assert len(np.unique(ic.indices)) == 8 and np.all(np.isin(ic.indices, idx))
    np.testing.assert_allclose(ic.positions, ds.positions[ic.indices])
    np.testing.assert_allclose(ic.velocities, ds.velocities[ic.indices])
    with pytest.raises(ValueError, match="replace=True"):
        sample_initial_conditions(ds, 21, seed=0, pool=idx)
    ic = sample_initial_conditions(ds, 50, seed=0, replace=True)
    assert ic.positions.shape[0] == 50


def test_data_package_imports_without_reference_engines():
    import subprocess
    import sys

    code = (
        "import sys, stablejax.data, stablejax.data.generate;"
        "print([m for m in ('openmm', 'tblite', 'rdkit') if m in sys.modules])"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# A data file never runs code
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command (the classic `__reduce__` attack)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_crafted_npy_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    box = np.empty((), object)
    box[()] = {"wrapped_coords": _Payload(marker), "atom_types": ["O", "H", "H"]}
    path = tmp_path / "water.npy"
    np.save(path, box, allow_pickle=True)
    with pytest.raises(DataFormatError, match=r"water\.npy.*refusing to unpickle .*system"):
        load(path)
    assert not marker.exists()


def test_crafted_npz_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "aspirin.npz"
    meta = np.empty(1, object)
    meta[0] = _Payload(marker)
    np.savez(path, R=np.zeros((2, 3, 3)), z=np.array([8, 1, 1]), E=np.zeros(2),
             F=np.zeros((2, 3, 3)), name=meta)  # fmt: skip
    with pytest.raises(DataFormatError, match=r"aspirin\.npz.*refusing to unpickle"):
        load(path)
    assert not marker.exists()


def test_object_metadata_in_npz_still_loads(tmp_path):
    """sGDML files with string metadata stored as object arrays load through the safe path."""
    path = tmp_path / "aspirin.npz"
    rng = np.random.default_rng(0)
    name = np.empty((), object)
    name[()] = "aspirin"
    np.savez(path, R=rng.normal(size=(4, 3, 3)), z=np.array([8, 1, 1]), E=rng.normal(size=4),
             F=rng.normal(size=(4, 3, 3)), name=name)  # fmt: skip
    ds = load(path, energy_unit="eV")
    assert ds.n_frames == 4 and list(ds.species) == [8, 1, 1]


def test_zero_box_side_and_negative_frame_interval_are_named(tmp_path):
    raw = _mdsim_dict()
    raw["lengths"] = np.tile([0.0, 6.0, 6.0], (len(raw["wrapped_coords"]), 1))
    path = tmp_path / "water.npy"
    np.save(path, raw, allow_pickle=True)
    with pytest.raises(DataFormatError, match=r"water\.npy: box lengths must be positive"):
        load(path)
    raw = _mdsim_dict()
    raw["frame_interval_fs"] = -10.0
    np.save(path, raw, allow_pickle=True)
    with pytest.raises(DataFormatError, match=r"frame_interval_fs must be a positive time"):
        load(path)
