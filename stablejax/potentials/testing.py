"""Property checks every potential must pass (used by each model's tests).

Each `check_*` function raises AssertionError with a message naming the
violated property, and returns a dict of the measured discrepancies so tests
can report them. They evaluate the potential in whatever dtype the inputs
have; call them with float64 inputs and params (tests enable x64) so that the
tolerances can be tight.

Every check is shown to fail on a deliberately broken model in
tests/test_potentials_common.py.

Example:
  >>> potential = factory.build(config)
  >>> params = potential.init(jax.random.key(0), species, positions, None)
  >>> check_invariances(potential, params, species, positions,
  ...                   all_pairs_edges(len(species)), atol=1e-9)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_masses

from stablejax import units
from stablejax.geometry import minimum_image
from stablejax.potentials.base import Potential, all_pairs_edges

_JITTED: dict[int, tuple] = {}


def _fns(potential: Potential):
    # Jitted functions cached per potential object (kept alive in the cache so
    # its id stays unique), so repeated checks on one model compile once.
    cached = _JITTED.get(id(potential))
    if cached is not None and cached[0] is potential:
        return cached[1]
    fns = _make_fns(potential)
    _JITTED[id(potential)] = (potential, fns)
    return fns


def _make_fns(potential: Potential):
    per_atom = jax.jit(potential.per_atom_energies)

    def energy_forces(params, species, positions, edges, box):
        e, g = jax.value_and_grad(
            lambda x: jnp.sum(potential.per_atom_energies(params, species, x, edges, box))
        )(positions)
        return e, -g

    return per_atom, jax.jit(energy_forces)


def _assert_close(what: str, actual, expected, atol: float) -> float:
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    if not np.all(np.isfinite(actual)) or not np.all(np.isfinite(expected)):
        raise AssertionError(f"{what}: non-finite values.")
    if not err <= atol:
        raise AssertionError(f"{what}: max deviation {err:.3e} > atol {atol:.3e}.")
    return err


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _remap_edges(edges: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Edges of the relabelled system whose atom k is old atom perm[k]."""
    n = perm.size
    inverse = np.empty(n + 1, dtype=np.int64)
    inverse[perm] = np.arange(n)
    inverse[n] = n  # padding stays padding
    return inverse[np.asarray(edges)].astype(np.int32)


