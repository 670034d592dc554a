"""The Boltzmann estimator: gradients of ensemble-average losses w.r.t. model parameters.

For samples x_i drawn from p_theta(x) ∝ exp(-beta U_theta(x)) and a loss l(<O>) of the
ensemble average of an observable O(x),

    d<O>/dtheta = -beta Cov(O(x), dU_theta(x)/dtheta),

and with w = dl/d<O> evaluated at the sample mean the whole loss gradient is the gradient
of ONE weighted sum of sample energies:

    grad L = grad_theta sum_i c_i U_theta(x_i),
    c_i    = stop_gradient(-beta w·(O_i - mean O) / (N - 1)).

So the estimator costs one forward and one backward pass through the model over the
samples (no per-sample gradients, no [samples x observable bins x params] Jacobian), its
memory does not depend on the number of observable bins, and any number of observables
can be trained at once (their weights add). The covariance is the unbiased 1/(N - 1) one
and beta is kept (not folded into the learning rate).

Public functions:
  boltzmann_grad:            global estimator, samples are whole configurations.
  boltzmann_grad_local:      localized estimator, samples are neighbourhoods of frames.
  neighbourhood_membership:  [n_molecules, n_atoms] membership of "molecule + k nearest".
  reweight_observable:       temperature reweighting of observables with an ESS.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stablejax.geometry import minimum_image

__all__ = [
    "BoltzmannAux",
    "boltzmann_grad",
    "boltzmann_grad_local",
    "neighbourhood_membership",
    "reweight_observable",
]

PyTree = Any


class BoltzmannAux(NamedTuple):
    """Diagnostics returned next to the loss by `boltzmann_grad(_local)`.

    Attributes:
      mean_observable: pytree like one observable; the mean over the used samples.
      observables: pytree with a leading sample axis [N, ...] (local estimator:
        [n_frames, n_neighbourhoods, ...]); per-sample observables as computed
        (dropped samples may hold non-finite values).
      energies: [N] eV sample energies (local estimator: [n_frames, n_neighbourhoods]
        local energies); non-finite for samples dropped for that reason.
      used: [N] bool (local: [n_frames, n_neighbourhoods]); which samples entered the
        estimate.
      n_used: int32 scalar, number of samples used.
      n_dropped: int32 scalar, number of samples dropped for non-finite input,
        energy or observable.
      loss_aux: whatever `loss_fn` returned as aux when `has_aux=True`, else None.
    """

    mean_observable: PyTree
    observables: PyTree
    energies: jax.Array
    used: jax.Array
    n_used: jax.Array
    n_dropped: jax.Array
    loss_aux: PyTree = None


class _Weights(NamedTuple):
    loss: jax.Array
    loss_aux: PyTree
    mean: PyTree
    c: jax.Array  # [N] surrogate weights, zero for dropped samples
    n_used: jax.Array


# --------------------------------------------------------------------------------------
# small pytree helpers
# --------------------------------------------------------------------------------------


def _leading_size(tree: PyTree) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("samples must be a non-empty pytree of arrays with a leading sample axis")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "every leaf of samples must have the same leading (sample) axis; got shapes "
            f"{[np.shape(x) for x in leaves]}"
        )
    n = sizes.pop()
    if n == 0:
        raise ValueError("samples are empty: the Boltzmann estimator needs at least 2 samples")
    return n


def _finite_rows(tree: PyTree, n_lead: int, n_axes: int = 1) -> jax.Array:
    """[lead...] bool: all inexact entries of each row (first `n_axes` axes) finite."""
    lead_shape = None
    ok = None
    for x in jax.tree.leaves(tree):
        x = jnp.asarray(x)
        lead_shape = x.shape[:n_axes]
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            continue
        axes = tuple(range(n_axes, x.ndim))
        row_ok = jnp.all(jnp.isfinite(x), axis=axes) if axes else jnp.isfinite(x)
        ok = row_ok if ok is None else ok & row_ok
    if ok is None:
        ok = jnp.ones(lead_shape if lead_shape is not None else (n_lead,), dtype=bool)
    return ok


def _bcast(mask: jax.Array, x: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _replace_rows(tree: PyTree, ok: jax.Array, safe_index: jax.Array) -> PyTree:
    """Rows where `ok` is False are replaced by row `safe_index` (first "where" of two)."""
    return jax.tree.map(lambda x: jnp.where(_bcast(ok, x), x, x[safe_index]), tree)


def _concrete_int(x) -> int | None:
    """int(x) when x is concrete, None under jit/vmap tracing."""
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def _check_kT(kT) -> None:
    """A concrete kT (Python number, NumPy or concrete JAX scalar) must be finite and > 0.

    A traced kT (inside `jit`/`vmap` of the caller) cannot be checked here; a
    non-positive or non-finite traced kT gives a meaningless gradient (a negative one
    flips its sign), so pass kT as a static Python float where possible.
    """
    try:
        value = np.asarray(kT, dtype=np.float64)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return  # traced: checked by the caller or not at all (see the docstring)
    if value.shape != ():
        raise ValueError(f"kT must be a scalar thermal energy in eV; got shape {value.shape}")
    if not (np.isfinite(value) and value > 0.0):
        raise ValueError(f"kT must be a positive, finite thermal energy in eV; got {kT!r}")


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None; got {batch_size!r}")


# --------------------------------------------------------------------------------------
# the estimator core
# --------------------------------------------------------------------------------------


def _weights(obs: PyTree, ok: jax.Array, loss_fn, has_aux: bool, beta) -> _Weights:
    """Mean observable over used samples, loss, and the stop-gradient surrogate weights c."""
    n_used = jnp.sum(ok).astype(jnp.int32)
    enough = n_used >= 2

    def masked(o):
        return jnp.where(_bcast(ok, o), o, jnp.zeros((), o.dtype))

    mean = jax.tree.map(lambda o: jnp.sum(masked(o), axis=0) / jnp.maximum(n_used, 1), obs)
    if has_aux:
        (loss, loss_aux), w = jax.value_and_grad(loss_fn, has_aux=True)(mean)
    else:
        loss, w = jax.value_and_grad(loss_fn)(mean)
        loss_aux = None
    # s_i = w · (O_i - <O>), summed over every leaf of the observable pytree: several
    # observables (or loss terms) simply add their weights.
    s = sum(
        jnp.sum(
            jnp.where(_bcast(ok, o), o - m, jnp.zeros((), o.dtype)) * wl,
            axis=tuple(range(1, o.ndim)),
        )
        for o, m, wl in zip(
            jax.tree.leaves(obs), jax.tree.leaves(mean), jax.tree.leaves(w), strict=True
        )
    )
    c = -beta * s / jnp.maximum(n_used - 1, 1)
    c = jnp.where(ok & enough, c, jnp.zeros((), c.dtype))
    loss = jnp.where(enough, loss, jnp.full((), jnp.nan, jnp.result_type(loss)))
    return _Weights(loss, loss_aux, mean, jax.lax.stop_gradient(c), n_used)


def _weighted_grad(unit_fn, params, units, cot, batch_size):
    """Outputs of `unit_fn` over `units` and grad_params sum(cot * outputs).

    One forward + one backward pass (jax.vjp); with `batch_size` the units are processed
    in padded minibatches inside lax.scan (padded rows get zero cotangent), which is exact
    because the surrogate is a sum.
    """
    n = _leading_size(units)

    def batch(units_b, cot_b):
        out, vjp = jax.vjp(lambda p: jax.vmap(unit_fn, in_axes=(None, 0))(p, units_b), params)
        (g,) = vjp(cot_b.astype(out.dtype))
        return out, g

    if batch_size is None or batch_size >= n:
        return batch(units, cot)

    n_batches = -(-n // batch_size)
    n_pad = n_batches * batch_size - n

    def pad_split(x, fill=None):
        if n_pad:
            tail = x[:1] if fill is None else jnp.full((1,) + x.shape[1:], fill, x.dtype)
            x = jnp.concatenate([x, jnp.broadcast_to(tail, (n_pad,) + x.shape[1:])], axis=0)
        return x.reshape((n_batches, batch_size) + x.shape[1:])

    # Padding rows repeat the first (finite) unit and carry a zero cotangent.
    units_b = jax.tree.map(pad_split, units)
    cot_b = pad_split(cot, fill=0)

    def step(acc, xs):
        out, g = batch(*xs)
        return jax.tree.map(jnp.add, acc, g), out

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, outs = jax.lax.scan(step, zeros, (units_b, cot_b))
    outs = outs.reshape((n_batches * batch_size,) + outs.shape[2:])[:n]
    return outs, grads


def _map_batched(fn, xs, batch_size):
    if batch_size is None:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=batch_size)


def _estimate(
    params,
    units,
    unit_ok,
    obs,
    obs_ok,
    unit_fn,
    cot_from_c,
    energies_from_out,
    energy_ok_from_out,
    loss_fn,
    has_aux,
    beta,
    batch_size,
    n_total=None,
):
    """Shared body of the global and local estimators.

    `units` are what the model is evaluated on (samples or frames), already cleaned so
    every row is finite; `obs`/`obs_ok` are per-sample observables with a flat leading
    sample axis. `cot_from_c` maps sample weights c [N] to the cotangent of the unit
    outputs; `energy_ok_from_out` maps unit outputs to a per-sample finiteness mask.
    """
    ok0 = unit_ok & obs_ok
    w0 = _weights(obs, ok0, loss_fn, has_aux, beta)
    out, grads0 = _weighted_grad(unit_fn, params, units, cot_from_c(w0.c), batch_size)
    energy_ok = energy_ok_from_out(out)

    def unit_energy_ok(o):
        return _finite_rows(o, o.shape[0])

    def keep():
        return w0, grads0, ok0

    def redo():
        # Some energies are not finite: drop those samples, recompute the weights, and
        # evaluate the model again on units whose non-finite rows were replaced by a
        # finite one (the second "where"), so 0 * inf cannot put NaN in the gradient.
        ok = ok0 & energy_ok
        w = _weights(obs, ok, loss_fn, has_aux, beta)
        unit_e_ok = unit_energy_ok(out)
        safe_units = _replace_rows(units, unit_e_ok, jnp.argmax(unit_e_ok))
        _, grads = _weighted_grad(unit_fn, params, safe_units, cot_from_c(w.c), batch_size)
        return w, grads, ok

    w, grads, ok = jax.lax.cond(jnp.all(unit_energy_ok(out)), keep, redo)
    enough = w.n_used >= 2
    # With fewer than two usable samples there is no covariance: zero gradient (and a NaN
    # loss, set in _weights) rather than whatever the model's backward pass produced.
    grads = jax.tree.map(lambda g: jnp.where(enough, g, jnp.zeros_like(g)), grads)
    n_total = ok.size if n_total is None else n_total
    n_used = _concrete_int(w.n_used)
    if n_used is not None and n_used < 2:
        raise ValueError(
            f"Boltzmann estimator needs at least 2 usable samples; got {n_used} of "
            f"{n_total} (samples with non-finite inputs, energies or observables are "
            "dropped)."
        )
    aux = BoltzmannAux(
        mean_observable=w.mean,
        observables=obs,
        energies=energies_from_out(out),
        used=ok,
        n_used=w.n_used,
        n_dropped=jnp.asarray(n_total).astype(jnp.int32) - w.n_used,
        loss_aux=w.loss_aux,
    )
    return (w.loss, aux), grads


def boltzmann_grad(
    energy_fn: Callable[[PyTree, PyTree], jax.Array],
    observable_fn: Callable[[PyTree], PyTree],
    loss_fn: Callable[[PyTree], Any],
    *,
    kT: float,
    batch_size: int | None = None,
    has_aux: bool = False,
) -> Callable[[PyTree, PyTree], tuple[tuple[jax.Array, BoltzmannAux], PyTree]]:
    """Builds the Boltzmann-estimator value-and-grad of an ensemble-average loss.

    The returned function behaves like `jax.value_and_grad(..., has_aux=True)`:
    `(params, samples) -> ((loss, aux), grads)` with `loss = loss_fn(<O>)` at the sample
    mean and `grads` shaped like `params`, so any optax transformation consumes them. The
    gradient is

        grad L = grad_params sum_i c_i energy_fn(params, x_i),
        c_i = stop_gradient(-w·(O_i - <O>) / (kT (N - 1))),  w = dloss/d<O> at <O>,

    i.e. -beta times the unbiased covariance of w·O with dU/dparams, computed with ONE
    backward pass through a weighted sum of sample energies (never per-sample gradients).

    Ensembles: the samples must come from the ensemble of the model at temperature kT.
    NVT and NPT (and muVT) are handled alike: the extra terms of the Boltzmann factor
    (P V, mu N) do not depend on the parameters and drop out of the gradient, so
    `energy_fn` is the potential energy only (for NPT include the box in the sample if
    the energy needs it; do not add P V).

    Bad samples: a sample whose inputs, energy or observable contain a non-finite value is
    dropped (it gets weight exactly zero, is evaluated on a substitute finite sample so
    NaN/inf cannot leak into the backward pass, and is counted in `aux.n_dropped`). When
    fewer than 2 samples are usable, the function raises ValueError if called eagerly;
    under `jit`/`vmap` it cannot raise and returns a NaN loss, zero gradients and
    `aux.n_used < 2` instead. Non-finite energies cost a second model pass (taken only
    when they occur; under `vmap` `lax.cond` evaluates both branches).

    Args:
      energy_fn: `(params, sample) -> scalar` potential energy in eV of ONE sample.
      observable_fn: `(sample) -> array or pytree` observable of one sample (independent
        of params).
      loss_fn: `(mean_observable) -> scalar` loss of the ensemble average (same pytree
        structure as the observable); several observables' losses simply add here. With
        `has_aux=True` it returns `(scalar, aux)`.
      kT: thermal energy k_B T in eV of the ensemble the samples come from (e.g.
        `stablejax.units.kT_from_kelvin(300.0)`).
      batch_size: if given, samples are processed in minibatches of this many inside
        `lax.scan` (the last one padded with zero-weight copies); exact, it only bounds
        memory. None: all samples at once.
      has_aux: whether `loss_fn` returns `(loss, aux)`; the aux is `aux.loss_aux`.

    Returns:
      `value_and_grad(params, samples) -> ((loss, aux), grads)` where `samples` is a
      pytree whose leaves have a leading sample axis [N, ...] (e.g. positions [N, n, 3]
      Å), `loss` is a scalar, `aux` a `BoltzmannAux`, and `grads` has the structure of
      `params`. The function contains no `jit`; wrap it (or your training step) in
      `jax.jit`. It is `vmap`-able (e.g. over replicas or parameter sets).

    Example (1-D harmonic oscillator U = k x^2 / 2, where <x^2> = kT / k):

      >>> import jax, jax.numpy as jnp
      >>> kT, k = 0.5, 2.0
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (20000,)) * jnp.sqrt(kT / k)
      >>> vg = boltzmann_grad(
      ...     lambda p, x: 0.5 * p["k"] * x**2,  # energy (eV)
      ...     lambda x: x**2,  # observable
      ...     lambda o: (o - 0.2) ** 2,  # loss of <x^2>
      ...     kT=kT,
      ... )
      >>> (loss, aux), grads = jax.jit(vg)({"k": k}, x)
      >>> # analytic: dL/dk = 2 (kT/k - 0.2) (-kT / k^2) = -0.0125
      >>> bool(abs(grads["k"] + 0.0125) < 0.002)
      True
    """
    _check_kT(kT)
    _check_batch_size(batch_size)

    def value_and_grad(params, samples):
        n = _leading_size(samples)
        sample_ok = _finite_rows(samples, n)
        clean = _replace_rows(samples, sample_ok, jnp.argmax(sample_ok))
        obs = _map_batched(observable_fn, clean, batch_size)
        obs_ok = _finite_rows(obs, n)
        return _estimate(
            params,
            clean,
            sample_ok,
            obs,
            obs_ok,
            energy_fn,
            cot_from_c=lambda c: c,
            energies_from_out=lambda out: out,
            energy_ok_from_out=jnp.isfinite,
            loss_fn=loss_fn,
            has_aux=has_aux,
            beta=1.0 / kT,
            batch_size=batch_size,
        )

    return value_and_grad


def boltzmann_grad_local(
    per_atom_energy_fn: Callable[[PyTree, PyTree], jax.Array],
    local_observable_fn: Callable[[PyTree, jax.Array], PyTree],
    loss_fn: Callable[[PyTree], Any],
    *,
    kT: float,
    batch_size: int | None = None,
    has_aux: bool = False,
) -> Callable[[PyTree, PyTree, jax.Array], tuple[tuple[jax.Array, BoltzmannAux], PyTree]]:
    """Localized Boltzmann estimator: samples are local neighbourhoods of frames.

    Each frame f is split into neighbourhoods m (typically one molecule plus its k nearest
    molecules, see `neighbourhood_membership`), given by a 0/1 membership matrix
    M[f] [n_neighbourhoods, n_atoms]. A neighbourhood is treated as one sample of the
    global estimator with

        local energy      U_fm = sum_a M[f, m, a] e_a(f)   (model per-atom energies, eV)
        local observable  O_fm = local_observable_fn(frame_f, M[f, m])

    and the surrogate sum_fm c_fm U_fm = sum_f sum_a (sum_m c_fm M[f, m, a]) e_a(f) is
    differentiated with ONE forward and ONE backward pass per (batch of) frames: all
    neighbourhoods of a frame share the same model evaluation. The statistics (mean,
    1/(N - 1), beta) are those of `boltzmann_grad` over N = n_frames * n_neighbourhoods
    samples. As there, the NVT/NPT extra terms do not depend on params and drop out.

    Bad samples: non-finite frame inputs or any non-finite per-atom energy drop every
    neighbourhood of that frame (in message-passing models a non-finite atom contaminates
    its neighbours' backward pass); a non-finite local observable drops that neighbourhood
    only. Fewer than 2 usable neighbourhoods: ValueError eagerly, NaN loss and zero
    gradients under `jit`/`vmap` (see `boltzmann_grad`).

    Args:
      per_atom_energy_fn: `(params, frame) -> [n_atoms]` per-atom energies in eV of one
        frame (e.g. `functools.partial` of a `Potential.per_atom_energies`).
      local_observable_fn: `(frame, members) -> array or pytree`, the observable of the
        neighbourhood whose atoms are `members` [n_atoms] (bool) in `frame`.
      loss_fn: `(mean_observable) -> scalar` (or `(scalar, aux)` with `has_aux`).
      kT: thermal energy in eV.
      batch_size: frames per minibatch (exact accumulation inside `lax.scan`); None: all.
      has_aux: whether `loss_fn` returns `(loss, aux)`.

    Returns:
      `value_and_grad(params, frames, membership, selected=None) -> ((loss, aux), grads)`
      where `frames` is a pytree with a leading frame axis [F, ...] (e.g. positions
      [F, n, 3] Å), `membership` is [F, n_neighbourhoods, n_atoms] bool or 0/1, and
      `selected` ([F, n_neighbourhoods] bool, default all) marks the neighbourhoods that
      are samples: the others are left out of every statistic (used by stratified
      sub-sampling; fixed shapes, so a new selection never recompiles). In `aux`,
      per-sample fields have shape [F, n_neighbourhoods, ...]; `n_dropped` counts
      selected neighbourhoods that were dropped as bad samples.

    Example (two independent "molecules" of one atom each in a harmonic well):

      >>> import jax, jax.numpy as jnp
      >>> kT = 1.0
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (5000, 2))  # k = 1 -> <x^2> = 1
      >>> vg = boltzmann_grad_local(
      ...     lambda p, x: 0.5 * p * x**2,  # per-atom energies [2]
      ...     lambda x, members: jnp.sum(jnp.where(members, x**2, 0.0)),
      ...     lambda o: o,  # L = <x^2>, dL/dk = -kT/k^2 = -1
      ...     kT=kT,
      ... )
      >>> membership = jnp.broadcast_to(jnp.eye(2, dtype=bool), (5000, 2, 2))
      >>> (loss, aux), g = vg(1.0, x, membership)
      >>> bool(abs(g + 1.0) < 0.1)
      True
    """
    _check_kT(kT)
    _check_batch_size(batch_size)

    def value_and_grad(params, frames, membership, selected=None):
        n_frames = _leading_size(frames)
        membership = jnp.asarray(membership)
        if membership.ndim != 3 or membership.shape[0] != n_frames:
            raise ValueError(
                "membership must be [n_frames, n_neighbourhoods, n_atoms] with n_frames = "
                f"{n_frames}; got shape {membership.shape}"
            )
        n_neigh = membership.shape[1]
        if selected is None:
            selected = jnp.ones((n_frames, n_neigh), bool)
        selected = jnp.asarray(selected).astype(bool)
        if selected.shape != (n_frames, n_neigh):
            raise ValueError(
                f"selected must be [n_frames, n_neighbourhoods] = {(n_frames, n_neigh)}; got "
                f"shape {selected.shape}"
            )
        members = membership.astype(bool)
        frame_ok = _finite_rows(frames, n_frames)
        clean = _replace_rows(frames, frame_ok, jnp.argmax(frame_ok))

        def frame_observables(xs):
            frame, m = xs
            return jax.vmap(local_observable_fn, in_axes=(None, 0))(frame, m)

        obs = _map_batched(frame_observables, (clean, members), batch_size)
        obs_ok = _finite_rows(obs, n_frames, n_axes=2)
        flat = lambda x: x.reshape((n_frames * n_neigh,) + x.shape[2:])
        obs_flat = jax.tree.map(flat, obs)
        unit_ok = frame_ok[:, None] & selected

        def cot_from_c(c):
            # Per-atom cotangent: sum of c over the neighbourhoods containing the atom.
            return jnp.einsum("fm,fma->fa", c.reshape(n_frames, n_neigh), members.astype(c.dtype))

        def local_energies(e_atoms):
            return jnp.sum(jnp.where(members, e_atoms[:, None, :], 0.0), axis=-1)

        def energy_ok(e_atoms):
            frame_e_ok = jnp.all(jnp.isfinite(e_atoms), axis=-1)
            return jnp.broadcast_to(frame_e_ok[:, None], (n_frames, n_neigh)).reshape(-1)

        (loss, aux), grads = _estimate(
            params,
            clean,
            unit_ok.reshape(-1),
            obs_flat,
            obs_ok.reshape(-1),
            per_atom_energy_fn,
            cot_from_c=cot_from_c,
            energies_from_out=local_energies,
            energy_ok_from_out=energy_ok,
            loss_fn=loss_fn,
            has_aux=has_aux,
            beta=1.0 / kT,
            batch_size=batch_size,
            n_total=jnp.sum(selected),
        )
        aux = aux._replace(observables=obs, used=aux.used.reshape(n_frames, n_neigh))
        return (loss, aux), grads

    return value_and_grad


# --------------------------------------------------------------------------------------
# neighbourhoods
# --------------------------------------------------------------------------------------


def neighbourhood_membership(
    positions: jax.Array,
    molecule_index,
    *,
    box=None,
    k_nearest: int = 0,
    num_molecules: int | None = None,
    centre: str = "first_atom",
) -> jax.Array:
    """Membership matrix of "molecule m plus its k nearest molecules" neighbourhoods.

    Molecule distances are minimum-image distances (when `box` is given) between molecule
    centres: the first atom of each molecule (`centre='first_atom'`, e.g. the oxygen of
    an O,H,H water) or the geometric centre of the molecule unwrapped around its first
    atom (`centre='centroid'`). One frame at a time; `jax.vmap` over frames.

    Args:
      positions: [n, 3] Å.
      molecule_index: [n] int, molecule of each atom (0 .. n_molecules-1, every molecule
        non-empty).
      box: [3] Å box, [3, 3] Å cell (lattice vectors as rows), or None for free space.
      k_nearest: number of nearest other molecules added to each neighbourhood (static).
      num_molecules: number of molecules; needed when `molecule_index` is traced.
      centre: 'first_atom' or 'centroid'.

    Returns:
      [n_molecules, n] bool; row m marks the atoms of neighbourhood m.
    """
    if num_molecules is None:
        try:
            num_molecules = int(np.max(np.asarray(molecule_index))) + 1
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            raise ValueError(
                "pass num_molecules= when molecule_index is traced (inside jit/vmap)"
            ) from None
    if not 0 <= k_nearest < num_molecules:
        raise ValueError(f"k_nearest must be in [0, {num_molecules - 1}]; got {k_nearest}")
    if centre not in ("first_atom", "centroid"):
        raise ValueError(f"centre must be 'first_atom' or 'centroid'; got {centre!r}")
    positions = jnp.asarray(positions)
    mol = jnp.asarray(molecule_index)
    atoms_of = mol[None, :] == jnp.arange(num_molecules)[:, None]  # [n_mol, n]

    def min_image(d):
        return minimum_image(d, box)

    first = jnp.argmax(atoms_of, axis=1)  # first atom of each molecule
    centres = positions[first]
    if centre == "centroid":
        rel = min_image(positions - centres[mol])  # unwrap each molecule around its first atom
        counts = jnp.sum(atoms_of, axis=1)[:, None]
        centres = centres + (atoms_of.astype(positions.dtype) @ rel) / counts
    dist = jnp.linalg.norm(min_image(centres[None, :, :] - centres[:, None, :]), axis=-1)
    mol_members = jnp.eye(num_molecules, dtype=bool)
    if k_nearest:
        dist = jnp.where(mol_members, jnp.inf, dist)
        _, nearest = jax.lax.top_k(-dist, k_nearest)  # [n_mol, k]
        mol_members = mol_members | jnp.any(
            nearest[:, :, None] == jnp.arange(num_molecules)[None, None, :], axis=1
        )
    return (mol_members.astype(jnp.int32) @ atoms_of.astype(jnp.int32)) > 0


def stratified_selection(
    deviation, *, n_bins: int, per_bin: int, rng: np.random.Generator
) -> np.ndarray:
    """Stratified sub-sample of local neighbourhoods by their deviation from the reference.

    The reference StABlE code does this for water: the deviations of every (frame,
    neighbourhood) sample are put into `n_bins` equal-width bins between their minimum and
    maximum (`np.histogram` edges, the last bin closed), and up to `per_bin` samples are
    drawn uniformly without replacement from each bin (all of them where a bin has fewer).

    Bias: the selected samples over-represent the rare, strongly deviating neighbourhoods
    (the tails get as many samples as the bulk), so the mean observable and the
    covariance of the Boltzmann estimator are taken over this re-weighted set, not over
    the model's Boltzmann distribution: the gradient is no longer an unbiased estimate of
    d L(<O>_theta)/d theta. It points the update at the unstable local environments, which
    is why the reference uses it; `stable.local_sampling = "all"` keeps the unbiased
    estimator.

    Args:
      deviation: [F, M] per-sample deviation (any unit); non-finite entries are never
        selected.
      n_bins: number of bins (>= 1).
      per_bin: samples drawn per bin (>= 1).
      rng: NumPy generator (the caller seeds it, e.g. from the training RNG key, so a
        resumed run draws the same samples).

    Returns:
      [F, M] bool: the selected samples.
    """
    if n_bins < 1 or per_bin < 1:
        raise ValueError(f"n_bins and per_bin must be >= 1; got {n_bins}, {per_bin}")
    dev = np.asarray(deviation, dtype=np.float64)
    flat = dev.reshape(-1)
    finite = np.flatnonzero(np.isfinite(flat))
    selected = np.zeros(flat.shape, bool)
    if finite.size == 0:
        return selected.reshape(dev.shape)
    values = flat[finite]
    edges = np.histogram_bin_edges(values, bins=n_bins)
    # Bin k holds edges[k] <= v < edges[k+1]; the last bin also holds its right edge.
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n_bins - 1)
    for k in range(n_bins):
        members = finite[which == k]
        if members.size > per_bin:
            members = rng.choice(members, size=per_bin, replace=False)
        selected[members] = True
    return selected.reshape(dev.shape)


# --------------------------------------------------------------------------------------
# reweighting
# --------------------------------------------------------------------------------------


def reweight_observable(
    observables: PyTree,
    energies: jax.Array,
    *,
    kT_from: float,
    kT_to: float,
    min_ess: float = 50.0,
    min_ess_fraction: float = 0.01,
) -> tuple[PyTree, jax.Array]:
    """Reweights sample observables from temperature kT_from to kT_to.

    Weights w_i ∝ exp(-(1/kT_to - 1/kT_from) U_i), normalised with a log-sum-exp so large
    energies cannot overflow; the effective sample size is ESS = (sum w)^2 / sum w^2.
    Samples with a non-finite energy or observable get weight zero. When called eagerly,
    a `UserWarning` is issued if ESS < `min_ess` or ESS < `min_ess_fraction` * N (the
    reweighted average is then dominated by a few samples and unreliable).

    Args:
      observables: array [N, ...] or pytree of such arrays; per-sample observables.
      energies: [N] eV potential energies of the samples (drawn at kT_from).
      kT_from: thermal energy in eV at which the samples were drawn.
      kT_to: thermal energy in eV to reweight to.
      min_ess: warn below this effective sample size.
      min_ess_fraction: warn below this fraction of N.

    Returns:
      (reweighted mean with the structure of one observable, ESS scalar).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (20000,))  # U = x^2/2 at kT = 1
      >>> mean, ess = reweight_observable(x**2, 0.5 * x**2, kT_from=1.0, kT_to=0.9)
      >>> bool(abs(mean - 0.9) < 0.03), bool(ess > 1000)
      (True, True)
    """
    _check_kT(kT_from)
    _check_kT(kT_to)
    energies = jnp.asarray(energies)
    n = energies.shape[0]
    if _leading_size(observables) != n:
        raise ValueError(
            f"observables and energies need the same leading axis; got {_leading_size(observables)} and {n}"
        )
    ok = jnp.isfinite(energies) & _finite_rows(observables, n)
    dbeta = 1.0 / kT_to - 1.0 / kT_from
    log_w = jnp.where(ok, -dbeta * jnp.where(ok, energies, 0.0), -jnp.inf)
    log_w = log_w - jax.scipy.special.logsumexp(log_w)
    w = jnp.exp(log_w)
    ess = 1.0 / jnp.sum(w * w)
    mean = jax.tree.map(
        lambda o: jnp.sum(
            _bcast(w, o) * jnp.where(_bcast(ok, o), o, jnp.zeros((), o.dtype)), axis=0
        ),
        observables,
    )
    try:
        ess_value = float(ess)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        ess_value = None
    if ess_value is not None and not (ess_value >= min_ess and ess_value >= min_ess_fraction * n):
        warnings.warn(
            f"reweighting from kT={kT_from} to kT={kT_to} eV leaves an effective sample size "
            f"of {ess_value:.1f} out of {n} samples; the reweighted average is unreliable.",
            UserWarning,
            stacklevel=2,
        )
    return mean, ess
