"""Cases of tests/test_sharding.py, each run in a subprocess with 4 forced host devices.

`python tests/sharding_cases.py OUT.json [case,case]` runs each case: computed
once on one device (``mesh=None``, everything on device 0) and once with the
replicas split over 4 devices, then compared. Both runs happen in the same
process (same compiler and flags); the subprocess only exists because the
device count is fixed when JAX starts, and all cases share it because starting
JAX and compiling cost more than the cases themselves.
"""

import os
import re
import sys

os.environ.setdefault("JAX_ENABLE_X64", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from test_md_common import ARGON, cluster, lattice, make_lj  # noqa: E402

from stablejax import md, sharding, units  # noqa: E402

N_DEVICES = 4
N_NPT = 60  # steps of the compressing run (its lists overflow within them)


def _spans(x, n=N_DEVICES) -> None:
    devices = x.sharding.device_set
    assert len(devices) == n, f"{x.shape} is on {len(devices)} devices, expected {n}"
    spec = getattr(x.sharding, "spec", None)
    assert spec is not None and spec[0] == sharding.REPLICA_AXIS, f"sharding {x.sharding}"


def _close(a, b, what, rtol=1e-9, atol=1e-10) -> None:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=what)


def case_md() -> None:
    """200 steps of 8 replicas (free space), and a periodic run whose box shrinks
    (Berendsen NPT): neighbour lists rebuilt, overflowing, grown and the chunk redone."""
    mesh = sharding.replica_mesh(N_DEVICES)
    kT = units.kT_from_kelvin(60.0)
    rng = np.random.default_rng(0)
    pos = cluster(2, 3.8)[None] + 0.05 * rng.normal(size=(8, 8, 3))

    def free(m):
        sim = md.Simulator(
            make_lj(),
            species=np.full(8, 18),
            integrator=md.Langevin(dt_fs=4.0, friction_per_ps=1.0),
            chunk_steps=50,
            history_every=50,
            mesh=m,
        )
        s = sim.init(jax.random.PRNGKey(1), ARGON, pos, kT)
        s, traj = sim.run(ARGON, s, 100, record_every=10)
        s = sim.freeze(s, np.arange(8) % 3 == 0)  # eager control between runs
        s, traj2 = sim.run(ARGON, s, 100, record_every=10)
        return sim, s, traj, traj2

    _, s1, t1, u1 = free(None)
    sim4, s4, t4, u4 = free(mesh)
    for x in jax.tree.leaves(s4):
        _spans(x)
    assert sim4.num_traces == 1, f"recompiled: {sim4.num_traces} traces"
    _close(s4.position, s1.position, "free-space positions after 200 steps")
    _close(u4.position, u1.position, "recorded frames")
    _close(t4.potential_energy, t1.potential_energy, "energies")
    # XLA split the vmapped step rather than gathering replicas: replicas are
    # independent, so the compiled free-space chunk moves no replica data between
    # devices; its only collective is the scalar "does any replica snapshot now".
    chunk = next(iter(sim4._chunk_cache.values()))[1]
    hlo = chunk.lower(sharding.replicate(ARGON, mesh), s4).compile().as_text()
    collectives = re.findall(
        r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute)\(", hlo
    )
    assert collectives == [("pred[]", "all-reduce")], collectives

    # Overflow: a compressing barostat outgrows the edge capacity; the chunk is redone.
    xl, boxl = lattice(4, 24.0)
    rng = np.random.default_rng(2)
    npt_pos = xl[None] + 0.1 * rng.normal(size=(4, 64, 3))

    def compress(m):
        sim = md.Simulator(
            make_lj(6.0),
            species=np.full(64, 18),
            box=boxl,
            cutoff=6.0,
            skin=1.0,
            integrator=md.BerendsenNPT(
                dt_fs=4.0,
                pressure_bar=5000.0,
                tau_T_fs=100.0,
                tau_P_fs=400.0,
                compressibility_per_bar=1e-2,
            ),
            chunk_steps=20,
            mesh=m,
        )
        s = sim.init(jax.random.PRNGKey(7), ARGON, npt_pos, units.kT_from_kelvin(100.0))
        ref = np.asarray(s.neighbors.reference)
        s, traj = sim.run(ARGON, s, N_NPT, record_every=5)
        assert not np.array_equal(np.asarray(s.neighbors.reference), ref), "never rebuilt"
        return sim, s, traj

    c1, n1, tr1 = compress(None)
    c4, n4, tr4 = compress(mesh)
    assert c4.num_reallocations >= 1, "no neighbour-list overflow happened"
    assert c4.num_reallocations == c1.num_reallocations
    _spans(n4.position)
    _spans(n4.neighbors.edges)
    _close(tr4.box, tr1.box, "NPT boxes", atol=1e-8)
    _close(n4.position, n1.position, "NPT positions", atol=1e-8)


