"""Test configuration: float64 on (numerics are checked in double precision).

Library code is dtype-agnostic; tests that want float32 create float32 arrays.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
