"""Replicas split over devices (`stablejax.sharding`) give the results of one device.

The cases live in `sharding_cases.py` and run in ONE subprocess with 4 forced
host devices (`--xla_force_host_platform_device_count`: the device count is
fixed when JAX starts) and float64, each computing its result on 1 device and on
4 and comparing them; every test here reports one case. Forced host devices
check correctness, not speed (see benchmarks/scaling.py).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from stablejax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))


def _compilation_cache() -> dict:
    """The test session's persistent XLA cache (conftest.py) for the subprocesses too."""
    cache = os.environ.get("STABLEJAX_TEST_JAX_CACHE")
    if not cache:
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def four_device_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4".strip(),
        "JAX_ENABLE_X64": "1",
        "JAX_PLATFORMS": "cpu",
        **_compilation_cache(),
    }
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharding_cases.py"), str(out)],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), f"the 4-device subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def _check(results, case):
    r = results[case]
    assert r["ok"], f"case {case} failed on 4 devices:\n{r['error']}"


def test_md_200_steps_of_8_replicas_equal_one_device(four_device_results):
    """Free-space Langevin (200 steps, freeze between runs, no recompilation) and a
    compressing NPT run (list rebuilds, overflow -> grow -> redo): same positions as one
    device, state split over 4 devices."""
    _check(four_device_results, "md")


def test_boltzmann_grad_on_64_sharded_samples_equals_one_device(four_device_results):
    _check(four_device_results, "estimator")


def test_6_replicas_on_4_devices_are_refused_naming_the_field(four_device_results):
    """Simulator, `check_divisible` and `validate_config` (explicit `devices`) refuse;
    `devices=0` picks the most devices that divide the replica counts."""
    _check(four_device_results, "indivisible")


def test_stable_epoch_on_4_devices_equals_one_device(four_device_results):
    """One simulation and one learning epoch (Boltzmann estimator + QM regulariser)."""
    _check(four_device_results, "stable")


def test_one_device_needs_no_mesh():
    """On one device every helper is the identity (runs are as before sharding)."""
    assert sharding.mesh_or_none(1) is None
    x = {"a": np.ones((3, 2))}
    assert sharding.shard_replicas(x, None) is x
    assert sharding.replicate(x, None) is x
    sharding.check_divisible(7, None)
    assert sharding.runtime_info(None)["n_devices"] == 1
    with pytest.raises(ValueError, match=r"config\.devices: .* asked for"):
        sharding.select_devices(10_000)
    with pytest.raises(ValueError, match=r"config\.devices: must be >= 0"):
        sharding.select_devices(-1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Two JAX processes compiling the same programs: ~60 s on 2 idle cores, 140 s on busy ones.
def test_two_processes_give_the_parameters_of_one(tmp_path):
    """`jax.distributed` on localhost (gloo CPU collectives), 2 devices per process: one
    StABlE simulation + learning epoch with the replicas split over both processes gives
    the parameters of one device."""
    out = tmp_path / "params.npz"
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=2".strip(),
        "JAX_ENABLE_X64": "1",
        "JAX_PLATFORMS": "cpu",
        **_compilation_cache(),
    }
    port = str(_free_port())
    script = os.path.join(HERE, "distributed_case.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(out), port, str(pid)],
            cwd=HERE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    params = np.load(out)
    n = len(params.files) // 2
    assert n > 0
    for i in range(n):
        np.testing.assert_allclose(params[f"both_{i}"], params[f"alone_{i}"], rtol=1e-9, atol=1e-12)
