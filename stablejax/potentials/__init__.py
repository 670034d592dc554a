"""Potentials: pure Flax energy functions (see `stablejax.potentials.base`).

Build one with `build(default_config(name))`; architectures plug in through
the module contract documented in `stablejax.potentials.factory`. Property
checks for tests live in `stablejax.potentials.testing`; the ASE calculator in
`stablejax.potentials.ase_calculator`.
"""

from stablejax.potentials.base import (
    Potential,
    all_pairs_edges,
    cutoff_fits_cell,
    edge_vectors,
    minimum_image,
    perpendicular_widths,
    safe_norm,
)
from stablejax.potentials.factory import (
    build,
    check_species,
    default_config,
    from_module,
    species_indices,
)
from stablejax.potentials.io import load_model, save_model
from stablejax.potentials.normalization import (
    fit_energy_normalization,
    fit_energy_scale,
    fit_energy_shift,
)

__all__ = [
    "Potential",
    "all_pairs_edges",
    "build",
    "check_species",
    "cutoff_fits_cell",
    "default_config",
    "edge_vectors",
    "fit_energy_normalization",
    "fit_energy_scale",
    "fit_energy_shift",
    "from_module",
    "load_model",
    "minimum_image",
    "perpendicular_widths",
    "safe_norm",
    "save_model",
    "species_indices",
]
