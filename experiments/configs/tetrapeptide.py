"""Ac-Ala3-NHMe (MD22-style, 42 atoms): NequIP, global estimator on h(r), bond-length criterion.

Usage:
  python -m experiments.tetrapeptide --config=experiments/configs/tetrapeptide.py:quick \
      --workdir=runs/tetrapeptide
"""

import ml_collections

from experiments.configs import base
from stablejax import units
from stablejax.potentials import factory
from stablejax.training.stable import reference_observable_weight

PRESETS = ("paper", "quick", "test")


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for tetrapeptide; choose one of {PRESETS}")
    c = base.base_config()
    c.system = "tetrapeptide"
    c.preset = preset
    c.data.generator = "tetrapeptide"
    c.model = factory.default_config("nequip")
    c.md.temperature_K = 500.0
    c.md.dt_fs = 0.5
    c.md.integrator = "nose_hoover"
    c.stability.criterion = "bond_length_deviation"
    c.stability.threshold = 0.25
    c.stability.eval_criterion = "bond_length_deviation"
    c.stability.eval_threshold = 0.5
    c.observable.name = "distance_histogram"
    c.observable.r_max = 15.0  # Å (larger molecule)
    c.stable.estimator = "global"
    c.stable.lr = 1e-3
    c.stable.qm_weight = 10.0
    c.eval.integrator = "nose_hoover"
    if preset == "paper":
        c.data.split = "percent"
        c.data.n_frames = 85109
        c.data.n_train = 14890
        c.data.n_val = 1000
        # The reference code's configs/stable_training/md22/train.yml (docs/fidelity.md).
        c.md.n_replicas = 128
        c.md.steps_per_epoch = 2000
        c.md.tau_fs = 10.0  # reference Q = 3N kT (20 dt)^2: tau = 20 x 0.5 fs
        c.stable.sample_every = 100  # n_dump
        c.md.check_every = 100
        c.stable.batch_size = 40
        c.stable.observable_weight = reference_observable_weight(
            units.kT_from_kelvin(c.md.temperature_K), 40, 100 * c.observable.dr
        )
        # NequIP's loss in the reference: 1000 F_MSE + per-atom E_MSE (docs/fidelity.md:
        # the reference computes it on targets scaled by the force RMS; not converted).
        c.stable.qm_energy_weight = 1.0
        c.stable.qm_force_weight = 1000.0
        c.stable.qm_per_atom_energy = True
        c.stable.max_epochs = 600
        c.stable.max_learning_cycles = 1  # the reference evaluates `post_cycle1`
        c.stable.history_depth = 600
        c.eval.n_replicas = 48
        c.eval.time_ps = 300.0
        c.pretrain.epochs = 1000
    elif preset == "quick":
        c.reductions = (
            "GFN2-xTB data (600 frames) instead of DFT (PBE+MBD); NequIP with 2 layers of 16 "
            "features (27k parameters instead of 0.12M: ~50 ms per 8-replica force call on 2 CPU "
            "cores instead of ~400 ms); pre-training 6 epochs with lr 5e-3 (20 epochs give a "
            "106 meV/A model that stays stable for the 1 ps a CPU can simulate, which leaves "
            "StABlE nothing to correct); 8 training replicas x 100 steps per epoch, StABlE 30 "
            "epochs with lr 2e-2, lambda 0.05 on E_MSE + 100 F_MSE over 16-frame batches and "
            "the learning-phase rules of aspirin quick; evaluation 8 replicas "
            "x 1 ps instead of 48 x 300 ps."
        )
        c.data.n_frames = 600
        c.model.num_layers = 2
        c.model.num_features = 16
        c.data.n_train = 500
        c.data.n_val = 50
        # Budgets in epochs, not seconds, so that the result does not depend on the machine.
        c.pretrain.epochs = 6
        c.pretrain.batch_size = 8
        c.pretrain.lr = 5e-3
        c.pretrain.warmup_steps = 50
        c.md.n_replicas = 8
        c.md.steps_per_epoch = 100
        c.md.check_every = 10
        c.stable.sample_every = 10
        c.stable.batch_size = 40
        c.stable.qm_batch_size = 16
        c.stable.lr = 2e-2
        c.stable.qm_weight = 0.05
        c.stable.qm_energy_weight = 1.0
        c.stable.qm_force_weight = 100.0
        c.stable.lower_threshold = 0.25
        c.stable.plateau_patience = 4
        c.stable.plateau_factor = 0.5
        c.stable.max_lr_reductions = 2
        c.stable.max_epochs = 30
        c.eval.n_replicas = 8
        c.eval.time_ps = 1.0
        c.eval.record_every = 20
        c.eval.n_test_frames = 50
    elif preset == "test":
        c.reductions = "CI smoke test: tiny data, model, replica counts and run lengths."
        c.eval.vacf_window = 4  # steps: the default 100 would be 200 MD steps per model
        c.data.n_frames = 16
        c.model.num_layers = 1
        c.model.num_features = 4
        c.model.radial_neurons = 8
        c.model.output_hidden = 4
        c.data.n_train = 10
        c.data.n_val = 3
        c.pretrain.epochs = 1
        c.pretrain.batch_size = 4
        c.md.n_replicas = 2
        c.md.steps_per_epoch = 10
        c.md.check_every = 5
        c.md.chunk_steps = 5
        c.stable.sample_every = 5
        c.stable.batch_size = 4
        c.stable.qm_batch_size = 4
        c.stable.max_epochs = 2
        c.stable.history_depth = 2
        c.eval.n_replicas = 2
        c.eval.time_ps = 0.01
        c.eval.record_every = 5
        c.eval.n_test_frames = 3
    c.lock()
    return c