def check_invariances(
    potential: Potential,
    params,
    species,
    positions,
    edges,
    box=None,
    *,
    atol: float,
    force_atol: float | None = None,
    seed: int = 0,
) -> dict:
    """Check the symmetries of a potential energy surface.

    Checks: rotation and reflection (energies invariant, per-atom energies
    invariant, forces rotate with the system), translation (with wrapping into
    the box when periodic), permutation of identical atoms and a relabelling
    of all atoms (per-atom energies and forces permute), zero net force.

    Under periodic boundaries only the box's symmetries apply: the rotations
    used are signed axis permutations, with the box sides permuted alongside.

    Args:
      potential: the potential under test.
      params: its params.
      species: [n] atomic numbers.
      positions: [n, 3] Å.
      edges: [2, e] int32 edges for `positions` (padding value n allowed).
      box: [3] Å or None.
      atol: tolerance on energies (eV) and per-atom energies.
      force_atol: tolerance on forces (eV/Å); defaults to atol.
      seed: seed for the random transformations.

    Returns:
      Dict of max deviations per property.
    """
    force_atol = atol if force_atol is None else force_atol
    rng = np.random.default_rng(seed)
    per_atom, energy_forces = _fns(potential)
    species = np.asarray(species)
    positions = jnp.asarray(positions)
    edges = np.asarray(edges)
    n = species.size
    e_ref = per_atom(params, species, positions, edges, box)
    total, forces = energy_forces(params, species, positions, edges, box)
    if not (np.all(np.isfinite(e_ref)) and np.all(np.isfinite(forces))):
        raise AssertionError("Non-finite energies or forces on the input configuration.")
    errors = {}

    def compare(tag, pos2, species2, edges2, box2, perm=None, rot=None):
        e2 = per_atom(params, species2, pos2, edges2, box2)
        t2, f2 = energy_forces(params, species2, pos2, edges2, box2)
        expected_e = e_ref if perm is None else e_ref[perm]
        expected_f = forces if perm is None else forces[perm]
        if rot is not None:
            expected_f = expected_f @ rot.T
        errors[f"{tag}_energy"] = _assert_close(f"{tag}: total energy", t2, total, atol)
        errors[f"{tag}_per_atom"] = _assert_close(f"{tag}: per-atom energies", e2, expected_e, atol)
        errors[f"{tag}_forces"] = _assert_close(f"{tag}: forces", f2, expected_f, force_atol)

    centre = jnp.mean(positions, axis=0)
    if box is None:
        rot = _random_rotation(rng)
        compare("rotation", (positions - centre) @ rot.T + centre, species, edges, None, rot=rot)
        normal = rng.normal(size=3)
        normal /= np.linalg.norm(normal)
        refl = np.eye(3) - 2.0 * np.outer(normal, normal)
        compare(
            "reflection", (positions - centre) @ refl.T + centre, species, edges, None, rot=refl
        )
        shift = rng.normal(size=3) * 3.0
        compare("translation", positions + shift, species, edges, None)
    else:
        box = np.asarray(box, dtype=np.float64)
        axes = rng.permutation(3)
        if np.all(axes == np.arange(3)):
            axes = np.array([1, 2, 0])
        signs = np.array([1.0, -1.0, 1.0])
        # Proper rotation: axis permutation times signs with det = +1.
        rot = np.zeros((3, 3))
        rot[np.arange(3), axes] = signs
        if np.linalg.det(rot) < 0:
            rot[0] *= -1.0
        box_rot = np.abs(rot) @ box
        pos_rot = jnp.mod(positions @ rot.T, box_rot)
        compare("rotation", pos_rot, species, edges, jnp.asarray(box_rot), rot=rot)
        refl = np.diag([1.0, 1.0, -1.0])
        compare("reflection", jnp.mod(positions @ refl.T, box), species, edges, box, rot=refl)
        shift = rng.uniform(size=3) * box
        compare("translation", jnp.mod(positions + shift, box), species, edges, box)

    # Permutation of identical atoms: species unchanged, positions shuffled within species.
    perm = np.arange(n)
    for z in np.unique(species):
        where = np.nonzero(species == z)[0]
        perm[where] = rng.permutation(where)
    compare("permutation", positions[perm], species, _remap_edges(edges, perm), box, perm=perm)
    # Relabelling of all atoms (species move with them).
    perm = rng.permutation(n)
    compare(
        "relabelling", positions[perm], species[perm], _remap_edges(edges, perm), box, perm=perm
    )
    net = np.asarray(jnp.sum(forces, axis=0))
    errors["net_force"] = _assert_close("net force", net, np.zeros(3), force_atol)
    return errors


