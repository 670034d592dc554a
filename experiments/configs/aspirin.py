"""Aspirin (MD17-style, 21 atoms): SchNet, global estimator on h(r), bond-length criterion.

Usage:
  python -m experiments.aspirin --config=experiments/configs/aspirin.py:quick --workdir=runs/aspirin
  python -m experiments.aspirin --config=experiments/configs/aspirin.py:paper \
      --config.data.path=md17_aspirin.npz --workdir=runs/aspirin_paper
"""

import ml_collections

from experiments.configs import base
from stablejax import units
from stablejax.potentials import factory
from stablejax.training.stable import reference_observable_weight

PRESETS = ("paper", "quick", "test", "transfer", "timestep")


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for aspirin; choose one of {PRESETS}")
    c = base.base_config()
    c.system = "aspirin"
    c.preset = preset
    c.data.generator = "aspirin"
    c.model = factory.default_config("schnet")  # paper size: 64/64, 6 interactions, 5 Å
    c.model.species = [1, 6, 8]
    c.md.temperature_K = 500.0
    c.md.dt_fs = 0.5
    c.md.integrator = "nose_hoover"
    c.stability.criterion = "bond_length_deviation"
    c.stability.threshold = 0.25
    c.stability.eval_criterion = "bond_length_deviation"
    c.stability.eval_threshold = 0.5
    c.observable.name = "distance_histogram"
    c.observable.r_max = 10.0
    c.stable.estimator = "global"
    c.stable.lr = 1e-3
    c.stable.qm_weight = 10.0
    c.eval.integrator = "langevin"
    c.eval.friction_per_ps = 0.1
    if preset == "paper":
        # The reference code's configs/stable_training/md17/train.yml and the paper
        # (docs/fidelity.md has the table; tests/test_stable_training.py checks it).
        c.data.n_frames = 10000
        c.md.n_replicas = 128
        c.md.steps_per_epoch = 2000
        c.md.tau_fs = 10.0  # reference Q = 3N kT (20 dt)^2: tau = 20 x 0.5 fs
        c.stable.sample_every = 100  # n_dump
        c.md.check_every = 100  # stability judged on the n_dump frames
        c.stable.batch_size = 40
        # Our estimator keeps beta and the unbiased covariance; this weight makes one
        # step the reference's at its lr 1e-3, lambda 10 and clip 1 (h(r): the
        # reference's is 100 x normalised counts = 100 dr x our density).
        c.stable.observable_weight = reference_observable_weight(
            units.kT_from_kelvin(c.md.temperature_K), 40, 100 * c.observable.dr
        )
        c.stable.max_epochs = 500
        c.stable.max_learning_cycles = 4  # "four complete StABlE cycles"
        c.stable.history_depth = 500  # every stored state (max_epochs)
        c.eval.n_replicas = 256
        c.eval.time_ps = 1000.0
        c.pretrain.epochs = 2000
        c.pretrain.patience = 50
    elif preset in ("quick", "transfer", "timestep"):
        c.reductions = (
            "GFN2-xTB data (1200 frames, 2 trajectories) instead of DFT; SchNet with 3 "
            "interactions; pre-training batch 8, lr 2e-3, at most 60 epochs (stops earlier "
            "on its validation plateau); 32 training replicas x 200 steps per "
            "epoch (0.1 ps); StABlE 80 epochs (two learning cycles) with lr 2e-2 (paper "
            "1e-3, which needs hundreds of learning steps), the estimator's own gradient "
            "(observable weight 1, paper preset 0.17) and lambda 0.05 on E_MSE + 100 F_MSE over "
            "a 32-frame batch (paper 10 on 0.05 E_MSE + 0.95 F_MSE over all frames: with few "
            "steps, lambda >= 1 lets the QM gradient dominate the clipped step and the QM "
            "loss oscillates); learning phases end at unstable fraction 0.25 or after 2 "
            "halvings of lr with patience 4 (paper: 0, 3 x 0.2 with patience 10); 20 stored "
            "states for resets; evaluation 32 replicas x 5 ps instead of 256 x 1 ns."
        )
        c.data.n_frames = 1200
        c.data.n_train = 950
        c.data.n_val = 50
        c.model.n_interactions = 3
        # Budgets in epochs, not seconds, so that the result does not depend on the machine.
        # The baseline is the best QM-only model the budget allows (issue 12's rule): batch
        # 8 at lr 2e-3 reaches in 40 epochs (~4 min) a val force MAE that batch 32 at lr 1e-3
        # (the former preset, stopped at 26 epochs: 133 meV/Å) does not reach in 28 (77 vs
        # 128 meV/Å, seed 0, same machine); 60 epochs with the plateau rule is the budget
        # the 30-minute target leaves (seed 0, measured 2026-12-01 on the 2-core machine).
        c.pretrain.epochs = 60
        c.pretrain.batch_size = 8
        c.pretrain.lr = 2e-3
        c.pretrain.patience = 15
        c.md.n_replicas = 32
        c.md.steps_per_epoch = 200
        c.md.check_every = 20
        c.stable.sample_every = 20
        c.stable.batch_size = 80
        c.stable.lr = 2e-2
        c.stable.qm_weight = 0.05
        # Learning-phase rules sized for an 80-epoch budget (the reference's patience of
        # 10 and 3 reductions need hundreds of epochs), and the QM term on a batch.
        c.stable.qm_energy_weight = 1.0
        c.stable.qm_force_weight = 100.0
        c.stable.qm_batch_size = 32
        c.stable.lower_threshold = 0.25
        c.stable.plateau_patience = 4
        c.stable.plateau_factor = 0.5
        c.stable.max_lr_reductions = 2
        c.stable.max_epochs = 80  # 40 allow one learning cycle, which is not enough
        c.eval.n_replicas = 32
        c.eval.time_ps = 5.0
        c.eval.record_every = 40
        if preset == "transfer":
            # Run after `quick` in the same workdir: reuses its trained models and
            # evaluates them at 350 K and 700 K against references reweighted from
            # the 500 K data (the effective sample size goes into final_metrics.json).
            c.eval.transfer_temperatures_K = (350.0, 700.0)
        if preset == "timestep":
            # Run after `quick` in the same workdir: the time-step study.
            c.eval.timestep_study_fs = (0.25, 1.0, 2.0)
    elif preset == "test":
        c.reductions = "CI smoke test: tiny data, model, replica counts and run lengths."
        c.eval.vacf_window = 4  # steps: the default 100 would be 200 MD steps per model
        c.data.n_frames = 40
        c.data.n_train = 24
        c.data.n_val = 8
        c.model.hidden_features = 16
        c.model.n_filters = 16
        c.model.n_interactions = 1
        c.model.n_gaussians = 8
        c.model.head_features = 8
        c.pretrain.epochs = 2
        c.pretrain.batch_size = 8
        c.md.n_replicas = 4
        c.md.steps_per_epoch = 20
        c.md.check_every = 5
        c.md.chunk_steps = 10
        c.stability.threshold = 0.05  # small so that the test exercises both phases
        c.stable.sample_every = 5
        c.stable.batch_size = 8
        c.stable.qm_batch_size = 8
        c.stable.max_epochs = 4
        c.stable.history_depth = 4
        c.eval.n_replicas = 4
        c.eval.time_ps = 0.05
        c.eval.record_every = 10
        c.eval.n_test_frames = 8
    c.lock()
    return c
