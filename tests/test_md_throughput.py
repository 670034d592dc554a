"""benchmarks/md_throughput.py: the jax-md reference engine integrates the same Nose-Hoover
dynamics as our Simulator (so `vs_jax_md` times equal work), and a tiny run writes every
summary key, finite and positive."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import md_throughput as mt
from stablejax import md, units

REPO = Path(__file__).resolve().parents[1]


def _system(name):
    """(system, dt, tau) with dt and tau in ASE time units, exactly representable in
    float32 (jax-md's nvt_nose_hoover casts both to float32)."""
    if name == "lj_fluid":
        # 125 atoms, 17.9 Å box: cutoff + skin (8.5 Å) below half the box (minimum image).
        return mt.lj_system(n_side=5), 0.25, 4.0  # 2.5 fs, 41 fs
    return mt.molecule_system(), 2.0**-5, 2.0  # 0.32 fs, 20 fs


@pytest.mark.parametrize("name", ["lj_fluid", "benzene_morse"])
def test_jax_md_reference_follows_the_simulator_trajectory(name):
    """float64, 2 replicas x 50 steps from the same positions and momenta: positions,
    momenta, thermostat chain and the extended-system energy agree to rounding (measured
    ~1e-15; 1e-8 when dt and tau are not float32 numbers), and both conserve that energy."""
    system, dt, tau = _system(name)
    system = dict(system, dt_fs=dt / units.fs, tau_fs=tau / units.fs)
    integrator = mt.nose_hoover(system)
    n = len(system["species"])
    sim = md.Simulator(
        system["energy_fn"],
        species=system["species"],
        box=system["box"],
        cutoff=system["cutoff"],
        skin=mt.SKIN,
        integrator=integrator,
        chunk_steps=10,
    )
    rng = np.random.default_rng(1)
    pos = system["positions"][None] + 0.05 * rng.normal(size=(2, n, 3))
    params = jnp.asarray(1.0, jnp.float64)
    kT = units.kT_from_kelvin(system["temperature_K"])
    state = sim.init(jax.random.PRNGKey(3), params, jnp.asarray(pos, jnp.float64), kT)
    assert state.position.dtype == jnp.float64

    ref = mt.JaxMDReference(system, integrator, dtype=jnp.float64)
    carry = ref.init(params, state.position, state.momentum)
    box = None if system["box"] is None else np.asarray(system["box"])

    def extended_energy(carry):
        s, nbrs = carry
        if nbrs is None:
            edges = jnp.asarray(mt.all_pairs_edges(n))
            pe = jax.vmap(lambda r: system["energy_fn"](params, r, edges, None))(s.position)
        else:
            pe = jax.vmap(lambda r, nb: system["energy_fn"](params, r, nb.idx, ref.box))(
                s.position, nbrs
            )
        ke = jnp.sum(s.momentum**2 / s.mass, axis=(1, 2)) / 2
        c = s.chain
        h = pe + ke + jnp.sum(c.momentum**2 / (2 * c.mass), axis=-1)
        return h + ref.dof * ref.kT * c.position[:, 0] + ref.kT * jnp.sum(c.position[:, 1:], -1)

    h0 = np.asarray(sim.conserved_energy(state))
    np.testing.assert_allclose(np.asarray(extended_energy(carry)), h0, rtol=0, atol=1e-10)
    ke_scale = float(np.mean(np.asarray(sim.kinetic_energy(state))))
    for _ in range(5):
        state, _ = sim.run(params, state, 10, record_every=10)
        carry, ok = ref.run(params, carry, 10)
        assert ok
        ours = np.asarray(state.position)
        theirs = np.asarray(carry[0].position)
        diff = theirs - ours
        if box is not None:  # jax-md wraps positions into the box, we keep them unwrapped
            diff -= box * np.round(diff / box)
        assert np.max(np.abs(diff)) < 1e-11, np.max(np.abs(diff))
        np.testing.assert_allclose(np.asarray(carry[0].momentum), np.asarray(state.momentum),
                                   rtol=0, atol=1e-11 * np.max(np.abs(np.asarray(state.momentum))))  # fmt: skip
        for field in ("position", "momentum"):
            np.testing.assert_allclose(
                np.asarray(getattr(carry[0].chain, field)),
                np.asarray(getattr(state.chain, field)),
                rtol=1e-10,
                atol=1e-13,
            )
        h_ours = np.asarray(sim.conserved_energy(state))
        np.testing.assert_allclose(np.asarray(extended_energy(carry)), h_ours, rtol=0, atol=1e-11)
    # Both conserve the extended energy (a real Nose-Hoover run, not a frozen one).
    assert np.all(np.asarray(state.step) == 50) and not np.any(np.asarray(state.unstable))
    assert np.max(np.abs(h_ours - h0)) < 3e-2 * ke_scale  # Verlet fluctuation, no drift
    assert np.max(np.abs(np.asarray(state.position) - pos)) > 1e-3


def test_tiny_run_writes_finite_positive_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault(  # cheap compilation (conftest sets the same for the test process)
        "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    cmd = [sys.executable, "-m", "benchmarks.md_throughput", "--tiny", "--systems",
           "water_quick", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "md_throughput.json").read_text())
    assert report["mode"] == "tiny" and report["dtype"] == "float32"
    assert list(report["systems"]) == ["water_quick"]
    res = report["systems"]["water_quick"]
    assert res["metrics_integrator"] == "nose_hoover"
    assert res["replica_counts"] == [1, 2]
    assert res["model"]["n_params"] > 0
    for key in (
        "batching_efficiency",
        "integrator_overhead",
        "speedup_vs_ase",
        "vs_jax_md",
        "vs_jax_md_unbatched_r1",
        "ase_atom_steps_per_s",
    ):
        assert math.isfinite(res[key]) and res[key] > 0, key
    rows = res["rows"]["nose_hoover"]
    assert set(rows) == {"1", "2"}
    for R, row in rows.items():
        for key in ("atom_steps_per_s", "integrator_overhead", "jax_md_atom_steps_per_s",
                    "vs_jax_md", "md_step_s", "force_eval_s", "jax_md_step_s"):  # fmt: skip
            assert math.isfinite(row[key]) and row[key] > 0, (R, key)
        assert row["jax_md_reallocations"] == 0 and row["unstable_replicas"] == 0
        assert row["edge_slots"] > 0 and row["jax_md_edge_slots"] > 0
    assert "vs_jax_md_unbatched" in rows["1"] and "vs_jax_md_unbatched" not in rows["2"]
    assert res["vs_jax_md"] == rows["2"]["vs_jax_md"]
