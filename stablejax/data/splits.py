"""Train/validation/test splits and initial conditions for MD replicas.

Sizes are frame counts (ints, e.g. MD17's 950/50 out of 1k) or fractions of the
dataset (floats in (0, 1], e.g. MD22's percentage splits). The test set is drawn first
and does not depend on the training-set size, as in the reference pipeline (MDsim
draws a fixed test set, then train/val from the remaining pool), so models trained on
1k and 10k frames are compared on the same test frames.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from stablejax.data.dataset import Dataset

__all__ = [
    "Split",
    "InitialConditions",
    "split_indices",
    "split_dataset",
    "sample_initial_conditions",
]


class Split(NamedTuple):
    """Frame indices of the three subsets (disjoint, each sorted ascending)."""

    train: np.ndarray  # [n_train] int
    val: np.ndarray  # [n_val] int
    test: np.ndarray  # [n_test] int


class InitialConditions(NamedTuple):
    """Starting states for replicas, taken from dataset frames."""

    positions: np.ndarray  # [n, atoms, 3] Å
    velocities: np.ndarray | None  # [n, atoms, 3] Å/(ASE time), or None
    indices: np.ndarray  # [n] frame indices the states came from


def _count(size, n_frames, name) -> int:
    if size is None:
        return 0
    if isinstance(size, bool):
        raise ValueError(f"{name} must be a count or a fraction, got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not 0.0 <= size <= 1.0:
            raise ValueError(f"{name}={size} as a fraction must lie in [0, 1]")
        return int(round(float(size) * n_frames))
    size = int(size)
    if size < 0:
        raise ValueError(f"{name}={size} must not be negative")
    return size


def split_indices(
    n_frames: int,
    *,
    train,
    val,
    test=None,
    mode: str = "random",
    seed: int = 0,
) -> Split:
    """Splits frame indices ``0..n_frames-1`` into train/val/test.

    Args:
      n_frames: number of frames in the dataset.
      train: training-set size, a count (``950``) or a fraction (``0.8``).
      val: validation-set size, count or fraction.
      test: test-set size, count or fraction; None uses every remaining frame.
      mode: ``'random'`` (test drawn first from all frames with `seed`, then train and val
        from the rest) or ``'contiguous'`` (train = the first frames, val = the next
        ones, test = the last ones: a time split, no frames shared across a boundary).
      seed: seed of the random permutation (ignored for contiguous splits).

    Returns:
      A :class:`Split` of sorted int64 index arrays.

    Example:
      >>> s = split_indices(1000, train=950, val=50, test=0, seed=0)
      >>> len(s.train), len(s.val), len(s.test)
      (950, 50, 0)
    """
    n_frames = int(n_frames)
    if n_frames <= 0:
        raise ValueError(f"cannot split {n_frames} frames")
    n_train = _count(train, n_frames, "train")
    n_val = _count(val, n_frames, "val")
    n_test = n_frames - n_train - n_val if test is None else _count(test, n_frames, "test")
    if n_train + n_val + n_test > n_frames or n_test < 0:
        raise ValueError(
            f"split sizes train={n_train} + val={n_val} + test={n_test} exceed the "
            f"{n_frames} frames available"
        )
    if mode == "contiguous":
        tr = np.arange(0, n_train)
        va = np.arange(n_train, n_train + n_val)
        te = np.arange(n_frames - n_test, n_frames)
    elif mode == "random":
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n_frames)
        te = perm[:n_test]
        pool = rng.permutation(perm[n_test:])
        va = pool[:n_val]
        tr = pool[n_val : n_val + n_train]
    else:
        raise ValueError(f"mode must be 'random' or 'contiguous', got {mode!r}")
    return Split(*(np.sort(a).astype(np.int64) for a in (tr, va, te)))


def split_dataset(dataset: Dataset, **kwargs) -> tuple[Dataset, Dataset, Dataset]:
    """Splits a Dataset with :func:`split_indices` (same keyword arguments).

    Returns:
      ``(train, val, test)`` Datasets; each records its frame indices in
      ``metadata['frame_indices']``.
    """
    split = split_indices(dataset.n_frames, **kwargs)
    out = []
    for idx in split:
        sub = dataset.subset(idx)
        sub.metadata = {**dataset.metadata, "frame_indices": idx}
        out.append(sub)
    return tuple(out)


def sample_initial_conditions(
    dataset: Dataset,
    n: int,
    *,
    seed: int,
    pool=None,
    replace: bool = False,
) -> InitialConditions:
    """Draws `n` frames as replica starting states.

    Args:
      dataset: frames to draw from.
      n: number of replicas.
      seed: random seed.
      pool: frame indices to draw from (e.g. ``split.train``); default all frames.
      replace: allow drawing the same frame twice (needed when n > len(pool)).

    Returns:
      :class:`InitialConditions` with positions [n, atoms, 3] Å (wrapped for periodic
      data), velocities [n, atoms, 3] Å/(ASE time) or None when the dataset has none
      (draw Maxwell-Boltzmann velocities then), and the frame indices used.
    """
    n = int(n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    pool = np.arange(dataset.n_frames) if pool is None else np.asarray(pool, dtype=np.int64)
    if pool.size == 0:
        raise ValueError("cannot sample initial conditions from an empty pool of frames")
    if pool.min() < 0 or pool.max() >= dataset.n_frames:
        raise ValueError(f"pool indices must lie in [0, {dataset.n_frames})")
    if n > pool.size and not replace:
        raise ValueError(
            f"asked for {n} initial conditions from {pool.size} frames without replacement; "
            "pass replace=True or a larger pool"
        )
    rng = np.random.default_rng(seed)
    idx = rng.choice(pool, size=n, replace=replace)
    velocities = None if dataset.velocities is None else np.asarray(dataset.velocities)[idx]
    return InitialConditions(
        positions=np.asarray(dataset.positions)[idx], velocities=velocities, indices=idx
    )
