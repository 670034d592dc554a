"""GemNet-T: triplet layout against plain NumPy, truncation/overflow, symmetry and smoothness.

Property checks use `stablejax.potentials.testing` on a real aspirin frame
(MD17 DFT) and a small periodic water-like box, with a reduced-size config;
the full-size config is checked by its parameter count (no forward pass).
"""

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax.potentials import factory, testing
from stablejax.potentials import gemnet_t as g
from stablejax.potentials.base import all_pairs_edges, edge_vectors

ASPIRIN = "/work/shared/data/aspirin_md17_dft_frames.xyz"


def small_config(**overrides):
    """Reduced sizes (one block) so that the suite compiles quickly on a CPU."""
    c = factory.default_config("gemnet_t")
    c.num_blocks = 1
    c.num_atom = 1
    c.num_radial = 4
    c.num_spherical = 4
    c.emb_size_atom = 16
    c.emb_size_edge = 16
    c.emb_size_trip = 8
    c.emb_size_rbf = 4
    c.emb_size_cbf = 4
    c.emb_size_bil_trip = 8
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def aspirin():
    atoms = ase.io.read(ASPIRIN, 0)
    return np.asarray(atoms.numbers), np.asarray(atoms.positions, dtype=np.float64)


def init(potential, key, species, x, box=None):
    """Jitted init: eager (op-by-op) initialisation of GemNet is many times slower."""
    return jax.jit(potential.init)(key, species, jnp.asarray(x), box)


@pytest.fixture(scope="module")
def small(aspirin):
    species, x = aspirin
    potential = factory.build(small_config())
    return potential, init(potential, jax.random.key(0), species, x)


def water_box(n_side, spacing, seed=0):
    """n_side^3 rigid water molecules on a cubic lattice with random orientations."""
    rng = np.random.default_rng(seed)
    theta = np.deg2rad(104.5)
    mol = np.array(
        [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [0.96 * np.cos(theta), 0.96 * np.sin(theta), 0]]
    )
    xs, species = [], []
    for a in range(n_side):
        for b in range(n_side):
            for c in range(n_side):
                q, r = np.linalg.qr(rng.normal(size=(3, 3)))
                centre = (np.array([a, b, c]) + 0.5) * spacing + rng.uniform(-0.2, 0.2, 3)
                xs.append(centre + (mol - mol.mean(0)) @ (q * np.sign(np.diag(r))).T)
                species += [8, 1, 1]
    box = np.full(3, n_side * spacing)
    return np.array(species), np.concatenate(xs) % box, box


# --------------------------------------------------------------------------------------
# Size.
# --------------------------------------------------------------------------------------


def expected_parameter_count(c, n_species):
    """Independent count from the GemNet-T layer list (bias-free dense layers)."""
    a, e, t = c.emb_size_atom, c.emb_size_edge, c.emb_size_trip
    r, rbf, cbf, bil = c.num_radial, c.emb_size_rbf, c.emb_size_cbf, c.emb_size_bil_trip
    residual_edge = 2 * e * e
    shared = 3 * r * rbf + c.num_spherical * r * cbf  # rbf3, rbf_h, rbf_out; cbf3
    embedding = n_species * a + (2 * a + r) * e
    atom_mlp = rbf * e + e * a + c.num_atom * 2 * a * a
    triplet = e * e + rbf * e + e * t + t * cbf * bil + 2 * bil * e
    block = (
        e * e  # skip dense
        + triplet
        + (c.num_before_skip + c.num_after_skip) * residual_edge
        + atom_mlp
        + (2 * a + e) * e  # concat
        + c.num_concat * residual_edge
    )
    output = atom_mlp + a
    return shared + embedding + c.num_blocks * block + (c.num_blocks + 1) * output


def count_init_parameters(config, n_species, n_atoms=5):
    module = g.make_module(config, n_species)
    edges = all_pairs_edges(n_atoms)
    e = edges.shape[1]
    shapes = jax.eval_shape(
        module.init,
        jax.random.key(0),
        jnp.zeros(n_atoms, jnp.int32),
        jnp.ones((e, 3)),
        jnp.asarray(edges),
        jnp.ones(e, bool),
    )
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def test_full_size_parameter_count():
    c = g.default_config()
    assert (c.emb_size_atom, c.emb_size_edge, c.emb_size_trip) == (128, 128, 64)
    assert (c.num_blocks, c.num_radial, c.num_spherical, c.cutoff) == (4, 6, 7, 5.0)
    n4 = count_init_parameters(c, 4)
    assert n4 == expected_parameter_count(c, 4) == 1_880_896
    # OCP/MDsim (StABlE's GemNet-T) embed 83 elements: the paper's 1.89M.
    n83 = count_init_parameters(c, 83)
    assert n83 == 1_891_008
    assert abs(n83 - 1.89e6) / 1.89e6 < 1e-3
    # The layer list also predicts the OC20 variant (num_after_skip=2, num_atom=3).
    c.num_after_skip, c.num_atom = 2, 3
    assert count_init_parameters(c, 83) == expected_parameter_count(c, 83)


