"""Integrator configurations and their single-replica step pieces.

Each integrator is a small frozen dataclass of user-facing hyperparameters
(time step in fs, friction in 1/ps, ...). The Simulator turns it into two pure
single-replica functions, ``pre_force`` (everything up to the new positions)
and ``post_force`` (everything after the new forces), and vmaps them over
replicas. Splitting a step around the force evaluation lets the neighbour
list be refreshed between the two halves with one scalar decision for the
whole batch (see ``stablejax.md.neighbors``).

Why not jax-md's ``simulate.nve`` / ``nvt_langevin`` / ``nvt_nose_hoover``
step functions directly: they evaluate only forces, so recording or
NaN-checking potential energies would need a second energy evaluation per
step, and their velocity-Verlet step cannot host a neighbour-list refresh
decided across replicas. We keep jax-md's Nose-Hoover chain helper
(``simulate.nose_hoover_chain``; its ``tau`` is an absolute time, which we
pass in ASE units) and write the plain kicks/drifts (a line each) here.
jax-md has no Berendsen barostat, so that one is ours.

Degrees of freedom: the total momentum is zero at start and stays zero
(translation-invariant forces, thermostats that scale momenta uniformly,
and a Langevin O-step that removes the centre-of-mass velocity it injects),
so every integrator works with dof = 3n - 3. Canonical averages are then
<K> = (3n - 3) kT / 2 and Var(K) = (3n - 3) kT^2 / 2.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax_md import simulate

from stablejax import units

__all__ = [
    "INTEGRATORS",
    "NVE",
    "BerendsenNPT",
    "Integrator",
    "Langevin",
    "NoseHooverChain",
    "make_integrator",
]


@dataclasses.dataclass(frozen=True)
class NVE:
    """Velocity Verlet (microcanonical).

    Attributes:
      dt_fs: time step in fs.
    """

    dt_fs: float = 0.5


@dataclasses.dataclass(frozen=True)
class Langevin:
    """BAOAB Langevin dynamics (canonical).

    The O-step removes the centre-of-mass velocity it injects; the projected
    Ornstein-Uhlenbeck step samples the canonical momentum distribution on the
    zero-total-momentum subspace exactly (dof = 3n - 3).

    Attributes:
      dt_fs: time step in fs.
      friction_per_ps: friction coefficient gamma in 1/ps.
    """

    dt_fs: float = 0.5
    friction_per_ps: float = 1.0


@dataclasses.dataclass(frozen=True)
class NoseHooverChain:
    """Nose-Hoover chain thermostat (canonical), jax-md's chain integrator.

    Attributes:
      dt_fs: time step in fs.
      tau_fs: thermostat period in fs (absolute time; chain masses
        Q_0 = dof kT tau^2, Q_k = kT tau^2).
      chain_length: number of thermostats in the chain.
      chain_steps: outer sub-steps of the chain per half step.
      sy_steps: Suzuki-Yoshida order (1, 3, 5 or 7).
    """

    dt_fs: float = 0.5
    tau_fs: float = 20.0
    chain_length: int = 3
    chain_steps: int = 2
    sy_steps: int = 3


@dataclasses.dataclass(frozen=True)
class BerendsenNPT:
    """Berendsen thermostat + isotropic Berendsen barostat (periodic boxes only).

    Per step: momenta are scaled by lambda = sqrt(1 + dt/tau_T (kT0/kT_inst - 1))
    (clipped to [0.9, 1.1]) and positions and box by mu with
    mu^3 = 1 - compressibility dt/tau_P (P0 - P) (clipped to [0.99, 1.01]).
    The pressure is P = (2K - dU/ds) / (3V) where U(s) = U(s R, s box), taken
    in the same backward pass as the forces. Berendsen coupling relaxes to the
    target T and P but does not sample the NPT ensemble exactly.

    Attributes:
      dt_fs: time step in fs.
      pressure_bar: target pressure in bar.
      tau_T_fs: temperature coupling time in fs.
      tau_P_fs: pressure coupling time in fs.
      compressibility_per_bar: isothermal compressibility in 1/bar (default:
        water, 4.57e-5 / bar).
    """

    dt_fs: float = 0.5
    pressure_bar: float = 1.0
    tau_T_fs: float = 20.0
    tau_P_fs: float = 2000.0
    compressibility_per_bar: float = 4.57e-5


Integrator = NVE | Langevin | NoseHooverChain | BerendsenNPT

#: The integrators by config name (`md.integrator`, `eval.integrator`, the `--integrator`
#: of `stablejax.evaluate`): each builds its dataclass from the `md` block's fields (the
#: keyword arguments of `make_integrator`). The config checks and the dispatch both read
#: this table; a new integrator is its dataclass, its branch in `make_step_pieces` and
#: `validate`, and its line here, all in this file.
INTEGRATORS = {
    "nve": lambda s: NVE(dt_fs=s["dt_fs"]),
    "langevin": lambda s: Langevin(dt_fs=s["dt_fs"], friction_per_ps=s["friction_per_ps"]),
    "nose_hoover": lambda s: NoseHooverChain(
        dt_fs=s["dt_fs"], tau_fs=s["tau_fs"], chain_length=s["chain_length"]
    ),
    "berendsen_npt": lambda s: BerendsenNPT(
        dt_fs=s["dt_fs"],
        pressure_bar=s["pressure_bar"],
        tau_T_fs=s["tau_fs"],
        tau_P_fs=s["tau_P_fs"],
    ),
}


def make_integrator(
    kind: str,
    *,
    dt_fs: float,
    tau_fs: float = 20.0,
    friction_per_ps: float = 0.1,
    chain_length: int = 3,
    pressure_bar: float = 1.01325,
    tau_P_fs: float = 2000.0,
) -> Integrator:
    """The integrator called `kind` (a key of `INTEGRATORS`) from the `md` block's fields
    (units in the argument names; each integrator reads the ones it has)."""
    if kind not in INTEGRATORS:
        raise ValueError(f"unknown integrator {kind!r}; choose one of {tuple(INTEGRATORS)}")
    settings = dict(
        dt_fs=dt_fs,
        tau_fs=tau_fs,
        friction_per_ps=friction_per_ps,
        chain_length=chain_length,
        pressure_bar=pressure_bar,
        tau_P_fs=tau_P_fs,
    )
    return INTEGRATORS[kind](settings)


_MAX_MOMENTUM_SCALE_CHANGE = 0.1
_MAX_VOLUME_CHANGE = 0.01


def kinetic_energy(momentum, mass):
    """Kinetic energy (eV) of one replica: momentum [n,3] amu Å/t, mass [n,1] amu."""
    return 0.5 * jnp.sum(momentum**2 / mass)


def remove_com_velocity(momentum, mass):
    """Subtract m_i V_com so the total momentum is zero (mass-weighted projection)."""
    total = jnp.sum(momentum, axis=0, keepdims=True)
    return momentum - mass * total / jnp.sum(mass)


def validate(integrator) -> None:
    """Raise ValueError on unphysical integrator settings."""
    if not isinstance(integrator, NVE | Langevin | NoseHooverChain | BerendsenNPT):
        raise ValueError(
            f"integrator must be NVE, Langevin, NoseHooverChain or BerendsenNPT, got {integrator!r}"
        )
    if not integrator.dt_fs > 0:
        raise ValueError(f"dt_fs must be positive, got {integrator.dt_fs}")
    if isinstance(integrator, Langevin) and integrator.friction_per_ps < 0:
        raise ValueError(f"friction_per_ps must be >= 0, got {integrator.friction_per_ps}")
    if isinstance(integrator, NoseHooverChain):
        if not integrator.tau_fs > 0 or integrator.chain_length < 2:
            raise ValueError("NoseHooverChain needs tau_fs > 0 and chain_length >= 2")
        if integrator.sy_steps not in (1, 3, 5, 7):
            raise ValueError(f"sy_steps must be 1, 3, 5 or 7, got {integrator.sy_steps}")
    if isinstance(integrator, BerendsenNPT):
        if not (integrator.tau_T_fs > 0 and integrator.tau_P_fs > 0):
            raise ValueError("BerendsenNPT needs positive tau_T_fs and tau_P_fs")
        if not integrator.compressibility_per_bar > 0:
            raise ValueError("BerendsenNPT needs compressibility_per_bar > 0")


def make_chain_fns(integrator: NoseHooverChain):
    """jax-md's Nose-Hoover chain helper with tau converted to ASE time units."""
    return simulate.nose_hoover_chain(
        integrator.dt_fs * units.fs,
        integrator.chain_length,
        integrator.chain_steps,
        integrator.sy_steps,
        integrator.tau_fs * units.fs,
    )


