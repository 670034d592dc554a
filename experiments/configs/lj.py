"""Lennard-Jones fluid: pair-MLP correction on a repulsive prior, trained on the RDF.

The reference RDF comes from simulating the full LJ potential with the same engine.

Usage:
  python -m experiments.lj --config=experiments/configs/lj.py:quick --workdir=runs/lj
"""

import ml_collections

from experiments.configs import base

PRESETS = ("paper", "quick", "test")


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for lj; choose one of {PRESETS}")
    c = base.base_config()
    c.system = "lj"
    c.preset = preset
    c.data.generator = "lj"
    c.model.name = "pair_mlp"
    c.lj = ml_collections.ConfigDict()
    c.lj.n_particles = 32
    c.lj.sigma = 3.405  # Å (argon)
    c.lj.epsilon = 0.0103  # eV (argon, 119.8 K)
    c.lj.density = 0.8  # reduced number density rho*sigma^3
    c.md.temperature_K = 119.8  # kT/epsilon = 1 (argon)
    c.md.dt_fs = 5.0
    c.md.integrator = "nose_hoover"
    c.md.tau_fs = 500.0
    c.stability.criterion = "rdf_mae"
    c.stability.threshold = 3.0
    c.stability.eval_criterion = "rdf_mae"
    c.stability.eval_threshold = 3.0
    c.observable.name = "rdf"
    c.observable.r_max = 8.0  # Å (< half the box)
    c.observable.dr = 0.05
    c.observable.sigma = 0.05
    c.stable.estimator = "global"
    c.stable.qm_weight = 0.0
    c.stable.lr = 1e-3
    c.eval.integrator = "nose_hoover"
    if preset == "paper":
        c.md.n_replicas = 32
        c.md.steps_per_epoch = 1000
        c.stable.sample_every = 20
        c.stable.max_epochs = 300
        c.eval.n_replicas = 32
        c.eval.time_ps = 100.0
    elif preset == "quick":
        c.reductions = "16 replicas, 400 steps/epoch, 60 epochs; evaluation 16 x 20 ps."
        c.md.n_replicas = 16
        c.md.steps_per_epoch = 400
        c.stable.sample_every = 20
        c.stable.max_epochs = 60
        c.eval.n_replicas = 16
        c.eval.time_ps = 20.0
    elif preset == "test":
        c.reductions = "CI smoke test."
        c.md.n_replicas = 2
        c.md.steps_per_epoch = 10
        c.md.check_every = 5
        c.md.chunk_steps = 5
        c.stable.sample_every = 5
        c.stable.batch_size = 4
        c.stable.max_epochs = 2
        c.eval.n_replicas = 2
        c.eval.time_ps = 0.1
        c.eval.record_every = 5
    c.lock()
    return c
