"""stablejax.data: the Dataset container, readers, splits and reference-data generation.

Everything here imports without the optional ``[reference]`` engines (openmm, tblite,
rdkit); the generators load them only when they run.
"""

from stablejax.data.dataset import Dataset
from stablejax.data.generate import ensure_dataset
from stablejax.data.readers import (
    ENERGY_UNITS,
    DataFormatError,
    load,
    read_ase,
    read_mdsim_water,
    read_rmd17_npz,
    read_sgdml_npz,
    write_mdsim_water,
    write_sgdml_npz,
)
from stablejax.data.splits import (
    InitialConditions,
    Split,
    sample_initial_conditions,
    split_dataset,
    split_indices,
)
from stablejax.data.topology import (
    System,
    equilibrium_bond_lengths,
    find_bonds,
    molecules,
    system_from_frames,
)

__all__ = [
    "Dataset",
    "DataFormatError",
    "ENERGY_UNITS",
    "InitialConditions",
    "Split",
    "System",
    "ensure_dataset",
    "equilibrium_bond_lengths",
    "find_bonds",
    "load",
    "molecules",
    "read_ase",
    "read_mdsim_water",
    "read_rmd17_npz",
    "read_sgdml_npz",
    "sample_initial_conditions",
    "split_dataset",
    "split_indices",
    "system_from_frames",
    "write_mdsim_water",
    "write_sgdml_npz",
]
