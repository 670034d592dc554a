"""Periodic cells narrower than twice the cutoff: edges with integer image shifts (float64).

Each check compares the small cell (edges [5, e] with lattice shifts) with an
independent reference: ASE's neighbour list, or the same computation on a
supercell wide enough for minimum-image [2, e] edges (energy per copy, forces
and per-atom energies of copy 0; MD positions of copy 0; RDF counts).
"""

from __future__ import annotations

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import neighbor_list
from test_md_common import make_lj

from stablejax import geometry, md, observables
from stablejax.md import neighbors as md_neighbors
from stablejax.potentials import factory
from stablejax.potentials.base import edge_vectors

TRICLINIC = np.array([[3.2, 0.0, 0.0], [1.1, 3.4, 0.0], [-0.6, 0.8, 3.6]])  # widths ~3 Å
ORTHO = np.array([2.9, 3.6, 4.0])
CUTOFF = 3.0  # Å: more than half of every width, more than some widths (self-images)


def supercell(positions, box, reps):
    """(positions [M n, 3] with copy 0 first, supercell box, M) of a cell repeated reps times."""
    cell = geometry.cell_matrix(box)
    offsets = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1)
    offsets = offsets.reshape(-1, 3)  # (0, 0, 0) first
    big = np.concatenate([positions + o @ cell for o in offsets])
    big_box = np.asarray(box) * reps if np.ndim(box) == 1 else cell * np.asarray(reps)[:, None]
    return big, big_box, len(offsets)


def reps_for(box, radius):
    """Smallest repeats giving every supercell width more than 2 radius."""
    return np.floor(2.0 * radius / geometry.perpendicular_widths(box)).astype(int) + 1


def random_positions(box, n, *, min_dist, seed):
    """n atoms in the cell, no two images (self-images included) closer than min_dist."""
    rng = np.random.default_rng(seed)
    cell = geometry.cell_matrix(box)
    while True:
        x = rng.uniform(size=(n, 3)) @ cell
        if geometry.image_edges_np(x, box, min_dist).shape[1] == 0:
            # Unwrapped input: shifts must refer to the positions as given.
            return x + rng.integers(-2, 3, size=(n, 3)) @ cell


# ------------------------------------------------------------------- edge builders


def test_image_edges_match_ase_neighbor_list():
    x = random_positions(TRICLINIC, 5, min_dist=0.8, seed=0)
    atoms = ase.Atoms("Ar5", positions=x, cell=TRICLINIC, pbc=True)
    shifts_seen = set()
    for cutoff in (1.4, 4.5, 7.0):  # below half, above the widths, several shells
        edges = geometry.image_edges_np(x, TRICLINIC, cutoff)
        assert edges.shape[0] == 5 and edges.dtype == np.int32
        i, j, s = neighbor_list("ijS", atoms, cutoff)
        expected = set(zip(i.tolist(), j.tolist(), *s.T.tolist(), strict=True))
        got = {tuple(e) for e in edges.T.tolist()}
        assert got == expected and len(got) == edges.shape[1]
        shifts_seen |= {e[2:] for e in got if e[0] == e[1]}
        # The jittable builder gives the same list, padded, with an overflow count.
        shifts = geometry.image_shifts(TRICLINIC, cutoff)
        build = jax.jit(
            lambda pos, b: geometry.image_edges(pos, b, cutoff, shifts, edges.shape[1] + 4)  # noqa: B023
        )
        jedges, count = build(jnp.asarray(x), jnp.asarray(TRICLINIC))
        assert int(count) == edges.shape[1]
        np.testing.assert_array_equal(np.asarray(jedges)[:, : edges.shape[1]], edges)
        np.testing.assert_array_equal(
            np.asarray(jedges)[:, edges.shape[1] :].T, [[5, 5, 0, 0, 0]] * 4
        )
        small, count = geometry.image_edges(x, TRICLINIC, cutoff, shifts, 3)
        assert int(count) == edges.shape[1] > 3  # overflow is reported
        # Vectors of the edges are the ASE distance vectors.
        d, mask = edge_vectors(jnp.asarray(x), jnp.asarray(edges), jnp.asarray(TRICLINIC))
        assert bool(jnp.all(mask))
        ase_d = dict(
            zip(zip(i, j, *s.T, strict=True), neighbor_list("D", atoms, cutoff), strict=True)
        )
        ref = np.array([ase_d[tuple(e)] for e in edges.T])
        np.testing.assert_allclose(np.asarray(d), ref, atol=1e-12)
    assert shifts_seen  # self-images occurred
    # Below half the width the same pairs as the minimum-image list.
    e2 = geometry.cutoff_edges_np(x, 1.4, TRICLINIC)
    e5 = geometry.image_edges_np(x, TRICLINIC, 1.4)
    assert {tuple(e) for e in e2.T.tolist()} == {tuple(e) for e in e5[:2].T.tolist()}


