"""Checkpoints of arbitrary training-state pytrees, on top of orbax-checkpoint.

A training state (params, optax states, MD replica states, PRNG keys, phase
strings, counters) is flattened with `jax.tree_util` into its leaves:

- array leaves (jax/NumPy arrays, NumPy scalars) go to an orbax array item;
- typed PRNG keys (`jax.random.key`) are stored as their raw key data and
  re-wrapped on restore;
- Python scalars and strings (int, float, bool, str) go to a JSON item, so that
  counters stay Python ints and a phase name stays a string.

Restoring needs a *template* pytree of the same structure (e.g. the freshly
initialised state): its tree definition rebuilds the containers (dicts,
NamedTuples, dataclasses, flax/jax-md pytree dataclasses) and its leaves give
the array kinds (NumPy leaves come back as NumPy, jax leaves as jax arrays).
Saves are atomic (orbax writes to a temporary directory and renames it), so a
crash mid-save leaves the previous checkpoint intact.

Example:
  >>> ckpt = CheckpointManager(workdir / "checkpoints", max_to_keep=3)
  >>> restored = ckpt.restore_latest(state)   # None on a fresh run
  >>> if restored is not None:
  ...     start_epoch, state = restored
  >>> ckpt.save(epoch, state)
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_ARRAYS = "arrays"
_META = "meta"
_FORMAT_VERSION = 1
# orbax refuses an empty array item; states made only of Python values carry this.
_SENTINEL = "format_version"


def _not_an_orphaned_read_error(record) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _quiet_orbax_read_failures() -> None:
    """A failed orbax restore leaves asyncio read tasks whose errors nobody retrieves;
    asyncio logs each with a long traceback at garbage collection. Once we have reported
    the damaged checkpoint ourselves, those repeats are dropped."""
    logger = logging.getLogger("asyncio")
    if _not_an_orphaned_read_error not in logger.filters:
        logger.addFilter(_not_an_orphaned_read_error)


def _checksum(x) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(x)).tobytes())


def _is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_name(i: int) -> str:
    return f"leaf_{i:06d}"


def _split_leaves(leaves):
    """Sorts flattened leaves into orbax arrays and JSON-able Python values."""
    arrays: dict[str, Any] = {_SENTINEL: np.asarray(_FORMAT_VERSION, dtype=np.int32)}
    kinds: list[str] = []
    python_values: dict[str, Any] = {}
    for i, leaf in enumerate(leaves):
        name = _leaf_name(i)
        if _is_typed_key(leaf):
            arrays[name] = jax.random.key_data(leaf)
            kinds.append("prng_key:" + str(jax.random.key_impl(leaf)))
        elif isinstance(leaf, (bool, int, float, str)):
            # bool is checked with int: JSON keeps true/false apart from 0/1.
            python_values[name] = leaf
            kinds.append("python:" + type(leaf).__name__)
        elif isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            # orbax handles 0-d arrays but not NumPy scalar objects.
            arrays[name] = np.asarray(leaf) if isinstance(leaf, np.generic) else leaf
            kinds.append("array")
        else:
            raise ValueError(
                f"checkpoint leaf {i} has unsupported type {type(leaf).__name__}; leaves must be "
                "jax/NumPy arrays, PRNG keys, or Python bool/int/float/str"
            )
    return arrays, kinds, python_values


class CheckpointManager:
    """Keeps the last `max_to_keep` checkpoints of a training state in a directory.

    A thin wrapper over `orbax.checkpoint.CheckpointManager` that accepts any
    pytree (see the module docstring). Steps are non-negative ints (epochs).

    Args:
      directory: folder for the checkpoints (created if missing).
      max_to_keep: number of most recent checkpoints kept on disk (None keeps all).
      async_save: let orbax write in a background thread. Off by default: the
        states here are small and a synchronous save makes "the checkpoint of
        epoch k exists" true as soon as `save` returns.
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = False
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_ARRAYS, _META)
        )

    # -- saving -------------------------------------------------------------------------------

    def save(self, step: int, state: PyTree, *, force: bool = True) -> bool:
        """Saves `state` as checkpoint `step` (overwrites nothing; steps must increase).

        Args:
          step: non-negative int, e.g. the number of completed epochs.
          state: any pytree of arrays, PRNG keys and Python scalars/strings.
          force: save even if orbax's save-interval policy would skip this step.

        Returns:
          True if a checkpoint was written.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        leaves, treedef = jax.tree_util.tree_flatten(state)
        arrays, kinds, python_values = _split_leaves(leaves)
        meta = {
            "format_version": _FORMAT_VERSION,
            "n_leaves": len(leaves),
            "treedef": str(treedef),
            "kinds": kinds,
            "python_values": python_values,
            # CRC32 of every array's bytes: a flipped bit on disk is detected on restore.
            "checksums": {k: [_checksum(v), str(np.asarray(v).dtype)] for k, v in arrays.items()},
        }
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_ARRAYS: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}
            ),
            force=force,
        )
        return bool(saved)

    def wait_until_finished(self) -> None:
        """Blocks until background saves (async_save=True) are on disk."""
        self._manager.wait_until_finished()

    # -- querying -----------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest saved step, or None when nothing has been saved."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All steps currently on disk, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    # -- restoring ----------------------------------------------------------------------------

    def restore(self, template: PyTree, *, step: int | None = None) -> PyTree:
        """Restores checkpoint `step` (default: the latest) into the structure of `template`.

        Args:
          template: a pytree with the same structure as the saved state (leaf
            values are ignored; their kinds and dtypes decide what comes back).
          step: which checkpoint; None for the latest.

        Raises:
          FileNotFoundError: no checkpoint (or not that step) in the directory.
          ValueError: the template does not match the saved structure.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif int(step) not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})"
            )
        step = int(step)
        leaves, treedef = jax.tree_util.tree_flatten(template)
        template_arrays, template_kinds, _ = _split_leaves(leaves)

        meta = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )[_META]
        if meta["n_leaves"] != len(leaves):
            raise ValueError(
                f"checkpoint step {step} in {self.directory} has {meta['n_leaves']} leaves but the "
                f"template has {len(leaves)}; saved structure: {meta['treedef']}"
            )
        for i, (saved_kind, kind) in enumerate(zip(meta["kinds"], template_kinds, strict=True)):
            # A Python int may have been saved where the template holds a float and
            # vice versa only if the user changed types; flag real kind changes.
            if saved_kind.split(":")[0] != kind.split(":")[0]:
                raise ValueError(
                    f"checkpoint leaf {i} was saved as {saved_kind} but the template has {kind}"
                )

        restored_arrays = self._manager.restore(
            step, args=ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore(template_arrays)})
        )[_ARRAYS]
        for name, (crc, dtype) in meta.get("checksums", {}).items():
            value = restored_arrays.get(name)
            if value is None or str(np.asarray(value).dtype) != dtype:
                continue  # restored into another dtype on purpose: nothing to compare
            if _checksum(value) != crc:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory}: array {name} does not match "
                    "its checksum (corrupted on disk)"
                )
        out = []
        for i, (leaf, kind) in enumerate(zip(leaves, template_kinds, strict=True)):
            name = _leaf_name(i)
            if kind.startswith("prng_key"):
                out.append(
                    jax.random.wrap_key_data(restored_arrays[name], impl=jax.random.key_impl(leaf))
                )
            elif kind.startswith("python"):
                out.append(type(leaf)(meta["python_values"][name]))
            else:
                value = restored_arrays[name]
                if isinstance(leaf, np.generic):
                    value = np.asarray(value).astype(leaf.dtype)[()]
                out.append(value)
        return jax.tree_util.tree_unflatten(treedef, out)

    def restore_latest(self, template: PyTree) -> tuple[int, PyTree] | None:
        """(step, state) of the newest intact checkpoint, or None when nothing is saved.

        A checkpoint that cannot be read (truncated metadata, missing or corrupted array
        files, a checksum mismatch) is moved aside to `corrupt-<step>` with a warning
        naming it, and the next older one is tried; when none can be read, the error of
        the newest is raised.
        """
        steps = self.all_steps()
        if not steps:
            return None
        first_error = None
        for step in reversed(steps):
            try:
                return step, self.restore(template, step=step)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
                if first_error is None:
                    first_error = e
                bad = os.path.join(self.directory, str(step))
                aside = os.path.join(self.directory, f"corrupt-{step}")
                warnings.warn(
                    f"checkpoint {bad} cannot be restored ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); moved to {aside}, trying "
                    "the previous one",
                    stacklevel=2,
                )
                _quiet_orbax_read_failures()
                if os.path.exists(bad):
                    if os.path.exists(aside):
                        shutil.rmtree(aside)
                    os.replace(bad, aside)
                self._manager.reload()
        raise first_error

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