# --------------------------------------------------------------------------------------
# Triplets, truncation and overflow.
# --------------------------------------------------------------------------------------


def random_edge_list(rng, n, n_pad, drop_fraction):
    """Shuffled directed edges (both directions) with padding and a random mask."""
    x = rng.uniform(0.0, 4.0, size=(n, 3))
    edges = all_pairs_edges(n)
    edges = np.concatenate([edges, np.full((2, n_pad), n, np.int32)], axis=1)
    edges = edges[:, rng.permutation(edges.shape[1])]
    mask = (edges[0] < n) & (rng.uniform(size=edges.shape[1]) > drop_fraction)
    vectors, _ = edge_vectors(jnp.asarray(x), jnp.asarray(edges))
    return x, edges, mask, np.asarray(vectors)


def numpy_triplets(x, edges, mask, n, k):
    """Kept edges (k nearest valid per centre) and all ordered pairs sharing a centre."""
    kept = []
    for i in range(n):
        mine = np.nonzero(mask & (edges[0] == i))[0]
        d = np.linalg.norm(x[edges[1, mine]] - x[i], axis=1)
        kept += list(mine[np.argsort(d)][:k])
    kept = np.array(sorted(kept))
    pairs = {}
    for a in kept:
        for b in kept:
            if a != b and edges[0, a] == edges[0, b]:
                i, j, l = edges[0, a], edges[1, a], edges[1, b]
                u, v = x[j] - x[i], x[l] - x[i]
                pairs[(a, b)] = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    return kept, pairs


@pytest.mark.parametrize("max_neighbors", [3, 50])
def test_triplets_match_numpy_enumeration(max_neighbors):
    rng = np.random.default_rng(1)
    n = 9
    x, edges, mask, vectors = random_edge_list(rng, n, n_pad=11, drop_fraction=0.3)
    k = g.num_slots(n, max_neighbors)
    slots = jax.jit(g.neighbor_slots, static_argnames=("n_atoms", "max_neighbors"))(
        jnp.asarray(vectors),
        jnp.asarray(edges),
        jnp.asarray(mask),
        n_atoms=n,
        max_neighbors=max_neighbors,
    )
    cos, tmask = g.triplet_cosines(slots)
    assert cos.shape == tmask.shape == (n, k, k)
    kept, pairs = numpy_triplets(x, edges, mask, n, k)

    table = np.asarray(slots.edge_index)
    valid = np.asarray(slots.valid)
    np.testing.assert_array_equal(np.sort(table[valid]), kept)
    # Slots hold the right centre, neighbour and vector, nearest first.
    rows = np.nonzero(valid)[0]
    np.testing.assert_array_equal(edges[0, table[valid]], rows)
    np.testing.assert_array_equal(np.asarray(slots.neighbor)[valid], edges[1, table[valid]])
    np.testing.assert_allclose(np.asarray(slots.vectors)[valid], vectors[table[valid]])
    d = np.where(valid, np.linalg.norm(np.asarray(slots.vectors), axis=-1), 1e9)
    assert np.all(np.diff(d, axis=1) >= 0)

    ii, ss, tt = np.nonzero(np.asarray(tmask))
    got = {
        (table[i, s], table[i, t]): float(cos[i, s, t]) for i, s, t in zip(ii, ss, tt, strict=True)
    }
    assert set(got) == set(pairs)
    assert len(got) == len(ii)  # no triplet twice
    for key, value in pairs.items():
        assert abs(got[key] - value) < 1e-12

    # Reverse edges: slot (i, s) holding i->j points at j->i when j->i is kept.
    kept_set = {(edges[0, a], edges[1, a]): a for a in kept}
    for i, s in zip(*np.nonzero(valid), strict=True):
        j = edges[1, table[i, s]]
        rev = kept_set.get((j, i))
        assert bool(slots.has_reverse[i, s]) == (rev is not None)
        if rev is not None:
            assert table[j, slots.reverse_slot[i, s]] == rev


