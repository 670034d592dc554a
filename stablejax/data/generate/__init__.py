"""Reference-data generation with real engines (the ``[reference]`` extra), cached on disk.

Three datasets, one command each::

    python -m stablejax.data.generate water --frames 20000 --out DIR
    python -m stablejax.data.generate aspirin --frames 1000 --out DIR
    python -m stablejax.data.generate tetrapeptide --frames 1000 --out DIR

- ``water``: 64 flexible SPC/Fw waters, OpenMM with PME, 300 K, 0.5 fs, a frame every
  10 fs, written in the MDsim water ``.npy`` format (:mod:`.water`).
- ``aspirin``, ``tetrapeptide`` (Ac-Ala3-NHMe): GFN2-xTB Langevin MD with tblite at
  500 K, 0.5 fs, written as sGDML npz labelled ``theory='GFN2-xTB'`` (:mod:`.xtb`).

Experiments call :func:`ensure_dataset`, which returns the cached file when the same
parameters were generated before. Importing this package does not import openmm,
tblite or rdkit.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATASETS", "ensure_dataset"]

#: Names accepted by :func:`ensure_dataset` and the command line.
DATASETS = ("water", "aspirin", "tetrapeptide")


def ensure_dataset(
    name: str,
    *,
    out_dir,
    n_frames: int,
    seed: int = 0,
    progress: bool = True,
    **options,
) -> Path:
    """Returns the path of a generated reference dataset, generating it when missing.

    Args:
      name: ``'water'``, ``'aspirin'`` or ``'tetrapeptide'``.
      out_dir: cache directory.
      n_frames: number of frames.
      seed: random seed.
      progress: show a progress bar with ETA while generating.
      **options: passed to :func:`.water.generate_water` or
        :func:`.xtb.generate_molecule` (temperature_K, force_constants, stride, ...).

    Returns:
      Path to the data file (``.npy`` for water, ``.npz`` otherwise); its ``.json``
      sidecar holds the parameters, sanity figures and generation rate.

    Example:
      >>> path = ensure_dataset("water", out_dir="data", n_frames=1000)  # doctest: +SKIP
      >>> ds = stablejax.data.load(path)                                  # doctest: +SKIP
    """
    if name == "water":
        from stablejax.data.generate.water import generate_water

        return generate_water(out_dir, n_frames=n_frames, seed=seed, progress=progress, **options)
    if name in ("aspirin", "tetrapeptide"):
        from stablejax.data.generate.xtb import generate_molecule

        return generate_molecule(
            name, out_dir, n_frames=n_frames, seed=seed, progress=progress, **options
        )
    raise ValueError(f"unknown dataset {name!r}; known: {DATASETS}")
