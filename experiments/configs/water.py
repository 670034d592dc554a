"""Water (64 flexible SPC/Fw molecules, periodic): GemNet-T, localized estimator on O-H bonds.

Training stops replicas on the minimum intermolecular distance (1.2 Å); evaluation
uses the RDF-MAE criterion. Presets: paper, quick, test, npt (Berendsen NPT).

Usage:
  python -m experiments.water --config=experiments/configs/water.py:quick --workdir=runs/water
"""

import ml_collections

from experiments.configs import base
from stablejax import units
from stablejax.potentials import factory
from stablejax.training.stable import reference_observable_weight

PRESETS = ("paper", "quick", "test", "npt")


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for water; choose one of {PRESETS}")
    c = base.base_config()
    c.system = "water"
    c.preset = preset
    c.data.generator = "water"
    c.model = factory.default_config("gemnet_t")
    c.model.species = [1, 8]
    # The paper's GemNet-T keeps the 50 nearest neighbours; in liquid water at 5 Å most
    # atoms have 51-61, so truncation makes the energy jump when the nearest set changes.
    # 64 slots keep all but ~1 in 3,000 atoms' neighbours (the SPC/Fw reference has at most
    # 67; benchmarks/README.md); parameters do not depend on this.
    c.model.max_neighbors = 64
    c.md.temperature_K = 300.0
    c.md.dt_fs = 1.0
    c.md.integrator = "nose_hoover"
    c.md.tau_fs = 20.0
    c.stability.criterion = "min_intermolecular_distance"
    c.stability.threshold = 1.2  # Å
    c.stability.eval_criterion = "rdf_mae"
    c.stability.eval_threshold = 3.0
    # The reference code averages the RDF over 10 ps windows (the `quick` preset
    # shortens it, see `reductions`).
    c.stability.rdf_window_ps = 10.0
    # Interpenetrating molecules are caught by the physical criterion of training.
    c.stability.eval_guard = "min_intermolecular_distance"
    c.stability.eval_guard_threshold = 1.2  # Å
    # The reference code's observable: each water's two O-H bond lengths, one molecule
    # per neighbourhood, neighbourhoods stratified by their deviation.
    c.observable.name = "oh_bond_lengths"
    c.stable.estimator = "local"
    c.stable.local_k_nearest = 0
    c.stable.local_sampling = "stratified"
    c.stable.local_bins = 100
    c.stable.lr = 3e-3
    c.stable.qm_weight = 0.0
    c.stable.batch_size = 4
    c.stable.reset_fraction = 0.0  # reference reset_probability 0
    c.eval.integrator = "nose_hoover"
    if preset in ("paper", "npt"):
        # The reference code's configs/stable_training/water/train.yml (docs/fidelity.md).
        c.data.n_frames = 100000
        c.data.n_train = 1000
        c.data.n_val = 100
        c.md.n_replicas = 8
        c.md.steps_per_epoch = 1000
        c.md.check_every = 100
        c.stable.sample_every = 100
        c.stable.local_per_bin = 5 * c.md.n_replicas
        # beta and the unbiased covariance of our estimator, converted to the reference's
        # step at lr 3e-3 (its minibatches of 4 neighbourhoods, bond lengths in Å both).
        c.stable.observable_weight = reference_observable_weight(
            units.kT_from_kelvin(c.md.temperature_K), 4
        )
        c.stable.max_epochs = 500
        # The reference evaluates `post_cycle1_epoch10`: 10 learning steps of cycle 1.
        c.stable.max_learning_cycles = 1
        c.stable.max_learning_steps = 10
        c.stable.history_depth = 1  # no resets (reset_fraction 0)
        c.eval.n_replicas = 5
        c.eval.time_ps = 1000.0
        c.eval.record_every = 100
        c.pretrain.epochs = 500
        if preset == "npt":
            c.md.integrator = "berendsen_npt"
            c.md.pressure_bar = 1.01325
            c.md.tau_P_fs = 2000.0
            c.eval.integrator = "berendsen_npt"
    elif preset == "quick":
        c.reductions = (
            "SPC/Fw reference generated with OpenMM (1500 frames, 15 ps) instead of the MDsim "
            "data; a small SchNet (2 interactions of 32 features, cutoff 4 Å: ~9 ms per force "
            "call on 2 CPU cores, 9x cheaper than the smallest GemNet-T we tried, so that 8 "
            "evaluation replicas fit the budget) instead of GemNet-T; pre-training on 300 "
            "frames until the validation force MAE stops improving (early stopping with "
            "patience 15, lr x0.8 after 5 epochs without improvement, at most 150 epochs); "
            "training observable: "
            "the one-sided close-contact shortfall s = max(0, d_ref - d) of each molecule "
            "and its 2 nearest molecules (d the closest intermolecular atom pair, d_ref its "
            "training-frame mean; localized, stratified), matched to the reference data's "
            "mean of s, instead of the O-H bond lengths: on these models the failure is "
            "molecules running into each other with bonds at normal length, where the O-H "
            "observable carries no signal (results/water_quick_sampling/, README); QM "
            "regulariser lambda 10 over all 300 training frames (the reference's water "
            "setting is 0: without it the observable's steps wrecked the forces, force MAE "
            "up to 9.6x, results/water_quick_contact_qm0/); 8 training replicas "
            "x 100 steps per epoch, StABlE 40 epochs with as many learning phases as the "
            "unstable fraction starts (the reference stops after 10 learning steps of its "
            "first phase) and the estimator's own gradient "
            "(observable weight 1), learning phases ending at unstable fraction 0.25 or after "
            "2 halvings of lr with patience 2 (paper: 0, 3 x 0.2 with patience 10); "
            "evaluation 8 replicas x 2 ps with a 0.2 ps RDF window (the reference data's own "
            "RDF MAE over 0.2 ps windows is 0.7, under the 3.0 threshold) instead of 5 x 1 ns "
            "with 10 ps."
        )
        c.data.n_frames = 1500
        c.model = factory.default_config("schnet")
        c.model.species = [1, 8]
        c.model.cutoff = 4.0
        c.model.hidden_features = 32
        c.model.n_filters = 32
        c.model.n_interactions = 2
        c.model.n_gaussians = 16
        c.model.head_features = 16
        c.data.n_train = 300
        c.data.n_val = 30
        # Budgets in epochs, not seconds, so that the result does not depend on the machine.
        # The baseline is pre-trained to its validation plateau (issue 12's rule: the best
        # QM-only model the budget allows). The former 60 epochs with patience 5 stopped
        # 40-100 % above what 45 further epochs reached (results/water_quick at 72d8c7c:
        # 98 -> 55 meV/Å), and patience 5 ended seed 2 during its slow start (555 meV/Å).
        c.pretrain.epochs = 150
        c.pretrain.batch_size = 4
        c.pretrain.lr = 5e-3
        c.pretrain.warmup_steps = 50
        c.pretrain.patience = 15
        c.md.n_replicas = 8
        c.md.steps_per_epoch = 100
        c.md.check_every = 10
        # Chosen after four 6-seed runs on the same baselines (README, results/README.md):
        # the only training setup tried that kept the force MAE within 1.5x and the RDFs no
        # worse than the baseline's in every seed (results/water_quick_contact/). The
        # former two-sided `min_intermolecular_distance` without the QM term gained no
        # stability and wrecked the forces in one seed of six (61 -> 521 meV/Å).
        c.observable.name = "contact_shortfall"
        c.stable.qm_weight = 10.0
        c.stable.local_k_nearest = 2
        c.stable.sample_every = 20
        c.stable.local_per_bin = 5 * c.md.n_replicas
        c.stable.max_epochs = 40
        c.stable.lower_threshold = 0.25
        c.stable.plateau_patience = 2
        c.stable.plateau_factor = 0.5
        c.stable.max_lr_reductions = 2
        c.eval.n_replicas = 8
        c.eval.time_ps = 2.0
        c.eval.record_every = 20
        c.eval.vacf_window = 50
        c.stability.rdf_window_ps = 0.2
        c.eval.n_test_frames = 20
    elif preset == "test":
        c.reductions = "CI smoke test: tiny data, model, replica counts and run lengths."
        c.eval.vacf_window = 4  # steps: the default 100 would be 200 MD steps per model
        c.data.n_frames = 8
        c.model.emb_size_atom = 8
        c.model.emb_size_edge = 8
        c.model.emb_size_trip = 4
        c.model.emb_size_bil_trip = 4
        c.model.emb_size_rbf = 4
        c.model.emb_size_cbf = 4
        c.model.num_blocks = 1
        c.data.n_train = 4
        c.data.n_val = 2
        c.pretrain.epochs = 1
        c.pretrain.batch_size = 2
        c.md.n_replicas = 2
        c.md.steps_per_epoch = 4
        c.md.check_every = 2
        c.md.chunk_steps = 2
        c.stable.sample_every = 2
        c.stable.batch_size = 2
        c.stable.local_per_bin = 4
        c.stable.max_epochs = 2
        c.stable.history_depth = 2
        c.eval.n_replicas = 2
        c.eval.time_ps = 0.004
        c.eval.record_every = 2
        c.stability.rdf_window_ps = 0.002
        c.eval.n_test_frames = 2
    c.lock()
    return c
