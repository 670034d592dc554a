"""The StABlE training loop: alternate simulation and learning phases.

Simulation phase (learning rate 0): R replicas run with the current model for
`steps_per_epoch` steps per epoch; every `check_every` steps a frame is checked
with the training stability criterion. A replica that becomes unstable during an
epoch is rewound to its state at the start of that epoch and held (frozen) there:
that state is "near-unstable" (simulating one more epoch from it crosses the
threshold). At the start of each simulation phase a random `reset_fraction` of
the stable replicas is reset to a random earlier stored state (diversity). When
the held fraction reaches `upper_threshold` the learning phase starts.

Learning phase: every replica is reset to its stored near-unstable state (the
state it is held at, or its current state if it is stable), simulated for one
epoch with the current model, and every `sample_every`-th state is a sample.
The gradient of the observable loss ||<O>_theta - O_ref||^2 comes from the
Boltzmann estimator (global, or localized for water), plus lambda x the QM
energy/force gradient on a random batch of the original training frames; the
sum is clipped to a global norm and one SGD step is taken. This repeats from the
same starting states. The learning rate is reduced on a plateau of the unstable
fraction; the phase ends when that fraction falls to `lower_threshold` or the
rate has been reduced `max_lr_reductions` times. The next simulation phase
starts from the end states of the last learning epoch (replicas that went
unstable in it restart from their learning-phase starting states).

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

from stablejax import md, units
from stablejax.estimator import boltzmann_grad, boltzmann_grad_local
from stablejax.potentials.base import Potential, all_pairs_edges
from stablejax.stability import StabilityCriterion
from stablejax.training.checkpoint import CheckpointManager
from stablejax.training.metrics import MetricsWriter, read_metrics
from stablejax.training.qm import QMFrames, cutoff_edges, make_qm_loss

PyTree = Any

SIMULATION, LEARNING = 0, 1
PHASE_NAMES = {SIMULATION: "simulation", LEARNING: "learning"}


# ---------------------------------------------------------------------------------------------
# Simulator and observable set-up from configs
# ---------------------------------------------------------------------------------------------


def make_integrator(
    kind: str,
    *,
    dt_fs: float,
    tau_fs: float = 20.0,
    friction_per_ps: float = 0.1,
    chain_length: int = 3,
    pressure_bar: float = 1.01325,
    tau_P_fs: float = 2000.0,
):
    """An integrator of `stablejax.md` from its config name (units in the argument names)."""
    if kind == "nve":
        return md.NVE(dt_fs=dt_fs)
    if kind == "langevin":
        return md.Langevin(dt_fs=dt_fs, friction_per_ps=friction_per_ps)
    if kind == "nose_hoover":
        return md.NoseHooverChain(dt_fs=dt_fs, tau_fs=tau_fs, chain_length=chain_length)
    if kind == "berendsen_npt":
        return md.BerendsenNPT(
            dt_fs=dt_fs, pressure_bar=pressure_bar, tau_T_fs=tau_fs, tau_P_fs=tau_P_fs
        )
    raise ValueError(
        f"unknown integrator {kind!r}; choose 'nve', 'langevin', 'nose_hoover' or 'berendsen_npt'"
    )


def potential_energy_fn(potential: Potential, species) -> Callable:
    """`(params, positions [n,3] Å, edges [2,e], box [3] Å | None) -> eV` for the MD engine."""
    species = jnp.asarray(species, dtype=jnp.int32)

    def energy_fn(params, positions, edges, box):
        return potential.energy(params, species, positions, edges, box)

    return energy_fn


def make_simulator(
    potential: Potential,
    species,
    box,
    md_config: ml_collections.ConfigDict,
    *,
    integrator=None,
    chunk_steps: int | None = None,
) -> md.Simulator:
    """A replica-batched `md.Simulator` for `potential` from the experiment's `md` block."""
    if integrator is None:
        integrator = make_integrator(
            md_config.integrator,
            dt_fs=md_config.dt_fs,
            tau_fs=md_config.tau_fs,
            friction_per_ps=md_config.friction_per_ps,
            chain_length=md_config.chain_length,
            pressure_bar=md_config.pressure_bar,
            tau_P_fs=md_config.tau_P_fs,
        )
    return md.Simulator(
        potential_energy_fn(potential, species),
        species=np.asarray(species),
        box=box,
        integrator=integrator,
        cutoff=potential.cutoff if box is not None else None,
        skin=md_config.skin,
        chunk_steps=chunk_steps or md_config.chunk_steps,
    )


