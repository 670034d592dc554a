"""The dataset container every reader returns and every trainer consumes."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Dataset:
    """Frames of one system with QM labels, in ASE units.

    Attributes:
      species: [n] int atomic numbers (same for every frame).
      positions: [m, n, 3] Å (wrapped into the box for periodic data).
      energies: [m] eV, or None when the source has no energies.
      forces: [m, n, 3] eV/Å, or None.
      box: [3] Å orthorhombic box side lengths, [3, 3] Å cell (lattice vectors as
        rows; extended-XYZ/npz data with a triclinic cell), or None for free space.
      velocities: [m, n, 3] Å/(ASE time unit), or None.
      frame_interval_fs: time between consecutive frames in fs, or None when the
        frames are not a trajectory (or the interval is unknown).
      unwrapped_positions: [m, n, 3] Å, or None (periodic trajectories only).
      source: where the data came from (path, or a generator description).
      metadata: free-form dict (theory level, temperature, units on disk...).
    """

    species: np.ndarray
    positions: np.ndarray
    energies: np.ndarray | None = None
    forces: np.ndarray | None = None
    box: np.ndarray | None = None
    velocities: np.ndarray | None = None
    frame_interval_fs: float | None = None
    unwrapped_positions: np.ndarray | None = None
    source: str = ""
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.species.shape[0])

    @property
    def periodic(self) -> bool:
        return self.box is not None

    def subset(self, index) -> Dataset:
        """A new Dataset with the frames selected by `index` (int array or slice)."""

        def take(a):
            return None if a is None else np.asarray(a)[index]

        return dataclasses.replace(
            self,
            positions=take(self.positions),
            energies=take(self.energies),
            forces=take(self.forces),
            velocities=take(self.velocities),
            unwrapped_positions=take(self.unwrapped_positions),
        )
