"""The StABlE training loop: alternate simulation and learning phases.

The rules are the reference code's (docs/fidelity.md lists every setting):

Simulation phase (learning rate 0): R replicas run with the current model for
`steps_per_epoch` steps per epoch; every `check_every` steps a frame is checked
with the training stability criterion. A replica that becomes unstable during an
epoch is rewound to its state at the start of that epoch and held (frozen) there:
that state is "near-unstable" (simulating one more epoch from it crosses the
threshold). The start of every simulation epoch is stored; at the start of each
simulation phase ceil(`reset_fraction` x stable replicas) random stable replicas are
reset to random stored states (diversity). When the held fraction reaches
`upper_threshold` the learning phase starts.

Learning phase: every replica is reset to its state at the start of the simulation
epoch that reached the threshold, simulated for one epoch with the current model,
and every `sample_every`-th state is a sample. The update direction is
`observable_weight` x the Boltzmann-estimator gradient of ||<O>_theta - O_ref||^2
(global, or localized over neighbourhoods, all or stratified) plus lambda x the
gradient of the QM energy/force loss over the training frames (all of them, or a
random batch); it is clipped to a global norm and one SGD step is taken. This repeats
from the same starting states. The learning rate is reduced on a plateau of the
unstable fraction (PyTorch `ReduceLROnPlateau` semantics); the phase ends when that
fraction falls to `lower_threshold` or the rate has been reduced `max_lr_reductions`
times. The next simulation phase starts from the end states of the last learning
epoch (replicas that went unstable in it restart from their learning-phase starting
states). Training stops after `max_epochs` epochs, `max_learning_cycles` learning
phases or `max_learning_steps` steps (0: no limit), or `max_time_s`.

Everything that decides the future of the run (params, optimizer state, replica
states and stored states, RNG key, phase and counters) is checkpointed with
orbax after every epoch; a run resumed from its workdir continues exactly where
it stopped (same seed -> same result as an uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from stablejax import md, sharding, units
from stablejax.estimator import boltzmann_grad, boltzmann_grad_local, stratified_selection
from stablejax.logs import logger
from stablejax.md.factory import make_simulator
from stablejax.potentials.base import Potential, all_pairs_edges
from stablejax.stability import StabilityCriterion
from stablejax.training.checkpoint import CheckpointManager
from stablejax.training.metrics import MetricsWriter, progress_bar, read_metrics
from stablejax.training.qm import QMFrames, cutoff_edges, make_qm_loss

PyTree = Any

SIMULATION, LEARNING = 0, 1


# ---------------------------------------------------------------------------------------------
# Simulator and observable set-up from configs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObservableTarget:
    """What the learning phase matches: an observable and its reference value.

    Attributes:
      name: observable name (for logs).
      reference: reference value (array) of the ensemble-averaged observable.
      observable_fn: global estimator: `(positions [n,3] Å) -> array`.
      local_observable_fn: localized estimator: `(positions [n,3] Å, members [n] bool)
        -> array`; None for the global estimator.
      neighbourhoods: localized estimator: `(positions [n,3] Å, box [3] Å | None) ->
        [n_neighbourhoods, n_atoms] bool`, evaluated on every sampled frame (the
        neighbourhoods of "molecule plus its k nearest" change as molecules move).
    """

    name: str
    reference: np.ndarray
    observable_fn: Callable | None = None
    local_observable_fn: Callable | None = None
    neighbourhoods: Callable | None = None

    def __post_init__(self):
        if (self.observable_fn is None) == (self.local_observable_fn is None):
            raise ValueError("give exactly one of observable_fn and local_observable_fn")
        if self.local_observable_fn is not None and self.neighbourhoods is None:
            raise ValueError("the localized estimator needs neighbourhoods")

    @property
    def local(self) -> bool:
        return self.local_observable_fn is not None

    def loss(self, mean_observable):
        """||<O> - O_ref||^2 (sum of squares over the observable's entries)."""
        return jnp.sum((mean_observable - jnp.asarray(self.reference)) ** 2)

    def deviation(self, observable):
        """Largest |O - O_ref| over the observable's entries (trailing axis), per sample."""
        return jnp.max(jnp.abs(observable - jnp.asarray(self.reference)), axis=-1)


def reference_observable_weight(
    kT: float, minibatch_size: int, observable_scale: float = 1.0
) -> float:
    """`stable.observable_weight` that makes our learning step the reference code's step.

    The reference StABlE code computes the observable gradient per minibatch of B samples
    as -2 (<O>_b - O_ref) Cov_b(O, dU/dtheta) with the biased (1/B) covariance and
    without beta ("like scaling the learning rate"), and its observables are `s` times
    ours (h(r): 100 x normalised counts where ours is a density in 1/Å, s = 100 dr). Our
    estimator gives -2 beta (<O> - O_ref) Cov(O, dU/dtheta) with the unbiased 1/(N - 1)
    covariance. For B = N samples the two differ by the factor

        w = kT (B - 1) / B s^2,

    so weighting our observable gradient by w, with the reference's lr, lambda and
    clipping, takes the same SGD step (checked in tests/test_stable_training.py). With
    N > B the reference averages per-minibatch estimates; the (B - 1)/B factor is
    converted, its minibatch noise is not (docs/fidelity.md).

    Args:
      kT: thermal energy of the training MD (eV).
      minibatch_size: the reference's `minibatch_size` B (>= 2).
      observable_scale: s, the reference observable divided by ours.
    """
    if minibatch_size < 2:
        raise ValueError(f"minibatch_size must be >= 2; got {minibatch_size}")
    return float(kT) * (minibatch_size - 1) / minibatch_size * float(observable_scale) ** 2


def make_learning_step(
    potential: Potential,
    species,
    box,
    target: ObservableTarget,
    optimizer: optax.GradientTransformation,
    *,
    kT: float,
    observable_weight: float = 1.0,
    batch_size: int | None = None,
    qm_weight: float = 0.0,
    qm_loss: Callable | None = None,
    qm_frames: QMFrames | None = None,
) -> Callable:
    """One StABlE learning step as a pure function (jit it once).

    The update direction is `observable_weight * grad L_O + qm_weight * grad L_QM`, where
    grad L_O comes from the Boltzmann estimator (global or localized) on the samples and
    grad L_QM is the exact mean over the QM frames given by `qm_idx`/`qm_w` (chunks of
    frames, summed inside one `lax.scan`); `optimizer` consumes it (the trainer uses
    `clip_by_global_norm` then SGD with an injected learning rate).

    Returns:
      `step(params, opt_state, samples, selected, qm_idx [C, B] int, qm_w [C, B], lr)
      -> (params, opt_state, metrics)`. `samples` holds `positions` [S, n, 3] Å and, for
      periodic systems, `edges` [S, 2, E] and `box` [S, 3] Å; `selected` is the
      localized estimator's [S, n_neighbourhoods] bool sample mask (None: all; ignored by
      the global estimator).
    """
    species = jnp.asarray(species, dtype=jnp.int32)
    periodic = box is not None
    if periodic:

        def energy(params, sample):
            return potential.energy(
                params, species, sample["positions"], sample["edges"], sample["box"]
            )

        def per_atom(params, sample):
            return potential.per_atom_energies(
                params, species, sample["positions"], sample["edges"], sample["box"]
            )
    else:
        edges = jnp.asarray(all_pairs_edges(len(species)))

        def energy(params, sample):
            return potential.energy(params, species, sample["positions"], edges, None)

        def per_atom(params, sample):
            return potential.per_atom_energies(params, species, sample["positions"], edges, None)

    if target.local:
        estimator = boltzmann_grad_local(
            per_atom,
            lambda sample, members: target.local_observable_fn(sample["positions"], members),
            target.loss,
            kT=kT,
            batch_size=batch_size,
        )
    else:
        estimator = boltzmann_grad(
            energy,
            lambda sample: target.observable_fn(sample["positions"]),
            target.loss,
            kT=kT,
            batch_size=batch_size,
        )
    if qm_weight > 0 and (qm_loss is None or qm_frames is None):
        raise ValueError("qm_weight > 0 needs qm_loss and qm_frames")

    def qm_value_and_grad(params, qm_idx, qm_w):
        total = jnp.maximum(jnp.sum(qm_w), 1.0)

        def chunk(acc, xs):
            idx, w = xs
            (loss, _), g = jax.value_and_grad(qm_loss, has_aux=True)(params, qm_frames, idx, w)
            share = jnp.sum(w) / total
            loss_acc, g_acc = acc
            return (
                loss_acc + share * loss,
                jax.tree.map(lambda a, b: a + share * b, g_acc, g),
            ), None

        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(chunk, zeros, (qm_idx, qm_w))
        return loss, grads

    def step(params, opt_state, samples, selected, qm_idx, qm_w, lr):
        if target.local:
            boxes = samples.get("box")
            if boxes is None:
                members = jax.vmap(lambda x: target.neighbourhoods(x, None))(samples["positions"])
            else:
                members = jax.vmap(target.neighbourhoods)(samples["positions"], boxes)
            (obs_loss, aux), g_obs = estimator(params, samples, members, selected)
        else:
            (obs_loss, aux), g_obs = estimator(params, samples)
        if qm_weight > 0:
            q_loss, g_qm = qm_value_and_grad(params, qm_idx, qm_w)
        else:
            q_loss = jnp.zeros(())
            g_qm = jax.tree.map(jnp.zeros_like, g_obs)
        grads = jax.tree.map(lambda a, b: observable_weight * a + qm_weight * b, g_obs, g_qm)
        opt_state[-1].hyperparams["learning_rate"] = lr
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        n_obs = optax.global_norm(g_obs)
        n_qm = optax.global_norm(g_qm)
        dot = sum(
            jnp.vdot(a, b)
            for a, b in zip(jax.tree.leaves(g_obs), jax.tree.leaves(g_qm), strict=True)
        )
        cosine = jnp.where(n_obs * n_qm > 0, dot / jnp.maximum(n_obs * n_qm, 1e-30), 0.0)
        metrics = {
            "observable_loss": obs_loss,
            "qm_loss": q_loss,
            "observable_grad_norm": n_obs,
            "qm_grad_norm": n_qm,
            "update_grad_norm": optax.global_norm(grads),
            "grad_cosine": cosine,
            "samples_used": aux.n_used,
            "samples_dropped": aux.n_dropped,
        }
        return params, opt_state, metrics

    return step


def learning_optimizer(grad_clip: float, lr: float) -> optax.GradientTransformation:
    """The learning phase's optimizer: clip to a global norm, then SGD (lr injected)."""
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.inject_hyperparams(optax.sgd)(learning_rate=lr),
    )


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def _stack_states(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


class StableTrainer:
    """Runs StABlE training from pre-trained params; resumable from `workdir`.

    Args:
      potential: the model.
      params: pre-trained parameters (the starting point).
      species: [n] atomic numbers.
      box: [3] Å periodic box, or None for molecules.
      config: the experiment config (blocks `md`, `stable`, `seed` are read).
      criterion: training stability criterion (`stablejax.stability`), applied to
        frames [..., n, 3].
      target: the observable and its reference (`ObservableTarget`).
      qm_frames: QM training frames (energies/forces) for the lambda-weighted
        regulariser; may be None when `stable.qm_weight == 0`.
      initial_positions: [R, n, 3] Å replica starting structures (training set).
      workdir: folder for checkpoints and metrics.jsonl (None: in memory only).
      progress: print a progress line per epoch.
      mesh: a `stablejax.sharding` mesh: replicas (MD state, stored states,
        stability checks) and the estimator's samples are split over its devices,
        parameters replicated; `md.n_replicas` must be a multiple of its size.
        None: one device.
    """

    def __init__(
        self,
        *,
        potential: Potential,
        params: PyTree,
        species,
        box,
        config: ml_collections.ConfigDict,
        criterion: StabilityCriterion,
        target: ObservableTarget,
        qm_frames: QMFrames | None,
        initial_positions,
        workdir: str | None = None,
        progress: bool = True,
        mesh=None,
    ):
        self.potential = potential
        self.species = np.asarray(species, dtype=np.int32)
        self.box = None if box is None else np.asarray(box, dtype=np.float64)
        self.config = config
        self.scfg = config.stable
        self.mcfg = config.md
        self.criterion = criterion
        self.target = target
        self.qm_frames = qm_frames
        self.workdir = workdir
        self.progress = progress
        self.mesh = mesh
        self._validate(initial_positions)
        sharding.check_divisible(self.mcfg.n_replicas, mesh, field="md.n_replicas")
        self.runtime = sharding.runtime_info(mesh)

        self.sim = make_simulator(potential, self.species, self.box, self.mcfg, mesh=mesh)
        self.kT = units.kT_from_kelvin(self.mcfg.temperature_K)
        self.n_replicas = int(self.mcfg.n_replicas)
        self.frames_per_epoch = self.mcfg.steps_per_epoch // self.mcfg.check_every
        self.sample_stride = self.scfg.sample_every // self.mcfg.check_every
        self.optimizer = learning_optimizer(self.scfg.grad_clip, self.scfg.lr)
        self._edge_capacity = 0
        self._qm_idx, self._qm_w = self._qm_chunks_all()
        qm_loss = None
        if self.scfg.qm_weight > 0:
            qm_loss = make_qm_loss(
                potential,
                energy_weight=self.scfg.qm_energy_weight,
                force_weight=self.scfg.qm_force_weight,
                per_atom_energy=self.scfg.qm_per_atom_energy,
            )
        self._learn_step = jax.jit(
            make_learning_step(
                potential,
                self.species,
                self.box,
                target,
                self.optimizer,
                kT=self.kT,
                observable_weight=float(self.scfg.observable_weight),
                batch_size=int(self.scfg.batch_size) if self.scfg.batch_size else None,
                qm_weight=float(self.scfg.qm_weight),
                qm_loss=qm_loss,
                qm_frames=qm_frames,
            )
        )
        self._check = jax.jit(self._unstable_frames)
        if target.local:

            def local_observables(positions, boxes):
                def one(x, b):
                    members = target.neighbourhoods(x, b)
                    obs = jax.vmap(target.local_observable_fn, in_axes=(None, 0))(x, members)
                    return target.deviation(obs)

                if boxes is None:
                    return jax.vmap(lambda x: one(x, None))(positions)
                return jax.vmap(one)(positions, boxes)

            self._local_deviation = jax.jit(local_observables)

        key = jax.random.PRNGKey(int(config.seed))
        key, k_init = jax.random.split(key)
        positions = jnp.asarray(initial_positions)
        md_state = self.sim.init(k_init, params, positions, self.kT)
        depth = int(self.scfg.history_depth)
        params = sharding.replicate(params, mesh)
        self.state = {
            "params": params,
            "opt_state": sharding.replicate(self.optimizer.init(params), mesh),
            "md_state": md_state,
            "learn_start": md_state,
            # [D, R, ...]: replicas split over the devices like the live state.
            "history": sharding.shard_replicas(_stack_states([md_state] * depth), mesh, axis=1),
            "history_count": 0,
            "held": np.zeros(self.n_replicas, bool),
            "key": key,
            "phase": SIMULATION,
            "new_phase": True,
            "epoch": 0,
            "learning_steps": 0,
            "cycles": 0,
            "lr": float(self.scfg.lr),
            "lr_reductions": 0,
            "best_fraction": 1.0,
            "since_best": 0,
            "time_s": 0.0,
        }
        self.ckpt = None
        self.writer = None
        if workdir is not None:
            os.makedirs(workdir, exist_ok=True)
            self.ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), max_to_keep=2)
            restored = self.ckpt.restore_latest(self.state)
            if restored is not None:
                self.state = restored[1]
                self.state["held"] = np.asarray(self.state["held"], bool)
            log_cfg = config.get("log") or {}
            self.writer = MetricsWriter(
                os.path.join(workdir, "metrics.jsonl"),
                resume_step=int(self.state["epoch"]),
                step_key="epoch",
                tensorboard=bool(log_cfg.get("tensorboard", False)),
            )

    # ------------------------------------------------------------------ checks

    def _validate(self, initial_positions):
        s, m = self.config.stable, self.config.md
        if m.steps_per_epoch % m.check_every:
            raise ValueError(
                f"md.steps_per_epoch ({m.steps_per_epoch}) must be a multiple of md.check_every "
                f"({m.check_every})"
            )
        if s.sample_every % m.check_every:
            raise ValueError(
                f"stable.sample_every ({s.sample_every}) must be a multiple of md.check_every "
                f"({m.check_every})"
            )
        # A negative lower threshold means: only lr reductions end a learning phase.
        if not -1.0 <= s.lower_threshold < s.upper_threshold <= 1.0:
            raise ValueError(
                "need -1 <= stable.lower_threshold < stable.upper_threshold <= 1, got "
                f"{s.lower_threshold}, {s.upper_threshold}"
            )
        shape = np.shape(initial_positions)
        if len(shape) != 3 or shape[0] != m.n_replicas or shape[1:] != (len(self.species), 3):
            raise ValueError(
                f"initial_positions must be [md.n_replicas={m.n_replicas}, "
                f"{len(self.species)}, 3], got {shape}"
            )
        if s.qm_weight > 0 and self.qm_frames is None:
            raise ValueError("stable.qm_weight > 0 needs QM training frames")

    # ----------------------------------------------------------- compiled pieces

    def _unstable_frames(self, positions):
        """[R, F] bool: frames that cross the criterion (or are not finite)."""
        return self.criterion.is_unstable(positions)

    def _on_devices(self, tree, axis: int | None = 0):
        """Host arrays with a replica/sample axis at `axis`, split over the mesh
        (`axis=None`: whole on every device)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        if axis is None:
            return sharding.replicate(tree, self.mesh)
        return sharding.shard_replicas(tree, self.mesh, axis=axis)

    def _qm_chunks_all(self):
        """Every QM training frame in zero-padded chunks of `stable.qm_chunk_size`."""
        chunk = max(1, int(self.scfg.qm_chunk_size))
        if self.qm_frames is None or self.scfg.qm_weight <= 0:
            return np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32)
        n = self.qm_frames.n_frames
        size = n if self.scfg.qm_batch_size == 0 else min(int(self.scfg.qm_batch_size), n)
        n_chunks = -(-size // chunk)
        idx = np.zeros(n_chunks * chunk, np.int32)
        w = np.zeros(n_chunks * chunk, np.float32)
        idx[:size] = np.arange(size)
        w[:size] = 1.0
        return idx.reshape(n_chunks, chunk), w.reshape(n_chunks, chunk)

    def _qm_chunks(self, key):
        """The QM frames of one learning step: all of them (`qm_batch_size = 0`, the
        reference), or a random batch of `qm_batch_size` distinct frames."""
        idx, w = self._qm_idx, self._qm_w
        if self.qm_frames is None or self.scfg.qm_weight <= 0 or self.scfg.qm_batch_size == 0:
            return idx, w
        n, size = self.qm_frames.n_frames, int(w.sum())
        pick = np.asarray(jax.random.permutation(key, n))[:size].astype(np.int32)
        idx = idx.copy().reshape(-1)
        idx[:size] = pick
        return idx.reshape(self._qm_idx.shape), w

    # ------------------------------------------------------------------ epochs

    def _samples(self, traj: md.Trajectory) -> dict:
        """Every `sample_every`-th recorded frame of every replica, as estimator samples."""
        k = self.sample_stride
        pos = traj.position[:, k - 1 :: k]
        R, F = pos.shape[:2]
        flat = pos.reshape((R * F,) + pos.shape[2:])
        samples = {"positions": flat}
        if self.box is not None:
            box_shape = self.box.shape  # [3] or [3, 3]
            boxes = (
                traj.box[:, k - 1 :: k].reshape((R * F,) + box_shape)
                if traj.box is not None
                else np.broadcast_to(self.box, (R * F,) + box_shape)
            )
            finite = np.all(np.isfinite(flat), axis=(1, 2))
            safe = np.where(finite[:, None, None], flat, 0.0)
            # Edge capacity only grows (rounded up), so the learning step recompiles rarely.
            edges = cutoff_edges(safe, self.potential.cutoff, np.asarray(boxes).mean(axis=0))
            need = edges.shape[-1]
            if need > self._edge_capacity:
                self._edge_capacity = int(np.ceil(need * 1.1 / 256) * 256)
            pad = np.full(edges.shape[:2] + (self._edge_capacity,), len(self.species), np.int32)
            pad[..., :need] = edges
            samples["edges"] = pad
            samples["box"] = np.asarray(boxes)
        return samples

    def _selection(self, samples: dict, key) -> tuple[np.ndarray | None, dict]:
        """The localized estimator's samples: every neighbourhood of every frame, or a
        stratified sub-sample (`stable.local_sampling`)."""
        if not self.target.local:
            return None, {}
        dev = sharding.to_host(
            self._local_deviation(
                self._on_devices(samples["positions"]), self._on_devices(samples.get("box"))
            )
        )
        if self.scfg.local_sampling == "all":
            return np.ones(dev.shape, bool), {}
        # A NumPy generator seeded from the epoch's key: a resumed run draws the same samples.
        rng = np.random.default_rng(np.asarray(key, np.uint32).ravel())
        selected = stratified_selection(
            dev, n_bins=int(self.scfg.local_bins), per_bin=int(self.scfg.local_per_bin), rng=rng
        )
        return selected, {"local_selected": int(selected.sum()), "local_candidates": dev.size}

    def _random_resets(self, key):
        """Reset ceil(reset_fraction x stable replicas) random stable replicas to random
        stored states (the reference's diversity step at the start of a simulation phase)."""
        st = self.state
        stored = min(int(st["history_count"]), int(self.scfg.history_depth))
        if stored == 0 or self.scfg.reset_fraction <= 0:
            return 0
        k1, k2, k3 = jax.random.split(key, 3)
        stable = np.flatnonzero(~np.asarray(st["held"]))
        n_reset = int(np.ceil(self.scfg.reset_fraction * stable.size))
        if n_reset == 0:
            return 0
        chosen = np.asarray(jax.random.permutation(k1, stable))[:n_reset]
        mask = np.zeros(self.n_replicas, bool)
        mask[chosen] = True
        slots = np.asarray(jax.random.randint(k2, (self.n_replicas,), 0, stored))
        rows = np.arange(self.n_replicas)
        earlier = jax.tree.map(lambda h: h[slots, rows], st["history"])
        st["md_state"] = self.sim.reset(st["md_state"], earlier, mask, key=k3)
        return n_reset

    def _push_history(self, md_state):
        st = self.state
        slot = int(st["history_count"]) % int(self.scfg.history_depth)
        st["history"] = jax.tree.map(lambda h, x: h.at[slot].set(x), st["history"], md_state)
        st["history_count"] = int(st["history_count"]) + 1

    def _simulation_epoch(self, key) -> dict:
        st = self.state
        n_reset = 0
        if st["new_phase"]:
            n_reset = self._random_resets(key)
            st["new_phase"] = False
        start = st["md_state"]
        # Stored states are the starts of simulation epochs (as in the reference code).
        self._push_history(start)
        md_state, traj = self.sim.run(
            st["params"], start, self.mcfg.steps_per_epoch, record_every=self.mcfg.check_every
        )
        flags = sharding.to_host(self._check(self._on_devices(traj.position)))
        newly = (flags.any(axis=1) | sharding.to_host(md_state.unstable)) & ~st["held"]
        if newly.any():
            # Rewind by one epoch and hold there: the state one epoch before instability.
            md_state = self.sim.reset(md_state, start, newly)
        held = st["held"] | newly
        md_state = self.sim.freeze(md_state, held)
        st["md_state"] = md_state
        st["held"] = held
        fraction = float(held.mean())
        record = {
            "phase": "simulation",
            "unstable_fraction": fraction,
            "lr": 0.0,
            "replicas_reset": n_reset,
            "temperature_K": float(np.nanmean(traj.temperature)),
        }
        if fraction >= self.scfg.upper_threshold:
            # Every replica restarts the learning phase from its state at the start of
            # this epoch: the held ones sit there already; the stable ones are rewound
            # too (the reference resets all replicas).
            st["phase"] = LEARNING
            st["learn_start"] = start
            st["lr"] = float(self.scfg.lr)
            st["lr_reductions"] = 0
            st["best_fraction"] = fraction
            st["since_best"] = 0
        return record

    def _plateau(self, fraction: float) -> None:
        """Reduce-on-plateau of the unstable fraction with the semantics of PyTorch's
        `ReduceLROnPlateau(mode='min', threshold=1e-4, threshold_mode='rel')`, which the
        reference uses: a step improves when fraction < best x (1 - 1e-4); the rate is
        multiplied by `plateau_factor` once more than `plateau_patience` steps in a row
        have not improved."""
        st = self.state
        if fraction < st["best_fraction"] * (1.0 - 1e-4):
            st["best_fraction"], st["since_best"] = fraction, 0
            return
        st["since_best"] = int(st["since_best"]) + 1
        if st["since_best"] > self.scfg.plateau_patience:
            st["lr"] = float(st["lr"]) * self.scfg.plateau_factor
            st["lr_reductions"] = int(st["lr_reductions"]) + 1
            st["since_best"] = 0

    def _learning_epoch(self, key) -> dict:
        st = self.state
        k_sel, k_qm = jax.random.split(key)
        start = self.sim.unfreeze(st["learn_start"], np.ones(self.n_replicas, bool))
        md_state, traj = self.sim.run(
            st["params"], start, self.mcfg.steps_per_epoch, record_every=self.mcfg.check_every
        )
        flags = sharding.to_host(self._check(self._on_devices(traj.position)))
        went_unstable = flags.any(axis=1) | sharding.to_host(md_state.unstable)
        fraction = float(went_unstable.mean())
        samples = self._samples(traj)
        selected, sel_record = self._selection(samples, k_sel)
        qm_idx, qm_w = self._qm_chunks(k_qm)
        # Samples are [R x frames] in replica order: split over the devices like the
        # replicas; the estimator's sums over them become cross-device reductions.
        # QM frames of a chunk are split too when they divide evenly (data parallel).
        qm_axis = 1 if self.mesh is not None and qm_idx.shape[1] % self.mesh.size == 0 else None
        params, opt_state, metrics = self._learn_step(
            st["params"],
            st["opt_state"],
            self._on_devices(samples),
            None if selected is None else self._on_devices(selected),
            self._on_devices(qm_idx, axis=qm_axis),
            self._on_devices(qm_w, axis=qm_axis),
            self._on_devices(np.asarray(st["lr"], dtype=jnp.result_type(float)), axis=None),
        )
        metrics = {k: float(v) for k, v in sharding.to_host(metrics).items()}
        if not np.isfinite(metrics["observable_loss"]):
            raise FloatingPointError(
                "observable loss is not finite (fewer than 2 usable samples?): "
                f"{metrics}; lower stable.lr or check the stability threshold"
            )
        record = {
            "phase": "learning",
            "unstable_fraction": fraction,
            "lr": st["lr"],
            **metrics,
            **sel_record,
        }
        st["params"], st["opt_state"] = params, opt_state
        st["learning_steps"] = int(st["learning_steps"]) + 1
        self._plateau(fraction)
        if (
            fraction <= self.scfg.lower_threshold
            or st["lr_reductions"] >= self.scfg.max_lr_reductions
        ):
            # Continue simulating from where learning ended; replicas that went
            # unstable in this epoch restart from their learning-phase start.
            md_state = self.sim.reset(md_state, start, went_unstable)
            md_state = self.sim.unfreeze(md_state, np.ones(self.n_replicas, bool))
            st["md_state"] = md_state
            st["held"] = np.zeros(self.n_replicas, bool)
            st["phase"] = SIMULATION
            st["new_phase"] = True
            st["cycles"] = int(st["cycles"]) + 1
            record["phase_end"] = True
        return record

    def budget_left(self) -> bool:
        st = self.state
        if st["epoch"] >= self.scfg.max_epochs:
            return False
        cycles = int(self.scfg.max_learning_cycles)
        if cycles > 0 and int(st["cycles"]) >= cycles:
            return False
        steps = int(self.scfg.max_learning_steps)
        if steps > 0 and int(st["learning_steps"]) >= steps:
            return False
        return not (self.scfg.max_time_s > 0 and st["time_s"] >= self.scfg.max_time_s)

    def run(self) -> PyTree:
        """Runs epochs until the budget is spent; returns the trained params."""
        st = self.state
        # A live bar on a terminal; one line per epoch otherwise (logs, CI, nohup).
        bar = progress_bar(
            int(self.scfg.max_epochs),
            desc="StABlE",
            initial=int(st["epoch"]),
            disable=not self.progress or None,
        )
        try:
            self._run_epochs(bar)
        finally:
            bar.close()
        if self.ckpt is not None:
            self.ckpt.wait_until_finished()
        return st["params"]

    def _run_epochs(self, bar) -> None:
        st = self.state
        while self.budget_left():
            t0 = time.perf_counter()
            key = jax.random.fold_in(st["key"], int(st["epoch"]))
            if st["phase"] == SIMULATION:
                record = self._simulation_epoch(key)
            else:
                record = self._learning_epoch(key)
            st["epoch"] = int(st["epoch"]) + 1
            st["time_s"] = float(st["time_s"]) + time.perf_counter() - t0
            record.update(
                epoch=st["epoch"],
                wall_time_s=st["time_s"],
                cycles=st["cycles"],
                n_devices=self.runtime["n_devices"],
                n_processes=self.runtime["n_processes"],
            )
            if self.writer is not None:
                self.writer.write(record)
            if self.ckpt is not None:
                self.ckpt.save(int(st["epoch"]), st)
            if self.progress and bar.disable:
                logger.info(_progress_line(record, self.scfg.max_epochs))
            elif self.progress:
                bar.set_postfix_str(_progress_line(record, self.scfg.max_epochs, short=True))
                bar.update(1)

    @property
    def history(self) -> list[dict]:
        if self.writer is None:
            return []
        return read_metrics(self.writer.path)


def _progress_line(record: dict, max_epochs: int, *, short: bool = False) -> str:
    parts = [] if short else [f"[StABlE] epoch {record['epoch']}/{max_epochs}"]
    parts += [
        f"{record['phase']:<10}",
        f"unstable {record['unstable_fraction']:.2f}",
        f"lr {record['lr']:.2e}",
    ]
    if "observable_loss" in record:
        parts.append(f"L_obs {record['observable_loss']:.3e}")
        parts.append(f"L_QM {record['qm_loss']:.3e}")
    if not short:
        parts.append(f"{record['wall_time_s']:.0f}s")
    return " | ".join(parts)
