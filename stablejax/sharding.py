"""The one place where replicas are spread over devices.

Replicas are independent, so the replica axis is the natural one to split: a
`jax.sharding.Mesh` over the selected devices with one axis, ``"replicas"``,
and every array with a leading replica (or sample) axis placed with
``NamedSharding(mesh, P("replicas"))``; parameters are replicated. The jitted
functions themselves are unchanged: XLA's SPMD partitioner splits the vmapped
MD step, the neighbour-list rebuild and the Boltzmann estimator along the
sharded axis and turns reductions over it (``jnp.any`` of the rebuild flags,
the estimator's sums over samples) into cross-device all-reduces. Results
therefore do not depend on the device count beyond floating-point summation
order.

Callers pass ``mesh=None`` for one device; every helper is then the identity,
so single-device runs are exactly what they were before sharding existed.

A replica count that is not a multiple of the device count is refused
(``check_divisible``) with a message naming the config field: padding with
dummy replicas would change the unstable fractions, the random resets and the
samples of the estimator, which all count replicas.

Example:
  >>> mesh = replica_mesh(0)  # all devices
  >>> check_divisible(8, mesh, field="md.n_replicas")
  >>> positions = shard_replicas(np.zeros((8, 21, 3)), mesh)  # [R, n, 3], split over R
  >>> params = replicate({"w": np.ones(3)}, mesh)  # whole on every device
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "REPLICA_AXIS",
    "select_devices",
    "replica_mesh",
    "mesh_or_none",
    "check_divisible",
    "replica_sharding",
    "shard_replicas",
    "replicate",
    "constrain_replicas",
    "to_host",
    "initialize_distributed",
    "runtime_info",
    "is_main_process",
    "from_process_0",
    "sync_processes",
]

REPLICA_AXIS = "replicas"

PyTree = Any


def select_devices(devices: int | Sequence[jax.Device] = 0) -> list[jax.Device]:
    """The devices replicas are spread over.

    Args:
      devices: 0 for every device (of every process after
        ``jax.distributed.initialize``), a count k for the first k devices, or an
        explicit sequence of ``jax.Device``.

    Raises:
      ValueError: a negative count, more devices than exist, or (several
        processes) a count that leaves a process without a device.
    """
    if not isinstance(devices, (int, np.integer)):
        selected = list(devices)
        if not selected:
            raise ValueError("devices: an empty device list")
        return selected
    available = jax.devices()
    k = int(devices)
    if k < 0:
        raise ValueError(f"config.devices: must be >= 0 (0 = all), got {k}")
    if k > len(available):
        raise ValueError(
            f"config.devices: {k} devices asked for, but only {len(available)} are available "
            f"({available[0].platform})"
        )
    if k == 0:
        return list(available)
    if jax.process_count() > 1 and k != len(available):
        raise ValueError(
            f"config.devices: with {jax.process_count()} processes every device takes part "
            f"(0 or {len(available)}); got {k}"
        )
    return list(available[:k])


def replica_mesh(devices: int | Sequence[jax.Device] = 0) -> Mesh:
    """A one-axis ``Mesh`` named ``"replicas"`` over ``select_devices(devices)``."""
    return Mesh(np.asarray(select_devices(devices), dtype=object), (REPLICA_AXIS,))


def mesh_or_none(devices: int | Sequence[jax.Device] = 0) -> Mesh | None:
    """``replica_mesh(devices)``, or None when it would hold one device (no sharding)."""
    mesh = replica_mesh(devices)
    return mesh if mesh.size > 1 else None


def check_divisible(n_replicas: int, mesh: Mesh | None, *, field: str = "md.n_replicas") -> None:
    """Raises ValueError naming ``field`` unless ``n_replicas`` splits evenly over ``mesh``."""
    if mesh is None:
        return
    k = mesh.size
    if int(n_replicas) % k:
        lower = (int(n_replicas) // k) * k
        hint = f"{lower} or {lower + k}" if lower else f"{k}"
        raise ValueError(
            f"config.{field}: {n_replicas} replicas cannot be split evenly over {k} devices; "
            f"use a multiple of {k} (e.g. {hint}) or select fewer devices with config.devices"
        )


def replica_sharding(mesh: Mesh, *, axis: int = 0) -> NamedSharding:
    """``NamedSharding`` splitting array axis ``axis`` over the ``"replicas"`` mesh axis."""
    return NamedSharding(mesh, P(*([None] * axis), REPLICA_AXIS))


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _put(x, sharding: NamedSharding):
    """``device_put``; host (NumPy) values go through ``make_array_from_callback`` so that
    with several processes each one places its own devices' slices of the same value."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    x = np.asarray(x)  # a value every process holds whole
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_replicas(tree: PyTree, mesh: Mesh | None, *, axis: int = 0) -> PyTree:
    """Places every array leaf of ``tree`` with its axis ``axis`` split over the devices.

    Leaves with fewer than ``axis + 1`` dimensions (scalars) are replicated. A
    no-op for arrays already placed that way, and for ``mesh=None``.

    Args:
      tree: pytree whose array leaves have the replica (or sample) axis at
        ``axis``, e.g. an ``MDState`` ([R, ...] leaves) or recorded frames
        [R, F, n, 3].
      mesh: from ``replica_mesh``, or None.
      axis: position of the replica axis (1 for stacked states [D, R, ...]).

    Raises:
      ValueError: a leaf's replica axis is not a multiple of the device count.
    """
    if mesh is None:
        return tree
    split = replica_sharding(mesh, axis=axis)
    whole = _replicated(mesh)

    def place(x):
        if not _is_array(x) or np.ndim(x) <= axis:
            return _put(x, whole) if _is_array(x) else x
        if np.shape(x)[axis] % mesh.size:
            raise ValueError(
                f"an array of shape {np.shape(x)} cannot be split over {mesh.size} devices "
                f"along axis {axis} (replicas must be a multiple of the device count)"
            )
        return _put(x, split)

    return jax.tree.map(place, tree)


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Places every array leaf of ``tree`` (e.g. model parameters) whole on every device."""
    if mesh is None:
        return tree
    whole = _replicated(mesh)
    return jax.tree.map(lambda x: _put(x, whole) if _is_array(x) else x, tree)


def constrain_replicas(tree: PyTree, mesh: Mesh | None, *, axis: int = 0) -> PyTree:
    """Inside ``jit``: keeps axis ``axis`` of every array leaf split over the devices.

    Used on the outputs of the MD chunk, so the state that goes into the next
    chunk (and the recorded frames) stay split however XLA propagated shardings
    through ``lax.scan``; scalars are left alone.
    """
    if mesh is None:
        return tree
    split = replica_sharding(mesh, axis=axis)

    def constrain(x):
        if getattr(x, "ndim", 0) <= axis:
            return x
        return jax.lax.with_sharding_constraint(x, split)

    return jax.tree.map(constrain, tree)


def to_host(tree: PyTree) -> PyTree:
    """Every array leaf as a NumPy array holding ALL replicas.

    With one process that is ``np.asarray``; with several (``jax.distributed``), an
    array split over other processes' devices is gathered first (a collective: every
    process must call this in the same order). Host-side decisions (neighbour-list
    overflow, stability flags, which replicas to reset) are thus the same everywhere.
    """

    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x) if _is_array(x) else x

    return jax.tree.map(gather, tree)


DISTRIBUTED_MODES = ("", "auto", "explicit")


def initialize_distributed(
    mode: str = "",
    *,
    coordinator_address: str = "",
    num_processes: int = 1,
    process_id: int = 0,
) -> None:
    """``jax.distributed.initialize`` for runs over several processes or hosts.

    Call it before any other JAX call of the process (it decides which devices
    ``jax.devices()`` lists). On CPU the cross-process collectives use gloo.

    Args:
      mode: "" one process (nothing to do); "auto" for JAX's own detection of the
        cluster environment (SLURM, Open MPI, Kubernetes, Cloud TPU); "explicit"
        for the three arguments below.
      coordinator_address: "host:port" of process 0 (mode "explicit").
      num_processes: number of processes (mode "explicit").
      process_id: this process, 0 .. num_processes - 1 (mode "explicit").
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"config.distributed: unknown {mode!r}; choose one of {DISTRIBUTED_MODES}")
    if not mode:
        return
    # CPU-only processes (tests, CPU clusters) need a collectives backend across
    # processes; GPU and TPU backends bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "auto":
        jax.distributed.initialize()
        return
    if not coordinator_address:
        raise ValueError(
            "config.cluster.coordinator_address: distributed='explicit' needs host:port"
        )
    if not 0 <= int(process_id) < int(num_processes):
        raise ValueError(
            f"config.cluster.process_id: must be in [0, {num_processes}), got {process_id}"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=int(num_processes),
        process_id=int(process_id),
    )


