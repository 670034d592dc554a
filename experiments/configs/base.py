"""Fields shared by every experiment config (ml_collections).

Every physical quantity states its unit in the field name or the comment.
System configs (`aspirin.py`, `tetrapeptide.py`, `water.py`, `lj.py`) call
`base_config()` and override fields; presets (`paper`, `quick`, `test`) are
applied by the system config's `get_config(preset)`.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.system = ""
    c.preset = ""
    c.seed = 0
    # Human-readable list of what this preset changes w.r.t. the paper.
    c.reductions = ""
    # After pre-training and after StABlE, re-fit the per-species energy shift to the
    # training energies (least squares). It is a constant per composition: no force,
    # trajectory or observable changes; only the energy zero, which training lets drift.
    c.refit_energy_shift = True
    # Floating-point precision of MD, training and evaluation: "float32" or "float64"
    # (jax_enable_x64, set by the command line before any JAX array is made). float64
    # costs 1.9x the time of float32 on 2 CPU cores (aspirin quick SchNet, energy and
    # forces of 32 replicas) and far more on most GPUs; use it to check that a result
    # does not depend on rounding.
    c.precision = "float32"
    # Persistent XLA compilation cache (`stablejax.compile_cache`): a second run of a
    # preset (another seed, a resumed run) loads the compiled programs instead of
    # compiling them again; "" turns it off. The run log prints the compile time.
    c.compilation_cache = "~/.cache/stablejax/xla"
    # Devices the replicas are split over (`stablejax.sharding`: MD state, neighbour
    # lists, stability checks, estimator samples; parameters replicated): k = the first
    # k devices (md.n_replicas and eval.n_replicas must be multiples of k); 0 = the most
    # devices that divide both counts (all of them when they are multiples of the device
    # count). Results do not depend on it beyond floating-point summation order.
    c.devices = 0
    # Several processes or hosts (`jax.distributed.initialize`, called by the command
    # line before anything else): "" one process; "auto": JAX reads the cluster
    # environment (SLURM, Open MPI, ...); "explicit": the `cluster` fields below.
    # Pass it (and `cluster.*`) on the command line: they start `jax.distributed` before
    # this file loads. Every process runs the study (data and pre-training replicated,
    # replicas split over all processes' devices); process 0 writes the workdir, which
    # must be on a filesystem every process sees (README: "Several GPUs or nodes").
    c.distributed = ""
    c.cluster = ml_collections.ConfigDict()
    c.cluster.coordinator_address = ""  # "host:port" of process 0
    c.cluster.num_processes = 1
    c.cluster.process_id = 0
    # Logging: mirror every metrics.jsonl record (pre-training, StABlE, evaluation) to
    # TensorBoard under WORKDIR/**/tensorboard/ (needs `pip install "stablejax[tensorboard]"`).
    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = False

    # --- data -----------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # Path to a user file (sGDML/rMD17 npz, MDsim water .npy, extxyz). Empty:
    # the package generates its own reference data (GFN2-xTB / SPC/Fw) and
    # caches it under `cache_dir`.
    c.data.path = ""
    c.data.energy_unit = ""  # '' = the format's own default (kcal/mol for MD17/MD22/MDsim)
    c.data.generator = ""  # 'aspirin' | 'tetrapeptide' | 'water'
    c.data.n_frames = 1000  # frames to generate when no path is given
    # Seed of the generated reference data. Separate from `seed` so that a study over
    # several seeds (`--seeds=0,1,2`) varies the model, split and MD, not the reference.
    c.data.seed = 0
    c.data.cache_dir = "~/.cache/stablejax"
    c.data.n_train = 950
    c.data.n_val = 50
    c.data.split = "random"  # 'random' | 'contiguous'
    # Frames of the dataset that are held out for evaluation initial states.
    c.data.n_test = 0  # 0 = everything not in train/val

    # --- model ----------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.name = "schnet"

    # --- QM pre-training --------------------------------------------------------
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.epochs = 100
    c.pretrain.batch_size = 32
    c.pretrain.lr = 1e-3
    c.pretrain.warmup_steps = 100
    c.pretrain.energy_weight = 1.0
    c.pretrain.force_weight = 100.0
    c.pretrain.patience = 20  # epochs without val force-MAE improvement
    c.pretrain.ema_decay = 0.0  # 0 = off
    c.pretrain.max_time_s = 0.0  # 0 = no wall-clock limit
    c.pretrain.checkpoint_path = ""  # skip pre-training: load this saved model

    # --- molecular dynamics (training) --------------------------------------------
    c.md = ml_collections.ConfigDict()
    c.md.temperature_K = 500.0
    c.md.dt_fs = 0.5
    c.md.integrator = "nose_hoover"  # 'nve' | 'langevin' | 'nose_hoover' | 'berendsen_npt'
    c.md.tau_fs = 20.0  # Nose-Hoover / Berendsen temperature coupling time (fs)
    c.md.friction_per_ps = 0.1  # Langevin friction (1/ps)
    c.md.chain_length = 3
    c.md.pressure_bar = 1.01325  # Berendsen NPT target pressure (bar)
    c.md.tau_P_fs = 2000.0  # Berendsen NPT pressure coupling time (fs)
    c.md.n_replicas = 128
    c.md.steps_per_epoch = 2000  # T in the paper
    c.md.check_every = 100  # steps between frames checked for stability
    c.md.chunk_steps = 100
    c.md.skin = 1.0  # neighbour-list skin (Å), periodic systems only
    # Molecules (free space): 'all_pairs' (dense n(n-1) edges) | 'cutoff' (lists of the pairs
    # within model cutoff + md.skin, rebuilt past skin/2, grown on overflow and the chunk
    # redone; same results up to summation order; ~0.6x the MD step time of Ac-Ala3-NHMe). Default
    # 'all_pairs': 'cutoff' adds neighbour lists to the MD state (StABlE checkpoints of earlier
    # free-space runs would not restore), changes results at the rounding level, and keeps a
    # replica bitwise independent of the others only while no list overflows.
    c.md.free_space_edges = "all_pairs"

    # --- stability criteria ---------------------------------------------------------
    c.stability = ml_collections.ConfigDict()
    c.stability.criterion = "bond_length_deviation"  # | 'min_intermolecular_distance'
    c.stability.threshold = 0.25  # Å (training)
    c.stability.eval_criterion = "bond_length_deviation"  # | 'rdf_mae'
    c.stability.eval_threshold = 0.5  # Å, or RDF MAE units for 'rdf_mae'
    c.stability.rdf_window_ps = 1.0  # averaging window of the RDF-MAE criterion (ps)
    # Evaluation guard, judged beside eval_criterion: a replica is unstable at the first
    # crossing of either (the combined criterion of final_metrics.json), and each is also
    # reported alone (`by_criterion`). Molecules: the closest non-bonded pair (a molecule
    # folding into itself); water: the minimum intermolecular distance. '' = none.
    c.stability.eval_guard = "min_nonbonded_distance"
    c.stability.eval_guard_threshold = 0.8  # Å

    # --- training observable ----------------------------------------------------------
    c.observable = ml_collections.ConfigDict()
    c.observable.name = "distance_histogram"  # any key of stablejax.training.targets.TARGETS
    c.observable.r_max = 10.0  # Å
    c.observable.dr = 0.02  # Å
    c.observable.sigma = 0.01  # Å (Gaussian smearing)

    # --- StABlE training -----------------------------------------------------------
    # Defaults are the reference code's (docs/fidelity.md); presets override.
    c.stable = ml_collections.ConfigDict()
    c.stable.estimator = "global"  # 'global' | 'local'
    c.stable.local_k_nearest = 0  # local estimator: molecules added around each centre
    # Local estimator samples: 'all' neighbourhoods of every frame (unbiased), or
    # 'stratified' by the observable's deviation from the reference (the reference code:
    # `local_bins` equal-width bins, up to `local_per_bin` per bin; biased, see
    # stablejax.estimator.stratified_selection).
    c.stable.local_sampling = "all"
    c.stable.local_bins = 100
    c.stable.local_per_bin = 40
    c.stable.lr = 1e-3
    # Weight of the observable gradient (the estimator's own, beta kept, unbiased
    # covariance). The paper presets set stablejax.training.stable.reference_observable_weight
    # so that one step equals the reference code's step at its lr, lambda and clipping.
    c.stable.observable_weight = 1.0
    c.stable.qm_weight = 10.0  # lambda
    # The regulariser's loss L_QM = w_E E_MSE + w_F F_MSE in eV (1/eV^2, Å^2/eV^2):
    # the reference's 0.05 / 0.95.
    c.stable.qm_energy_weight = 0.05
    c.stable.qm_force_weight = 0.95
    c.stable.qm_per_atom_energy = False  # compare E / n_atoms (NequIP's PerAtomMSELoss)
    c.stable.qm_batch_size = 0  # frames of grad L_QM per step; 0 = every training frame
    c.stable.qm_chunk_size = 32  # frames per forward/backward pass of grad L_QM
    c.stable.sample_every = 100  # steps between samples in a learning epoch
    c.stable.batch_size = 40  # estimator minibatch (samples per backward pass)
    c.stable.grad_clip = 1.0
    c.stable.upper_threshold = 0.75  # unstable fraction that starts learning
    c.stable.lower_threshold = 0.0  # unstable fraction that ends learning
    # Stable replicas reset to stored states at the start of a simulation phase:
    # ceil(reset_fraction x number of stable replicas).
    c.stable.reset_fraction = 0.05
    # Reduce-on-plateau of the unstable fraction in a learning phase (PyTorch's
    # ReduceLROnPlateau semantics: reduce after more than `patience` steps without
    # improvement); the phase ends after `max_lr_reductions` reductions. The reference
    # ends when lr < lr0 / 25 with factor 0.2, which in floating point is 3 reductions.
    c.stable.plateau_patience = 10
    c.stable.plateau_factor = 0.2
    c.stable.max_lr_reductions = 3
    c.stable.max_epochs = 500  # simulation + learning epochs
    c.stable.max_learning_cycles = 0  # learning phases before training stops; 0 = no limit
    c.stable.max_learning_steps = 0  # learning steps before training stops; 0 = no limit
    c.stable.max_time_s = 0.0  # 0 = no wall-clock limit
    # Stored states per replica (starts of simulation epochs) for the random resets; the
    # reference keeps all of them (the paper presets: max_epochs, every state is saved in
    # each checkpoint).
    c.stable.history_depth = 20

    # --- evaluation ---------------------------------------------------------------
    c.eval = ml_collections.ConfigDict()
    c.eval.n_replicas = 256
    c.eval.time_ps = 1000.0
    c.eval.temperature_K = -1.0  # <0: same as md.temperature_K
    c.eval.dt_fs = -1.0  # <0: same as md.dt_fs
    c.eval.integrator = "langevin"
    c.eval.friction_per_ps = 0.1
    c.eval.tau_fs = 20.0
    c.eval.record_every = 200  # steps between recorded frames (time resolution of stable time)
    c.eval.vacf_window = 100  # steps
    c.eval.n_test_frames = 200  # test frames for energy/force MAE
    # Extended-XYZ trajectory per replica in eval/<model>/traj/ (ase, OVITO), thinned to
    # this many frames; 0 = none.
    c.eval.trajectory_frames = 100
    # Also evaluate the control `baseline_plus`: the baseline trained further on the QM
    # loss alone for as many steps and as much time as StABlE spent learning.
    c.eval.baseline_plus = True
    # Extra evaluation temperatures (K) with references reweighted from the data.
    c.eval.transfer_temperatures_K = ()
    # Extra evaluation time steps (fs): the time-step study.
    c.eval.timestep_study_fs = ()
    return c
