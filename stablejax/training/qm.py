"""QM pre-training: fit a potential to reference energies and forces (paper Eq. 1).

The loss over a batch B of frames (each with n atoms) is

    L_QM = w_E * mean_{b in B} (E_b - E_b^ref)^2 / d_b^2
         + w_F * mean_{b in B} mean_{i, alpha} (F_{b,i,alpha} - F^ref_{b,i,alpha})^2

with energies in eV, forces in eV/Å, d_b = 1 (total energy, as the reference
implementation) or n (per-atom energy, `per_atom_energy=True`). The forces
dominate: the defaults are w_E = 1, w_F = 100 (1/(eV/Å)^2 relative to 1/eV^2),
which is what the reference (MDsim/StABlE) uses for water; its MD17/MD22 SchNet
configs use 0.05 : 0.95 (1 : 19) and its GemNet configs 1 : 1000. The ratio is
unit-independent when energies and forces share an energy unit.

Training: Adam on minibatches of frames, a linear learning-rate warm-up from
`warmup_factor * lr` to `lr` over `warmup_steps` steps, a reduce-on-plateau
factor (optax.contrib.reduce_on_plateau, stepped once per epoch on the
validation force MAE), early stopping when the validation force MAE has not
improved by a relative `early_stopping_rtol` for `patience` epochs, an optional exponential moving average (EMA) of
the parameters (validation and the returned model use the EMA when enabled),
and a wall-clock budget. Each minibatch step is one jitted function with fixed
shapes: the last, short batch of an epoch is padded with zero-weight frames, so
nothing is recompiled and no frame is dropped. Every epoch ends with an orbax
checkpoint (`workdir/checkpoints`) and a metrics record (`workdir/metrics.jsonl`);
calling `train_qm` again with the same workdir resumes from the last checkpoint
and ends with the same parameters as an uninterrupted run (the minibatch order
of epoch k depends only on (seed, k)).

Graphs: molecules (no box) use all-pairs edges shared by every frame
(`edges='all_pairs'`). Periodic data (and large molecules, `edges='cutoff'`)
use per-frame edge lists of the pairs within the potential's cutoff, found
with the minimum-image convention in NumPy before training and padded to the
largest count (true for the 12.44 Å water box with a 5 Å cutoff). A cell
narrower than twice the cutoff gets edges with lattice image shifts instead
([m, 5, e], `geometry.image_edges_np`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from stablejax import batching, geometry, sharding
from stablejax.data.dataset import Dataset
from stablejax.potentials import normalization
from stablejax.potentials.base import Potential, all_pairs_edges
from stablejax.training.checkpoint import CheckpointManager
from stablejax.training.metrics import MetricsWriter, format_metrics, progress_bar

PyTree = Any

#: Config fields of the experiment-level `pretrain` block that train_qm ignores.
_IGNORED_FIELDS = ("checkpoint_path",)

# Jitted step/metric functions per (potential, trace-relevant settings), so that
# repeated train_qm/evaluate calls in one process compile once. Holds strong
# references (a potential is small); bounded, least recently used dropped.
_JIT_CACHE: collections.OrderedDict = collections.OrderedDict()
_JIT_CACHE_SIZE = 32


def _cached_jit(kind: str, potential: Potential, settings: tuple, build: Callable) -> Callable:
    key = (kind, id(potential), settings)
    hit = _JIT_CACHE.get(key)
    if hit is not None and hit[0] is potential:
        _JIT_CACHE.move_to_end(key)
        return hit[1]
    fn = build()
    _JIT_CACHE[key] = (potential, fn)
    while len(_JIT_CACHE) > _JIT_CACHE_SIZE:
        _JIT_CACHE.popitem(last=False)
    return fn


def default_config() -> ml_collections.ConfigDict:
    """Hyperparameters of `train_qm` (units in comments)."""
    c = ml_collections.ConfigDict()
    c.epochs = 100  # maximum number of passes over the training frames
    c.batch_size = 32  # frames per optimizer step
    c.eval_batch_size = 0  # frames per evaluation batch; 0 = batch_size
    c.lr = 1e-3  # Adam peak learning rate
    c.warmup_steps = 100  # linear warm-up length in optimizer steps (0 = none)
    c.warmup_factor = 0.2  # warm-up starts at warmup_factor * lr (MDsim uses 0.2)
    c.energy_weight = 1.0  # w_E, multiplies the energy MSE (eV^2)
    c.force_weight = 100.0  # w_F, multiplies the force-component MSE ((eV/Å)^2)
    c.per_atom_energy = False  # energy term on E/n instead of E
    c.grad_clip = 0.0  # global-norm gradient clipping; 0 = off
    c.plateau_patience = 5  # epochs without val force-MAE improvement before lr *= factor
    c.plateau_factor = 0.8  # reduce-on-plateau factor (MDsim: 0.8)
    c.plateau_rtol = 1e-4  # relative improvement that counts for the plateau test
    c.min_lr = 1e-6  # the plateau reduction stops here
    c.patience = 20  # early stopping: epochs without val force-MAE improvement (0 = off)
    c.early_stopping_rtol = 1e-3  # relative decrease of the val force MAE that resets patience
    c.ema_decay = 0.0  # EMA of params, e.g. 0.999; 0 = off
    c.seed = 0  # minibatch order
    c.max_time_s = 0.0  # wall-clock budget in seconds over all (resumed) sessions; 0 = none
    # Keep training past `epochs` until this much wall time (s) over all sessions has passed
    # (a lower bound, for budgets matched in time such as the `baseline_plus` control); 0 = none.
    c.min_time_s = 0.0
    c.edges = "auto"  # 'auto' | 'all_pairs' | 'cutoff' (see module docstring)
    c.max_to_keep = 2  # checkpoints kept on disk
    c.progress = True  # tqdm progress bar
    c.tensorboard = False  # mirror metrics.jsonl to TensorBoard (needs tensorboardX)
    return c


def _resolve_config(config) -> ml_collections.ConfigDict:
    resolved = default_config()
    if config is None:
        return resolved
    items = config.items() if hasattr(config, "items") else dict(config).items()
    for key, value in items:
        if key in _IGNORED_FIELDS:
            continue
        if key not in resolved:
            raise ValueError(
                f"unknown QM training config field {key!r}; known fields: {sorted(resolved.keys())}"
            )
        default = resolved[key]
        if isinstance(default, bool) != isinstance(value, bool) or (
            isinstance(default, (int, float)) and not isinstance(value, (int, float))
        ):
            raise ValueError(
                f"QM training config field {key!r} must be {type(default).__name__}, got "
                f"{type(value).__name__} {value!r}"
            )
        resolved[key] = type(default)(value) if isinstance(default, float) else value
    if resolved.batch_size < 1:
        raise ValueError(f"config.batch_size must be >= 1, got {resolved.batch_size}")
    if resolved.lr <= 0:
        raise ValueError(f"config.lr must be > 0, got {resolved.lr}")
    if not 0.0 <= resolved.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be in [0, 1), got {resolved.ema_decay}")
    if resolved.plateau_rtol <= 0:
        raise ValueError(f"config.plateau_rtol must be > 0, got {resolved.plateau_rtol}")
    if resolved.min_time_s < 0 or (
        resolved.max_time_s > 0 and resolved.min_time_s > resolved.max_time_s
    ):
        raise ValueError(
            f"config.min_time_s must be >= 0 and <= max_time_s when that is set, got "
            f"min_time_s={resolved.min_time_s}, max_time_s={resolved.max_time_s}"
        )
    if resolved.energy_weight < 0 or resolved.force_weight < 0:
        raise ValueError("config.energy_weight and config.force_weight must be >= 0")
    if resolved.edges not in ("auto", "all_pairs", "cutoff"):
        raise ValueError(
            f"config.edges must be 'auto', 'all_pairs' or 'cutoff', got {resolved.edges!r}"
        )
    return resolved


# ---------------------------------------------------------------------------------------------
# Frames on the device
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QMFrames:
    """Labelled frames as device arrays, ready for batched loss/metric evaluation.

    Attributes:
      species: [n] int32 atomic numbers.
      positions: [m, n, 3] Å.
      energies: [m] eV.
      forces: [m, n, 3] eV/Å.
      edges: [2, e] int32 shared by all frames, or [m, 2, e] per frame (padding n);
        [m, 5, e] with lattice image shifts for cells narrower than twice the cutoff.
      box: [3] Å, [3, 3] Å cell (lattice vectors as rows), or None.
    """

    species: jax.Array
    positions: jax.Array
    energies: jax.Array
    forces: jax.Array
    edges: jax.Array
    box: jax.Array | None

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.species.shape[0])


jax.tree_util.register_dataclass(
    QMFrames,
    data_fields=["species", "positions", "energies", "forces", "edges", "box"],
    meta_fields=[],
)


def cutoff_edges(positions: np.ndarray, cutoff: float, box=None, *, capacity: int | None = None):
    """Per-frame directed edges of the pairs closer than `cutoff`.

    Minimum image ([2, e] per frame) when the cutoff is below half the smallest
    perpendicular width of the cell; otherwise every periodic image within the
    cutoff, as edges with lattice shifts ([5, e], `geometry.image_edges_np`).

    Args:
      positions: [m, n, 3] Å.
      cutoff: Å.
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows) or None.
      capacity: edges per frame; None = the largest count over the frames.

    Returns:
      [m, 2, capacity] int32 padded with n, or [m, 5, capacity] int32 padded
      with (n, n, 0, 0, 0) for a cell narrower than twice the cutoff.
    """
    positions = np.asarray(positions, dtype=np.float64)
    m, n, _ = positions.shape
    if geometry.needs_image_edges(cutoff, box):
        per_frame = [geometry.image_edges_np(frame, box, cutoff) for frame in positions]
    else:
        per_frame = [geometry.cutoff_edges_np(frame, cutoff, box) for frame in positions]
    largest = max(e.shape[1] for e in per_frame)
    if capacity is None:
        capacity = max(largest, 1)
    elif capacity < largest:
        raise ValueError(f"edge capacity {capacity} < largest edge count {largest}")
    rows = per_frame[0].shape[0]
    edges = np.zeros((m, rows, capacity), dtype=np.int32)
    edges[:, :2] = n
    for k, e in enumerate(per_frame):
        edges[k, :, : e.shape[1]] = e
    return edges


def prepare_frames(
    dataset: Dataset,
    potential: Potential,
    *,
    edges: str = "auto",
    dtype=None,
) -> QMFrames:
    """Checks a Dataset's QM labels and moves them to the device with their edge lists.

    Args:
      dataset: frames with `energies` [m] eV and `forces` [m, n, 3] eV/Å.
      potential: the model (its cutoff sets 'cutoff' edge lists).
      edges: 'all_pairs' (free space only), 'cutoff', or 'auto' (all pairs
        for molecules, cutoff lists for periodic data).
      dtype: float dtype of positions and labels; None = jax's default float.

    Returns:
      QMFrames.
    """
    if dataset.energies is None or dataset.forces is None:
        raise ValueError(
            f"QM training needs energies and forces; dataset from {dataset.source!r} lacks "
            + ("energies" if dataset.energies is None else "forces")
        )
    m, n = dataset.n_frames, dataset.n_atoms
    if m == 0:
        raise ValueError(f"dataset from {dataset.source!r} has no frames")
    if np.shape(dataset.energies) != (m,) or np.shape(dataset.forces) != (m, n, 3):
        raise ValueError(
            f"dataset from {dataset.source!r}: energies {np.shape(dataset.energies)} and forces "
            f"{np.shape(dataset.forces)} do not match positions {np.shape(dataset.positions)}"
        )
    if edges == "auto":
        edges = "cutoff" if dataset.periodic else "all_pairs"
    if edges == "all_pairs":
        if dataset.periodic:
            raise ValueError("edges='all_pairs' is for free-space molecules; use 'cutoff'")
        edge_array = all_pairs_edges(n)
    elif edges == "cutoff":
        edge_array = cutoff_edges(dataset.positions, potential.cutoff, dataset.box)
    else:
        raise ValueError(f"edges must be 'auto', 'all_pairs' or 'cutoff', got {edges!r}")
    if dtype is None:
        dtype = jnp.asarray(0.0).dtype
    return QMFrames(
        species=jnp.asarray(dataset.species, dtype=jnp.int32),
        positions=jnp.asarray(dataset.positions, dtype=dtype),
        energies=jnp.asarray(dataset.energies, dtype=dtype),
        forces=jnp.asarray(dataset.forces, dtype=dtype),
        edges=jnp.asarray(edge_array),
        box=None if dataset.box is None else jnp.asarray(dataset.box, dtype=dtype),
    )


def _batch_indices(n_frames: int, batch_size: int, order: np.ndarray | None = None):
    """Fixed-size index batches [k, B] and weights [k, B]; the last one padded with weight 0."""
    order = np.arange(n_frames) if order is None else np.asarray(order)
    n_batches = max(1, math.ceil(n_frames / batch_size))
    idx = np.zeros(n_batches * batch_size, dtype=np.int32)
    weight = np.zeros(n_batches * batch_size, dtype=np.float64)
    idx[:n_frames] = order
    weight[:n_frames] = 1.0
    # Padding repeats a real frame (index 0 of the order) so every input is valid data.
    idx[n_frames:] = order[0]
    return idx.reshape(n_batches, batch_size), weight.reshape(n_batches, batch_size)


def _predict(potential: Potential, params, frames: QMFrames, idx: jax.Array):
    """Energies [B] eV and forces [B, n, 3] eV/Å of frames `idx` (`batching.map_frames`:
    one vmapped call on an accelerator, frame by frame on a CPU)."""
    xs = {"position": frames.positions[idx]}
    if frames.edges.ndim == 3:
        xs["edges"] = frames.edges[idx]

    def one(x):
        edges = x["edges"] if "edges" in x else frames.edges
        return potential.energy_and_forces(params, frames.species, x["position"], edges, frames.box)

    per_pass = batching.frames_per_pass(len(idx), edges_per_frame=frames.edges.shape[-1])
    return batching.map_frames(one, xs, per_pass=per_pass)


# ---------------------------------------------------------------------------------------------
# Loss and metrics
# ---------------------------------------------------------------------------------------------


class QMLossAux(NamedTuple):
    """Per-batch diagnostics returned next to the loss (weighted means over real frames)."""

    energy_mse: jax.Array  # eV^2 (per-atom eV^2 when per_atom_energy)
    force_mse: jax.Array  # (eV/Å)^2 per component


@dataclasses.dataclass(frozen=True)
class QMLoss:
    """The energy-and-force loss L_QM (Eq. 1) over a weighted batch of frames
    (`make_qm_loss` builds it).

    `loss(params, frames, idx [B] int, weight [B]) -> (loss, QMLossAux)` is the weighted
    mean over the frames `idx` of `frames` (weight 0 marks padding), differentiable with
    `jax.value_and_grad(..., has_aux=True)`; `loss.value_and_grad(params, frames, idx,
    weight) -> ((loss, aux), grads)` gives the same, frame by frame on a CPU
    (`stablejax.batching`: 2-2.6x faster there), and is what the trainers call.
    """

    potential: Potential
    energy_weight: float = 1.0
    force_weight: float = 100.0
    per_atom_energy: bool = False
    frames_per_pass: int = 0  # 0: `batching.frames_per_pass`'s choice for the device

    def _inputs(self, frames: QMFrames, idx, weight) -> dict:
        weight = jnp.asarray(weight, frames.positions.dtype)
        xs = {
            "position": frames.positions[idx],
            "energy": frames.energies[idx],
            "force": frames.forces[idx],
            "share": weight / jnp.maximum(jnp.sum(weight), 1.0),  # of the weighted mean
        }
        if frames.edges.ndim == 3:
            xs["edges"] = frames.edges[idx]
        return xs

    def _frame(self, params, frames: QMFrames, x: dict):
        """One frame's share of (loss, QMLossAux)."""
        edges = x["edges"] if "edges" in x else frames.edges
        energy, forces = self.potential.energy_and_forces(
            params, frames.species, x["position"], edges, frames.box
        )
        de = energy - x["energy"]
        if self.per_atom_energy:
            de = de / frames.n_atoms
        energy_mse = x["share"] * de**2
        force_mse = x["share"] * jnp.mean((forces - x["force"]) ** 2)
        loss = self.energy_weight * energy_mse + self.force_weight * force_mse
        return loss, QMLossAux(energy_mse=energy_mse, force_mse=force_mse)

    def __call__(self, params, frames: QMFrames, idx, weight):
        values, aux = jax.vmap(lambda x: self._frame(params, frames, x))(
            self._inputs(frames, idx, weight)
        )
        return jnp.sum(values), jax.tree.map(jnp.sum, aux)

    def value_and_grad(self, params, frames: QMFrames, idx, weight):
        """((loss, QMLossAux), grads) of `self(params, frames, idx, weight)`."""
        per_pass = batching.frames_per_pass(
            len(idx), self.frames_per_pass, edges_per_frame=frames.edges.shape[-1]
        )
        return batching.summed_value_and_grad(
            lambda p, x: self._frame(p, frames, x),
            params,
            self._inputs(frames, idx, weight),
            per_pass=per_pass,
        )


