"""Floating-point precision of a run: float32 (the default) or float64.

JAX computes in float32 unless `jax_enable_x64` is on; with it on, every array
made from float64 NumPy data (positions, energies, forces) stays float64, and
the potentials initialise their params in the dtype of the positions, so MD,
training and evaluation all follow. Set the precision before any JAX array of
the run is made: arrays made earlier keep their dtype.

Example:
  >>> from stablejax.precision import set_precision
  >>> set_precision("float64")
"""

from __future__ import annotations

import jax

PRECISIONS = ("float32", "float64")


def set_precision(name: str) -> None:
    """Turns float64 on ("float64") or off ("float32") for the arrays made from now on."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    jax.config.update("jax_enable_x64", name == "float64")


def current_precision() -> str:
    """The default float dtype of new arrays: "float64" when jax_enable_x64 is on."""
    return "float64" if jax.config.jax_enable_x64 else "float32"
