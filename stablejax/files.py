"""Crash-safe files: atomic writes and JSON reads that name the file.

Every output that marks work as done (models, final metrics, summaries, cached data) is
written through `atomic_write`: a temporary file in the same directory, fsynced, then
renamed in place, so a kill leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path, write: Callable) -> Path:
    """Writes through a temporary file in the same directory, then renames it in place.

    Args:
      path: destination.
      write: `write(f)` for a file object opened in binary mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path, content: Any, **dump_kwargs) -> Path:
    """`json.dump` of `content` to `path`, atomically (indent 2 unless given)."""
    dump_kwargs.setdefault("indent", 2)
    text = json.dumps(content, **dump_kwargs)
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_text(path, text: str) -> Path:
    """Writes `text` (UTF-8) to `path`, atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path) -> Any:
    """`json.load` whose errors name the file (and say how to recover)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}); the file is damaged, delete it to redo the step "
            "that wrote it"
        ) from e
