"""Test configuration: float64 on (numerics are checked in double precision).

Library code is dtype-agnostic; tests that want float32 create float32 arrays.
"""

import jax

jax.config.update("jax_enable_x64", True)
