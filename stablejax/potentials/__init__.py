"""Potentials: pure Flax energy functions (see `stablejax.potentials.base`)."""

from stablejax.potentials.base import Potential, all_pairs_edges, edge_vectors

__all__ = ["Potential", "all_pairs_edges", "edge_vectors"]