def test_triplet_and_neighbor_counts_and_overflow(aspirin):
    species, x = aspirin
    n = species.size
    cutoff = 5.0
    edges = all_pairs_edges(n)
    vectors, mask = edge_vectors(jnp.asarray(x), jnp.asarray(edges))
    mask = np.asarray(mask & (jnp.linalg.norm(vectors, axis=1) < cutoff))
    counts = np.bincount(edges[0][mask], minlength=n)
    np.testing.assert_array_equal(g.neighbor_counts(edges, mask, n), counts)
    assert g.count_triplets(edges, mask, n) == int(np.sum(counts * (counts - 1)))
    brute = sum(
        1
        for a in np.nonzero(mask)[0]
        for b in np.nonzero(mask)[0]
        if a != b and edges[0, a] == edges[0, b]
    )
    assert g.count_triplets(edges, mask, n) == brute
    most = int(counts.max())
    assert counts.min() < n - 1 and most > 3  # aspirin at 5 Å: some pairs beyond the cutoff

    overflow = jax.jit(g.neighbor_overflow, static_argnames=("n_atoms", "max_neighbors"))
    assert not bool(overflow(edges, mask, n_atoms=n, max_neighbors=most))
    assert bool(overflow(edges, mask, n_atoms=n, max_neighbors=most - 1))
    assert g.check_neighbor_capacity(edges, mask, n_atoms=n, max_neighbors=most) == most
    needed = jax.jit(g.max_neighbors_needed, static_argnames="cutoff")
    assert int(needed(jnp.asarray(x), edges, None, cutoff=cutoff)) == most
    with pytest.raises(ValueError, match=f"max_neighbors >= {most}"):
        g.check_neighbor_capacity(edges, mask, n_atoms=n, max_neighbors=most - 1)
    # Without overflow the static allocation holds every triplet.
    assert g.triplet_capacity(n, most) >= g.count_triplets(edges, mask, n)
    assert g.triplet_capacity(n, 50) == n * (n - 1) * (n - 2)  # K capped at n - 1


def test_truncation_equals_explicitly_pruned_graph(aspirin, small):
    """Over capacity, the model keeps each atom's nearest max_neighbors edges, no more."""
    species, x = aspirin
    n = species.size
    potential, params = small
    k = 5
    cfg = small_config(max_neighbors=k)
    truncated = factory.build(cfg)
    edges = all_pairs_edges(n)
    d = np.linalg.norm(x[edges[1]] - x[edges[0]], axis=1)
    keep = []
    for i in range(n):
        mine = np.nonzero((edges[0] == i) & (d < cfg.cutoff))[0]
        keep += list(mine[np.argsort(d[mine])][:k])
    pruned = edges[:, np.sort(keep)]
    assert np.any(~np.isin(np.arange(edges.shape[1]), keep) & (d < cfg.cutoff))
    x = jnp.asarray(x)
    e_trunc = jax.jit(truncated.per_atom_energies)(params, species, x, edges)
    e_pruned = jax.jit(potential.per_atom_energies)(params, species, x, pruned)
    e_full = jax.jit(potential.per_atom_energies)(params, species, x, edges)
    np.testing.assert_allclose(e_trunc, e_pruned, rtol=0, atol=1e-12)
    assert np.max(np.abs(e_trunc - e_full)) > 1e-6  # truncation is not a no-op


# --------------------------------------------------------------------------------------
# Physical properties (reduced-size model, float64).
# --------------------------------------------------------------------------------------


def test_params_follow_float64(small):
    _, params = small
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params))


def test_vmap_over_replicas(aspirin, small):
    """Replica-batched MD vmaps the energy: the sort-based slot packing must batch."""
    species, x = aspirin
    potential, params = small
    edges = all_pairs_edges(species.size)
    xs = jnp.asarray(x) + 0.05 * jax.random.normal(jax.random.key(3), (2,) + x.shape)
    per_atom = jax.jit(potential.per_atom_energies)
    batched = jax.jit(jax.vmap(potential.per_atom_energies, in_axes=(None, None, 0, None)))
    e = batched(params, species, xs, edges)
    for r in range(2):
        np.testing.assert_allclose(e[r], per_atom(params, species, xs[r], edges), atol=1e-12)


def test_invariances_aspirin(aspirin, small):
    species, x = aspirin
    potential, params = small
    out = testing.check_invariances(
        potential, params, species, x, all_pairs_edges(species.size), atol=1e-10
    )
    assert max(v for v in out.values() if isinstance(v, float)) < 1e-10


def test_padding_and_param_gradients(aspirin, small):
    species, x = aspirin
    potential, params = small
    # All pairs: aspirin has pairs beyond the 5 Å cutoff, so masked edges are exercised too.
    testing.check_padding(
        potential, params, species, x, all_pairs_edges(species.size), n_pad=13, atol=1e-10
    )


def pair_near_cutoff(species, x, cutoff):
    """(hydrogen, anchor) at the distance closest to the cutoff: moving it barely
    perturbs the molecule."""
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    hydrogens = np.nonzero(species == 1)[0]
    sub = np.abs(d[hydrogens] - cutoff)
    h, anchor = np.unravel_index(np.argmin(sub), sub.shape)
    return int(hydrogens[h]), int(anchor)


