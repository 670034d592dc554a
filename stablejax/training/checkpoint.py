"""Checkpoints of training-state pytrees, on top of orbax-checkpoint.

A checkpoint `<directory>/<step>/` holds two orbax items:

- `state`: the state pytree itself, written with orbax's standard (PyTree)
  handler, so every leaf is stored under its key path (`params/dense/kernel`,
  `opt_state/...`, `epoch`). A plain orbax restore reads it without this module:
  `ocp.StandardCheckpointer().restore(f"{directory}/{step}/state")` gives nested
  dicts/lists of arrays named like the state's fields;
- `meta`: JSON with the format version, the key paths and the kind of every leaf
  and a CRC32 of every array's bytes (a flipped bit on disk is detected on restore).

Leaves may be jax/NumPy arrays, NumPy scalars, Python bool/int/float, None, or
typed PRNG keys (`jax.random.key`, stored as their raw key data and re-wrapped on
restore). Restoring needs a *template* pytree of the same structure (e.g. the
freshly initialised state): its tree definition rebuilds the containers (dicts,
NamedTuples, dataclasses, flax/jax-md pytree dataclasses) and its leaves give the
array kinds (NumPy leaves come back as NumPy, jax leaves as jax arrays, Python
scalars as Python scalars).

Crash safety: saves are atomic (orbax writes to a temporary directory and renames
it), so a crash mid-save leaves the previous checkpoint intact; a checkpoint that
cannot be read (truncated metadata, damaged array files, a checksum mismatch) is
moved aside by `restore_latest`, which falls back to the previous one.

Several processes (`jax.distributed`): every process calls `save` and `restore` (they
are collectives) with the same state, and orbax's multi-host saving writes it once:
arrays split over the processes' devices (the replicas' MD state) are written shard by
shard, each process its own; values every process holds whole (NumPy, Python scalars,
arrays on a process's own devices, which the replicated computation makes equal
everywhere: QM pre-training, counters) are written by process 0 only. Checksums are of
the whole arrays (gathered). A checkpoint stores global arrays, so a run may resume
with another number of processes or devices: the arrays are read into the template's
placement. The directory must be one that every process sees (a shared filesystem).

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

STATE = "state"
_META = "meta"
_FORMAT_VERSION = 2


class CheckpointFormatError(ValueError):
    """A readable checkpoint in another format (written by another stablejax version)."""


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


def _kind(path, leaf) -> str:
    if _is_typed_key(leaf):
        return "prng_key:" + str(jax.random.key_impl(leaf))
    # bool before int: orbax keeps Python scalars, the kind keeps true/false apart from 0/1.
    if isinstance(leaf, (bool, int, float)):
        return "python:" + type(leaf).__name__
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        return "array"
    raise ValueError(
        f"checkpoint leaf {jax.tree_util.keystr(path)} has unsupported type "
        f"{type(leaf).__name__}; leaves must be jax/NumPy arrays, PRNG keys, or Python "
        "bool/int/float"
    )


def _storable(leaf):
    """The value orbax writes for a leaf (typed keys as key data, NumPy scalars as 0-d)."""
    if _is_typed_key(leaf):
        return jax.random.key_data(leaf)
    if isinstance(leaf, np.generic):
        return np.asarray(leaf)
    return leaf


def _several_processes() -> bool:
    return jax.process_count() > 1


def _process_local(x) -> bool:
    """A jax array on this process's own devices only, with several processes."""
    return _several_processes() and isinstance(x, jax.Array) and x.is_fully_addressable


