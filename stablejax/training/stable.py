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
states and stored states, RNG key, phase, counters, plateau state) is one pytree,
`StableState`. `simulation_epoch` and `learning_epoch` are transitions
`(state, setup) -> (new state, record)` that never modify their argument
(`StableSetup` holds the simulator and the jitted pieces); `StableTrainer` is the
loop around them that checkpoints the state with orbax after every epoch, writes
metrics and shows progress. A run resumed from its workdir continues exactly
where it stopped, also in the middle of a learning phase (same seed -> same
result as an uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import flax
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
from stablejax.training.metrics import MetricsWriter, progress_bar
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

    # A `qm.QMLoss` accumulates its gradient frame by frame on a CPU (`stablejax.batching`);
    # any other loss function is differentiated as a whole.
    qm_grad = None
    if qm_loss is not None:
        qm_grad = getattr(qm_loss, "value_and_grad", None) or jax.value_and_grad(
            qm_loss, has_aux=True
        )

    def qm_value_and_grad(params, qm_idx, qm_w):
        total = jnp.maximum(jnp.sum(qm_w), 1.0)

        def chunk(acc, xs):
            idx, w = xs
            (loss, _), g = qm_grad(params, qm_frames, idx, w)
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
        opt_state = with_learning_rate(opt_state, lr)
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


def _clipped_sgd(learning_rate, grad_clip):
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.sgd(learning_rate))


def learning_optimizer(grad_clip: float, lr: float) -> optax.GradientTransformation:
    """The learning phase's optimizer: clip to a global norm, then SGD.

    The whole chain is wrapped in `optax.inject_hyperparams`, so the state carries
    the learning rate at `opt_state.hyperparams["learning_rate"]` whatever the chain
    holds; `with_learning_rate` sets it for a step (the plateau rule decides it).
    """
    return optax.inject_hyperparams(_clipped_sgd, static_args=("grad_clip",))(
        learning_rate=lr, grad_clip=float(grad_clip)
    )


