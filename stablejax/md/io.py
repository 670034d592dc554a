"""Trajectory writers: extended XYZ through ASE (opens in ASE, OVITO, VMD) and npz."""

from __future__ import annotations

import os

import numpy as np

from stablejax import geometry

__all__ = ["write_trajectory"]


def write_trajectory(path, positions, species, *, box=None, velocities=None, energies=None):
    """Write one replica's trajectory to ``.xyz``/``.extxyz`` (ASE) or ``.npz``.

    Args:
      path: output file; the suffix picks the format (.xyz, .extxyz, .npz).
      positions: [F, n, 3] Å (one replica, e.g. ``traj.position[r]``).
      species: [n] atomic numbers.
      box: None (free space), [3] Å or [F, 3] Å orthorhombic box(es), or
        [3, 3] Å or [F, 3, 3] Å cell(s) (lattice vectors as rows); sets the
        cell and pbc=True.
      velocities: optional [F, n, 3] Å / (ASE time); stored as ASE momenta
        in extxyz, as ``velocities`` in npz.
      energies: optional [F] eV potential energies (extxyz ``energy`` info).

    Example:
      >>> write_trajectory("r0.extxyz", traj.position[0], species, box=traj.box[0])
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim == 2:
        positions = positions[None]
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be [frames, n, 3], got {positions.shape}")
    n_frames, n = positions.shape[:2]
    species = np.asarray(species, dtype=np.int32)
    if species.shape != (n,):
        raise ValueError(f"species must be [n]={n}, got {species.shape}")
    boxes = None
    if box is not None:
        box = np.asarray(box, dtype=np.float64)
        core = (3, 3) if box.shape[-2:] == (3, 3) and box.shape != (n_frames, 3) else (3,)
        boxes = np.broadcast_to(box, (n_frames,) + core)
    if velocities is not None:
        velocities = np.asarray(velocities, dtype=np.float64).reshape(positions.shape)
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix == ".npz":
        arrays = {"positions": positions, "species": species}
        if boxes is not None:
            arrays["box"] = boxes
        if velocities is not None:
            arrays["velocities"] = velocities
        if energies is not None:
            arrays["energies"] = np.asarray(energies)
        np.savez(path, **arrays)
        return
    if suffix not in (".xyz", ".extxyz"):
        raise ValueError(f"unknown trajectory format {suffix!r}; use .xyz, .extxyz or .npz")
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k in range(n_frames):
        atoms = ase.Atoms(numbers=species, positions=positions[k])
        if boxes is not None:
            atoms.set_cell(geometry.cell_matrix(boxes[k]))
            atoms.set_pbc(True)
        if velocities is not None:
            atoms.set_velocities(velocities[k])
        if energies is not None:
            atoms.calc = SinglePointCalculator(atoms, energy=float(np.asarray(energies)[k]))
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
