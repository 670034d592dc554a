"""Water quick: learning signal of local_sampling='all' vs 'stratified' on identical samples.

For each seed's baseline model (runs/water_quick/seed_k/models/baseline): simulate with the
quick preset until the learning phase starts, then for N learning epochs compute the
learning step's observable loss and observable-gradient norm with both selections on the
same samples (the update applied is the stratified one, as in the preset). JSON to stdout.
"""

import json
import sys
from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np

from experiments import pipeline
from experiments.configs import water
from stablejax.potentials import io as model_io
from stablejax.training.stable import StableTrainer


def main(seed, n_learn=6, max_sim=40):
    config = water.get_config("quick")
    with config.unlocked():
        config.seed = seed
    wd = f"/work/main/runs/water_quick/seed_{seed}"
    dataset = pipeline.load_data(config, wd)
    train, val, test = pipeline.split(config, dataset)
    system = pipeline.system_topology(dataset, train)
    potential, _ = pipeline.build_model(config, dataset, train)
    _, baseline = model_io.load_model(f"{wd}/models/baseline")
    criterion = pipeline.stability_criterion(config, system)
    target = pipeline.observable_target(config, system, train)
    from stablejax.data import sample_initial_conditions

    R = config.md.n_replicas
    init = sample_initial_conditions(
        train, R, seed=config.seed, replace=R > train.n_frames
    ).positions
    t = StableTrainer(
        potential=potential,
        params=baseline,
        species=dataset.species,
        box=dataset.box,
        config=config,
        criterion=criterion,
        target=target,
        qm_frames=None,
        initial_positions=init,
        workdir=None,
        progress=False,
    )
    out = {"seed": seed, "sim_epochs": 0, "learning": []}
    while t.state["phase"] == 0 and t.state["epoch"] < max_sim:
        key = jax.random.fold_in(t.state["key"], int(t.state["epoch"]))
        t._simulation_epoch(key)
        t.state["epoch"] += 1
    out["sim_epochs"] = int(t.state["epoch"])
    if t.state["phase"] == 0:
        out["note"] = "no learning phase within the simulation budget"
        return out
    st = t.state
    for i in range(n_learn):
        start = t.sim.unfreeze(st["learn_start"], jnp.ones(t.n_replicas, bool))
        md_state, traj = t.sim.run(
            st["params"], start, t.mcfg.steps_per_epoch, record_every=t.mcfg.check_every
        )
        samples = t._samples(traj)
        key = jax.random.fold_in(st["key"], 1000 + i)
        dev = np.asarray(t._local_deviation(jnp.asarray(samples["positions"]), samples.get("box")))
        rec = {}
        for mode in ("all", "stratified"):
            with t.scfg.unlocked() if hasattr(t.scfg, "unlocked") else nullcontext():
                t.scfg.local_sampling = mode
            sel, info = t._selection(samples, key)
            z = jnp.zeros((1, 1), jnp.int32)
            p, o, m = t._learn_step(
                st["params"],
                st["opt_state"],
                samples,
                jnp.asarray(sel),
                z,
                jnp.zeros((1, 1)),
                jnp.asarray(st["lr"]),
            )
            rec[mode] = {k: float(v) for k, v in m.items()} | {"n_samples": int(sel.sum())}
            if mode == "stratified":
                st["params"], st["opt_state"] = p, o
        rec["deviation_max_A"] = float(np.nanmax(dev))
        rec["deviation_median_A"] = float(np.nanmedian(dev))
        out["learning"].append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    from contextlib import nullcontext  # noqa: F401

    seeds = [int(s) for s in sys.argv[1].split(",")]
    res = [main(s) for s in seeds]
    print(json.dumps(res, indent=1))
