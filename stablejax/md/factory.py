"""MD objects from config: a replica-batched Simulator for a Potential (integrators by name
come from `stablejax.md.integrators.make_integrator`).

The experiments, the StABlE trainer, `stablejax.evaluate` and the LJ reference all build
their simulators here, from an `md`-style config block (units in the field names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax.numpy as jnp
import ml_collections
import numpy as np

# The integrator table lives with the integrators; re-exported for `stablejax.md.factory` users.
from stablejax.md.integrators import INTEGRATORS, make_integrator  # noqa: F401
from stablejax.md.simulator import Simulator

if TYPE_CHECKING:
    from stablejax.potentials.base import Potential


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
    mesh=None,
) -> Simulator:
    """A replica-batched `md.Simulator` for `potential` from the experiment's `md` block
    (`mesh`: a `stablejax.sharding` mesh to split the replicas over devices, or None).

    Free space (`box` None) uses `md_config.free_space_edges` ("all_pairs" when the
    block has no such field, e.g. a config saved before it existed): "cutoff" gives the
    Simulator lists of the pairs within `potential.cutoff` + `md_config.skin`."""
    free_space_edges = md_config.get("free_space_edges", "all_pairs")
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
    return Simulator(
        potential_energy_fn(potential, species),
        species=np.asarray(species),
        box=box,
        integrator=integrator,
        cutoff=potential.cutoff if box is not None or free_space_edges == "cutoff" else None,
        skin=md_config.skin,
        free_space_edges=free_space_edges,
        chunk_steps=chunk_steps or md_config.chunk_steps,
        mesh=mesh,
    )
