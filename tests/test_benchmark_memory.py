"""The Boltzmann estimator's memory must not grow with the trajectory length (issue 13)."""

import jax
import numpy as np

from benchmarks import lj_differentiation as lj


def _boltzmann_peak_bytes(system, params, n_steps):
    methods = lj.make_methods(system, n_steps, 10, np.zeros(len(system.r), np.float32))
    key = jax.random.PRNGKey(0)
    compiled = jax.jit(methods["boltzmann"]).lower(params, system.positions0, key).compile()
    return lj.peak_memory_bytes(compiled)


def test_boltzmann_peak_memory_does_not_grow_with_trajectory_length():
    system = lj.System([64] * 3)  # the --quick model
    params = system.model.init(jax.random.PRNGKey(0), None, system.positions0, system.box)
    short = _boltzmann_peak_bytes(system, params, 100)
    long = _boltzmann_peak_bytes(system, params, 1000)  # the --quick lengths
    # Simulation and stored samples included; backprop grows ~linearly over the same range.
    assert long <= 1.2 * short, (short, long)
