"""ASE calculator for a stablejax potential (energy, forces, per-atom energies, stress).

Free-space systems (no periodic boundaries) use dense all-pairs edges.
Fully periodic systems may have any cell (orthorhombic or triclinic). Cells
narrower than twice the cutoff are evaluated on a supercell (see
`StablejaxCalculator`). Orthorhombic cells use a jax-md Sparse neighbour list
kept between calls and reallocated when it overflows, or all-pairs minimum-
image edges (`neighbors='all_pairs'`); triclinic cells always use all-pairs
edges. Stress comes from the strain derivative of the energy in the same
jitted function as energies and forces, which is compiled once: new positions
of the same system, or a neighbour list of the same capacity, reuse it.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from jax_md import partition, space

from stablejax.potentials.base import Potential, all_pairs_edges, perpendicular_widths

# ASE's Voigt order: xx, yy, zz, yz, xz, xy.
_VOIGT = (np.array([0, 1, 2, 1, 0, 0]), np.array([0, 1, 2, 2, 2, 1]))


def _energies_forces_stress(potential: Potential):
    """(params, species, positions, edges, cell [3,3] | None) -> (E, per-atom E, forces, stress).

    Stress [3, 3] = (1/V) dE/d eps at eps = 0, with positions and cell both
    deformed by (I + eps) (rows are vectors, so x -> x (I + eps)),
    symmetrised; one backward pass gives it with the forces. None in free
    space (cell None).
    """

    def fn(params, species, positions, edges, cell):
        if cell is None:

            def total(x):
                e = potential.per_atom_energies(params, species, x, edges, None)
                return jnp.sum(e), e

            (energy, per_atom), grad = jax.value_and_grad(total, has_aux=True)(positions)
            return energy, per_atom, -grad, None

        def strained_total(x, eps):
            strain = jnp.eye(3, dtype=x.dtype) + eps
            e = potential.per_atom_energies(params, species, x @ strain, edges, cell @ strain)
            return jnp.sum(e), e

        eps0 = jnp.zeros((3, 3), positions.dtype)
        (energy, per_atom), (grad_x, grad_eps) = jax.value_and_grad(
            strained_total, argnums=(0, 1), has_aux=True
        )(positions, eps0)
        volume = jnp.abs(jnp.linalg.det(cell))
        stress = 0.5 * (grad_eps + grad_eps.T) / volume
        return energy, per_atom, -grad_x, stress

    return fn


def periodic_cell(atoms) -> np.ndarray | None:
    """[3, 3] Å cell of `atoms` (lattice vectors as rows), or None when no direction is periodic.

    Raises ValueError for partly periodic or degenerate cells.
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any():
        return None
    if not pbc.all():
        raise ValueError(f"Periodic in some directions only (pbc={pbc.tolist()}): unsupported.")
    cell = np.array(atoms.cell, dtype=np.float64)
    perpendicular_widths(cell)  # raises on a degenerate cell
    return cell


def orthorhombic_box(atoms) -> np.ndarray | None:
    """[3] Å box side lengths of `atoms`, or None when no direction is periodic.

    Raises ValueError for partly periodic or non-orthorhombic cells.
    """
    cell = periodic_cell(atoms)
    if cell is None:
        return None
    if not _is_diagonal(cell):
        raise ValueError("Only orthorhombic (diagonal) cells are supported.")
    return np.diag(cell).copy()


def _is_diagonal(cell: np.ndarray) -> bool:
    return bool(np.max(np.abs(cell - np.diag(np.diag(cell)))) <= 1e-10)


def supercell_repeats(cutoff: float, cell) -> np.ndarray:
    """[3] int repeats (n1, n2, n3) so that every perpendicular width n_i w_i exceeds 2 cutoff.

    (1, 1, 1) when the cell is already wide enough for minimum-image edges.

    Args:
      cutoff: Å.
      cell: [3] Å side lengths or [3, 3] Å cell (lattice vectors as rows).
    """
    widths = perpendicular_widths(cell)
    return np.floor(2.0 * cutoff / widths).astype(np.int64) + 1