def check_cutoff_smoothness(
    potential: Potential,
    params,
    species,
    positions,
    *,
    moving_atom: int,
    anchor_atom: int,
    box=None,
    width: float = 0.02,
    n_points: int = 201,
    energy_atol: float,
    force_atol: float,
) -> dict:
    """Check energy and forces are continuous and consistent as a pair crosses the cutoff.

    `moving_atom` is moved along the line from `anchor_atom` through it so that
    their distance scans [cutoff - width, cutoff + width] on `n_points` evenly
    spaced points (spacing h); all other atoms stay put. Uses dense edges.

    Checks:
      * energy-force consistency on every step (trapezoid rule):
        |E_{k+1} - E_k + h (F_k + F_{k+1}) . u / 2| <= energy_atol, where u is
        the direction of motion. A jump in the energy (hard cutoff) breaks it.
      * force continuity: max over atoms and steps of |F_{k+1} - F_k| <=
        force_atol. A force that does not vanish at the cutoff breaks it.

    Choose n_points large enough that h |dF/dr| and h^3 |E'''| are well
    below the tolerances for a smooth model.

    Args:
      potential, params: the potential under test and its params.
      species: [n] atomic numbers.
      positions: [n, 3] Å; the distance between the two atoms is overwritten.
      moving_atom, anchor_atom: atom indices.
      box: [3] Å, [3, 3] Å cell (lattice vectors as rows) or None.
      width: half-width (Å) of the scanned distance window around the cutoff.
      n_points: number of distances.
      energy_atol: eV. force_atol: eV/Å.

    Returns:
      Dict with the max trapezoid residual, the max force step, and the scan
      (distances, energies, forces along u on the moving atom).
    """
    _, energy_forces = _fns(potential)
    species = np.asarray(species)
    positions = np.asarray(positions)
    n = species.size
    edges = all_pairs_edges(n)
    rc = float(potential.cutoff)
    u = positions[moving_atom] - positions[anchor_atom]
    if box is not None:
        u = np.asarray(minimum_image(jnp.asarray(u), box))
    u = u / np.linalg.norm(u)
    distances = np.linspace(rc - width, rc + width, n_points)
    h = distances[1] - distances[0]

    def at(d):
        x = positions.copy()
        x[moving_atom] = positions[anchor_atom] + d * u
        return jnp.asarray(x, dtype=positions.dtype)

    batch = jnp.stack([at(d) for d in distances])
    e, f = jax.vmap(energy_forces, in_axes=(None, None, 0, None, None))(
        params, species, batch, edges, box
    )
    e = np.asarray(e)
    f = np.asarray(f)
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(f))):
        raise AssertionError("cutoff smoothness: non-finite energies or forces.")
    f_along = f[:, moving_atom] @ u
    residual = np.abs(np.diff(e) + h * 0.5 * (f_along[1:] + f_along[:-1]))
    force_step = np.max(np.abs(np.diff(f, axis=0)), axis=(1, 2))
    worst_e = int(np.argmax(residual))
    worst_f = int(np.argmax(force_step))
    if not residual[worst_e] <= energy_atol:
        raise AssertionError(
            f"cutoff smoothness: energy not consistent with forces between r = "
            f"{distances[worst_e]:.5f} and {distances[worst_e + 1]:.5f} Å (cutoff {rc} Å): "
            f"residual {residual[worst_e]:.3e} eV > {energy_atol:.3e} (energy jump?)."
        )
    if not force_step[worst_f] <= force_atol:
        raise AssertionError(
            f"cutoff smoothness: force jumps by {force_step[worst_f]:.3e} eV/Å between r = "
            f"{distances[worst_f]:.5f} and {distances[worst_f + 1]:.5f} Å (cutoff {rc} Å) "
            f"> {force_atol:.3e}."
        )
    return {
        "max_trapezoid_residual": float(residual.max()),
        "max_force_step": float(force_step.max()),
        "distances": distances,
        "energies": e,
        "force_along": f_along,
    }


def check_padding(
    potential: Potential,
    params,
    species,
    positions,
    edges,
    box=None,
    *,
    n_pad: int = 7,
    atol: float,
    seed: int = 0,
) -> dict:
    """Check padded edges change neither energies, forces nor param gradients.

    Appends `n_pad` padded edges (value n, as jax-md Sparse lists use) at
    random places in a shuffled copy of the edge list, and compares per-atom
    energies, forces and d(energy)/d(params) with the unpadded input. Also
    checks every param gradient is finite.

    Args:
      potential, params: the potential under test and its params.
      species: [n] atomic numbers. positions: [n, 3] Å.
      edges: [2, e] int32 (unpadded). box: [3] or [3, 3] Å, or None.
      n_pad: number of padded edges to insert.
      atol: tolerance on energies (eV), forces (eV/Å) and gradients.

    Returns:
      Dict of max deviations.
    """
    rng = np.random.default_rng(seed)
    species = np.asarray(species)
    edges = np.asarray(edges)
    n = species.size
    padded = np.concatenate([edges, np.full((2, n_pad), n, dtype=edges.dtype)], axis=1)
    padded = padded[:, rng.permutation(padded.shape[1])]
    per_atom, energy_forces = _fns(potential)
    grad_params = jax.jit(jax.grad(potential.energy))

    errors = {}
    ref_grads = grad_params(params, species, positions, edges, box)
    grads = grad_params(params, species, positions, padded, box)
    for tag, g in (("unpadded", ref_grads), ("padded", grads)):
        if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g)):
            raise AssertionError(f"padding: non-finite parameter gradients ({tag} edges).")
    errors["per_atom"] = _assert_close(
        "padding: per-atom energies",
        per_atom(params, species, positions, padded, box),
        per_atom(params, species, positions, edges, box),
        atol,
    )
    _, f_ref = energy_forces(params, species, positions, edges, box)
    _, f_pad = energy_forces(params, species, positions, padded, box)
    errors["forces"] = _assert_close("padding: forces", f_pad, f_ref, atol)
    flat_ref = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(ref_grads)])
    flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(grads)])
    errors["param_grads"] = _assert_close("padding: parameter gradients", flat, flat_ref, atol)
    return errors


