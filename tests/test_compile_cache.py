"""Persistent compilation cache: a second process loads what the first compiled."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp
    from stablejax import compile_cache
    compile_cache.enable(sys.argv[1], min_compile_time_s=0.0)
    meter = compile_cache.CompileMeter()
    def f(x):
        for k in range(20):
            x = jnp.sin(x @ x.T + k)
        return x
    jax.jit(f)(jnp.ones((4, 4))).block_until_ready()
    print(meter.count, meter.cache_hits, meter.seconds)
    """
)


def _run(cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache_dir)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    count, hits, seconds = out.stdout.split()
    return int(count), int(hits), float(seconds)


def test_second_process_loads_compiled_programs_from_the_cache(tmp_path):
    count1, hits1, _ = _run(tmp_path / "xla")
    assert count1 >= 1 and hits1 == 0
    assert any((tmp_path / "xla").iterdir())
    count2, hits2, _ = _run(tmp_path / "xla")
    assert hits2 == count2 == count1


def test_meter_counts_compilations_in_process():
    import jax
    import jax.numpy as jnp

    from stablejax import compile_cache

    meter = compile_cache.CompileMeter()
    jax.jit(lambda x: jnp.cos(x) * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()
    assert meter.count >= 1 and meter.seconds > 0.0
