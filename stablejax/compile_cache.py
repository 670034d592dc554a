"""Persistent XLA compilation cache and a compile-time meter.

A study compiles the same MD chunk, learning step and evaluation functions every
time it starts (tens of seconds on 2 CPU cores, minutes for GemNet-T). JAX's own
persistent cache (`jax_compilation_cache_dir`) stores the compiled executables on
disk, keyed by the program, the jax/jaxlib version, the backend and the compile
options, so a second run (another seed, a resumed run) loads instead of compiling.
The experiments turn it on by default (`config.compilation_cache`).

`CompileMeter` sums JAX's backend-compile events (XLA compilation, or the cache
lookup that replaces it), so a run can print how much of its time went to compiling.

Example:
  >>> from stablejax import compile_cache
  >>> compile_cache.enable("~/.cache/stablejax/xla")
  >>> meter = compile_cache.CompileMeter()
  >>> # ... jitted work ...
  >>> meter.seconds, meter.count
"""

from __future__ import annotations

import os
import threading

import jax

DEFAULT_DIR = "~/.cache/stablejax/xla"
# JAX's event around each XLA compile (or persistent-cache retrieval).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_totals = {"seconds": 0.0, "count": 0, "hits": 0}
_registered = False


def _on_duration(event: str, duration: float, **_) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _totals["seconds"] += float(duration)
            _totals["count"] += 1


def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _totals["hits"] += 1


def _register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


def enable(path: str, *, min_compile_time_s: float = 0.2) -> str:
    """Turns on JAX's persistent compilation cache in `path` (created if missing).

    Args:
      path: folder of the cache ('~' expanded). Entries are keyed by jax/jaxlib
        version and backend, so one folder serves every version and device.
      min_compile_time_s: programs that compile faster than this are not stored
        (JAX's default, 1 s, would skip most of our CPU programs).

    Returns:
      The absolute cache folder.
    """
    folder = os.path.abspath(os.path.expanduser(path))
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


class CompileMeter:
    """XLA compile time (s), compile count and persistent-cache hits since construction."""

    def __init__(self):
        _register()
        with _lock:
            self._start = dict(_totals)

    def _delta(self, key):
        with _lock:
            return _totals[key] - self._start[key]

    @property
    def seconds(self) -> float:
        """Wall seconds spent in XLA compilation or persistent-cache retrieval."""
        return float(self._delta("seconds"))

    @property
    def count(self) -> int:
        """Number of backend compilations (each one compiled or loaded from the cache)."""
        return int(self._delta("count"))

    @property
    def cache_hits(self) -> int:
        """Number of executables loaded from the persistent cache."""
        return int(self._delta("hits"))

    def summary(self) -> str:
        return (
            f"XLA compilation: {self.seconds:.1f} s over {self.count} programs "
            f"({self.cache_hits} loaded from the persistent cache)"
        )