def make_qm_loss(
    potential: Potential,
    *,
    energy_weight: float = 1.0,
    force_weight: float = 100.0,
    per_atom_energy: bool = False,
    frames_per_pass: int = 0,
) -> QMLoss:
    """The energy-and-force loss L_QM (Eq. 1) over a weighted batch of frames.

    Args:
      potential: the model.
      energy_weight: w_E (1/eV^2).
      force_weight: w_F (1/(eV/Å)^2).
      per_atom_energy: compare E/n instead of E.
      frames_per_pass: frames through the model at once in `value_and_grad`
        (0: all on an accelerator, 1 on a CPU; `stablejax.batching`).

    Returns:
      A `QMLoss`: `loss_fn(params, frames, idx [B] int, weight [B]) -> (loss, QMLossAux)`,
      the weighted mean over the frames `idx` of `frames` (weight 0 marks padding), and
      `loss_fn.value_and_grad(params, frames, idx, weight) -> ((loss, aux), grads)`.

    Example:
      >>> loss_fn = make_qm_loss(potential, energy_weight=1.0, force_weight=100.0)
      >>> (loss, aux), grads = loss_fn.value_and_grad(params, frames, idx, weight)
    """
    return QMLoss(
        potential=potential,
        energy_weight=float(energy_weight),
        force_weight=float(force_weight),
        per_atom_energy=bool(per_atom_energy),
        frames_per_pass=int(frames_per_pass),
    )