def runtime_info(mesh: Mesh | None) -> dict:
    """{'n_devices', 'n_processes', 'platform'} of a run, for config.json and metrics."""
    n_devices = 1 if mesh is None else int(mesh.size)
    platform = jax.devices()[0].platform if mesh is None else mesh.devices.flat[0].platform
    return {"n_devices": n_devices, "n_processes": int(jax.process_count()), "platform": platform}


# ---------------------------------------------------------------------------------------------
# Several processes: one writer, one decision
# ---------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """True in process 0 (always with one process): the one that writes reports, metrics,
    figures, models and config.json; the others compute the same things and write nothing."""
    return jax.process_index() == 0


def from_process_0(tree: PyTree) -> PyTree:
    """Process 0's value of ``tree`` on every process (a collective: every process calls
    it in the same order); the identity with one process.

    For values every process computes but that may differ between them: wall times,
    what process 0 found on disk (``os.path.exists`` of a stage's output), results of
    replicated training on hardware with non-deterministic reductions. Host-side
    decisions taken from them are then the same everywhere, so no process skips a
    collective the others run. Leaves keep their kind: jax arrays come back with their
    sharding, NumPy arrays as NumPy, Python bool/int/float as such. Arrays split over
    several processes are refused (they are one value already).
    """
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    def host(x):
        if isinstance(x, jax.Array):
            if not (x.is_fully_addressable or x.is_fully_replicated):
                raise ValueError("from_process_0: an array split over processes")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    leaves, treedef = jax.tree.flatten(tree)
    values = [host(x) for x in leaves]
    # As raw bytes: bitwise exact for every dtype (float64 without jax_enable_x64, bool).
    raw = [np.ascontiguousarray(v).reshape(-1).view(np.uint8) for v in values]
    got = multihost_utils.broadcast_one_to_all(raw)

    def back(old, value, new):
        new = np.asarray(new, np.uint8).view(value.dtype).reshape(value.shape)
        if isinstance(old, jax.Array):
            return _put(new, old.sharding) if not old.is_fully_addressable else jnp_put(new, old)
        if isinstance(old, (bool, int, float)):
            return type(old)(new)
        if isinstance(old, np.generic):
            return new[()]
        return new

    def jnp_put(new, old):  # a process-local array: back on its own device(s)
        return jax.device_put(new, old.sharding)

    return jax.tree.unflatten(treedef, [back(*x) for x in zip(leaves, values, got, strict=True)])


def sync_processes(name: str) -> None:
    """Waits until every process reaches this point (e.g. after process 0 wrote a file
    the others read next); nothing with one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