def make_step_pieces(integrator, mass, dof: int):
    """Build ``(pre_force, post_force)`` for one replica.

    Args:
      integrator: one of the integrator configs.
      mass: [n, 1] amu.
      dof: degrees of freedom of the thermostatted kinetic energy (3n - 3).

    Returns:
      ``pre_force(state) -> state`` (kicks, drifts, thermostat/barostat before
      the force call; positions and box are final afterwards) and
      ``post_force(state) -> state`` (state.force/potential_energy are already
      those at the new positions).
    """
    dt = integrator.dt_fs * units.fs
    half = 0.5 * dt

    def kick(state, h):
        return state.set(momentum=state.momentum + h * state.force)

    def drift(state, h):
        return state.set(position=state.position + h * state.momentum / mass)

    if isinstance(integrator, NVE):

        def pre_force(state):
            return drift(kick(state, half), dt)

        def post_force(state):
            return kick(state, half)

    elif isinstance(integrator, Langevin):
        gamma = units.friction_per_ps_to_ase(integrator.friction_per_ps)
        c1 = math.exp(-gamma * dt)
        c2 = math.sqrt(1.0 - c1**2)

        def pre_force(state):
            state = drift(kick(state, half), half)
            rng, sub = jax.random.split(state.rng)
            noise = jax.random.normal(sub, state.momentum.shape, state.momentum.dtype)
            p = c1 * state.momentum + c2 * jnp.sqrt(mass * state.kT) * noise
            state = state.set(momentum=remove_com_velocity(p, mass), rng=rng)
            return drift(state, half)

        def post_force(state):
            return kick(state, half)

    elif isinstance(integrator, NoseHooverChain):
        chain_fns = make_chain_fns(integrator)

        def pre_force(state):
            chain = chain_fns.update_mass(state.chain, state.kT)
            p, chain = chain_fns.half_step(state.momentum, chain, state.kT)
            state = state.set(momentum=p, chain=chain)
            return drift(kick(state, half), dt)

        def post_force(state):
            state = kick(state, half)
            chain = state.chain.set(kinetic_energy=kinetic_energy(state.momentum, mass))
            p, chain = chain_fns.half_step(state.momentum, chain, state.kT)
            return state.set(momentum=p, chain=chain)

    elif isinstance(integrator, BerendsenNPT):
        tau_T = integrator.tau_T_fs * units.fs
        tau_P = integrator.tau_P_fs * units.fs
        P0 = integrator.pressure_bar * units.bar
        kappa = integrator.compressibility_per_bar / units.bar  # 1 / (eV/Å^3)

        def pre_force(state):
            K = kinetic_energy(state.momentum, mass)
            kT_inst = 2.0 * K / dof
            lam = jnp.sqrt(1.0 + dt / tau_T * (state.kT / kT_inst - 1.0))
            lam = jnp.clip(lam, 1.0 - _MAX_MOMENTUM_SCALE_CHANGE, 1.0 + _MAX_MOMENTUM_SCALE_CHANGE)
            P = instantaneous_pressure(K, state.virial, state.box)
            mu3 = 1.0 - kappa * dt / tau_P * (P0 - P)
            mu3 = jnp.clip(mu3, 1.0 - _MAX_VOLUME_CHANGE, 1.0 + _MAX_VOLUME_CHANGE)
            mu = jnp.cbrt(mu3)
            state = state.set(momentum=lam * state.momentum)
            state = drift(kick(state, half), dt)
            return state.set(position=mu * state.position, box=mu * state.box)

        def post_force(state):
            return kick(state, half)

    else:  # pragma: no cover - validate() rejects this earlier
        raise ValueError(f"unknown integrator {integrator!r}")

    return pre_force, post_force


def instantaneous_pressure(kinetic, virial, box):
    """Pressure (eV/Å^3) from kinetic energy (eV), virial dU/ds (eV) and box [3] Å.

    P = (2K - dU/ds) / (3V) with U(s) = U(s R, s box) at s = 1 (so that
    -dU/dV = -(dU/ds) / (3V)).
    """
    volume = jnp.prod(box)
    return (2.0 * kinetic - virial) / (3.0 * volume)