def _describe(tree) -> tuple[dict[str, str], Any]:
    """({key path: kind}, the tree as orbax stores it)."""
    kinds = {
        jax.tree_util.keystr(p): _kind(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }
    stored = jax.tree.map(_storable, tree)
    if _several_processes():
        # Process-local arrays hold the same value in every process: as host values,
        # orbax writes them from process 0 alone (as a jax array each process would
        # write the "same" global array).
        stored = jax.tree.map(lambda x: np.asarray(x) if _process_local(x) else x, stored)
    return kinds, stored


def _whole(x):
    """The whole value of a leaf on the host (gathered from every process: a collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from stablejax.sharding import to_host

        return to_host(x)
    return np.asarray(x)


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
            self.directory, options=options, item_names=(STATE, _META)
        )

    def state_path(self, step: int) -> str:
        """The orbax PyTree item of checkpoint `step` (for a plain orbax restore)."""
        return os.path.join(self.directory, str(int(step)), STATE)

    # -- saving -------------------------------------------------------------------------------

    def save(self, step: int, state: PyTree, *, force: bool = True) -> bool:
        """Saves `state` as checkpoint `step` (overwrites nothing; steps must increase).

        Args:
          step: non-negative int, e.g. the number of completed epochs.
          state: any pytree of arrays, PRNG keys and Python bool/int/float.
          force: save even if orbax's save-interval policy would skip this step.

        Returns:
          True if a checkpoint was written.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        kinds, stored = _describe(state)
        meta = {
            "format_version": _FORMAT_VERSION,
            "treedef": str(jax.tree_util.tree_structure(state)),
            "kinds": kinds,
            "checksums": {
                jax.tree_util.keystr(p): [_checksum(_whole(x)), str(np.dtype(x.dtype))]
                for p, x in jax.tree_util.tree_leaves_with_path(stored)
                if not isinstance(x, (bool, int, float))
            },
        }
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(stored), _META: ocp.args.JsonSave(meta)}
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
          ValueError: the template does not match the saved structure, or an array
            does not match its checksum.
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
        kinds, stored_template = _describe(template)
        meta = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )[_META]
        if meta.get("format_version") != _FORMAT_VERSION:
            raise CheckpointFormatError(
                f"checkpoint step {step} in {self.directory} has format version "
                f"{meta.get('format_version')}, this stablejax reads version {_FORMAT_VERSION}; "
                "continue that run with the stablejax version that wrote it, or start it "
                "again in a new workdir"
            )
        saved_kinds = meta["kinds"]
        if list(saved_kinds) != list(kinds):
            missing = sorted(set(kinds) - set(saved_kinds))
            extra = sorted(set(saved_kinds) - set(kinds))
            raise ValueError(
                f"checkpoint step {step} in {self.directory} has {len(saved_kinds)} leaves but the "
                f"template has {len(kinds)} (not saved: {missing[:5]}; not in the template: "
                f"{extra[:5]}); saved structure: {meta['treedef']}"
            )
        for name, kind in kinds.items():
            if saved_kinds[name].split(":")[0] != kind.split(":")[0]:
                raise ValueError(
                    f"checkpoint leaf {name} was saved as {saved_kinds[name]} but the template "
                    f"has {kind}"
                )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(stored_template)})
        )[STATE]
        for path, value in jax.tree_util.tree_leaves_with_path(restored):
            name = jax.tree_util.keystr(path)
            crc, dtype = meta["checksums"].get(name, (None, None))
            if crc is None or isinstance(value, (bool, int, float)):
                continue  # a Python scalar
            if str(np.dtype(value.dtype)) != dtype:
                continue  # restored into another dtype on purpose
            if _checksum(_whole(value)) != crc:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory}: array {name} does not match "
                    "its checksum (corrupted on disk)"
                )

        def back(leaf, value):
            if _process_local(leaf):  # read as a host value (see _describe)
                value = jax.device_put(value, leaf.sharding)
            if _is_typed_key(leaf):
                return jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf))
            if isinstance(leaf, (bool, int, float)):
                return type(leaf)(value)
            if isinstance(leaf, np.generic):
                return np.asarray(value).astype(leaf.dtype)[()]
            return value

        return jax.tree.map(back, template, restored)

    def restore_latest(self, template: PyTree) -> tuple[int, PyTree] | None:
        """(step, state) of the newest intact checkpoint, or None when nothing is saved.

        A checkpoint that cannot be read (truncated metadata, missing or corrupted array
        files, a checksum mismatch) is moved aside to `corrupt-<step>` with a warning
        naming it, and the next older one is tried; when none can be read, the error of
        the newest is raised. A checkpoint of another format version raises
        `CheckpointFormatError` and is left in place.
        """
        steps = self.all_steps()
        if not steps:
            return None
        first_error = None
        for step in reversed(steps):
            try:
                return step, self.restore(template, step=step)
            except CheckpointFormatError:
                raise  # intact, only older: not moved aside, nothing silently restarted
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
                # Several processes fail on the same files (a shared filesystem): process
                # 0 moves them aside while the others wait.
                from stablejax.sharding import is_main_process, sync_processes

                if is_main_process() and os.path.exists(bad):
                    if os.path.exists(aside):
                        shutil.rmtree(aside)
                    os.replace(bad, aside)
                sync_processes(f"checkpoint {bad} moved aside")
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