def case_estimator() -> None:
    """`boltzmann_grad` on 64 samples split over 4 devices equals one device."""
    from stablejax.estimator import boltzmann_grad
    from stablejax.potentials.base import all_pairs_edges

    mesh = sharding.replica_mesh(N_DEVICES)
    rng = np.random.default_rng(1)
    samples = {"positions": jnp.asarray(cluster(2, 3.8)[None] + 0.1 * rng.normal(size=(64, 8, 3)))}
    samples["positions"] = samples["positions"].at[5, 0, 0].set(jnp.nan)  # one dropped sample
    energy = make_lj()
    edges = jnp.asarray(all_pairs_edges(8))

    def observable(sample):
        x = sample["positions"]
        d = jnp.linalg.norm(x[:, None] - x[None], axis=-1) + jnp.eye(8)
        return jnp.stack([jnp.mean(d), jnp.min(d)])

    vg = jax.jit(
        boltzmann_grad(
            lambda p, s: energy(p, s["positions"], edges, None),
            observable,
            lambda o: jnp.sum((o - jnp.array([6.0, 3.7])) ** 2),
            kT=units.kT_from_kelvin(60.0),
        )
    )
    (l1, a1), g1 = vg(ARGON, samples)
    placed = sharding.shard_replicas(samples, mesh)
    _spans(placed["positions"])
    (l4, a4), g4 = vg(sharding.replicate(ARGON, mesh), placed)
    assert int(a4.n_dropped) == int(a1.n_dropped) == 1
    _close(l4, l1, "loss", rtol=1e-12)
    for k in g1:
        _close(g4[k], g1[k], f"grad {k}", rtol=1e-10, atol=1e-14)


def case_indivisible() -> None:
    """6 replicas on 4 devices are refused, naming the field and the device count."""
    mesh = sharding.replica_mesh(N_DEVICES)
    sim = md.Simulator(make_lj(), species=np.full(8, 18), mesh=mesh)
    pos = np.broadcast_to(cluster(2, 3.8), (6, 8, 3))
    try:
        sim.init(jax.random.PRNGKey(0), ARGON, pos, 0.01)
    except ValueError as err:
        msg = str(err)
        assert "md.n_replicas" in msg and "4 devices" in msg and "6 replicas" in msg, msg
    else:
        raise AssertionError("6 replicas on 4 devices were accepted")
    try:
        sharding.check_divisible(6, mesh, field="eval.n_replicas")
    except ValueError as err:
        assert str(err).startswith("config.eval.n_replicas:"), err
    else:
        raise AssertionError("check_divisible accepted 6 on 4")
    sharding.check_divisible(8, mesh)
    sharding.check_divisible(6, None)

    # The pipeline: an explicit device count must divide the replica counts (refused
    # before any work, naming the field); devices=0 takes the most devices that do.
    from experiments import pipeline
    from experiments.configs import aspirin

    config = aspirin.get_config("test")
    config.md.n_replicas, config.eval.n_replicas = 6, 4
    config.devices = 4
    try:
        pipeline.validate_config(config)
    except ValueError as err:
        assert str(err).startswith("config.md.n_replicas: 6 replicas"), err
    else:
        raise AssertionError("validate_config accepted 6 replicas on 4 devices")
    config.devices = 0
    pipeline.validate_config(config)
    assert pipeline.replica_mesh(config).size == 2
    config.md.n_replicas = 8
    assert pipeline.replica_mesh(config).size == 4


def case_stable() -> None:
    """One StABlE simulation epoch and one learning epoch (estimator + QM regulariser)
    on 4 devices give the parameters of one device."""
    from test_stable_training import harmonic_bond_dataset, make_trainer, tiny_config

    data = harmonic_bond_dataset()
    config = tiny_config(max_epochs=2, upper_threshold=0.0, lower_threshold=-0.5, qm_weight=1.0)
    trainer1 = make_trainer(config, data, None)
    p1 = trainer1.run()
    mesh = sharding.replica_mesh(N_DEVICES)
    trainer4 = make_trainer(config, data, None, mesh=mesh)
    _spans(trainer4.state["md_state"].position)
    p4 = trainer4.run()
    _spans(trainer4.state["md_state"].position)
    assert trainer4.state["learning_steps"] == 1, trainer4.state["learning_steps"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        _close(b, a, "parameters after one learning step", rtol=1e-9, atol=1e-12)
    start = jax.tree.leaves(trainer4.state["params"])[0]
    assert len(start.sharding.device_set) == N_DEVICES


CASES = {"md": case_md, "estimator": case_estimator, "indivisible": case_indivisible}
CASES["stable"] = case_stable


def main(names, out_path) -> None:
    """Runs the cases (one JAX start for all of them) and writes
    {case: {"ok": bool, "error": traceback text, "seconds": float}} as JSON."""
    import json
    import time
    import traceback

    assert len(jax.devices()) == N_DEVICES, jax.devices()
    results = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            CASES[name]()
            results[name] = {"ok": True, "error": ""}
        except Exception:  # reported to the test that owns the case
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"case {name}: {results[name]}", flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES), sys.argv[1])