def _cluster_edges(positions: np.ndarray, cutoff: float) -> np.ndarray:
    """Free-space edges with |r_ij| < cutoff, by cell binning (numpy)."""
    n = positions.shape[0]
    cell = np.floor((positions - positions.min(0)) / cutoff).astype(np.int64)
    buckets: dict[tuple, list[int]] = {}
    for k, c in enumerate(map(tuple, cell)):
        buckets.setdefault(c, []).append(k)
    ii, jj = [], []
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
    for c, members in buckets.items():
        members = np.asarray(members)
        near = [buckets.get((c[0] + a, c[1] + b, c[2] + d), []) for a, b, d in offsets]
        near = np.asarray([k for group in near for k in group])
        d = np.linalg.norm(positions[near][None, :, :] - positions[members][:, None, :], axis=-1)
        i_loc, j_loc = np.nonzero((d < cutoff) & (members[:, None] != near[None, :]))
        ii.append(members[i_loc])
        jj.append(near[j_loc])
    del n
    return np.stack([np.concatenate(ii), np.concatenate(jj)]).astype(np.int32)


def check_periodic_images(
    potential: Potential,
    params,
    species,
    positions,
    box,
    *,
    receptive_field: float,
    atol: float,
    force_atol: float | None = None,
    check_forces: bool = True,
) -> dict:
    """Check a periodic box against an explicitly replicated free-space cluster.

    An atom's energy depends only on atoms within `receptive_field` of it
    (cutoff times the number of message-passing steps). Replicating the box
    (2k+1)^3 times in free space, the central cell's atoms see exactly the
    periodic environment when k L_min >= receptive_field, so their per-atom
    energies must equal the periodic ones. The force on a central atom also
    involves the energies of atoms up to `receptive_field` away, whose own
    environments reach 2 x receptive_field: with k L_min >= 2 x receptive_field
    the central atoms' forces must equal the periodic forces too. k is chosen
    accordingly. The periodic side uses all-pairs minimum-image edges, which
    requires cutoff < L_min / 2.

    Args:
      potential, params: the potential under test and its params.
      species: [n] atomic numbers. positions: [n, 3] Å inside the box.
      box: [3] Å.
      receptive_field: Å, distance beyond which atoms cannot affect an atom's
        energy (SchNet/NequIP: cutoff x interactions; pair potentials: cutoff).
      atol: eV for energies; force_atol: eV/Å (defaults to atol).
      check_forces: also compare forces (needs the larger cluster).

    Returns:
      Dict of max deviations and the replication factor used.
    """
    force_atol = atol if force_atol is None else force_atol
    species = np.asarray(species)
    positions = np.asarray(positions)
    box = np.asarray(box, dtype=np.float64)
    n = species.size
    rc = float(potential.cutoff)
    if not rc < 0.5 * box.min():
        raise ValueError(
            f"check_periodic_images needs cutoff {rc} Å < half the smallest box side "
            f"{0.5 * box.min()} Å (minimum-image edges)."
        )
    reach = (2.0 if check_forces else 1.0) * receptive_field
    k = max(1, math.ceil(reach / box.min() - 1e-12))
    shifts = np.array(
        [(a, b, c) for a in range(-k, k + 1) for b in range(-k, k + 1) for c in range(-k, k + 1)]
    )
    # Central image first, so atoms 0..n-1 of the cluster are the central cell.
    shifts = shifts[np.argsort(np.abs(shifts).sum(1), kind="stable")]
    cluster = (positions[None, :, :] + (shifts * box)[:, None, :]).reshape(-1, 3)
    cluster_species = np.tile(species, shifts.shape[0])
    cluster_edges = _cluster_edges(cluster, rc)

    per_atom, energy_forces = _fns(potential)
    pos_p = jnp.asarray(positions)
    edges_p = all_pairs_edges(n)
    e_periodic = per_atom(params, species, pos_p, edges_p, jnp.asarray(box))
    pos_c = jnp.asarray(cluster, dtype=pos_p.dtype)
    e_cluster = per_atom(params, cluster_species, pos_c, cluster_edges, None)
    errors = {"replication": 2 * k + 1}
    errors["per_atom"] = _assert_close(
        f"periodic images: per-atom energies of the central cell ({2 * k + 1}^3 cluster)",
        e_cluster[:n],
        e_periodic,
        atol,
    )
    if check_forces:
        _, f_periodic = energy_forces(params, species, pos_p, edges_p, jnp.asarray(box))
        _, f_cluster = energy_forces(params, cluster_species, pos_c, cluster_edges, None)
        errors["forces"] = _assert_close(
            "periodic images: forces on the central cell", f_cluster[:n], f_periodic, force_atol
        )
    return errors