def with_learning_rate(opt_state, lr):
    """`opt_state` of `learning_optimizer` with the learning rate `lr` (a new state;
    the argument is not modified)."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})


# ---------------------------------------------------------------------------------------------
# Training state and learning-rate rule
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class StableState:
    """Everything that decides the future of a StABlE run, as one pytree.

    It is checkpointed whole after every epoch (`CheckpointManager` stores it under
    these field names) and passed through the epoch functions, which return a new
    state and never modify the one they are given. Counters are 0-d NumPy arrays
    (host-side decisions read them without a device round trip); `state["epoch"]`
    reads a field like `state.epoch`.

    Attributes:
      params: model parameters.
      opt_state: `learning_optimizer` state (the learning rate is set per step).
      md_state: the replicas' live MD state [R, ...].
      learn_start: every replica's state at the start of the current learning phase.
      stored_starts: [history_depth, R, ...] the last `history_depth` starts of simulation
        epochs, the pool that random resets draw from (the reference's stored states).
        Not the simulator's `History`: that one is per replica, restarts when a replica
        is reset and serves `rewind`; this pool outlives resets and rewinds, as in the
        reference code, whose random resets may pick any stored epoch.
      n_stored: int32, starts stored so far (the ring buffer's write count).
      held: bool [R], replicas held (frozen) near instability in this simulation phase.
      key: the run's PRNG key (epoch k uses `fold_in(key, k)`).
      phase: int32, SIMULATION (0) or LEARNING (1).
      new_phase: bool, the next simulation epoch starts a phase (random resets).
      epoch: int32, completed epochs.
      learning_steps: int32, learning steps taken.
      cycles: int32, completed learning phases.
      plateau: `optax.contrib.reduce_on_plateau` state of the unstable fraction in
        the current learning phase.
      lr_reductions: int32, learning-rate reductions in the current learning phase.
      time_s: float64, training wall time over all sessions.
    """

    params: PyTree
    opt_state: PyTree
    md_state: PyTree
    learn_start: PyTree
    stored_starts: PyTree
    n_stored: np.ndarray
    held: np.ndarray
    key: jax.Array
    phase: np.ndarray
    new_phase: np.ndarray
    epoch: np.ndarray
    learning_steps: np.ndarray
    cycles: np.ndarray
    plateau: optax.contrib.ReduceLROnPlateauState
    lr_reductions: np.ndarray
    time_s: np.ndarray

    def __getitem__(self, name: str):
        return getattr(self, name)


def _i32(x) -> np.ndarray:
    return np.asarray(x, np.int32)


def plateau_rule(scfg) -> optax.GradientTransformationExtraArgs:
    """Reduce-on-plateau of the unstable fraction as the reference uses it: PyTorch's
    `ReduceLROnPlateau(mode='min', threshold=1e-4, threshold_mode='rel', cooldown=0)`.

    A step improves when fraction < best x (1 - 1e-4); the rate is multiplied by
    `plateau_factor` once more than `plateau_patience` steps in a row have not improved
    (optax counts the reducing step itself, hence its patience is one more). The state
    of a phase starts with best = the fraction that started it (`plateau_start`).
    """
    return optax.contrib.reduce_on_plateau(
        factor=float(scfg.plateau_factor),
        patience=int(scfg.plateau_patience) + 1,
        rtol=1e-4,
        atol=0.0,
        cooldown=0,
        min_scale=0.0,
    )


def plateau_start(rule, params, fraction: float) -> optax.contrib.ReduceLROnPlateauState:
    """The plateau state at the start of a learning phase: best = `fraction`."""
    state = rule.init(params)
    return state._replace(best_value=jnp.asarray(fraction, state.best_value.dtype))


def learning_rate(scfg, reductions) -> float:
    """`stable.lr` reduced `reductions` times by `plateau_factor`, in float64 on the host
    (one multiplication per reduction, as PyTorch's scheduler does)."""
    lr = float(scfg.lr)
    for _ in range(int(reductions)):
        lr = lr * float(scfg.plateau_factor)
    return lr


def budget_left(state: StableState, scfg) -> bool:
    """Whether the run may take another epoch (`stable.max_*` budgets)."""
    if int(state.epoch) >= scfg.max_epochs:
        return False
    cycles = int(scfg.max_learning_cycles)
    if cycles > 0 and int(state.cycles) >= cycles:
        return False
    steps = int(scfg.max_learning_steps)
    if steps > 0 and int(state.learning_steps) >= steps:
        return False
    return not (scfg.max_time_s > 0 and float(state.time_s) >= scfg.max_time_s)


# ---------------------------------------------------------------------------------------------
# Static set-up: simulator, compiled pieces, configuration
# ---------------------------------------------------------------------------------------------


def _stack_states(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


class StableSetup:
    """What the epoch functions need besides the state: configs, the simulator and the
    jitted pieces (built once; nothing here decides the future of a run).

    The one mutable member is `edge_capacity`, the padded edge count of periodic
    samples: it only grows (rounded up) so that the learning step recompiles rarely;
    padding edges are ignored by the potentials.

    Args: as `StableTrainer` (without params, initial_positions, workdir, progress).
    """

    def __init__(
        self,
        *,
        potential: Potential,
        species,
        box,
        config: ml_collections.ConfigDict,
        criterion: StabilityCriterion,
        target: ObservableTarget,
        qm_frames: QMFrames | None,
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
        self.mesh = mesh
        sharding.check_divisible(self.mcfg.n_replicas, mesh, field="md.n_replicas")
        self.runtime = sharding.runtime_info(mesh)

        self.sim = make_simulator(potential, self.species, self.box, self.mcfg, mesh=mesh)
        self.kT = units.kT_from_kelvin(self.mcfg.temperature_K)
        self.n_replicas = int(self.mcfg.n_replicas)
        self.frames_per_epoch = self.mcfg.steps_per_epoch // self.mcfg.check_every
        self.sample_stride = self.scfg.sample_every // self.mcfg.check_every
        self.optimizer = learning_optimizer(self.scfg.grad_clip, self.scfg.lr)
        self.plateau = plateau_rule(self.scfg)
        # Jitted: run eagerly, the lax.cond inside would compile on every call.
        self.plateau_update = jax.jit(
            lambda st, value: self.plateau.update(None, st, value=value)[1]
        )
        self.edge_capacity = 0
        self.qm_idx, self.qm_w = self._qm_chunks_all()
        qm_loss = None
        if self.scfg.qm_weight > 0:
            qm_loss = make_qm_loss(
                potential,
                energy_weight=self.scfg.qm_energy_weight,
                force_weight=self.scfg.qm_force_weight,
                per_atom_energy=self.scfg.qm_per_atom_energy,
            )
        self.learn_step = jax.jit(
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
        # [R, F] bool: frames that cross the criterion (or are not finite).
        self.check = jax.jit(criterion.is_unstable)
        if target.local:

            def local_observables(positions, boxes):
                def one(x, b):
                    members = target.neighbourhoods(x, b)
                    obs = jax.vmap(target.local_observable_fn, in_axes=(None, 0))(x, members)
                    return target.deviation(obs)

                if boxes is None:
                    return jax.vmap(lambda x: one(x, None))(positions)
                return jax.vmap(one)(positions, boxes)

            self.local_deviation = jax.jit(local_observables)

    def on_devices(self, tree, axis: int | None = 0):
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

    def qm_chunks(self, key):
        """The QM frames of one learning step: all of them (`qm_batch_size = 0`, the
        reference), or a random batch of `qm_batch_size` distinct frames."""
        idx, w = self.qm_idx, self.qm_w
        if self.qm_frames is None or self.scfg.qm_weight <= 0 or self.scfg.qm_batch_size == 0:
            return idx, w
        n, size = self.qm_frames.n_frames, int(w.sum())
        pick = np.asarray(jax.random.permutation(key, n))[:size].astype(np.int32)
        idx = idx.copy().reshape(-1)
        idx[:size] = pick
        return idx.reshape(self.qm_idx.shape), w

    def samples(self, traj: md.Trajectory) -> dict:
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
            if need > self.edge_capacity:
                self.edge_capacity = int(np.ceil(need * 1.1 / 256) * 256)
            pad = np.full(edges.shape[:2] + (self.edge_capacity,), len(self.species), np.int32)
            pad[..., :need] = edges
            samples["edges"] = pad
            samples["box"] = np.asarray(boxes)
        return samples

    def selection(self, samples: dict, key) -> tuple[np.ndarray | None, dict]:
        """The localized estimator's samples: every neighbourhood of every frame, or a
        stratified sub-sample (`stable.local_sampling`)."""
        if not self.target.local:
            return None, {}
        dev = sharding.to_host(
            self.local_deviation(
                self.on_devices(samples["positions"]), self.on_devices(samples.get("box"))
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

    def run_md(self, params, start):
        """One epoch of MD from `start`: (end state, trajectory, [R] bool went unstable)."""
        md_state, traj = self.sim.run(
            params, start, self.mcfg.steps_per_epoch, record_every=self.mcfg.check_every
        )
        flags = sharding.to_host(self.check(self.on_devices(traj.position)))
        return md_state, traj, flags.any(axis=1) | sharding.to_host(md_state.unstable)


def init_state(setup: StableSetup, params: PyTree, initial_positions) -> StableState:
    """The state of a fresh run: replicas initialised at `initial_positions` [R, n, 3] Å."""
    key = jax.random.PRNGKey(int(setup.config.seed))
    key, k_init = jax.random.split(key)
    md_state = setup.sim.init(k_init, params, jnp.asarray(initial_positions), setup.kT)
    depth = int(setup.scfg.history_depth)
    params = sharding.replicate(params, setup.mesh)
    return StableState(
        params=params,
        opt_state=sharding.replicate(setup.optimizer.init(params), setup.mesh),
        md_state=md_state,
        learn_start=md_state,
        # [D, R, ...]: replicas split over the devices like the live state.
        stored_starts=sharding.shard_replicas(
            _stack_states([md_state] * depth), setup.mesh, axis=1
        ),
        n_stored=_i32(0),
        held=np.zeros(setup.n_replicas, bool),
        key=key,
        phase=_i32(SIMULATION),
        new_phase=np.asarray(True),
        epoch=_i32(0),
        learning_steps=_i32(0),
        cycles=_i32(0),
        plateau=setup.plateau.init(params),
        lr_reductions=_i32(0),
        time_s=np.asarray(0.0, np.float64),
    )


# ---------------------------------------------------------------------------------------------
# Epochs: pure transitions of the state
# ---------------------------------------------------------------------------------------------


def epoch_key(state: StableState):
    """The PRNG key of the state's next epoch (depends only on the seed and the epoch)."""
    return jax.random.fold_in(state.key, int(state.epoch))


def _random_resets(setup: StableSetup, state: StableState, key):
    """Reset ceil(reset_fraction x stable replicas) random stable replicas to random
    stored states (the reference's diversity step at the start of a simulation phase).
    Returns (md_state, number reset)."""
    stored = min(int(state.n_stored), int(setup.scfg.history_depth))
    if stored == 0 or setup.scfg.reset_fraction <= 0:
        return state.md_state, 0
    k1, k2, k3 = jax.random.split(key, 3)
    stable = np.flatnonzero(~np.asarray(state.held))
    n_reset = int(np.ceil(setup.scfg.reset_fraction * stable.size))
    if n_reset == 0:
        return state.md_state, 0
    chosen = np.asarray(jax.random.permutation(k1, stable))[:n_reset]
    mask = np.zeros(setup.n_replicas, bool)
    mask[chosen] = True
    slots = np.asarray(jax.random.randint(k2, (setup.n_replicas,), 0, stored))
    rows = np.arange(setup.n_replicas)
    earlier = jax.tree.map(lambda h: h[slots, rows], state.stored_starts)
    return setup.sim.reset(state.md_state, earlier, mask, key=k3), n_reset


def _md_speed(setup: StableSetup, seconds: float) -> dict:
    """The epoch's MD speed: batched steps per second and replica-steps per second."""
    steps = int(setup.mcfg.steps_per_epoch)
    seconds = max(float(seconds), 1e-12)
    return {
        "md_time_s": seconds,
        "md_steps_per_s": steps / seconds,
        "md_replica_steps_per_s": steps * setup.n_replicas / seconds,
    }


def simulation_epoch(state: StableState, setup: StableSetup) -> tuple[StableState, dict]:
    """One simulation epoch (learning rate 0): returns (next state, metrics record).

    Random resets when the epoch starts a phase; the epoch's start is stored; replicas
    that become unstable are rewound to that start and held; the learning phase starts
    (every replica from this epoch's start) when the held fraction reaches
    `upper_threshold`.
    """
    n_reset = 0
    md_state = state.md_state
    if state.new_phase:
        md_state, n_reset = _random_resets(setup, state, epoch_key(state))
    start = md_state
    # Stored states are the starts of simulation epochs (as in the reference code).
    slot = int(state.n_stored) % int(setup.scfg.history_depth)
    stored_starts = jax.tree.map(lambda h, x: h.at[slot].set(x), state.stored_starts, start)
    t0 = time.perf_counter()
    md_state, traj, unstable = setup.run_md(state.params, start)
    md_time = time.perf_counter() - t0
    newly = unstable & ~state.held
    if newly.any():
        # Rewind by one epoch and hold there: the state one epoch before instability.
        md_state = setup.sim.reset(md_state, start, newly)
    held = state.held | newly
    md_state = setup.sim.freeze(md_state, held)
    fraction = float(held.mean())
    record = {
        "phase": "simulation",
        "unstable_fraction": fraction,
        "lr": 0.0,
        "replicas_reset": n_reset,
        "temperature_K": float(np.nanmean(traj.temperature)),
        **_md_speed(setup, md_time),
    }
    state = state.replace(
        md_state=md_state,
        held=held,
        stored_starts=stored_starts,
        n_stored=_i32(int(state.n_stored) + 1),
        new_phase=np.asarray(False),
        epoch=_i32(int(state.epoch) + 1),
    )
    if fraction >= setup.scfg.upper_threshold:
        # Every replica restarts the learning phase from its state at the start of
        # this epoch: the held ones sit there already; the stable ones are rewound
        # too (the reference resets all replicas).
        state = state.replace(
            phase=_i32(LEARNING),
            learn_start=start,
            lr_reductions=_i32(0),
            plateau=plateau_start(setup.plateau, state.params, fraction),
        )
    return state, record


def learning_epoch(state: StableState, setup: StableSetup) -> tuple[StableState, dict]:
    """One learning epoch: returns (next state, metrics record).

    Every replica runs one epoch from its learning-phase start with the current model;
    one clipped SGD step on the estimator (+ QM) gradient of its samples; the plateau
    rule sees the epoch's unstable fraction. The phase ends at `lower_threshold` or
    after `max_lr_reductions` reductions: the next simulation phase continues from the
    end states (replicas that went unstable from their learning-phase start).
    """
    k_sel, k_qm = jax.random.split(epoch_key(state))
    everyone = np.ones(setup.n_replicas, bool)
    start = setup.sim.unfreeze(state.learn_start, everyone)
    t0 = time.perf_counter()
    md_state, traj, went_unstable = setup.run_md(state.params, start)
    md_time = time.perf_counter() - t0
    fraction = float(went_unstable.mean())
    samples = setup.samples(traj)
    selected, sel_record = setup.selection(samples, k_sel)
    qm_idx, qm_w = setup.qm_chunks(k_qm)
    lr = learning_rate(setup.scfg, state.lr_reductions)
    # Samples are [R x frames] in replica order: split over the devices like the
    # replicas; the estimator's sums over them become cross-device reductions.
    # QM frames of a chunk are split too when they divide evenly (data parallel).
    mesh = setup.mesh
    qm_axis = 1 if mesh is not None and qm_idx.shape[1] % mesh.size == 0 else None
    t0 = time.perf_counter()
    params, opt_state, metrics = setup.learn_step(
        state.params,
        state.opt_state,
        setup.on_devices(samples),
        None if selected is None else setup.on_devices(selected),
        setup.on_devices(qm_idx, axis=qm_axis),
        setup.on_devices(qm_w, axis=qm_axis),
        setup.on_devices(np.asarray(lr, dtype=jnp.result_type(float)), axis=None),
    )
    metrics = {k: float(v) for k, v in sharding.to_host(metrics).items()}
    learn_time = time.perf_counter() - t0
    if not np.isfinite(metrics["observable_loss"]):
        raise FloatingPointError(
            "observable loss is not finite (fewer than 2 usable samples?): "
            f"{metrics}; lower stable.lr or check the stability threshold"
        )
    record = {
        "phase": "learning",
        "unstable_fraction": fraction,
        "lr": lr,
        **metrics,
        **sel_record,
        **_md_speed(setup, md_time),
        # The learning step (estimator + QM gradient + update), first epoch with compile.
        "learning_step_time_s": learn_time,
    }
    plateau = setup.plateau_update(state.plateau, fraction)
    reduced = bool(plateau.scale < state.plateau.scale)
    state = state.replace(
        params=params,
        opt_state=opt_state,
        learning_steps=_i32(int(state.learning_steps) + 1),
        plateau=plateau,
        lr_reductions=_i32(int(state.lr_reductions) + reduced),
        epoch=_i32(int(state.epoch) + 1),
    )
    if (
        fraction <= setup.scfg.lower_threshold
        or int(state.lr_reductions) >= setup.scfg.max_lr_reductions
    ):
        # Continue simulating from where learning ended; replicas that went
        # unstable in this epoch restart from their learning-phase start.
        md_state = setup.sim.reset(md_state, start, went_unstable)
        state = state.replace(
            md_state=setup.sim.unfreeze(md_state, everyone),
            held=np.zeros(setup.n_replicas, bool),
            phase=_i32(SIMULATION),
            new_phase=np.asarray(True),
            cycles=_i32(int(state.cycles) + 1),
        )
        record["phase_end"] = True
    return state, record


def run_epoch(state: StableState, setup: StableSetup) -> tuple[StableState, dict]:
    """The state's next epoch, simulation or learning by its phase."""
    if int(state.phase) == SIMULATION:
        return simulation_epoch(state, setup)
    return learning_epoch(state, setup)


# ---------------------------------------------------------------------------------------------
# The trainer: the loop, checkpoints, metrics, progress
# ---------------------------------------------------------------------------------------------


class StableTrainer:
    """Runs StABlE training from pre-trained params; resumable from `workdir`.

    A thin loop over `run_epoch`: it times each epoch, writes the metrics record,
    checkpoints the `StableState` and shows progress.

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

    Attributes:
      setup: the `StableSetup` (simulator, compiled pieces, configs).
      state: the current `StableState` (restored from the workdir's latest checkpoint).
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
        _validate(config, np.asarray(species), initial_positions, qm_frames)
        self.setup = StableSetup(
            potential=potential,
            species=species,
            box=box,
            config=config,
            criterion=criterion,
            target=target,
            qm_frames=qm_frames,
            mesh=mesh,
        )
        self.config = config
        self.scfg = config.stable
        self.mcfg = config.md
        self.n_replicas = self.setup.n_replicas
        self.runtime = self.setup.runtime
        self.workdir = workdir
        self.progress = progress
        self.state = init_state(self.setup, params, initial_positions)
        self.ckpt = None
        self.writer = None
        if workdir is not None:
            os.makedirs(workdir, exist_ok=True)
            self.ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), max_to_keep=2)
            restored = self.ckpt.restore_latest(self.state)
            if restored is not None:
                self.state = restored[1]
            log_cfg = config.get("log") or {}
            self.writer = MetricsWriter(
                os.path.join(workdir, "metrics.jsonl"),
                resume_step=int(self.state.epoch),
                step_key="epoch",
                tensorboard=bool(log_cfg.get("tensorboard", False)),
            )

    def budget_left(self) -> bool:
        return budget_left(self.state, self.scfg)

    def run(self) -> PyTree:
        """Runs epochs until the budget is spent; returns the trained params."""
        # A live bar on a terminal; one line per epoch otherwise (logs, CI, nohup).
        bar = progress_bar(
            int(self.scfg.max_epochs),
            desc="StABlE",
            initial=int(self.state.epoch),
            disable=not self.progress or None,
        )
        try:
            self._run_epochs(bar)
        finally:
            bar.close()
        if self.ckpt is not None:
            self.ckpt.wait_until_finished()
        return self.state.params

    def _run_epochs(self, bar) -> None:
        while self.budget_left():
            t0 = time.perf_counter()
            state, record = run_epoch(self.state, self.setup)
            # With several processes the wall time is process 0's, so that every process
            # takes the same `max_time_s` decision (one collective per epoch).
            elapsed = sharding.from_process_0(time.perf_counter() - t0)
            state = state.replace(time_s=np.asarray(float(state.time_s) + elapsed, np.float64))
            self.state = state
            record.update(
                epoch=int(state.epoch),
                wall_time_s=float(state.time_s),
                cycles=int(state.cycles),
                n_devices=self.runtime["n_devices"],
                n_processes=self.runtime["n_processes"],
            )
            if self.writer is not None:
                self.writer.write(record)
            if self.ckpt is not None:
                self.ckpt.save(int(state.epoch), state)
            if self.progress and bar.disable:
                logger.info(_progress_line(record, self.scfg.max_epochs))
            elif self.progress:
                bar.set_postfix_str(_progress_line(record, self.scfg.max_epochs, short=True))
                bar.update(1)

    @property
    def history(self) -> list[dict]:
        """The per-epoch metrics records so far (`stable/metrics.jsonl`), oldest first."""
        if self.writer is None:
            return []
        return self.writer.records()


def _validate(config, species, initial_positions, qm_frames):
    s, m = config.stable, config.md
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
    if len(shape) != 3 or shape[0] != m.n_replicas or shape[1:] != (len(species), 3):
        raise ValueError(
            f"initial_positions must be [md.n_replicas={m.n_replicas}, {len(species)}, 3], "
            f"got {shape}"
        )
    if s.qm_weight > 0 and qm_frames is None:
        raise ValueError("stable.qm_weight > 0 needs QM training frames")


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