def make_qm_gradient(
    potential: Potential,
    frames: QMFrames,
    *,
    batch_size: int = 32,
    energy_weight: float = 1.0,
    force_weight: float = 100.0,
    per_atom_energy: bool = False,
) -> Callable:
    """grad L_QM averaged over every frame of `frames` (the StABlE regulariser).

    Loops over fixed-size, zero-padded batches with one jitted value-and-grad
    (compiled once per returned function) and combines them as an exact mean
    over frames.

    Returns:
      `qm_grad(params) -> (loss, grads)` with grads shaped like params.
    """
    loss_fn = make_qm_loss(
        potential,
        energy_weight=energy_weight,
        force_weight=force_weight,
        per_atom_energy=per_atom_energy,
    )
    idx_batches, w_batches = _batch_indices(frames.n_frames, batch_size)

    def build():
        @jax.jit
        def batch_grad(params, frames, idx, weight):
            (loss, _), grads = loss_fn.value_and_grad(params, frames, idx, weight)
            return loss, grads

        return batch_grad

    batch_grad = _cached_jit(
        "qm_grad", potential, (energy_weight, force_weight, per_atom_energy), build
    )

    def qm_grad(params):
        total_loss, total_grads = 0.0, None
        for idx, weight in zip(idx_batches, w_batches, strict=True):
            loss, grads = batch_grad(params, frames, idx, weight)
            share = float(weight.sum()) / frames.n_frames
            total_loss = total_loss + share * loss
            scaled = jax.tree.map(lambda g, s=share: s * g, grads)
            total_grads = (
                scaled if total_grads is None else jax.tree.map(jnp.add, total_grads, scaled)
            )
        return total_loss, total_grads

    return qm_grad


