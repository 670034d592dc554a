"""Readers for the datasets users bring: sGDML/rMD17 npz, MDsim water npy, anything ASE reads.

Every reader returns a :class:`~stablejax.data.dataset.Dataset` in ASE units (Å, eV,
eV/Å). Files store their own units (MD17, MD22 and the MDsim water files use kcal/mol
and kcal/mol/Å); the unit assumed for each file is taken, in order, from the caller's
option, from a unit hint inside the file, or from the format's documented convention,
and is recorded in ``dataset.metadata['units_on_disk']``.

Bad input raises :class:`DataFormatError` (a ``ValueError``) whose message names the
file and the problem.

Example:
    >>> ds = load("md17_aspirin.npz")                      # doctest: +SKIP
    >>> ds = load("frames.xyz", energy_unit="kcal/mol")    # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
from ase import units as _ase_units

from stablejax import geometry, units
from stablejax.data.dataset import Dataset
from stablejax.files import atomic_write  # noqa: F401 (re-exported)

__all__ = [
    "DataFormatError",
    "ENERGY_UNITS",
    "LENGTH_UNITS",
    "VELOCITY_UNITS",
    "load",
    "read_sgdml_npz",
    "read_rmd17_npz",
    "read_mdsim_water",
    "read_ase",
    "write_sgdml_npz",
    "write_mdsim_water",
]


class DataFormatError(ValueError):
    """A data file is missing something, has inconsistent shapes, or holds bad values."""


#: Energy units understood by the readers, as their value in eV.
ENERGY_UNITS: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "kcal/mol": units.kcal_per_mol,
    "kJ/mol": _ase_units.kJ / _ase_units.mol,
    "Hartree": _ase_units.Hartree,
    "Ry": _ase_units.Rydberg,
}
_ENERGY_ALIASES = {
    "ev": "eV",
    "mev": "meV",
    "kcal/mol": "kcal/mol",
    "kcal mol-1": "kcal/mol",
    "kcal_per_mol": "kcal/mol",
    "kcalmol": "kcal/mol",
    "kcal": "kcal/mol",
    "kj/mol": "kJ/mol",
    "kj_per_mol": "kJ/mol",
    "hartree": "Hartree",
    "ha": "Hartree",
    "eh": "Hartree",
    "au": "Hartree",
    "ry": "Ry",
    "rydberg": "Ry",
}

#: Length units understood by the readers, as their value in Å.
LENGTH_UNITS: dict[str, float] = {
    "Angstrom": 1.0,
    "nm": 10.0,
    "Bohr": _ase_units.Bohr,
}
_LENGTH_ALIASES = {
    "angstrom": "Angstrom",
    "ang": "Angstrom",
    "a": "Angstrom",
    "å": "Angstrom",
    "nm": "nm",
    "bohr": "Bohr",
    "au": "Bohr",
}

#: Velocity units understood by the readers, as their value in Å/(ASE time unit).
VELOCITY_UNITS: dict[str, float] = {
    "Angstrom/fs": 1.0 / units.fs,
    "Angstrom/ps": 1.0 / units.ps,
    "nm/ps": 10.0 / units.ps,
    "ase": 1.0,
}
_VELOCITY_ALIASES = {
    "angstrom/fs": "Angstrom/fs",
    "a/fs": "Angstrom/fs",
    "å/fs": "Angstrom/fs",
    "angstrom/ps": "Angstrom/ps",
    "a/ps": "Angstrom/ps",
    "å/ps": "Angstrom/ps",
    "nm/ps": "nm/ps",
    "ase": "ase",
}


def _canonical(unit, table, aliases, kind, path) -> str:
    if unit is None:
        raise TypeError("unit must not be None here")
    key = str(unit).strip()
    if key in table:
        return key
    canon = aliases.get(key.lower())
    if canon is None:
        known = ", ".join(sorted(table))
        raise DataFormatError(f"{path}: unknown {kind} unit {unit!r} (known: {known})")
    return canon


def energy_unit_in_eV(unit: str, path="<input>") -> float:
    """Value of one `unit` of energy in eV (``'kcal/mol'`` -> 0.0433641)."""
    return ENERGY_UNITS[_canonical(unit, ENERGY_UNITS, _ENERGY_ALIASES, "energy", path)]


def length_unit_in_angstrom(unit: str, path="<input>") -> float:
    """Value of one `unit` of length in Å (``'nm'`` -> 10)."""
    return LENGTH_UNITS[_canonical(unit, LENGTH_UNITS, _LENGTH_ALIASES, "length", path)]


def _as_str(value) -> str | None:
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype.kind in "US" or arr.dtype == object:
        item = arr.reshape(-1)[0] if arr.size else None
        if isinstance(item, bytes):
            item = item.decode()
        return None if item is None else str(item)
    return None


# --------------------------------------------------------------------------- validation


def _require(mapping, keys, path, what):
    missing = [k for k in keys if k not in mapping]
    if missing:
        have = ", ".join(sorted(map(str, mapping))) or "nothing"
        raise DataFormatError(
            f"{path}: not a valid {what} file: missing key(s) {missing} (file has: {have})"
        )


def _finite(name, array, path):
    if array is None:
        return
    if not np.all(np.isfinite(array)):
        bad = np.argwhere(~np.isfinite(array).reshape(array.shape[0], -1).all(axis=1))
        frames = bad[:5, 0].tolist()
        raise DataFormatError(
            f"{path}: {name} contains non-finite values (NaN/inf), first bad frame(s) {frames}"
        )


def _build(
    path,
    *,
    species,
    positions,
    energies=None,
    forces=None,
    box=None,
    velocities=None,
    unwrapped=None,
    frame_interval_fs=None,
    metadata=None,
) -> Dataset:
    """Checks shapes and values of arrays already in Å/eV and assembles a Dataset."""
    species = np.asarray(species)
    if species.ndim != 1:
        raise DataFormatError(f"{path}: atomic numbers must be 1-D, got shape {species.shape}")
    if not np.issubdtype(species.dtype, np.integer):
        if np.issubdtype(species.dtype, np.floating) and np.all(species == np.round(species)):
            species = species.astype(np.int64)
        else:
            raise DataFormatError(f"{path}: atomic numbers must be integers, got {species.dtype}")
    species = species.astype(np.int64)
    if np.any(species < 1) or np.any(species > 118):
        raise DataFormatError(f"{path}: atomic numbers outside 1..118: {np.unique(species)}")
    n = species.shape[0]
    if box is not None:
        box = np.asarray(box, dtype=np.float64)
        if box.shape == (3, 3) and np.all(np.isfinite(box)):
            try:
                geometry.perpendicular_widths(box)
            except ValueError as e:
                raise DataFormatError(f"{path}: {e}") from None
        elif box.shape != (3,) or not np.all(np.isfinite(box)) or np.any(box <= 0):
            raise DataFormatError(
                f"{path}: box must be 3 positive lengths or a [3, 3] cell (Å), got {box}"
            )
    if frame_interval_fs is not None and not (
        np.isfinite(frame_interval_fs) and float(frame_interval_fs) > 0
    ):
        raise DataFormatError(
            f"{path}: frame_interval_fs must be a positive time (fs), got {frame_interval_fs}"
        )
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 3 or positions.shape[1:] != (n, 3):
        raise DataFormatError(
            f"{path}: positions have shape {positions.shape}, expected (frames, {n}, 3) "
            f"for {n} atoms"
        )
    m = positions.shape[0]
    if m == 0:
        raise DataFormatError(f"{path}: the file holds zero frames")
    _finite("positions", positions, path)
    if energies is not None:
        energies = np.asarray(energies, dtype=np.float64)
        if energies.ndim == 2 and energies.shape[1] == 1:
            energies = energies[:, 0]
        if energies.shape != (m,):
            raise DataFormatError(
                f"{path}: energies have shape {energies.shape}, expected ({m},) or ({m}, 1) "
                f"to match {m} frames of positions"
            )
        _finite("energies", energies[:, None], path)
    for name, arr in (("forces", forces), ("velocities", velocities), ("unwrapped", unwrapped)):
        if arr is None:
            continue
        arr = np.asarray(arr)
        if arr.shape != positions.shape:
            raise DataFormatError(
                f"{path}: {name} have shape {arr.shape}, expected {positions.shape} "
                "(same as positions)"
            )
        _finite(name, arr, path)
    return Dataset(
        species=species,
        positions=positions,
        energies=energies,
        forces=None if forces is None else np.asarray(forces, dtype=np.float64),
        box=box,
        velocities=None if velocities is None else np.asarray(velocities, dtype=np.float64),
        frame_interval_fs=None if frame_interval_fs is None else float(frame_interval_fs),
        unwrapped_positions=None if unwrapped is None else np.asarray(unwrapped, np.float64),
        source=str(path),
        metadata=dict(metadata or {}),
    )


# ------------------------------------------------------------------ safe unpickling

#: The only globals a pickled data file may name: NumPy's array and scalar
#: reconstruction and dtypes (plus the bytes codec of protocol-2 pickles). Plain
#: containers (dict, list, str, numbers) need no globals. Anything else, e.g.
#: `os.system` in a crafted `__reduce__`, is refused before it can run.
_SAFE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/strings/numbers and NumPy arrays, nothing else."""

    def __init__(self, file, path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise DataFormatError(
            f"{self._path}: refusing to unpickle {module}.{name}: data files may only hold "
            "arrays, numbers, strings, lists and dicts (a pickle can run code when loaded)"
        )


def _read_npy_stream(f, path):
    """One .npy array from an open binary stream; object arrays through the safe unpickler."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        try:
            array = _ArrayOnlyUnpickler(f, path).load()
        except DataFormatError:
            raise
        except Exception as e:  # truncated or malformed pickle
            raise DataFormatError(f"{path}: cannot unpickle the object array ({e})") from e
        return np.asarray(array)
    f.seek(0)
    return np.load(f, allow_pickle=False)


def load_npy(path) -> np.ndarray:
    """`np.load` of a .npy file that never runs code: object arrays (e.g. the MDsim
    water format, a pickled dict) are unpickled admitting only arrays and plain values."""
    try:
        with open(path, "rb") as f:
            return _read_npy_stream(f, path)
    except DataFormatError:
        raise
    except Exception as e:
        raise DataFormatError(f"{path}: cannot read as .npy ({e})") from e


def _load_npz(path) -> dict:
    """Every array of an .npz; object members (some sGDML files store string metadata
    that way) through the safe unpickler, never NumPy's pickle fallback."""
    try:
        out = {}
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as member:
                    buf = io.BytesIO(member.read())
                out[name[: -len(".npy")]] = _read_npy_stream(buf, f"{path}[{name}]")
        return out
    except DataFormatError:
        raise
    except Exception as e:  # zip errors, truncated files
        raise DataFormatError(f"{path}: cannot read as .npz ({e})") from e


# ------------------------------------------------------------------------------ sGDML


def read_sgdml_npz(
    path,
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    frame_interval_fs: float | None = None,
) -> Dataset:
    """Reads an sGDML-style npz file (MD17, MD22, and files written by our generators).

    Keys: ``R`` [m, n, 3], ``z`` [n], ``E`` [m] or [m, 1], ``F`` [m, n, 3]; optional
    ``e_unit``/``r_unit`` strings, ``theory``, ``name``, ``lattice`` [3, 3].

    Args:
      path: the .npz file.
      energy_unit: unit of ``E`` (``F`` is in energy_unit per length_unit). Default: the
        file's ``e_unit`` if present, else kcal/mol (the MD17/MD22 convention).
      length_unit: unit of ``R``. Default: the file's ``r_unit``, else Å.
      frame_interval_fs: time between frames in fs if the frames are a trajectory
        (default: the file's ``frame_interval_fs`` key, else None). Generated files hold
        several trajectories back to back; ``metadata['trajectory_starts']`` lists
        the first frame of each.

    Returns:
      A Dataset in Å, eV, eV/Å.
    """
    data = _load_npz(path)
    _require(data, ["R", "z", "E", "F"], path, "sGDML npz")
    e_unit = energy_unit or _as_str(data.get("e_unit")) or "kcal/mol"
    r_unit = length_unit or _as_str(data.get("r_unit")) or "Angstrom"
    e_scale = energy_unit_in_eV(e_unit, path)
    r_scale = length_unit_in_angstrom(r_unit, path)
    box = None
    if "lattice" in data:
        lattice = np.asarray(data["lattice"], dtype=np.float64) * r_scale
        box = _periodic_box(lattice, path)
    if frame_interval_fs is None and "frame_interval_fs" in data:
        frame_interval_fs = float(data["frame_interval_fs"])
    metadata = {
        "format": "sgdml_npz",
        "units_on_disk": {"energy": e_unit, "length": r_unit},
    }
    for key in ("theory", "name", "type", "md5"):
        s = _as_str(data.get(key))
        if s is not None:
            metadata[key] = s
    if "trajectory_starts" in data:
        metadata["trajectory_starts"] = np.asarray(data["trajectory_starts"], np.int64)
    positions = np.asarray(data["R"], dtype=np.float64) * r_scale
    if box is not None:
        positions = geometry.wrap_positions_np(positions, box)
    return _build(
        path,
        species=data["z"],
        positions=positions,
        energies=np.asarray(data["E"], dtype=np.float64) * e_scale,
        forces=np.asarray(data["F"], dtype=np.float64) * (e_scale / r_scale),
        box=box,
        frame_interval_fs=frame_interval_fs,
        metadata=metadata,
    )


def write_sgdml_npz(
    path,
    dataset: Dataset,
    *,
    energy_unit: str = "kcal/mol",
    theory: str | None = None,
    name: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Writes a Dataset as an sGDML npz (``R`` Å, ``E``/``F`` in `energy_unit`), atomically.

    The unit is stored in ``e_unit``/``r_unit`` so :func:`read_sgdml_npz` reads it back.
    `theory` (e.g. ``'GFN2-xTB'``) labels the level of theory; never call xTB data DFT.
    `extra` adds arrays (e.g. ``trajectory_starts``, read back into metadata).
    """
    if dataset.energies is None or dataset.forces is None:
        raise ValueError("write_sgdml_npz needs energies and forces")
    scale = energy_unit_in_eV(energy_unit)
    arrays = {
        "R": np.asarray(dataset.positions, np.float64),
        "z": np.asarray(dataset.species, np.int64),
        "E": np.asarray(dataset.energies, np.float64)[:, None] / scale,
        "F": np.asarray(dataset.forces, np.float64) / scale,
        "e_unit": np.array(_canonical(energy_unit, ENERGY_UNITS, _ENERGY_ALIASES, "energy", path)),
        "r_unit": np.array("Ang"),
        "type": np.array("d"),
    }
    if theory is not None:
        arrays["theory"] = np.array(theory)
    if name is not None:
        arrays["name"] = np.array(name)
    if dataset.box is not None:
        arrays["lattice"] = geometry.cell_matrix(dataset.box)
    if dataset.frame_interval_fs is not None:
        arrays["frame_interval_fs"] = np.array(float(dataset.frame_interval_fs))
    arrays.update(extra or {})
    return atomic_write(path, lambda f: np.savez(f, **arrays))


# ------------------------------------------------------------------------------ rMD17


def read_rmd17_npz(
    path,
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    frame_interval_fs: float | None = None,
) -> Dataset:
    """Reads a revised-MD17 npz: ``coords`` [m, n, 3], ``energies`` [m], ``forces``,
    ``nuclear_charges`` [n]; kcal/mol and Å unless told otherwise.

    The rMD17 frames are a random subsample of a trajectory, so `frame_interval_fs`
    defaults to None.
    """
    data = _load_npz(path)
    _require(data, ["coords", "energies", "forces", "nuclear_charges"], path, "rMD17 npz")
    e_unit = energy_unit or "kcal/mol"
    r_unit = length_unit or "Angstrom"
    e_scale = energy_unit_in_eV(e_unit, path)
    r_scale = length_unit_in_angstrom(r_unit, path)
    metadata = {
        "format": "rmd17_npz",
        "units_on_disk": {"energy": e_unit, "length": r_unit},
    }
    if "old_indices" in data:
        metadata["old_indices"] = np.asarray(data["old_indices"])
    return _build(
        path,
        species=data["nuclear_charges"],
        positions=np.asarray(data["coords"], np.float64) * r_scale,
        energies=np.asarray(data["energies"], np.float64) * e_scale,
        forces=np.asarray(data["forces"], np.float64) * (e_scale / r_scale),
        frame_interval_fs=frame_interval_fs,
        metadata=metadata,
    )


# ------------------------------------------------------------------------ MDsim water

_MDSIM_KEYS = [
    "wrapped_coords",
    "unwrapped_coords",
    "velocities",
    "energy",
    "forces",
    "atom_types",
    "lengths",
    "angles",
]

#: Time between frames of the MDsim water data (Fu et al. 2022): 10 fs.
MDSIM_WATER_FRAME_INTERVAL_FS = 10.0


def _kinetic_temperature(species, velocities_ase) -> float:
    """Mean kinetic temperature in K of frames with velocities in Å/(ASE time)."""
    from ase.data import atomic_masses

    masses = atomic_masses[np.asarray(species)]
    ke = 0.5 * np.einsum("i,mij->m", masses, velocities_ase**2)
    n = len(species)
    dof = max(3 * n - 3, 1)
    return float(np.mean(2.0 * ke / (dof * units.kB)))


def _choose_velocity_unit(species, velocities, path) -> tuple[str, float]:
    """Picks the velocity unit whose kinetic temperature is closest (in log) to 300 K.

    The MDsim water files do not state their velocity unit; the candidates differ by
    factors of 10-1000 in speed, i.e. 100-10^6 in temperature, so the right one is
    unambiguous for any physical trajectory between ~10 K and ~10^4 K.
    """
    best = None
    for unit, scale in VELOCITY_UNITS.items():
        t = _kinetic_temperature(species, velocities[: min(len(velocities), 200)] * scale)
        score = abs(np.log(max(t, 1e-30) / 300.0))
        if best is None or score < best[0]:
            best = (score, unit, t)
    _, unit, t = best
    if not 1.0 < t < 1e5:
        warnings.warn(
            f"{path}: velocities give an implausible temperature ({t:.3g} K) in every "
            f"known unit; assuming {unit}. Pass velocity_unit= to override.",
            stacklevel=3,
        )
    return unit, VELOCITY_UNITS[unit]


def _atom_types_to_numbers(atom_types, path) -> np.ndarray:
    arr = np.asarray(atom_types)
    if arr.ndim == 2 and arr.shape[0] >= 1:  # stored per frame
        arr = arr[0]
    if arr.dtype.kind in "US" or arr.dtype == object:
        from ase.data import atomic_numbers

        try:
            return np.array([atomic_numbers[str(s).strip()] for s in arr], dtype=np.int64)
        except KeyError as e:
            raise DataFormatError(f"{path}: unknown element symbol {e} in atom_types") from e
    return arr


def read_mdsim_water(
    path,
    *,
    energy_unit: str | None = None,
    velocity_unit: str | None = "auto",
    frame_interval_fs: float | None = None,
) -> Dataset:
    """Reads the MDsim water ``.npy`` file (a pickled dict; also our generated water).

    Keys: ``wrapped_coords``/``unwrapped_coords`` [m, n, 3] Å, ``velocities`` [m, n, 3],
    ``energy`` [m] or [m, 1] kcal/mol, ``forces`` [m, n, 3] kcal/mol/Å, ``atom_types``
    [n] atomic numbers (or symbols) in O, H, H order, ``lengths`` [m, 3] or [3] Å,
    ``angles`` [m, 3] or [3] degrees (must be 90: orthorhombic boxes only).

    Velocity units: MDsim does not document them. Our generator writes Å/fs (and says
    so in a ``velocity_unit`` key). Without such a key, ``velocity_unit='auto'`` picks
    among Å/fs, Å/ps, nm/ps and ASE units the one that gives a kinetic temperature
    closest to 300 K, and records the choice in ``metadata['units_on_disk']``.

    Args:
      path: the .npy file.
      energy_unit: unit of ``energy`` (default: the file's ``energy_unit`` key, else
        kcal/mol); forces are in energy_unit/Å.
      velocity_unit: ``'auto'``, ``'Angstrom/fs'``, ``'Angstrom/ps'``, ``'nm/ps'``,
        ``'ase'``, or None to drop the velocities.
      frame_interval_fs: time between frames in fs (default: the file's key, else 10).

    Returns:
      A periodic Dataset (``box`` [3] Å) with wrapped ``positions``,
      ``unwrapped_positions``, velocities in Å/(ASE time), energies in eV.
    """
    raw = load_npy(path)
    if isinstance(raw, np.ndarray) and raw.dtype == object and raw.shape == ():
        raw = raw.item()
    if not isinstance(raw, dict):
        raise DataFormatError(
            f"{path}: expected a pickled dict (MDsim water format), got {type(raw).__name__}"
        )
    _require(raw, _MDSIM_KEYS, path, "MDsim water .npy")
    e_unit = energy_unit or _as_str(raw.get("energy_unit")) or "kcal/mol"
    e_scale = energy_unit_in_eV(e_unit, path)
    species = _atom_types_to_numbers(raw["atom_types"], path)
    wrapped = np.asarray(raw["wrapped_coords"], np.float64)
    m = wrapped.shape[0] if wrapped.ndim == 3 else -1
    lengths = np.asarray(raw["lengths"], np.float64)
    angles = np.asarray(raw["angles"], np.float64)
    for name, arr in (("lengths", lengths), ("angles", angles)):
        if arr.shape not in ((3,), (m, 3), (1, 3)):
            raise DataFormatError(
                f"{path}: {name} has shape {arr.shape}, expected (3,) or ({m}, 3)"
            )
        _finite(name, arr.reshape(-1, 3), path)
    if not np.allclose(angles, 90.0, atol=1e-6):
        raise DataFormatError(f"{path}: only orthorhombic boxes are supported, angles={angles}")
    lengths2 = lengths.reshape(-1, 3)
    if not np.allclose(lengths2, lengths2[0], rtol=1e-10, atol=0):
        raise DataFormatError(
            f"{path}: box lengths change between frames (NPT data is not supported)"
        )
    box = lengths2[0]
    if np.any(box <= 0):
        raise DataFormatError(f"{path}: box lengths must be positive (Å), got {box}")
    velocities = None
    v_unit = None
    if velocity_unit is not None:
        v_raw = np.asarray(raw["velocities"], np.float64)
        file_unit = _as_str(raw.get("velocity_unit"))
        if velocity_unit == "auto" and file_unit is not None:
            velocity_unit = file_unit
        if velocity_unit == "auto":
            if v_raw.shape != wrapped.shape:
                raise DataFormatError(
                    f"{path}: velocities have shape {v_raw.shape}, expected {wrapped.shape}"
                )
            _finite("velocities", v_raw, path)
            v_unit, v_scale = _choose_velocity_unit(species, v_raw, path)
        else:
            v_unit = _canonical(velocity_unit, VELOCITY_UNITS, _VELOCITY_ALIASES, "velocity", path)
            v_scale = VELOCITY_UNITS[v_unit]
        velocities = v_raw * v_scale
    if frame_interval_fs is None:
        frame_interval_fs = float(raw.get("frame_interval_fs", MDSIM_WATER_FRAME_INTERVAL_FS))
    metadata = {
        "format": "mdsim_water_npy",
        "units_on_disk": {"energy": e_unit, "length": "Angstrom", "velocity": v_unit},
    }
    for key in ("theory", "generator", "params_hash"):
        s = _as_str(raw.get(key))
        if s is not None:
            metadata[key] = s
    return _build(
        path,
        species=species,
        positions=np.mod(wrapped, box),
        energies=np.asarray(raw["energy"], np.float64) * e_scale,
        forces=np.asarray(raw["forces"], np.float64) * e_scale,
        box=box,
        velocities=velocities,
        unwrapped=np.asarray(raw["unwrapped_coords"], np.float64),
        frame_interval_fs=frame_interval_fs,
        metadata=metadata,
    )


def write_mdsim_water(
    path,
    dataset: Dataset,
    *,
    energy_unit: str = "kcal/mol",
    extra: dict | None = None,
) -> Path:
    """Writes a periodic Dataset in the MDsim water ``.npy`` format, atomically.

    Energies/forces in `energy_unit` (kcal/mol, as MDsim) and per Å, velocities in Å/fs
    (stated in a ``velocity_unit`` key), box in ``lengths`` [m, 3] and ``angles`` [m, 3].
    `extra` adds string/array entries (generator parameters, theory, ...).
    """
    if dataset.box is None:
        raise ValueError("write_mdsim_water needs a periodic dataset (box is None)")
    if np.shape(dataset.box) != (3,):
        raise ValueError(
            "write_mdsim_water: dataset.box must be [3] orthorhombic side lengths "
            f"(the MDsim format stores lengths with 90° angles), got shape {np.shape(dataset.box)}"
        )
    if dataset.energies is None or dataset.forces is None:
        raise ValueError("write_mdsim_water needs energies and forces")
    scale = energy_unit_in_eV(energy_unit)
    m = dataset.n_frames
    velocities = (
        np.zeros_like(dataset.positions)
        if dataset.velocities is None
        else np.asarray(dataset.velocities) * units.fs  # Å/(ASE time) -> Å/fs
    )
    unwrapped = (
        dataset.positions if dataset.unwrapped_positions is None else dataset.unwrapped_positions
    )
    data = {
        "wrapped_coords": np.mod(np.asarray(dataset.positions, np.float64), dataset.box),
        "unwrapped_coords": np.asarray(unwrapped, np.float64),
        "velocities": velocities,
        "velocity_unit": "Angstrom/fs",
        "energy": np.asarray(dataset.energies, np.float64)[:, None] / scale,
        "energy_unit": _canonical(energy_unit, ENERGY_UNITS, _ENERGY_ALIASES, "energy", path),
        "forces": np.asarray(dataset.forces, np.float64) / scale,
        "atom_types": np.asarray(dataset.species, np.int64),
        "lengths": np.tile(np.asarray(dataset.box, np.float64), (m, 1)),
        "angles": np.full((m, 3), 90.0),
        "frame_interval_fs": float(
            dataset.frame_interval_fs
            if dataset.frame_interval_fs is not None
            else MDSIM_WATER_FRAME_INTERVAL_FS
        ),
    }
    data.update(extra or {})
    return atomic_write(path, lambda f: np.save(f, data, allow_pickle=True))


# --------------------------------------------------------------------------------- ASE

_UNIT_HINT_KEYS = ("energy_unit", "energy_units", "e_unit", "units", "unit")


def _periodic_box(cell, path) -> np.ndarray:
    """[3] Å side lengths of a diagonal cell, else the [3, 3] Å cell (lattice vectors as rows)."""
    cell = np.asarray(cell, np.float64)
    off = cell - np.diag(np.diag(cell))
    if np.all(np.abs(off) <= 1e-8 * max(1.0, np.abs(cell).max())):
        return np.diag(cell).copy()
    try:
        geometry.perpendicular_widths(cell)
    except ValueError as e:
        raise DataFormatError(f"{path}: {e}") from None
    return cell.copy()


def _energy_hint(info: dict) -> str | None:
    for key in _UNIT_HINT_KEYS:
        if key in info:
            value = info[key]
            text = str(value).strip()
            # "units=kcal/mol,Angstrom" style: take the energy part.
            return text.split(",")[0].split(";")[0].strip()
    return None


def read_ase(
    path,
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    index=":",
    energy_key: str = "energy",
    forces_key: str = "forces",
    frame_interval_fs: float | None = None,
    ase_format: str | None = None,
) -> Dataset:
    """Reads any trajectory ASE can read (extended XYZ, .traj, ...).

    Energies come from ``atoms.info[energy_key]`` or the attached calculator, forces from
    ``atoms.arrays[forces_key]`` or the calculator. Positions are in Å unless
    `length_unit` says otherwise.

    Energy unit, in order: `energy_unit`; a hint in the first frame's info (extended
    XYZ comment line keys ``energy_unit``, ``e_unit``, ``units`` or ``unit``, e.g.
    ``energy_unit=kcal/mol``); else eV (ASE's convention). The shared MD17 frames
    ``aspirin_md17_dft_frames.xyz`` carry no hint and are in kcal/mol: pass
    ``energy_unit='kcal/mol'``.

    Returns:
      A Dataset (periodic when every frame has pbc on all axes and the same cell:
      ``box`` [3] Å for a diagonal cell, else the [3, 3] Å cell).
    """
    import ase.io

    try:
        frames = ase.io.read(path, index=index, format=ase_format)
    except Exception as e:
        raise DataFormatError(f"{path}: ASE cannot read this file ({type(e).__name__}: {e})") from e
    if not isinstance(frames, list):
        frames = [frames]
    if len(frames) == 0:
        raise DataFormatError(f"{path}: the file holds zero frames")
    first = frames[0]
    hint = _energy_hint(first.info)
    e_unit = energy_unit or hint or "eV"
    r_unit = length_unit or "Angstrom"
    e_scale = energy_unit_in_eV(e_unit, path)
    r_scale = length_unit_in_angstrom(r_unit, path)
    species = first.get_atomic_numbers()
    for i, atoms in enumerate(frames):
        if len(atoms) != len(species) or np.any(atoms.get_atomic_numbers() != species):
            raise DataFormatError(
                f"{path}: frame {i} has different atoms than frame 0 "
                f"({len(atoms)} vs {len(species)} atoms); all frames must share species"
            )

    def energy_of(atoms):
        if energy_key in atoms.info:
            return float(atoms.info[energy_key])
        if atoms.calc is not None:
            try:
                return float(atoms.get_potential_energy())
            except Exception:
                return None
        return None

    def forces_of(atoms):
        if forces_key in atoms.arrays:
            return np.asarray(atoms.arrays[forces_key], np.float64)
        if atoms.calc is not None:
            try:
                return np.asarray(atoms.get_forces(), np.float64)
            except Exception:
                return None
        return None

    energies = [energy_of(a) for a in frames]
    forces = [forces_of(a) for a in frames]
    have_e = [e is not None for e in energies]
    have_f = [f is not None for f in forces]
    if any(have_e) and not all(have_e):
        missing = [i for i, h in enumerate(have_e) if not h][:5]
        raise DataFormatError(f"{path}: energy missing in frame(s) {missing} (others have it)")
    if any(have_f) and not all(have_f):
        missing = [i for i, h in enumerate(have_f) if not h][:5]
        raise DataFormatError(f"{path}: forces missing in frame(s) {missing} (others have them)")
    pbc = np.array([a.pbc for a in frames])
    box = None
    positions = np.stack([a.positions for a in frames]) * r_scale
    if pbc.all():
        box = _periodic_box(np.asarray(first.cell) * r_scale, path)
        for i, a in enumerate(frames):
            if not np.allclose(np.asarray(a.cell) * r_scale, geometry.cell_matrix(box)):
                raise DataFormatError(f"{path}: frame {i} has a different cell than frame 0")
        positions = geometry.wrap_positions_np(positions, box)
    elif pbc.any():
        raise DataFormatError(f"{path}: mixed or partial periodicity {pbc[0]} is not supported")
    velocities = None
    if all(a.has("momenta") for a in frames):
        velocities = np.stack([a.get_velocities() for a in frames]) * r_scale
        if not np.any(velocities):
            velocities = None
    forces_arr = None
    if all(have_f):
        shapes = {f.shape for f in forces}
        if len(shapes) != 1:
            raise DataFormatError(f"{path}: forces have inconsistent shapes {shapes}")
        forces_arr = np.stack(forces) * (e_scale / r_scale)
    return _build(
        path,
        species=species,
        positions=positions,
        energies=np.array(energies) * e_scale if all(have_e) else None,
        forces=forces_arr,
        box=box,
        velocities=velocities,
        frame_interval_fs=frame_interval_fs,
        metadata={
            "format": "ase",
            "units_on_disk": {
                "energy": e_unit,
                "length": r_unit,
                "energy_unit_from": "option" if energy_unit else ("file" if hint else "default"),
            },
        },
    )


# ------------------------------------------------------------------------ entry point


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = set(f.files)
        except Exception as e:
            raise DataFormatError(f"{path}: cannot read as .npz ({e})") from e
        if keys & {"coords", "nuclear_charges"}:
            return "rmd17"
        if keys & {"R", "z", "E", "F"}:
            return "sgdml"
        raise DataFormatError(
            f"{path}: unrecognised npz layout; keys {sorted(keys)} match neither sGDML "
            "(R, z, E, F) nor rMD17 (coords, nuclear_charges, energies, forces)"
        )
    if suffix == ".npy":
        return "mdsim_water"
    return "ase"


_READERS = {
    "sgdml": read_sgdml_npz,
    "rmd17": read_rmd17_npz,
    "mdsim_water": read_mdsim_water,
    "ase": read_ase,
}


def load(path, *, format: str | None = None, **options) -> Dataset:
    """Loads a dataset file, detecting its format, and returns it in Å / eV / eV/Å.

    Formats: ``'sgdml'`` (MD17/MD22 npz: R, z, E, F), ``'rmd17'`` (npz: coords,
    nuclear_charges, energies, forces), ``'mdsim_water'`` (pickled-dict .npy),
    ``'ase'`` (extended XYZ and anything ``ase.io.read`` understands). Detection: .npz by
    its keys, .npy as MDsim water, anything else through ASE.

    Args:
      path: the file.
      format: force a format instead of detecting it.
      **options: passed to the reader: ``energy_unit`` (``'eV'``, ``'kcal/mol'``,
        ``'kJ/mol'``, ``'Hartree'``, ``'meV'``, ``'Ry'``), ``length_unit``,
        ``velocity_unit``, ``frame_interval_fs``, ``index`` (ASE), ...

    Returns:
      A :class:`Dataset`; ``dataset.metadata['units_on_disk']`` states the units assumed.

    Raises:
      FileNotFoundError: the path does not exist.
      DataFormatError: missing keys, inconsistent shapes, non-finite values, unknown
        units, zero frames (the message names the file).
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    fmt = format or _detect_format(p)
    if fmt not in _READERS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(_READERS)}")
    reader = _READERS[fmt]
    try:
        return reader(p, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"{p}: option not understood by the {fmt} reader: {e}") from e
        raise


# ---------------------------------------------------------------------------- writing
