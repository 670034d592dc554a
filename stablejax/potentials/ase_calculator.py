"""ASE calculator for a stablejax potential (energy, forces, per-atom energies).

Free-space systems (no periodic boundaries) use dense all-pairs edges.
Periodic systems (orthorhombic cells only) use a jax-md Sparse neighbour list
kept between calls and reallocated when it overflows, or all-pairs minimum-
image edges (`neighbors='all_pairs'`, needs cutoff < half the shortest side).
The energy-and-forces function is jitted once; new positions of the same
system, or a neighbour list of the same capacity, reuse the compiled code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from jax_md import partition, space

from stablejax.potentials.base import Potential, all_pairs_edges


def _energies_and_forces(potential: Potential):
    def fn(params, species, positions, edges, box):
        def total(x):
            e = potential.per_atom_energies(params, species, x, edges, box)
            return jnp.sum(e), e

        (energy, per_atom), grad = jax.value_and_grad(total, has_aux=True)(positions)
        return energy, per_atom, -grad

    return fn


def orthorhombic_box(atoms) -> np.ndarray | None:
    """[3] Å box side lengths of `atoms`, or None when no direction is periodic.

    Raises ValueError for partly periodic or non-orthorhombic cells.
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any():
        return None
    if not pbc.all():
        raise ValueError(f"Periodic in some directions only (pbc={pbc.tolist()}): unsupported.")
    cell = np.asarray(atoms.cell)
    if np.max(np.abs(cell - np.diag(np.diag(cell)))) > 1e-10:
        raise ValueError("Only orthorhombic (diagonal) cells are supported.")
    return np.diag(cell).copy()


class StablejaxCalculator(Calculator):
    """ASE calculator wrapping (potential, params).

    Results: 'energy' and 'free_energy' (eV), 'forces' [n, 3] eV/Å,
    'energies' [n] eV per-atom energies.

    Args:
      potential: a stablejax Potential.
      params: its params (their float dtype sets the compute dtype).
      neighbors: for periodic systems, 'jax_md' (Sparse neighbour list, the
        default) or 'all_pairs' (minimum image). Free space is always dense.
      skin: neighbour-list skin, Å (the list is rebuilt after atoms move by
        more than half of it).
      capacity_multiplier: spare neighbour-list capacity.

    Example:
      >>> atoms.calc = StablejaxCalculator(potential, params)
      >>> atoms.get_potential_energy(), atoms.get_forces()
    """

    implemented_properties = ["energy", "free_energy", "forces", "energies"]

    def __init__(
        self,
        potential: Potential,
        params,
        *,
        neighbors: str = "jax_md",
        skin: float = 0.5,
        capacity_multiplier: float = 1.25,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if neighbors not in ("jax_md", "all_pairs"):
            raise ValueError(f"neighbors must be 'jax_md' or 'all_pairs', got {neighbors!r}.")
        self.potential = potential
        self.params = params
        self.neighbors = neighbors
        self.skin = float(skin)
        self.capacity_multiplier = float(capacity_multiplier)
        floats = [
            jnp.asarray(x).dtype
            for x in jax.tree.leaves(params)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
        ]
        # Compute in the params' float dtype (float64 params need jax_enable_x64).
        self._dtype = floats[0] if floats else jnp.zeros(()).dtype
        self._eval = jax.jit(_energies_and_forces(potential))
        self._nl_key = None
        self._neighbor_fn = None
        self._nbrs = None
        self._update = None

    def _check_species(self, numbers):
        from stablejax.potentials.factory import check_species

        if "species" in self.potential.config:
            check_species(self.potential.config, numbers)

    def _periodic_edges(self, positions: jax.Array, box: np.ndarray) -> jax.Array:
        n = positions.shape[0]
        if self.neighbors == "all_pairs":
            if not self.potential.cutoff < 0.5 * box.min():
                raise ValueError(
                    f"all_pairs needs cutoff {self.potential.cutoff} Å < half the box "
                    f"({0.5 * box.min()} Å); use neighbors='jax_md'."
                )
            return jnp.asarray(all_pairs_edges(n))
        key = (n, tuple(box.tolist()))
        if key != self._nl_key:
            displacement, _ = space.periodic(jnp.asarray(box, dtype=positions.dtype))
            self._neighbor_fn = partition.neighbor_list(
                displacement,
                jnp.asarray(box, dtype=positions.dtype),
                self.potential.cutoff,
                dr_threshold=self.skin,
                capacity_multiplier=self.capacity_multiplier,
                format=partition.NeighborListFormat.Sparse,
            )
            self._nbrs = self._neighbor_fn.allocate(positions)
            self._update = jax.jit(lambda x, nbrs: nbrs.update(x))
            self._nl_key = key
        else:
            self._nbrs = self._update(positions, self._nbrs)
            if bool(self._nbrs.did_buffer_overflow):
                self._nbrs = self._neighbor_fn.allocate(positions)
        return self._nbrs.idx

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        numbers = np.asarray(self.atoms.numbers)
        self._check_species(numbers)
        box = orthorhombic_box(self.atoms)
        positions = np.asarray(self.atoms.positions, dtype=np.float64)
        if box is None:
            edges = jnp.asarray(all_pairs_edges(numbers.size))
            box_arg = None
        else:
            positions = np.mod(positions, box)
            edges = self._periodic_edges(jnp.asarray(positions, dtype=self._dtype), box)
            box_arg = jnp.asarray(box, dtype=self._dtype)
        energy, per_atom, forces = self._eval(
            self.params,
            jnp.asarray(numbers, dtype=jnp.int32),
            jnp.asarray(positions, dtype=self._dtype),
            edges,
            box_arg,
        )
        self.results["energy"] = float(energy)
        self.results["free_energy"] = float(energy)
        self.results["energies"] = np.asarray(per_atom, dtype=np.float64)
        self.results["forces"] = np.asarray(forces, dtype=np.float64)
