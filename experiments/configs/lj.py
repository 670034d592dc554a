"""Lennard-Jones fluid: pair-MLP correction on a repulsive prior, trained on the RDF.

The reference RDF comes from simulating the full LJ potential with the same engine.

Usage:
  python -m experiments.lj --config=experiments/configs/lj.py:quick --workdir=runs/lj
"""

import ml_collections

from experiments.configs import base
from stablejax.potentials import factory

PRESETS = ("paper", "quick", "test")


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for lj; choose one of {PRESETS}")
    c = base.base_config()
    c.system = "lj"
    c.preset = preset
    c.data.generator = "lj"
    c.lj = ml_collections.ConfigDict()
    c.lj.n_particles = 32
    c.lj.sigma = 3.405  # Å (argon)
    c.lj.epsilon = 0.0103  # eV (argon, 119.8 K)
    c.lj.density = 0.7  # reduced number density rho*sigma^3 -> box 12.17 Å
    c.lj.cutoff = 6.0  # Å, just under half the box (32 particles are a small box)
    c.lj.reference_frames = 400  # frames of the full-LJ reference simulation
    c.model = factory.default_config("pair_mlp")  # 5 hidden layers of 128 (paper A.13)
    c.model.cutoff = 6.0
    c.model.prior = "repulsive"
    c.model.prior_sigma = 3.405
    c.model.prior_epsilon = 0.0103
    c.md.temperature_K = 179.7  # kT/epsilon = 1.5: a supercritical LJ fluid
    c.md.dt_fs = 5.0
    c.md.integrator = "langevin"
    c.md.friction_per_ps = 1.0
    c.md.skin = 0.0  # 32 particles: the list radius must stay under half the box
    # The repulsive prior never blows up: learn from the start (upper threshold 0) and
    # never end the learning phase on the unstable fraction (lower threshold < 0).
    c.stability.criterion = "min_intermolecular_distance"  # particle overlap
    c.stability.threshold = 2.7  # Å (0.8 sigma)
    c.stability.eval_criterion = "min_intermolecular_distance"
    c.stability.eval_threshold = 2.7
    c.stability.eval_guard = ""  # the evaluation criterion is already the contact one
    c.observable.name = "rdf"
    c.observable.r_max = 6.0  # Å (<= half the box)
    c.observable.dr = 0.05
    c.observable.sigma = 0.05
    c.stable.estimator = "global"
    c.stable.qm_weight = 0.0
    c.stable.lr = 1e-2
    c.stable.upper_threshold = 0.0
    c.stable.lower_threshold = -1.0
    c.stable.plateau_patience = 1000
    c.eval.n_test_frames = 0
    c.eval.integrator = "nose_hoover"
    if preset == "paper":
        c.md.n_replicas = 32
        c.md.steps_per_epoch = 1000
        c.md.check_every = 20
        c.stable.sample_every = 20
        c.stable.max_epochs = 300
        c.eval.n_replicas = 32
        c.eval.time_ps = 100.0
    elif preset == "quick":
        c.reductions = "16 replicas, 400 steps/epoch, 60 epochs; evaluation 16 x 20 ps."
        c.lj.reference_frames = 200
        c.md.n_replicas = 16
        c.md.steps_per_epoch = 400
        c.md.check_every = 20
        c.stable.sample_every = 20
        c.eval.record_every = 40
        c.stable.max_epochs = 60
        c.eval.n_replicas = 16
        c.eval.time_ps = 20.0
    elif preset == "test":
        c.reductions = "CI smoke test."
        c.eval.vacf_window = 4  # steps: the default 100 would be 200 MD steps per model
        c.lj.reference_frames = 8
        c.model.hidden_sizes = (16, 16)
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