def make_evaluator(potential: Potential, *, batch_size: int = 32) -> Callable:
    """Energy/force error metrics of a potential on labelled frames.

    Returns:
      `evaluate(params, frames: QMFrames) -> dict` with energy_mae_meV,
      energy_rmse_meV, energy_mae_per_atom_meV (total-energy errors, eV -> meV),
      force_mae_meV_per_A and force_rmse_meV_per_A (over force components) and
      n_frames. The jitted batch function compiles once per frame shape.
    """

    def build():
        @jax.jit
        def batch_errors(params, frames, idx, weight):
            energies, forces = _predict(potential, params, frames, idx)
            weight = jnp.asarray(weight, energies.dtype)
            de = energies - frames.energies[idx]
            df = forces - frames.forces[idx]
            return jnp.stack(
                [
                    jnp.sum(weight * jnp.abs(de)),
                    jnp.sum(weight * de**2),
                    jnp.sum(weight * jnp.mean(jnp.abs(df), axis=(1, 2))),
                    jnp.sum(weight * jnp.mean(df**2, axis=(1, 2))),
                ]
            )

        return batch_errors

    batch_errors = _cached_jit("errors", potential, (), build)

    def errors(params, frames: QMFrames) -> dict:
        idx_batches, w_batches = _batch_indices(frames.n_frames, batch_size)
        sums = np.zeros(4)
        for idx, weight in zip(idx_batches, w_batches, strict=True):
            sums += np.asarray(batch_errors(params, frames, idx, weight), dtype=np.float64)
        m = frames.n_frames
        e_mae, e_mse, f_mae, f_mse = sums / m
        return {
            "energy_mae_meV": 1e3 * e_mae,
            "energy_rmse_meV": 1e3 * math.sqrt(e_mse),
            "energy_mae_per_atom_meV": 1e3 * e_mae / frames.n_atoms,
            "force_mae_meV_per_A": 1e3 * f_mae,
            "force_rmse_meV_per_A": 1e3 * math.sqrt(f_mse),
            "n_frames": m,
        }

    return errors


