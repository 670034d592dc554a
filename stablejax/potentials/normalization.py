"""Fit the per-species energy shift and the global energy scale from data.

Per-atom energy = energy_scale * raw_i + energy_shift[species_i] (see
`stablejax.potentials.factory`). As in NequIP/MACE, the shifts are fitted by
least squares of total energies on species counts, and the scale is the RMS
of the force components, so that a freshly initialised network (raw outputs
of order one, forces of order one per Å) starts with forces of the right size
and total energies near the data mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from stablejax.data.dataset import Dataset


def _as_list(datasets) -> list[Dataset]:
    if isinstance(datasets, Dataset):
        return [datasets]
    datasets = list(datasets)
    if not datasets:
        raise ValueError("Need at least one Dataset.")
    return datasets


def species_counts(species, supported: Sequence[int]) -> np.ndarray:
    """[n_species] number of atoms of each supported atomic number in `species` [n]."""
    species = np.asarray(species)
    unknown = sorted(set(np.unique(species).tolist()) - {int(z) for z in supported})
    if unknown:
        raise ValueError(
            f"Atomic number(s) {unknown} not in the model's species {list(supported)}."
        )
    return np.array([np.sum(species == z) for z in supported], dtype=np.float64)


def fit_energy_shift(datasets: Dataset | Sequence[Dataset], supported: Sequence[int]) -> np.ndarray:
    """Per-species energy shift (eV) by least squares of total energies on species counts.

    Solves min_s sum_frames (E_f - c_f . s)^2. When the counts do not determine
    s (always the case for frames of one composition), the solution closest to
    the uniform shift s_k = e_bar (mean energy per atom over all frames) is
    returned; for a single composition that is exactly e_bar for every species.
    Species absent from the data get e_bar.

    Args:
      datasets: one Dataset or several (different compositions), energies in eV.
      supported: the model's atomic numbers (config.species), in model order.

    Returns:
      [n_species] eV.
    """
    rows, targets = [], []
    for data in _as_list(datasets):
        if data.energies is None:
            raise ValueError(f"Dataset {data.source!r} has no energies to fit a shift to.")
        energies = np.asarray(data.energies, dtype=np.float64).reshape(-1)
        counts = species_counts(data.species, supported)
        rows.append(np.broadcast_to(counts, (energies.size, counts.size)))
        targets.append(energies)
    counts = np.concatenate(rows)
    energies = np.concatenate(targets)
    e_bar = energies.sum() / counts.sum()
    # Min-norm correction to the uniform shift: lstsq returns the minimum-norm
    # delta, i.e. the least-squares solution nearest to s = e_bar.
    delta, *_ = np.linalg.lstsq(counts, energies - counts.sum(1) * e_bar, rcond=None)
    return e_bar + delta


def fit_energy_scale(datasets: Dataset | Sequence[Dataset]) -> float:
    """Global energy scale (eV): RMS of all force components (eV/Å x 1 Å).

    Falls back to the RMS per-atom energy fluctuation when there are no forces.
    """
    datasets = _as_list(datasets)
    forces = [np.asarray(d.forces).ravel() for d in datasets if d.forces is not None]
    if forces:
        f = np.concatenate(forces)
        scale = float(np.sqrt(np.mean(f * f)))
    else:
        energies = [
            (np.asarray(d.energies).ravel() - np.mean(d.energies)) / d.n_atoms
            for d in datasets
            if d.energies is not None and d.n_frames > 1
        ]
        if not energies:
            raise ValueError("Need forces, or energies of more than one frame, to fit a scale.")
        scale = float(np.sqrt(np.mean(np.concatenate(energies) ** 2)))
    if not scale > 0:
        raise ValueError(f"Fitted energy scale is {scale}; data has no forces/fluctuations?")
    return scale


def fit_energy_normalization(params, datasets: Dataset | Sequence[Dataset], config) -> dict:
    """Params with energy_shift and energy_scale fitted to `datasets`.

    Args:
      params: a factory-built potential's params ({'net', 'energy_shift', 'energy_scale'}).
      datasets: training Dataset(s), ASE units.
      config: the potential's config (config.species gives the model's order).

    Returns:
      A new params dict (other entries shared, not copied).

    Example:
      >>> params = potential.init(key, data.species, data.positions[0], data.box)
      >>> params = fit_energy_normalization(params, train_data, potential.config)
    """
    supported = [int(z) for z in config.species]
    shift = fit_energy_shift(datasets, supported)
    scale = fit_energy_scale(datasets)
    dtype = jnp.asarray(params["energy_shift"]).dtype
    return dict(
        params,
        energy_shift=jnp.asarray(shift, dtype=dtype),
        energy_scale=jnp.asarray(scale, dtype=dtype),
    )