def test_edge_vectors_validate_shifted_edges():
    x = jnp.zeros((2, 3))
    edges = jnp.array([[0, 0, 2], [0, 1, 2], [1, 0, 0], [0, 0, 0], [0, 0, 0]], jnp.int32)
    d, mask = edge_vectors(x, edges, jnp.array([2.0, 3.0, 4.0]))
    assert mask.tolist() == [True, True, False]  # self-image valid, padding not
    np.testing.assert_allclose(np.asarray(d[0]), [2.0, 0, 0])
    with pytest.raises(ValueError, match="need a periodic box"):
        edge_vectors(x, edges, None)
    with pytest.raises(ValueError, match=r"\[2, e\] or \[5, e\]"):
        edge_vectors(x, edges[:3], jnp.ones(3))


# ------------------------------------------------------------------- potentials


def _lennard_jones():
    config = factory.default_config("lennard_jones")
    config.sigma, config.epsilon, config.cutoff, config.shift = 1.5, 0.2, CUTOFF, True
    potential = factory.build(config)
    return potential, potential.init(None, None, np.zeros((1, 3)), None)


def _schnet():
    config = factory.default_config("schnet")
    config.species = [1, 8]
    config.cutoff = CUTOFF
    config.n_interactions = 2
    config.hidden_features = 8
    config.n_filters = 8
    config.head_features = 8
    config.n_gaussians = 8
    potential = factory.build(config)
    params = potential.init(jax.random.key(0), np.array([8, 1]), np.eye(2, 3), None)
    params = dict(params, energy_shift=jnp.array([-0.3, -1.2]), energy_scale=jnp.asarray(4.0))
    return potential, params


def _gemnet():
    config = factory.default_config("gemnet_t")
    config.species = [1, 8]
    config.cutoff = CUTOFF
    config.max_neighbors = 30  # no truncation in either description (~10 neighbours)
    config.num_blocks = 1
    config.num_atom = 1
    config.num_radial = 4
    config.num_spherical = 3
    for name in ("emb_size_atom", "emb_size_edge", "emb_size_trip", "emb_size_bil_trip"):
        config[name] = 8
    config.emb_size_rbf = config.emb_size_cbf = 4
    potential = factory.build(config)
    params = potential.init(jax.random.key(1), np.array([8, 1]), np.eye(2, 3), None)
    params = dict(params, energy_scale=jnp.asarray(3.0))
    return potential, params