def test_smooth_at_cutoff(aspirin, small):
    species, x = aspirin
    potential, params = small
    moving, anchor = pair_near_cutoff(species, x, potential.cutoff)
    # Steps of 2e-4 Å: smooth force changes stay well below 1e-4 eV/Å per step.
    out = testing.check_cutoff_smoothness(
        potential,
        params,
        species,
        x,
        moving_atom=moving,
        anchor_atom=anchor,
        energy_atol=1e-10,
        force_atol=1e-4,
    )
    assert np.ptp(out["force_along"]) > 1e-4  # the scan does move a force-carrying atom


def test_smoothness_check_catches_missing_envelope(aspirin, small, monkeypatch):
    """Without the envelope the sine basis is only C0 at the cutoff: the check must fail."""
    species, x = aspirin
    _, params = small
    monkeypatch.setattr(g.common, "polynomial_envelope", lambda r, r_cut, p: jnp.ones_like(r))
    broken = factory.build(small_config())  # fresh closures: nothing cached from before
    moving, anchor = pair_near_cutoff(species, x, broken.cutoff)
    with pytest.raises(AssertionError, match="cutoff smoothness"):
        testing.check_cutoff_smoothness(
            broken,
            params,
            species,
            x,
            moving_atom=moving,
            anchor_atom=anchor,
            energy_atol=1e-10,
            force_atol=1e-4,
        )


def test_linear_triplets_finite_gradients(small):
    """cos(angle) = +-1 exactly (collinear atoms): forces and param grads stay finite."""
    species = np.array([8, 6, 8, 1])
    x = np.array([[-1.16, 0, 0], [0.0, 0, 0], [1.16, 0, 0], [2.5, 0, 0]])
    potential, params = small  # params do not depend on the number of atoms
    edges = np.concatenate([all_pairs_edges(4), np.full((2, 3), 4, np.int32)], axis=1)

    @jax.jit
    def energy_forces_grads(params, x):
        e, f = potential.energy_and_forces(params, species, x, edges)
        return e, f, jax.grad(potential.energy)(params, species, x, edges)

    e, f, grads = energy_forces_grads(params, jnp.asarray(x))
    assert np.isfinite(e) and np.all(np.isfinite(f))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(grads))
    np.testing.assert_allclose(f[:, 1:], 0.0, atol=1e-12)  # symmetry: forces on the axis


def test_nve_energy_conservation(aspirin, small):
    """Velocity Verlet's energy error of a smooth potential shrinks as dt^2."""
    species, x = aspirin
    potential, params = small
    drift = {}
    for dt_fs, n_steps in ((0.25, 100), (0.125, 200)):  # same 25 fs trajectory
        out = testing.check_nve_energy_conservation(
            potential,
            params,
            species,
            x,
            temperature_K=600.0,
            dt_fs=dt_fs,
            n_steps=n_steps,
            max_drift=1e-4,
        )
        drift[dt_fs] = out["max_deviation"]
        # The kinetic energy does exchange with the potential energy meanwhile.
        assert np.ptp(out["kinetic_energy"]) > 100 * out["max_deviation"]
    print(drift)
    assert 3.0 < drift[0.25] / drift[0.125] < 5.0


def test_periodic_water_box():
    # Sparse (8 molecules in 9 Å) so that one shell of images covers the receptive field.
    species, x, box = water_box(n_side=2, spacing=4.5)
    cutoff, blocks = 3.0, 1
    potential = factory.build(small_config(cutoff=cutoff, num_blocks=blocks, max_neighbors=24))
    params = init(potential, jax.random.key(2), species, x, box)
    edges = all_pairs_edges(species.size)
    # Periodic neighbour count against brute force over images (no truncation at 24).
    d = x[:, None] - x[None]
    d = np.linalg.norm(d - box * np.round(d / box), axis=-1)
    most = int(np.max(np.sum((d < cutoff) & (d > 0), axis=1)))
    assert 2 < most <= 24
    assert int(g.max_neighbors_needed(jnp.asarray(x), edges, box, cutoff=cutoff)) == most
    testing.check_invariances(potential, params, species, x, edges, box, atol=1e-10)
    # Edge messages reach one cutoff further per endpoint each block: (2B + 1) rc.
    testing.check_periodic_images(
        potential,
        params,
        species,
        x,
        box,
        receptive_field=(2 * blocks + 1) * cutoff,
        atol=1e-10,
        check_forces=False,
    )


@pytest.mark.slow
def test_full_size_invariances_and_padding(aspirin):
    species, x = aspirin
    potential = factory.build(factory.default_config("gemnet_t"))
    params = init(potential, jax.random.key(0), species, x)
    edges = all_pairs_edges(species.size)
    testing.check_invariances(potential, params, species, x, edges, atol=1e-9)
    testing.check_padding(potential, params, species, x, edges, atol=1e-9)
