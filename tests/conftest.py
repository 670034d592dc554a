"""Test configuration.

- float64 on (numerics are checked in double precision); library code is
  dtype-agnostic and tests that want float32 create float32 arrays.
- cheap XLA compilation flags (compile time dominates the suite);
- a persistent XLA compilation cache shared by the test session, so that the
  many identical MD chunks and models compiled by different tests (and by the
  `experiments` subprocesses) are compiled once.
"""

import os
import tempfile

# Cheaper XLA compilation: the suite compiles many small programs and runs each briefly.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

_CACHE = os.environ.setdefault(
    "STABLEJAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "stablejax-test-jax-cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