def evaluate(
    potential: Potential,
    params: PyTree,
    dataset: Dataset | QMFrames,
    *,
    batch_size: int = 32,
    edges: str = "auto",
) -> dict:
    """Energy and force errors of `params` on a labelled dataset.

    Args:
      potential: the model.
      params: its parameters.
      dataset: a Dataset with energies [m] eV and forces [m, n, 3] eV/Å, or QMFrames.
      batch_size: frames per jitted batch.
      edges: edge mode for a Dataset (see `prepare_frames`).

    Returns:
      {'energy_mae_meV', 'energy_rmse_meV', 'energy_mae_per_atom_meV',
       'force_mae_meV_per_A', 'force_rmse_meV_per_A', 'n_frames'}; energy errors
      are per frame (total energy), force errors per Cartesian component.

    Example:
      >>> metrics = evaluate(potential, params, test_set)
      >>> metrics['force_mae_meV_per_A']
    """
    if isinstance(dataset, Dataset):
        dataset = prepare_frames(dataset, potential, edges=edges, dtype=_float_dtype(params))
    return make_evaluator(potential, batch_size=batch_size)(params, dataset)


def predict_energies(
    potential: Potential, params: PyTree, dataset: Dataset, *, batch_size: int = 32
) -> np.ndarray:
    """Model total energies [m] (eV) of the labelled frames of `dataset` (jitted batches)."""
    frames = prepare_frames(dataset, potential, dtype=_float_dtype(params))

    def build():
        # Energies only: no force (backward) pass, unlike `_predict`.
        @jax.jit
        def batch_energies(params, frames, idx):
            if frames.edges.ndim == 3:
                edges, edges_axis = frames.edges[idx], 0
            else:
                edges, edges_axis = frames.edges, None
            return jax.vmap(
                lambda x, e: potential.energy(params, frames.species, x, e, frames.box),
                in_axes=(0, edges_axis),
            )(frames.positions[idx], edges)

        return batch_energies

    batch_energies = _cached_jit("energies", potential, (), build)
    idx_batches, w_batches = _batch_indices(frames.n_frames, batch_size)
    out = [
        np.asarray(batch_energies(params, frames, idx), dtype=np.float64)[w > 0]
        for idx, w in zip(idx_batches, w_batches, strict=True)
    ]
    return np.concatenate(out)


def refit_energy_shift(
    potential: Potential, params: PyTree, datasets, *, batch_size: int = 32
) -> tuple[PyTree, np.ndarray]:
    """Re-fits the per-species energy shift of trained params to reference energies.

    The shift adds sum_i s[species_i] to every energy, a constant per composition:
    it changes no force, no dynamics and no observable, only the energy zero. QM
    pre-training (energy weight << force weight) and StABlE training (driven by
    forces through the observable) leave that zero drifting (aspirin quick: a
    ~1 eV constant offset after StABlE while the energy *fluctuations* stay at
    ~90 meV MAE). This least-squares correction of the residuals on species counts
    (minimum-norm, as `normalization.fit_energy_shift`) removes the offset.

    Args:
      potential: a factory-built potential (params with 'energy_shift').
      params: its trained params.
      datasets: Dataset(s) with energies [m] eV (e.g. the training set).
      batch_size: frames per jitted batch.

    Returns:
      (params with the corrected energy_shift, correction [n_species] eV).
    """
    if isinstance(datasets, Dataset):
        datasets = [datasets]
    supported = [int(z) for z in potential.config.species]
    rows, residuals = [], []
    for data in datasets:
        if data.energies is None:
            raise ValueError(f"Dataset {data.source!r} has no energies to fit a shift to.")
        pred = predict_energies(potential, params, data, batch_size=batch_size)
        residuals.append(np.asarray(data.energies, np.float64).reshape(-1) - pred)
        counts = normalization.species_counts(data.species, supported)
        rows.append(np.broadcast_to(counts, (pred.size, counts.size)))
    delta, *_ = np.linalg.lstsq(np.concatenate(rows), np.concatenate(residuals), rcond=None)
    shift = jnp.asarray(params["energy_shift"])
    return dict(params, energy_shift=(shift + jnp.asarray(delta, shift.dtype))), delta