def check_nve_energy_conservation(
    potential: Potential,
    params,
    species,
    positions,
    box=None,
    *,
    temperature_K: float = 300.0,
    dt_fs: float = 0.25,
    n_steps: int = 400,
    max_drift: float,
    seed: int = 0,
) -> dict:
    """Run velocity Verlet (NVE) and check the total energy stays constant.

    Velocities are drawn from Maxwell-Boltzmann at `temperature_K` (centre-of-
    mass motion removed). Dense edges (minimum image when periodic). Call with
    float64 positions and params: the check is about the model's smoothness,
    not round-off.

    Args:
      potential, params: the potential under test and its params.
      species: [n] atomic numbers (masses from ase.data, amu).
      positions: [n, 3] Å.
      box: [3] Å or None.
      temperature_K: initial temperature, K.
      dt_fs: time step, fs.
      n_steps: number of steps.
      max_drift: eV; bound on max_t |E_total(t) - E_total(0)|.
      seed: velocity seed.

    Returns:
      Dict with the max deviation (eV), the total-energy trace and the
      kinetic-energy trace (eV).
    """
    species = np.asarray(species)
    positions = jnp.asarray(positions)
    n = species.size
    edges = all_pairs_edges(n)
    masses = jnp.asarray(atomic_masses[species], dtype=positions.dtype)[:, None]
    kT = units.kT_from_kelvin(temperature_K)
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3)) * np.sqrt(kT / np.asarray(masses))
    v = v - np.sum(np.asarray(masses) * v, 0) / np.sum(np.asarray(masses))
    v = jnp.asarray(v, dtype=positions.dtype)
    dt = units.fs_to_ase_time(dt_fs)
    box_arr = None if box is None else jnp.asarray(box, dtype=positions.dtype)

    def energy_forces(x):
        e, g = jax.value_and_grad(
            lambda y: jnp.sum(potential.per_atom_energies(params, species, y, edges, box_arr))
        )(x)
        return e, -g

    def step(carry, _):
        x, v, f = carry
        v_half = v + 0.5 * dt * f / masses
        x = x + dt * v_half
        u, f = energy_forces(x)
        v = v_half + 0.5 * dt * f / masses
        kinetic = 0.5 * jnp.sum(masses * v * v)
        return (x, v, f), (u + kinetic, kinetic)

    @jax.jit
    def run(x, v):
        u0, f0 = energy_forces(x)
        e0 = u0 + 0.5 * jnp.sum(masses * v * v)
        _, (etot, kin) = jax.lax.scan(step, (x, v, f0), None, length=n_steps)
        return e0, etot, kin

    e0, etot, kin = run(positions, v)
    etot = np.concatenate([[float(e0)], np.asarray(etot)])
    if not np.all(np.isfinite(etot)):
        raise AssertionError("NVE: non-finite total energy.")
    drift = float(np.max(np.abs(etot - etot[0])))
    if not drift <= max_drift:
        raise AssertionError(
            f"NVE: total energy deviates by {drift:.3e} eV > {max_drift:.3e} eV over "
            f"{n_steps} steps of {dt_fs} fs."
        )
    return {"max_deviation": drift, "total_energy": etot, "kinetic_energy": np.asarray(kin)}


