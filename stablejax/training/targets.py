"""Training observables of StABlE and their references, by name (`TARGETS`).

Each builder turns the experiment config, the `System` and the training frames into an
`ObservableTarget`: the observable as a function of one frame (global estimator) or of a
frame and a neighbourhood's atoms (localized estimator, with the neighbourhoods), and its
reference value, the mean over the training frames.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stablejax import geometry, observables, stability
from stablejax.data.topology import System
from stablejax.estimator import neighbourhood_membership
from stablejax.training.stable import ObservableTarget


def _oh_bonds_by_molecule(species, bonds, mol) -> np.ndarray:
    """[n_molecules, 2] indices into the O-H bond list: each water's first and second O-H
    bond, in the order of its hydrogens (O,H,H order gives the reference's bond order)."""
    z = np.asarray(species)
    zb = np.sort(z[bonds], axis=1)
    mol = np.asarray(mol)
    oh = bonds[(zb[:, 0] == 1) & (zb[:, 1] == 8) & (mol[bonds[:, 0]] == mol[bonds[:, 1]])]
    if len(oh) == 0:
        raise ValueError("the O-H bond-length observables need O-H bonds; the system has none")
    hydrogen = np.where(z[oh[:, 0]] == 1, oh[:, 0], oh[:, 1])
    molecule = np.asarray(mol)[oh[:, 0]]
    slots = []
    for m in np.unique(mol):
        rows = np.flatnonzero(molecule == m)
        rows = rows[np.argsort(hydrogen[rows])]
        if len(rows) != 2:
            raise ValueError(
                f"molecule {m} has {len(rows)} O-H bonds; the per-bond observable needs water"
            )
        slots.append(rows)
    return oh, np.asarray(slots)


def _neighbourhoods_fn(config, mol):
    """Per-frame neighbourhoods of the localized estimator: molecule m plus its
    `stable.local_k_nearest` nearest molecules (static when k = 0)."""
    k = int(config.stable.local_k_nearest)
    n_mol = int(mol.max()) + 1
    if k:

        def neighbourhoods(x, frame_box):
            # Minimum image in this frame's box; molecule centres are first atoms.
            return neighbourhood_membership(x, mol, box=frame_box, k_nearest=k, num_molecules=n_mol)

        return neighbourhoods
    single = jnp.asarray(mol[None, :] == np.arange(n_mol)[:, None])
    return lambda x, frame_box: single


def min_intermolecular_target(config, system: System, positions) -> ObservableTarget:
    """Closest intermolecular atom pair d (Å): of the frame (global) or among the
    neighbourhood's molecules (local; needs stable.local_k_nearest >= 1). The reference is
    the training frames' mean, computed with the same neighbourhoods."""
    return _closest_contact_target(config, system, positions, shortfall=False)


def contact_shortfall_target(config, system: System, positions) -> ObservableTarget:
    """One-sided close-contact observable s = max(0, d_ref - d) (Å), with d the closest
    intermolecular atom pair (as in `min_intermolecular_target`) and d_ref the training
    frames' mean of d over the same frames or neighbourhoods. Its reference is the training
    frames' mean of s. No free parameter; a collision can only raise s, so the loss
    gradient always asks for fewer close contacts (the two-sided d also moves when
    molecules drift apart, and a stratified sample's mean of d can sit at d_ref while
    molecules collide)."""
    return _closest_contact_target(config, system, positions, shortfall=True)


def _closest_contact_target(config, system: System, positions, *, shortfall: bool):
    name = "contact_shortfall" if shortfall else "min_intermolecular_distance"
    label = "close-contact shortfall" if shortfall else "min intermolecular distance"
    mol = system.molecules
    if mol is None or len(np.unique(mol)) < 2:
        raise ValueError(f"observable {name!r} needs several molecules")
    mol = np.asarray(mol)
    box = system.box
    pairs = stability.intermolecular_pairs(mol)
    i, j = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])

    def pair_distances(x):
        return geometry.pair_distances(x, i, j, box)

    def closest(x):
        return jnp.min(pair_distances(x)).reshape(1)

    positions = jnp.asarray(positions)
    if config.stable.estimator != "local":
        closest_fn, neighbourhoods, axes = closest, None, (0,)
        d = np.asarray(jax.jit(jax.vmap(closest))(positions))  # [m, 1]
    else:
        if int(config.stable.local_k_nearest) < 1:
            raise ValueError(
                f"config.stable.local_k_nearest: the local {name!r} observable needs "
                "neighbourhoods of several molecules (>= 1)"
            )

        def closest_fn(x, member_mask):
            inside = member_mask[i] & member_mask[j]
            return jnp.min(jnp.where(inside, pair_distances(x), jnp.inf)).reshape(1)

        neighbourhoods = _neighbourhoods_fn(config, mol)
        frame_box = None if box is None else jnp.asarray(box)

        def per_frame(x):
            members = neighbourhoods(x, frame_box)
            return jax.vmap(closest_fn, in_axes=(None, 0))(x, members)

        d = np.asarray(jax.jit(jax.vmap(per_frame))(positions))  # [m, n_neighbourhoods, 1]
        axes = (0, 1)
    fn = closest_fn
    if shortfall:
        d_ref = d.mean(axis=axes)
        d = np.maximum(d_ref - d, 0.0)
        d_ref = jnp.asarray(d_ref)

        def fn(*args):
            return jnp.maximum(d_ref - closest_fn(*args), 0.0)

    which = "observable_fn" if neighbourhoods is None else "local_observable_fn"
    return ObservableTarget(label, d.mean(axis=axes), **{which: fn}, neighbourhoods=neighbourhoods)