class StablejaxCalculator(Calculator):
    """ASE calculator wrapping (potential, params).

    Results: 'energy' and 'free_energy' (eV), 'forces' [n, 3] eV/Å,
    'energies' [n] eV per-atom energies, and for periodic systems 'stress'
    [6] eV/Å^3 in ASE's Voigt order (xx, yy, zz, yz, xz, xy), the symmetrised
    strain derivative (1/V) dE/d eps (ASE's sign convention: positive under
    tension). Free space has no stress (PropertyNotImplementedError).

    Periodic systems must be periodic in all three directions; the cell may be
    triclinic. When the cutoff is not below half the smallest perpendicular
    width of the cell (width_i = V / |a_j x a_k|), minimum-image edges would
    miss periodic images, so the calculator evaluates a supercell of the cell
    repeated n1 x n2 x n3 times (M = n1 n2 n3 copies, each n_i the smallest
    making n_i width_i > 2 cutoff) and reports energy = E_super / M, the forces
    and per-atom energies of the first copy (the original atoms), and the
    supercell's stress (equal to the cell's). The results are those of the
    infinite periodic system in every case.

    Args:
      potential: a stablejax Potential.
      params: its params (their float dtype sets the compute dtype).
      neighbors: for orthorhombic periodic systems, 'jax_md' (Sparse neighbour
        list, the default) or 'all_pairs' (minimum image). Triclinic cells
        always use all-pairs edges; free space is always dense.
      skin: neighbour-list skin, Å (the list is rebuilt after atoms move by
        more than half of it).
      capacity_multiplier: spare neighbour-list capacity.

    Example:
      >>> atoms.calc = StablejaxCalculator(potential, params)
      >>> atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    """

    implemented_properties = ["energy", "free_energy", "forces", "energies", "stress"]

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
        self._eval = jax.jit(_energies_forces_stress(potential))
        self._nl_key = None
        self._neighbor_fn = None
        self._nbrs = None
        self._update = None

    @classmethod
    def from_saved_model(cls, path, **kwargs) -> StablejaxCalculator:
        """Calculator for a model saved with `stablejax.potentials.io.save_model`.

        Args:
          path: the saved model directory.
          **kwargs: passed to the constructor (neighbors, skin, ...).

        Example:
          >>> atoms.calc = StablejaxCalculator.from_saved_model('runs/water/model')
        """
        from stablejax.potentials.io import load_model

        potential, params = load_model(path)
        return cls(potential, params, **kwargs)

    def _check_species(self, numbers):
        from stablejax.potentials.factory import check_species

        if "species" in self.potential.config:
            check_species(self.potential.config, numbers)

    def _neighbor_list_edges(self, positions: jax.Array, box: np.ndarray) -> jax.Array:
        """jax-md Sparse neighbour list for an orthorhombic box [3] Å, kept between calls."""
        n = positions.shape[0]
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
        if "stress" in properties:
            system = atoms if atoms is not None else self.atoms
            if system is not None and not np.any(system.pbc):
                raise PropertyNotImplementedError(
                    "stress is defined only for periodic systems; these atoms have pbc=False."
                )
        super().calculate(atoms, properties, system_changes)
        numbers = np.asarray(self.atoms.numbers)
        self._check_species(numbers)
        cell = periodic_cell(self.atoms)
        positions = np.asarray(self.atoms.positions, dtype=np.float64)
        if cell is None:
            energy, per_atom, forces, _ = self._eval(
                self.params,
                jnp.asarray(numbers, dtype=jnp.int32),
                jnp.asarray(positions, dtype=self._dtype),
                jnp.asarray(all_pairs_edges(numbers.size)),
                None,
            )
            self._store(energy, per_atom, forces)
            return
        n = numbers.size
        # Wrap into the cell (fractional coordinates in [0, 1)) for the cell list.
        frac = np.linalg.solve(cell.T, positions.T).T
        positions = (frac - np.floor(frac)) @ cell
        repeats = supercell_repeats(self.potential.cutoff, cell)
        if np.any(repeats > 1):
            shifts = np.array(list(itertools.product(*(range(r) for r in repeats))))
            # shifts[0] = (0, 0, 0): the first copy is the original atoms.
            positions = (positions[None] + (shifts @ cell)[:, None]).reshape(-1, 3)
            numbers = np.tile(numbers, len(shifts))
            cell = repeats[:, None] * cell
        x = jnp.asarray(positions, dtype=self._dtype)
        if self.neighbors == "jax_md" and _is_diagonal(cell):
            edges = self._neighbor_list_edges(x, np.diag(cell).copy())
        else:
            # Triclinic cells use all-pairs minimum-image edges rather than
            # jax_md.space.periodic_general: the calculator serves single
            # structures and small cells (where all-pairs is what a cell list
            # falls back to anyway), and this keeps one minimum-image code path
            # (`base.minimum_image`), valid by construction after the supercell.
            edges = jnp.asarray(all_pairs_edges(numbers.size))
        energy, per_atom, forces, stress = self._eval(
            self.params,
            jnp.asarray(numbers, dtype=jnp.int32),
            x,
            edges,
            jnp.asarray(cell, dtype=self._dtype),
        )
        copies = numbers.size // n
        self._store(energy / copies, per_atom[:n], forces[:n])
        stress = np.asarray(stress, dtype=np.float64)
        self.results["stress"] = stress[_VOIGT]

    def _store(self, energy, per_atom, forces):
        self.results["energy"] = float(energy)
        self.results["free_energy"] = float(energy)
        self.results["energies"] = np.asarray(per_atom, dtype=np.float64)
        self.results["forces"] = np.asarray(forces, dtype=np.float64)
