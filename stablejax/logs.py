"""Logging: our lines on the console, every library's records in a file.

The package logs through the standard `logging` module under the name "stablejax"
(`logger`). As a library it installs no handler (Python's convention: the program
decides); the command lines (`experiments.*`, `stablejax.evaluate`) call
`console_and_file(path)`, which shows

- our records (INFO and up) on stdout as `[stablejax HH:MM:SS] message`,
- other libraries' WARNING and up on stderr (orbax's INFO block per checkpoint, absl's
  and jax's records stay off the console),

and writes every record, ours included, to `path` (`WORKDIR/log.txt`).

Example:
  >>> from stablejax.logs import logger
  >>> logger.info("pre-training done")
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

logger = logging.getLogger("stablejax")

_OURS = logger.name


class _Ours(logging.Filter):
    def __init__(self, ours: bool):
        super().__init__()
        self.ours = ours

    def filter(self, record: logging.LogRecord) -> bool:
        is_ours = record.name == _OURS or record.name.startswith(_OURS + ".")
        return is_ours == self.ours


def _handlers(path: str) -> list[logging.Handler]:
    to_file = logging.FileHandler(path)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.StreamHandler(sys.stdout)
    ours.setLevel(logging.INFO)
    ours.addFilter(_Ours(True))
    ours.setFormatter(logging.Formatter("[stablejax %(asctime)s] %(message)s", "%H:%M:%S"))
    others = logging.StreamHandler(sys.stderr)
    others.setLevel(logging.WARNING)
    others.addFilter(_Ours(False))
    others.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return [to_file, ours, others]


@contextlib.contextmanager
def console_and_file(path: str | os.PathLike):
    """Within the block: our records on the console, other libraries' warnings only, and
    every record in the file `path`. The root logger's handlers and level, and absl's
    verbosity, are restored afterwards."""
    from absl import logging as absl_logging

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_verbosity = absl_logging.get_verbosity()
    saved_ours = logger.level
    # Every handler goes for the block: absl's, and the stderr one that importing orbax
    # installs through logging.basicConfig when the root logger has none.
    for h in saved_handlers:
        root.removeHandler(h)
    new = _handlers(path)
    for h in new:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    logger.setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        yield
    finally:
        for h in new:
            root.removeHandler(h)
            h.close()
        for h in saved_handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved_level)
        logger.setLevel(saved_ours)
        absl_logging.set_verbosity(saved_verbosity)