@pytest.mark.parametrize(
    "model, box",
    [
        ("lennard_jones", ORTHO),
        ("lennard_jones", TRICLINIC),
        ("schnet", ORTHO),
        ("schnet", TRICLINIC),
        ("gemnet_t", TRICLINIC),  # shift-aware reverse edges
    ],
    ids=["lj-ortho", "lj-triclinic", "schnet-ortho", "schnet-triclinic", "gemnet-triclinic"],
)
def test_small_cell_equals_supercell(model, box):
    potential, params = {"lennard_jones": _lennard_jones, "schnet": _schnet, "gemnet_t": _gemnet}[
        model
    ]()
    n = 3
    x = random_positions(box, n, min_dist=1.3, seed=3)
    species = np.array([8, 1, 1])
    assert not geometry.cutoff_fits_cell(CUTOFF, box)
    assert geometry.perpendicular_widths(box).min() < CUTOFF  # atoms see their own images
    edges = geometry.image_edges_np(x, box, CUTOFF + 0.3)  # a list radius with skin
    edges = np.concatenate([edges, np.tile([[n], [n], [0], [0], [0]], 7)], axis=1)  # padding

    big, big_box, m = supercell(x, box, reps_for(box, CUTOFF + 0.3))
    assert m > 1 and geometry.cutoff_fits_cell(CUTOFF + 0.3, big_box)
    big_species = np.tile(species, m)
    big_edges = geometry.cutoff_edges_np(big, CUTOFF + 0.3, big_box)
    assert big_edges.shape[0] == 2

    @jax.jit
    def run(p, z, pos, e, b):
        energy, forces = potential.energy_and_forces(p, z, pos, e, b)
        return energy, forces, potential.per_atom_energies(p, z, pos, e, b)

    e_s, f_s, a_s = run(params, species, x, edges, jnp.asarray(box))
    e_b, f_b, a_b = run(params, big_species, big, big_edges, jnp.asarray(big_box))
    assert abs(float(e_s)) > 1e-3 and float(jnp.max(jnp.abs(f_s))) > 1e-3
    np.testing.assert_allclose(float(e_s), float(e_b) / m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(f_s), np.asarray(f_b)[:n], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(a_s), np.asarray(a_b)[:n], rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------- MD


def test_md_small_cell_equals_supercell_with_overflow(monkeypatch):
    """8 LJ atoms in a 6 Å box, cutoff 5 Å: NVE equals the 2x2x2 supercell's copy 0."""
    # Exact initial capacity: a later rebuild with more pairs overflows, is caught,
    # the capacity grows and the chunk is redone.
    monkeypatch.setattr(md_neighbors, "IMAGE_CAPACITY_MULTIPLIER", 1.0)
    # A simple-cubic start (spacing 3 Å) has 48 pairs at 6.0 Å, just outside the list
    # radius 5.9 Å: thermal motion brings some inside before the first rebuild.
    side, cutoff, skin = 6.0, 5.0, 0.9
    box = np.full(3, side)
    params = {"sigma": 2.3, "epsilon": 0.02}
    rng = np.random.default_rng(11)
    g = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = (g + 0.25) * 3.0 + 0.02 * rng.normal(size=(8, 3))
    v = 0.02 * rng.normal(size=(8, 3))  # Å per ASE time unit (~ 200 K for argon)
    v -= v.mean(0)
    big, big_box, m = supercell(x, box, (2, 2, 2))

    def simulate(pos, vel, b):
        sim = md.Simulator(
            make_lj(cutoff),
            species=np.full(len(pos), 18),
            box=b,
            integrator=md.NVE(dt_fs=4.0),
            cutoff=cutoff,
            skin=skin,
            chunk_steps=50,
        )
        state = sim.init(jax.random.PRNGKey(0), params, pos, 0.0, velocities=vel[None])
        e0 = sim.conserved_energy(state)
        edges0 = state.neighbors.edges
        state, traj = sim.run(params, state, 200, record_every=10)
        return sim, edges0, state, traj, e0

    sim_s, edges_s, state_s, traj_s, e0_s = simulate(x, v, box)
    sim_b, edges_b, _, traj_b, e0_b = simulate(big, np.tile(v, (m, 1)), big_box)
    assert edges_s.shape[1] == 5 and edges_b.shape[1] == 2  # image shifts vs jax-md
    assert isinstance(sim_s._layout, md_neighbors.ImageLayout)
    assert sim_s.num_reallocations >= 1  # overflow detected and the chunk redone
    assert state_s.neighbors.edges.shape[-1] > edges_s.shape[-1]
    assert not np.any(np.asarray(state_s.neighbors.error))
    moved = np.abs(traj_s.position[0, -1] - x).max()
    assert moved > 0.2  # atoms moved (lists were rebuilt)
    np.testing.assert_allclose(traj_s.position[0], traj_b.position[0][:, :8], rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        traj_s.potential_energy[0], traj_b.potential_energy[0] / m, rtol=1e-9, atol=1e-12
    )
    total = traj_s.potential_energy[0] + traj_s.kinetic_energy[0]
    assert np.abs(total - float(e0_s[0])).max() < 2e-3 * np.abs(traj_s.kinetic_energy[0]).mean()


def test_npt_refuses_a_cell_too_small_for_the_cutoff():
    with pytest.raises(ValueError, match="fixed cells only"):
        md.Simulator(
            make_lj(5.0),
            species=np.full(8, 18),
            box=np.full(3, 6.0),
            integrator=md.BerendsenNPT(),
            cutoff=5.0,
        )


# ---------------------------------------------------------------------- observables


def test_rdf_of_a_small_cell_equals_the_supercell():
    n = 6
    species = np.where(np.arange(n) % 3 == 0, 8, 1)
    frames = np.stack([random_positions(TRICLINIC, n, min_dist=0.7, seed=s) for s in (5, 6)])
    r_max, dr, sigma = 3.3, 0.05, 0.03  # beyond the shortest lattice vector (3.2 Å)
    reps = reps_for(TRICLINIC, r_max + 6 * sigma)
    big = []
    for f in frames:
        b, big_box, m = supercell(f, TRICLINIC, reps)
        big.append(b)
    big = np.stack(big)
    big_species = np.tile(species, m)
    kw = dict(r_max=r_max, dr=dr, sigma=sigma)

    def rdf(x, z, b, pair, **kw):
        # Concrete species and box, closed over; one compiled call per RDF.
        return jax.jit(
            lambda x: observables.radial_distribution_function(x, z, b, pair=pair, **kw)
        )(x)

    # Unlike pairs: the same g(r).
    g_s = rdf(frames, species, TRICLINIC, (8, 1), **kw)
    g_b = rdf(big, big_species, big_box, (8, 1), **kw)
    assert float(jnp.max(g_s)) > 0.5
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(g_b), rtol=1e-9, atol=1e-10)
    # Like pairs (all atoms): equal counts; the normaliser N (N - 1) differs.
    n_big = n * m
    g_s = rdf(frames, None, TRICLINIC, None, **kw)
    g_b = rdf(big, None, big_box, None, **kw)
    np.testing.assert_allclose(
        np.asarray(g_s) * (n - 1) / n,
        np.asarray(g_b) * (n_big - 1) / n_big,
        rtol=1e-9,
        atol=1e-10,
    )
    # Bins below half the width are those of a minimum-image RDF (smaller r_max).
    half = 0.5 * geometry.perpendicular_widths(TRICLINIC).min()
    k = int((half - 6 * sigma) / dr) - 1
    g_mi = rdf(frames, None, TRICLINIC, None, r_max=k * dr, dr=dr, sigma=sigma)
    np.testing.assert_allclose(np.asarray(g_s)[:, :k], np.asarray(g_mi), rtol=1e-10, atol=1e-12)