def _float_dtype(params):
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            return jnp.asarray(leaf).dtype
    return None


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def learning_rate_schedule(cfg) -> optax.Schedule:
    """The learning rate by optimizer step before the plateau factor: a linear warm-up
    from `warmup_factor * lr` to `lr` over `warmup_steps` steps (MDsim's), then `lr`."""
    if cfg.warmup_steps <= 0:
        return optax.constant_schedule(cfg.lr)
    return optax.linear_schedule(cfg.warmup_factor * cfg.lr, cfg.lr, int(cfg.warmup_steps))


def warmup_lr(step: int, *, lr: float, warmup_steps: int, warmup_factor: float) -> float:
    """The warm-up schedule's learning rate at optimizer step `step` (host-side float)."""
    cfg = ml_collections.ConfigDict(
        {"lr": lr, "warmup_steps": warmup_steps, "warmup_factor": warmup_factor}
    )
    return float(learning_rate_schedule(cfg)(step))


def _ema_decay_at(decay: float, step):
    # Short-run correction (as TensorFlow's num_updates): early averages are not
    # dominated by the random initial parameters.
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _make_train_step(potential: Potential, cfg, optimizer):
    loss_fn = make_qm_loss(
        potential,
        energy_weight=cfg.energy_weight,
        force_weight=cfg.force_weight,
        per_atom_energy=cfg.per_atom_energy,
    )
    use_ema = cfg.ema_decay > 0

    @jax.jit
    def train_step(params, opt_state, ema_params, frames, idx, weight, scale, step):
        (loss, aux), grads = loss_fn.value_and_grad(params, frames, idx, weight)
        # Adam with the warm-up schedule (optax), times the plateau rule's scale.
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
        params = optax.apply_updates(params, updates)
        if use_ema:
            d = _ema_decay_at(cfg.ema_decay, step)
            ema_params = jax.tree.map(
                lambda e, p: (d * e + (1.0 - d) * p).astype(p.dtype), ema_params, params
            )
        return params, opt_state, ema_params, loss, aux

    return train_step


def _optimizers(cfg):
    """Adam with the warm-up schedule, and the plateau rule whose scale multiplies it."""
    optimizer = optax.chain(
        optax.scale_by_adam(), optax.scale_by_learning_rate(learning_rate_schedule(cfg))
    )
    if cfg.grad_clip > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optimizer)
    plateau = optax.contrib.reduce_on_plateau(
        factor=cfg.plateau_factor,
        patience=cfg.plateau_patience,
        rtol=cfg.plateau_rtol,
        min_scale=cfg.min_lr / cfg.lr,
    )
    return optimizer, plateau


# Why QM training ended; `QMState.stopped` holds the index ('' = still running).
STOP_REASONS = ("", "max_epochs", "max_time", "early_stopping")


@flax.struct.dataclass
class QMState:
    """The state of a `train_qm` run, as one pytree (checkpointed whole every epoch).

    Counters and metrics are 0-d NumPy arrays; `state["params"]` reads a field like
    `state.params`.

    Attributes:
      params, opt_state: the trained parameters and the optimizer (Adam) state.
      ema_params: exponential moving average of params (= params without EMA).
      best_params: the evaluated params (EMA or raw) of the best validation epoch.
      plateau_state: `optax.contrib.reduce_on_plateau` state of the val force MAE.
      epoch: int32, completed epochs.
      step: int64, optimizer steps taken.
      best_metric: float64, best validation force MAE (meV/Å).
      best_epoch: int32, 0-based epoch of best_params (-1: none yet).
      patience_metric: float64, val force MAE at the last significant improvement.
      patience_epoch: int32, 0-based epoch of that improvement.
      time_s: float64, training wall time over all sessions.
      stopped: int32, index into `STOP_REASONS` (0 while running).
    """

    params: PyTree
    opt_state: PyTree
    ema_params: PyTree
    best_params: PyTree
    plateau_state: optax.contrib.ReduceLROnPlateauState
    epoch: np.ndarray
    step: np.ndarray
    best_metric: np.ndarray
    best_epoch: np.ndarray
    patience_metric: np.ndarray
    patience_epoch: np.ndarray
    time_s: np.ndarray
    stopped: np.ndarray

    def __getitem__(self, name: str):
        return getattr(self, name)

    @property
    def stop_reason(self) -> str:
        """Why training ended ('' while running)."""
        return STOP_REASONS[int(self.stopped)]