def distance_histogram_target(config, system: System, positions) -> ObservableTarget:
    """h(r) of all atom pairs (1/Å), global estimator; reference: the frames' mean."""
    o, box = config.observable, system.box

    def fn(x):
        return observables.distance_histogram(x, r_max=o.r_max, dr=o.dr, sigma=o.sigma, box=box)

    ref = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(positions))).mean(axis=0)
    return ObservableTarget("h(r)", ref, observable_fn=fn)


def rdf_target(config, system: System, positions) -> ObservableTarget:
    """The radial distribution function g(r) of all atoms, global estimator."""
    o, box = config.observable, system.box

    def fn(x):
        return observables.radial_distribution_function(
            x, None, box, pair=None, r_max=o.r_max, dr=o.dr, sigma=o.sigma
        )

    ref = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(positions))).mean(axis=0)
    return ObservableTarget("g(r)", ref, observable_fn=fn)


def oh_bond_length_target(config, system: System, positions) -> ObservableTarget:
    """Mean O-H bond length (Å) of the frame (global) or of the neighbourhood's
    molecules (local)."""
    return _oh_target(config, system, positions, per_bond=False)


def oh_bond_lengths_target(config, system: System, positions) -> ObservableTarget:
    """The two O-H bond lengths (Å) of a water, [first, second] in hydrogen order: per
    neighbourhood the mean over its molecules of each slot (k = 0: exactly the molecule's
    two bonds, as in the reference code); globally the mean over all molecules of each
    slot."""
    return _oh_target(config, system, positions, per_bond=True)


def _oh_target(config, system: System, positions, *, per_bond: bool) -> ObservableTarget:
    name = "oh_bond_lengths" if per_bond else "oh_bond_length"
    mol, box, bonds = system.molecules, system.box, system.bonds
    if mol is None:
        raise ValueError(f"observable {name!r} needs the molecules of the system")
    mol = np.asarray(mol)
    oh, slots = _oh_bonds_by_molecule(system.species, bonds, mol)
    lengths = np.asarray(observables.bond_lengths(jnp.asarray(positions), oh, box))
    if per_bond:
        ref = lengths[:, slots].mean(axis=(0, 1))  # [2]: mean first and second bond
        name = "O-H bond lengths"
    else:
        ref = np.asarray(lengths.mean()).reshape(1)
        name = "O-H bond length"
    slots_j = jnp.asarray(slots)
    # A bond belongs to a neighbourhood when its oxygen does (the molecule of each slot
    # row of `slots` is that row's molecule).
    z = np.asarray(system.species)
    bond_atom = jnp.asarray(np.where(z[oh[:, 0]] == 8, oh[:, 0], oh[:, 1]))

    if config.stable.estimator != "local":

        def fn(x):
            b = observables.bond_lengths(x, oh, box)
            return b[slots_j].mean(axis=0) if per_bond else jnp.mean(b).reshape(1)

        return ObservableTarget(name, ref, observable_fn=fn)

    def local_fn(x, member_mask):
        b = observables.bond_lengths(x, oh, box)
        if per_bond:
            w = member_mask[bond_atom[slots_j[:, 0]]].astype(b.dtype)  # [n_mol]
            return jnp.sum(w[:, None] * b[slots_j], axis=0) / jnp.maximum(jnp.sum(w), 1.0)
        w = member_mask[bond_atom].astype(b.dtype)
        return (jnp.sum(w * b) / jnp.maximum(jnp.sum(w), 1.0)).reshape(1)

    neighbourhoods = _neighbourhoods_fn(config, mol)
    return ObservableTarget(name, ref, local_observable_fn=local_fn, neighbourhoods=neighbourhoods)


# The training observables by name: `config.observable.name` is validated against these
# keys and dispatched through them (a new observable: one builder here plus its test).
TARGETS = {
    "distance_histogram": distance_histogram_target,
    "rdf": rdf_target,
    "oh_bond_length": oh_bond_length_target,
    "oh_bond_lengths": oh_bond_lengths_target,
    "min_intermolecular_distance": min_intermolecular_target,
    "contact_shortfall": contact_shortfall_target,
}


def make_target(config, system: System, positions) -> ObservableTarget:
    """The training observable `config.observable.name` and its reference (the mean over
    `positions` [m, n, 3] Å, the training frames).

    Args:
      config: the experiment config (reads `observable.*` and `stable.estimator`,
        `stable.local_k_nearest`).
      system: `stablejax.data.System` (species, box, bonds, molecule ids).
      positions: [m, n, 3] Å frames the reference is averaged over.
    """
    name = config.observable.name
    if name not in TARGETS:
        raise ValueError(
            f"config.observable.name: unknown {name!r}; choose one of {tuple(TARGETS)}"
        )
    return TARGETS[name](config, system, positions)