@dataclasses.dataclass(frozen=True)
class ObservableTarget:
    """What the learning phase matches: an observable and its reference value.

    Attributes:
      name: observable name (for logs).
      reference: reference value (array) of the ensemble-averaged observable.
      observable_fn: global estimator: `(positions [n,3] Å) -> array`.
      local_observable_fn: localized estimator: `(positions [n,3] Å, members [n] bool)
        -> array`; None for the global estimator.
      membership: localized estimator: [n_neighbourhoods, n_atoms] bool.
    """

    name: str
    reference: np.ndarray
    observable_fn: Callable | None = None
    local_observable_fn: Callable | None = None
    membership: np.ndarray | None = None

    @property
    def local(self) -> bool:
        return self.local_observable_fn is not None

    def loss(self, mean_observable):
        """||<O> - O_ref||^2 (sum of squares over the observable's entries)."""
        return jnp.sum((mean_observable - jnp.asarray(self.reference)) ** 2)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def _stack_states(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _select_replicas(mask, new, old):
    def pick(a, b):
        m = jnp.reshape(mask, mask.shape + (1,) * (a.ndim - mask.ndim))
        return jnp.where(m, a, b)

    return jax.tree.map(pick, new, old)


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
        self._validate(initial_positions)

        self.sim = make_simulator(potential, self.species, self.box, self.mcfg)
        self.kT = units.kT_from_kelvin(self.mcfg.temperature_K)
        self.n_replicas = int(self.mcfg.n_replicas)
        self.frames_per_epoch = self.mcfg.steps_per_epoch // self.mcfg.check_every
        self.sample_stride = self.scfg.sample_every // self.mcfg.check_every
        self.optimizer = optax.chain(
            optax.clip_by_global_norm(self.scfg.grad_clip),
            optax.inject_hyperparams(optax.sgd)(learning_rate=self.scfg.lr),
        )
        self._edge_capacity = 0
        self._learn_step = jax.jit(self._make_learn_step())
        self._check = jax.jit(self._unstable_frames)

        key = jax.random.PRNGKey(int(config.seed))
        key, k_init = jax.random.split(key)
        positions = jnp.asarray(initial_positions)
        md_state = self.sim.init(k_init, params, positions, self.kT)
        depth = int(self.scfg.history_depth)
        self.state = {
            "params": params,
            "opt_state": self.optimizer.init(params),
            "md_state": md_state,
            "learn_start": md_state,
            "history": _stack_states([md_state] * depth),
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
            self.writer = MetricsWriter(
                os.path.join(workdir, "metrics.jsonl"),
                resume_step=int(self.state["epoch"]),
                step_key="epoch",
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

    def _sample_energy_fn(self):
        species = jnp.asarray(self.species)
        pot = self.potential
        if self.box is None:
            edges = jnp.asarray(all_pairs_edges(len(self.species)))

            def energy(params, sample):
                return pot.energy(params, species, sample["positions"], edges, None)

            def per_atom(params, sample):
                return pot.per_atom_energies(params, species, sample["positions"], edges, None)
        else:

            def energy(params, sample):
                return pot.energy(
                    params, species, sample["positions"], sample["edges"], sample["box"]
                )

            def per_atom(params, sample):
                return pot.per_atom_energies(
                    params, species, sample["positions"], sample["edges"], sample["box"]
                )

        return energy, per_atom

    def _make_learn_step(self):
        s = self.scfg
        energy, per_atom = self._sample_energy_fn()
        target = self.target
        batch = int(s.batch_size) if s.batch_size else None
        if target.local:
            estimator = boltzmann_grad_local(
                per_atom,
                lambda sample, members: target.local_observable_fn(sample["positions"], members),
                target.loss,
                kT=self.kT,
                batch_size=batch,
            )
        else:
            estimator = boltzmann_grad(
                energy,
                lambda sample: target.observable_fn(sample["positions"]),
                target.loss,
                kT=self.kT,
                batch_size=batch,
            )
        qm_loss = None
        if s.qm_weight > 0:
            qm_loss = make_qm_loss(
                self.potential,
                energy_weight=self.config.pretrain.energy_weight,
                force_weight=self.config.pretrain.force_weight,
            )
        qm_frames = self.qm_frames
        optimizer = self.optimizer
        membership = None if target.membership is None else jnp.asarray(target.membership)

        def step(params, opt_state, samples, qm_idx, lr):
            if target.local:
                n_frames = samples["positions"].shape[0]
                members = jnp.broadcast_to(membership, (n_frames,) + membership.shape)
                (obs_loss, aux), g_obs = estimator(params, samples, members)
            else:
                (obs_loss, aux), g_obs = estimator(params, samples)
            if qm_loss is not None:
                weight = jnp.ones(qm_idx.shape, dtype=samples["positions"].dtype)
                (q_loss, _), g_qm = jax.value_and_grad(qm_loss, has_aux=True)(
                    params, qm_frames, qm_idx, weight
                )
            else:
                q_loss = jnp.zeros(())
                g_qm = jax.tree.map(jnp.zeros_like, g_obs)
            grads = jax.tree.map(lambda a, b: a + s.qm_weight * b, g_obs, g_qm)
            opt_state[1].hyperparams["learning_rate"] = lr
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
                "grad_cosine": cosine,
                "samples_used": aux.n_used,
                "samples_dropped": aux.n_dropped,
            }
            return params, opt_state, metrics

        return step

    # ------------------------------------------------------------------ epochs

    def _samples(self, traj: md.Trajectory) -> dict:
        """Every `sample_every`-th recorded frame of every replica, as estimator samples."""
        k = self.sample_stride
        pos = traj.position[:, k - 1 :: k]
        R, F = pos.shape[:2]
        flat = pos.reshape((R * F,) + pos.shape[2:])
        samples = {"positions": flat}
        if self.box is not None:
            boxes = (
                traj.box[:, k - 1 :: k].reshape(R * F, 3)
                if traj.box is not None
                else np.broadcast_to(self.box, (R * F, 3))
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

    def _random_resets(self, key):
        """Reset a random fraction of the stable replicas to random earlier stored states."""
        st = self.state
        stored = min(int(st["history_count"]), int(self.scfg.history_depth))
        if stored == 0 or self.scfg.reset_fraction <= 0:
            return 0
        k1, k2, k3 = jax.random.split(key, 3)
        stable = ~np.asarray(st["held"])
        choose = np.asarray(jax.random.uniform(k1, (self.n_replicas,))) < self.scfg.reset_fraction
        mask = stable & choose
        if not mask.any():
            return 0
        slots = np.asarray(jax.random.randint(k2, (self.n_replicas,), 0, stored))
        rows = np.arange(self.n_replicas)
        earlier = jax.tree.map(lambda h: h[slots, rows], st["history"])
        st["md_state"] = self.sim.reset(st["md_state"], earlier, jnp.asarray(mask), key=k3)
        return int(mask.sum())

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
        md_state, traj = self.sim.run(
            st["params"], start, self.mcfg.steps_per_epoch, record_every=self.mcfg.check_every
        )
        flags = np.asarray(self._check(jnp.asarray(traj.position)))
        newly = (flags.any(axis=1) | np.asarray(md_state.unstable)) & ~st["held"]
        if newly.any():
            # Rewind by one epoch and hold there: the state one epoch before instability.
            md_state = self.sim.reset(md_state, start, jnp.asarray(newly))
        held = st["held"] | newly
        md_state = self.sim.freeze(md_state, jnp.asarray(held))
        st["md_state"] = md_state
        st["held"] = held
        self._push_history(md_state)
        fraction = float(held.mean())
        record = {
            "phase": "simulation",
            "unstable_fraction": fraction,
            "lr": 0.0,
            "replicas_reset": n_reset,
            "temperature_K": float(np.nanmean(traj.temperature)),
        }
        if fraction >= self.scfg.upper_threshold:
            st["phase"] = LEARNING
            st["learn_start"] = md_state
            st["lr"] = float(self.scfg.lr)
            st["lr_reductions"] = 0
            st["best_fraction"] = fraction
            st["since_best"] = 0
        return record

    def _learning_epoch(self, key) -> dict:
        st = self.state
        start = self.sim.unfreeze(st["learn_start"], jnp.ones(self.n_replicas, bool))
        md_state, traj = self.sim.run(
            st["params"], start, self.mcfg.steps_per_epoch, record_every=self.mcfg.check_every
        )
        flags = np.asarray(self._check(jnp.asarray(traj.position)))
        went_unstable = flags.any(axis=1) | np.asarray(md_state.unstable)
        fraction = float(went_unstable.mean())
        samples = self._samples(traj)
        qm_idx = np.zeros(max(1, int(self.scfg.qm_batch_size)), np.int32)
        if self.qm_frames is not None and self.scfg.qm_weight > 0:
            qm_idx = np.asarray(
                jax.random.randint(key, qm_idx.shape, 0, self.qm_frames.n_frames), np.int32
            )
        params, opt_state, metrics = self._learn_step(
            st["params"],
            st["opt_state"],
            samples,
            jnp.asarray(qm_idx),
            jnp.asarray(st["lr"], dtype=jnp.result_type(float)),
        )
        metrics = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(metrics["observable_loss"]):
            raise FloatingPointError(
                "observable loss is not finite (fewer than 2 usable samples?): "
                f"{metrics}; lower stable.lr or check the stability threshold"
            )
        record = {"phase": "learning", "unstable_fraction": fraction, "lr": st["lr"], **metrics}
        st["params"], st["opt_state"] = params, opt_state
        st["learning_steps"] = int(st["learning_steps"]) + 1
        # Reduce-on-plateau of the unstable fraction.
        if fraction < st["best_fraction"] - 1e-12:
            st["best_fraction"], st["since_best"] = fraction, 0
        else:
            st["since_best"] = int(st["since_best"]) + 1
            if st["since_best"] >= self.scfg.plateau_patience:
                st["lr"] = float(st["lr"]) * self.scfg.plateau_factor
                st["lr_reductions"] = int(st["lr_reductions"]) + 1
                st["since_best"] = 0
        if (
            fraction <= self.scfg.lower_threshold
            or st["lr_reductions"] >= self.scfg.max_lr_reductions
        ):
            # Continue simulating from where learning ended; replicas that went
            # unstable in this epoch restart from their learning-phase start.
            md_state = self.sim.reset(md_state, start, jnp.asarray(went_unstable))
            md_state = self.sim.unfreeze(md_state, jnp.ones(self.n_replicas, bool))
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
        return not (self.scfg.max_time_s > 0 and st["time_s"] >= self.scfg.max_time_s)

    def run(self) -> PyTree:
        """Runs epochs until the budget is spent; returns the trained params."""
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
            record.update(epoch=st["epoch"], wall_time_s=st["time_s"], cycles=st["cycles"])
            if self.writer is not None:
                self.writer.write(record)
            if self.ckpt is not None:
                self.ckpt.save(int(st["epoch"]), st)
            if self.progress:
                print(_progress_line(record, self.scfg.max_epochs), flush=True)
        if self.ckpt is not None:
            self.ckpt.wait_until_finished()
        return st["params"]

    @property
    def history(self) -> list[dict]:
        if self.writer is None:
            return []
        return read_metrics(self.writer.path)


def _progress_line(record: dict, max_epochs: int) -> str:
    parts = [
        f"[StABlE] epoch {record['epoch']}/{max_epochs}",
        f"{record['phase']:<10}",
        f"unstable {record['unstable_fraction']:.2f}",
        f"lr {record['lr']:.2e}",
    ]
    if "observable_loss" in record:
        parts.append(f"L_obs {record['observable_loss']:.3e}")
        parts.append(f"L_QM {record['qm_loss']:.3e}")
    parts.append(f"{record['wall_time_s']:.0f}s")
    return " | ".join(parts)