# ----------------------------------------------------------------------------- test systems

# One MD17 aspirin frame (DFT geometry, Å): a realistic 21-atom molecule for
# tests and benchmarks that must not depend on data files.
_ASPIRIN = """\
C 2.13448882 -0.98436105 -0.19521789
C 0.76264381 0.95941395 -1.67992890
C 2.66034484 -0.40792605 -1.30730391
C 1.91031682 0.39396596 -2.14701986
C -3.03019023 1.49540496 0.71966213
C 0.84942484 -0.55087107 0.28437510
C 0.23844682 0.47350594 -0.40442190
O 0.89789581 -2.27643204 1.73006105
O -2.38345218 0.41777894 -1.46285689
O -0.47620118 -0.52908707 2.33925915
C 0.39299181 -1.19023705 1.53798211
C -2.12298512 0.95175993 -0.39770490
O -0.80466616 1.28624594 0.11050910
H -0.49380317 -1.18679202 3.09597421
H 2.55473471 -1.80249703 0.39213109
H 0.33068982 1.85571098 -2.34526396
H 3.80379391 -0.49371904 -1.45620286
H 2.23114085 0.55718595 -3.12414980
H -2.70893025 2.48465800 0.92692810
H -4.13048315 1.48216701 0.43126610
H -2.87414813 1.00320899 1.69948506"""


def aspirin() -> tuple[np.ndarray, np.ndarray]:
    """(species [21] atomic numbers, positions [21, 3] Å) of one MD17 aspirin frame."""
    from ase.data import atomic_numbers

    rows = [line.split() for line in _ASPIRIN.splitlines()]
    species = np.array([atomic_numbers[r[0]] for r in rows], dtype=np.int32)
    positions = np.array([[float(v) for v in r[1:]] for r in rows])
    return species, positions


def water_box(
    n_per_side: int = 4, box_length: float = 12.44287777, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Water molecules on a cubic lattice with random orientations (O, H, H order).

    Geometry r_OH = 1.012 Å, angle 113.24° (SPC/Fw). The default is the
    StABlE water system: 64 molecules (192 atoms) in a 12.44287777 Å box.

    Returns:
      (species [3 m] atomic numbers, positions [3 m, 3] Å wrapped into the box,
      box [3] Å), m = n_per_side**3.
    """
    rng = np.random.default_rng(seed)
    r_oh, angle = 1.012, np.deg2rad(113.24)
    local = np.array(
        [
            [0.0, 0.0, 0.0],
            [r_oh * np.sin(angle / 2), r_oh * np.cos(angle / 2), 0.0],
            [-r_oh * np.sin(angle / 2), r_oh * np.cos(angle / 2), 0.0],
        ]
    )
    spacing = box_length / n_per_side
    grid = np.stack(np.meshgrid(*[np.arange(n_per_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    molecules = []
    for site in grid:
        rot = _random_rotation(rng)
        molecules.append(local @ rot.T + (site + 0.5) * spacing)
    positions = np.mod(np.concatenate(molecules), box_length)
    species = np.tile(np.array([8, 1, 1], dtype=np.int32), grid.shape[0])
    return species, positions, np.full(3, box_length)
