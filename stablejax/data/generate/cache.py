"""Parameter-hashed cache, atomic writes and resumable chunk storage for generators.

A generated file is named ``{name}_{hash}.{ext}`` where ``hash`` is a digest of every
parameter that changes its content (frames, seed, temperature, force field, ...), next
to a JSON sidecar ``{name}_{hash}.json`` holding those parameters plus what the run
reported (sanity figures, rate, software versions). A call with the same parameters
finds the file and reuses it.

While a run is under way its chunks live in ``{name}_{hash}.partial/``; each chunk
(frames plus the dynamical state needed to continue) is written atomically, so an
interrupted run restarts from its last complete chunk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from stablejax.files import atomic_write

__all__ = [
    "params_hash",
    "cache_paths",
    "atomic_write_bytes",
    "atomic_save_npz",
    "write_sidecar",
    "read_sidecar",
    "ChunkStore",
]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float):
        # repr round-trips floats exactly and is stable across platforms.
        return float(repr(obj))
    return obj


def params_hash(params: dict, *, length: int = 12) -> str:
    """Stable hex digest of a parameter dict (key order does not matter)."""
    text = json.dumps(_jsonable(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def cache_paths(out_dir, name: str, params: dict, ext: str) -> tuple[Path, Path, Path]:
    """Returns ``(data_file, sidecar_json, partial_dir)`` for a generator's parameters."""
    out_dir = Path(out_dir)
    stem = f"{name}_{params_hash(params)}"
    return out_dir / f"{stem}.{ext}", out_dir / f"{stem}.json", out_dir / f"{stem}.partial"


def atomic_write_bytes(path, data: bytes) -> Path:
    """Writes `data` to a temporary file next to `path`, fsyncs, then renames it over."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_save_npz(path, **arrays) -> Path:
    """``np.savez`` through a temporary file and ``os.replace`` (never a half file)."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def write_sidecar(path, content: dict) -> Path:
    """Writes the JSON sidecar atomically."""
    text = json.dumps(_jsonable(content), indent=2, sort_keys=True)
    return atomic_write_bytes(path, text.encode())


def read_sidecar(path) -> dict:
    with open(path) as f:
        return json.load(f)


class ChunkStore:
    """Numbered, atomically written chunks of one generation run (``chunk_00000.npz``...).

    A chunk holds the frames produced since the previous one and the state to continue
    from; :meth:`completed` counts the consecutive chunks on disk, so a rerun picks up
    after the last complete one. ``prefix`` separates independent trajectories that share
    a directory.
    """

    def __init__(self, directory, *, prefix: str = "chunk"):
        self.directory = Path(directory)
        self.prefix = prefix

    def path(self, index: int) -> Path:
        return self.directory / f"{self.prefix}_{index:05d}.npz"

    def completed(self) -> int:
        i = 0
        while self.path(i).exists():
            i += 1
        return i

    def save(self, index: int, **arrays) -> Path:
        return atomic_save_npz(self.path(index), **arrays)

    def load(self, index: int) -> dict:
        with np.load(self.path(index), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def load_all(self, keys) -> dict:
        """Concatenates `keys` over all completed chunks along axis 0."""
        n = self.completed()
        parts = {k: [] for k in keys}
        for i in range(n):
            chunk = self.load(i)
            for k in keys:
                parts[k].append(chunk[k])
        return {k: np.concatenate(v, axis=0) if v else None for k, v in parts.items()}

    def remove(self):
        shutil.rmtree(self.directory, ignore_errors=True)