def _initial_state(params, optimizer, plateau) -> QMState:
    return QMState(
        params=params,
        opt_state=optimizer.init(params),
        ema_params=params,
        best_params=params,
        plateau_state=plateau.init(params),
        epoch=np.asarray(0, np.int32),
        step=np.asarray(0, np.int64),
        best_metric=np.asarray(math.inf),
        best_epoch=np.asarray(-1, np.int32),
        patience_metric=np.asarray(math.inf),
        patience_epoch=np.asarray(-1, np.int32),
        time_s=np.asarray(0.0),
        stopped=np.asarray(0, np.int32),
    )


def _stop(state: QMState, reason: str) -> QMState:
    return state.replace(stopped=np.asarray(STOP_REASONS.index(reason), np.int32))


def load_qm_state(
    workdir: str | os.PathLike,
    params_template: PyTree,
    *,
    config: ml_collections.ConfigDict | dict | None = None,
    step: int | None = None,
) -> QMState:
    """The saved training state of a `train_qm` run (latest epoch unless `step`).

    Args:
      workdir: the run's workdir.
      params_template: params with the model's structure (e.g. from `potential.init`).
      config: the run's config (its grad_clip decides the optimizer-state layout).
      step: epoch number of the checkpoint; None = latest.

    Returns:
      the `QMState` (params, ema_params, best_params, opt_state, plateau_state,
      epoch, step, best_metric (val force MAE, meV/Å), best_epoch, time_s, stopped).
    """
    cfg = _resolve_config(config)
    optimizer, plateau = _optimizers(cfg)
    template = _initial_state(params_template, optimizer, plateau)
    with CheckpointManager(os.path.join(workdir, "checkpoints"), max_to_keep=None) as ckpt:
        return ckpt.restore(template, step=step)


def load_pretrained_params(
    workdir: str | os.PathLike, params_template: PyTree, *, config=None
) -> PyTree:
    """The best (validation force MAE) parameters of a `train_qm` run in `workdir`."""
    return load_qm_state(workdir, params_template, config=config)["best_params"]


