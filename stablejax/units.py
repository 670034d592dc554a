"""Units used throughout stablejax: ASE's (Å, eV, amu, ASE time units).

Helpers to convert the quantities users think in (kelvin, femtoseconds,
picoseconds, kcal/mol) into the package's internal units.
"""

from ase import units as _ase_units

#: One femtosecond in ASE time units.
fs = _ase_units.fs
#: One picosecond in ASE time units.
ps = 1000.0 * _ase_units.fs
#: Boltzmann constant in eV/K.
kB = _ase_units.kB
#: kcal/mol in eV (1 kcal/mol = 0.0433641 eV).
kcal_per_mol = _ase_units.kcal / _ase_units.mol
#: Conversion factor used by MD17/MD22/MDsim files: divide kcal/mol values by this.
KCAL_PER_MOL_PER_EV = 1.0 / kcal_per_mol
#: One bar in eV/Å^3.
bar = _ase_units.bar


def kT_from_kelvin(temperature_K: float) -> float:
    """Thermal energy kB*T in eV for a temperature in kelvin."""
    return kB * temperature_K


def kelvin_from_kT(kT_eV: float) -> float:
    """Temperature in kelvin for a thermal energy in eV."""
    return kT_eV / kB


def fs_to_ase_time(t_fs: float) -> float:
    """Time in femtoseconds -> ASE time units."""
    return t_fs * fs


def ase_time_to_fs(t):
    """Time in ASE time units -> femtoseconds."""
    return t / fs


def ase_time_to_ps(t):
    """Time in ASE time units -> picoseconds."""
    return t / ps


def friction_per_ps_to_ase(gamma_per_ps: float) -> float:
    """Langevin friction in 1/ps -> 1/(ASE time unit)."""
    return gamma_per_ps / ps
