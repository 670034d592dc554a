"""stablejax.md: replica-batched molecular dynamics (see ``Simulator``)."""

from stablejax.md.factory import make_simulator, potential_energy_fn
from stablejax.md.integrators import (
    INTEGRATORS,
    NVE,
    BerendsenNPT,
    Langevin,
    NoseHooverChain,
    make_integrator,
)
from stablejax.md.io import write_trajectory
from stablejax.md.neighbors import NeighborState
from stablejax.md.simulator import FREE_SPACE_EDGES, History, MDState, Simulator, Trajectory

__all__ = [
    "FREE_SPACE_EDGES",
    "INTEGRATORS",
    "make_integrator",
    "make_simulator",
    "potential_energy_fn",
    "NVE",
    "BerendsenNPT",
    "History",
    "Langevin",
    "MDState",
    "NeighborState",
    "NoseHooverChain",
    "Simulator",
    "Trajectory",
    "write_trajectory",
]