def train_qm(
    potential: Potential,
    params: PyTree,
    train: Dataset,
    val: Dataset,
    *,
    config: ml_collections.ConfigDict | dict | None = None,
    workdir: str | os.PathLike | None = None,
) -> tuple[PyTree, list[dict]]:
    """Pre-trains `params` on QM energies and forces; resumable from `workdir`.

    Args:
      potential: the model.
      params: initial parameters (with their energy shift/scale already fitted,
        e.g. by `stablejax.potentials.normalization`).
      train: training frames (energies [m] eV, forces [m, n, 3] eV/Å).
      val: validation frames (early stopping, plateau, reported metrics).
      config: overrides of `default_config()` (unknown fields are an error).
      workdir: folder for checkpoints/ and metrics.jsonl; None trains in memory
        only (no resume).

    Returns:
      (params, history): the parameters with the best validation force MAE
      (EMA parameters when ema_decay > 0), and one metrics dict per epoch
      (epoch, step, train_loss, train_energy_rmse_meV, train_force_rmse_meV_per_A,
      val_* from `evaluate`, lr, epoch_time_s, time_s, best_epoch).

    Example:
      >>> params, history = train_qm(potential, params, train, val,
      ...                            config={'epochs': 50, 'batch_size': 16},
      ...                            workdir='runs/pretrain')
    """
    cfg = _resolve_config(config)
    dtype = _float_dtype(params)
    train_frames = prepare_frames(train, potential, edges=cfg.edges, dtype=dtype)
    val_frames = prepare_frames(val, potential, edges=cfg.edges, dtype=dtype)
    if val_frames.n_atoms != train_frames.n_atoms:
        raise ValueError("train and val datasets have different atom counts")
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    evaluator = make_evaluator(potential, batch_size=eval_batch)

    optimizer, plateau = _optimizers(cfg)
    train_step = _cached_jit(
        "train_step",
        potential,
        # Everything the compiled step closes over (the optimizer holds the schedule).
        (
            cfg.energy_weight,
            cfg.force_weight,
            cfg.per_atom_energy,
            cfg.ema_decay,
            cfg.grad_clip,
            cfg.lr,
            cfg.warmup_steps,
            cfg.warmup_factor,
        ),
        lambda: _make_train_step(potential, cfg, optimizer),
    )
    state = _initial_state(params, optimizer, plateau)
    # Jitted: run eagerly, the lax.cond inside would compile on every call.
    plateau_update = _cached_jit(
        "plateau",
        potential,
        (cfg.plateau_factor, cfg.plateau_patience, cfg.plateau_rtol, cfg.min_lr / cfg.lr),
        lambda: jax.jit(lambda st, value: plateau.update(None, st, value=value)[1]),
    )
    ckpt = writer = None
    if workdir is not None:
        ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.max_to_keep)
        restored = ckpt.restore_latest(state)
        if restored is not None:
            state = restored[1]
        writer = MetricsWriter(
            os.path.join(workdir, "metrics.jsonl"),
            resume_step=int(state.epoch),
            step_key="epoch",
            tensorboard=cfg.tensorboard,
        )

    history = writer.records() if writer is not None else []
    bar = progress_bar(
        cfg.epochs,
        desc="QM pre-training",
        initial=int(state.epoch),
        disable=not cfg.progress or None,
    )
    try:
        while not int(state.stopped):
            if int(state.epoch) >= cfg.epochs and float(state.time_s) >= cfg.min_time_s:
                state = _stop(state, "max_epochs")
                break
            if cfg.max_time_s > 0 and float(state.time_s) >= cfg.max_time_s:
                state = _stop(state, "max_time")
                break
            t0 = time.perf_counter()
            state, record = qm_epoch(
                state,
                cfg=cfg,
                train_step=train_step,
                plateau_update=plateau_update,
                evaluator=evaluator,
                train_frames=train_frames,
                val_frames=val_frames,
            )
            state = state.replace(time_s=np.asarray(float(state.time_s) + time.perf_counter() - t0))
            # Several processes (`jax.distributed`) each train the same model on the same
            # frames (replicated, not data-parallel); process 0's state is everyone's, so
            # early stopping, the time budget and the parameters agree even where
            # reductions are not bitwise reproducible (GPUs).
            state = sharding.from_process_0(state)
            record.update(
                epoch_time_s=time.perf_counter() - t0,
                time_s=float(state.time_s),
                best_epoch=int(state.best_epoch) + 1,
            )
            if ckpt is not None:
                ckpt.save(int(state.epoch), state)
            if writer is not None:
                writer.write(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix_str(
                format_metrics(
                    record, ("train_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A", "lr")
                )
            )
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if ckpt is not None:
            ckpt.close()
    return state.best_params, history


def qm_epoch(
    state: QMState,
    *,
    cfg,
    train_step: Callable,
    plateau_update: Callable,
    evaluator: Callable,
    train_frames: QMFrames,
    val_frames: QMFrames,
) -> tuple[QMState, dict]:
    """One QM training epoch: returns (next state, metrics record); `state` is not modified.

    Minibatch steps in the epoch's order (it depends only on (seed, epoch): resumed runs
    repeat it), validation (of the EMA params when enabled), the plateau rule on the
    validation force MAE, best params, and early stopping. The record lacks the wall-time
    fields (`epoch_time_s`, `time_s`, `best_epoch`), which the loop adds.
    """
    epoch = int(state.epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(train_frames.n_frames)
    idx_batches, w_batches = _batch_indices(train_frames.n_frames, cfg.batch_size, order)
    scale = float(state.plateau_state.scale)
    params, opt_state, ema_params = state.params, state.opt_state, state.ema_params
    step = int(state.step)
    per_batch = []  # stays on the device until the epoch ends (no per-step sync)
    schedule = learning_rate_schedule(cfg)
    lr = cfg.lr * scale
    for idx, weight in zip(idx_batches, w_batches, strict=True):
        lr = scale * float(schedule(step))  # reported; the step uses optax's own count
        params, opt_state, ema_params, loss, aux = train_step(
            params, opt_state, ema_params, train_frames, idx, weight, scale, step
        )
        per_batch.append((loss, aux.energy_mse, aux.force_mse))
        step += 1
    # Batch means weighted by their real frame counts = means over the epoch's frames.
    n_real = w_batches.sum(axis=1)
    batch_means = np.asarray(jax.device_get(per_batch), dtype=np.float64)
    train_loss, e_mse, f_mse = n_real @ batch_means / train_frames.n_frames
    if not np.isfinite(train_loss):
        raise FloatingPointError(
            f"QM training loss is {train_loss} at epoch {epoch}; lower config.lr "
            "or check the energy normalisation"
        )
    eval_params = ema_params if cfg.ema_decay > 0 else params
    val_metrics = evaluator(eval_params, val_frames)
    metric = val_metrics["force_mae_meV_per_A"]
    plateau_state = plateau_update(state.plateau_state, metric)
    improved = metric < state.best_metric
    state = state.replace(
        params=params,
        opt_state=opt_state,
        ema_params=ema_params,
        plateau_state=plateau_state,
        epoch=np.asarray(epoch + 1, np.int32),
        step=np.asarray(step, np.int64),
    )
    if improved:
        state = state.replace(
            best_params=eval_params,
            best_metric=np.asarray(float(metric)),
            best_epoch=np.asarray(epoch, np.int32),
        )
    if metric < (1.0 - cfg.early_stopping_rtol) * state.patience_metric:
        state = state.replace(
            patience_metric=np.asarray(float(metric)), patience_epoch=np.asarray(epoch, np.int32)
        )
    if cfg.patience > 0 and epoch - int(state.patience_epoch) >= cfg.patience:
        state = _stop(state, "early_stopping")
    record = {
        "epoch": epoch + 1,
        "step": step,
        "train_loss": train_loss,
        "train_energy_rmse_meV": 1e3 * math.sqrt(e_mse),
        "train_force_rmse_meV_per_A": 1e3 * math.sqrt(f_mse),
        **{f"val_{k}": v for k, v in val_metrics.items() if k != "n_frames"},
        "lr": lr,  # of the epoch's last step
        "lr_scale_next": float(plateau_state.scale),
    }
    return state, record
