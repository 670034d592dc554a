"""Tests of the pair potentials against plain NumPy and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax.potentials import factory, pair
from stablejax.potentials.base import all_pairs_edges
from stablejax.potentials.testing import check_cutoff_smoothness, check_padding

BOX = np.array([9.0, 9.5, 10.0])  # Å
SIGMA, EPSILON, CUTOFF = 3.0, 0.01, 4.5  # Å, eV, Å


def random_fluid(n=10, seed=0, box=BOX, min_dist=2.6):
    """Random positions [n, 3] Å in the box without close overlaps (rejection)."""
    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n:
        x = rng.uniform(0, 1, 3) * box
        d = np.array([p - x for p in pos]).reshape(-1, 3)
        d -= box * np.round(d / box)
        if np.all(np.linalg.norm(d, axis=1) > min_dist):
            pos.append(x)
    return np.array(pos)


def numpy_pair_distances(pos, box):
    d = pos[None, :, :] - pos[:, None, :]
    if box is not None:
        d -= box * np.round(d / box)
    r = np.linalg.norm(d, axis=-1)
    np.fill_diagonal(r, np.inf)
    return r


def numpy_lj_per_atom(pos, box, sigma, eps, cutoff, shift=True):
    r = numpy_pair_distances(pos, box)
    lj = lambda x: 4 * eps * ((sigma / x) ** 12 - (sigma / x) ** 6)
    phi = np.where(r < cutoff, lj(r) - (lj(cutoff) if shift else 0.0), 0.0)
    return 0.5 * phi.sum(axis=1)


def lj_config(**kw):
    c = pair.default_config("lennard_jones")
    c.sigma, c.epsilon, c.cutoff = SIGMA, EPSILON, CUTOFF
    c.update(kw)
    return c


@pytest.mark.parametrize("box", [BOX, None])
@pytest.mark.parametrize("shift", [True, False])
def test_lennard_jones_matches_numpy(box, shift):
    pos = random_fluid(seed=1)
    pot = factory.build(lj_config(shift=shift))
    params = pot.init(jax.random.PRNGKey(0), np.ones(10, int), pos, box)
    e = pot.per_atom_energies(params, None, jnp.asarray(pos), all_pairs_edges(10), box)
    expected = numpy_lj_per_atom(pos, box, SIGMA, EPSILON, CUTOFF, shift)
    r = numpy_pair_distances(pos, box)
    assert np.any(r < CUTOFF) and np.any(np.isfinite(r) & (r > CUTOFF))  # both kinds present
    np.testing.assert_allclose(e, expected, rtol=1e-12, atol=1e-15)


def test_lennard_jones_parameter_gradients_match_finite_differences():
    pos = jnp.asarray(random_fluid(seed=2))
    n = pos.shape[0]
    pot = pair.build(lj_config())
    # Padded edges and edges beyond the cutoff are present: both must be harmless.
    edges = np.concatenate([all_pairs_edges(n), np.full((2, 5), n, np.int32)], axis=1)
    params = {"sigma": jnp.asarray(SIGMA), "epsilon": jnp.asarray(EPSILON)}
    energy = jax.jit(lambda p: pot.energy(p, None, pos, edges, BOX))
    g = jax.grad(energy)(params)
    assert all(np.isfinite(v) for v in jax.tree.leaves(g))
    for key, h in (("sigma", 1e-5), ("epsilon", 1e-8)):
        up = dict(params, **{key: params[key] + h})
        down = dict(params, **{key: params[key] - h})
        fd = (energy(up) - energy(down)) / (2 * h)
        np.testing.assert_allclose(g[key], fd, rtol=1e-7)
        assert abs(g[key]) > 0
    # epsilon enters linearly: dE/deps = E / eps exactly.
    np.testing.assert_allclose(g["epsilon"], energy(params) / EPSILON, rtol=1e-12)


def test_lennard_jones_gradient_finite_for_coincident_padding_and_self_edges():
    """Self edges (i == i) and padded edges have r = 0 or dummy values: no NaN anywhere."""
    pos = jnp.asarray(random_fluid(n=4, seed=3))
    pot = pair.build(lj_config())
    edges = np.array([[0, 1, 2, 2, 4], [1, 0, 2, 3, 4]], np.int32)  # (2,2) self, (4,4) pad
    params = {"sigma": jnp.asarray(SIGMA), "epsilon": jnp.asarray(EPSILON)}
    g = jax.grad(lambda p, x: pot.energy(p, None, x, edges, BOX), argnums=(0, 1))(params, pos)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g))


def small_mlp_config(prior="repulsive", **kw):
    c = pair.default_config("pair_mlp")
    c.cutoff = CUTOFF
    c.hidden_sizes = (16, 16)
    c.zero_init_output = False
    c.prior = prior
    c.prior_sigma, c.prior_epsilon = SIGMA, EPSILON
    c.energy_scale = 0.01
    c.update(kw)
    return c


def numpy_mlp_phi(params, r, config):
    """Independent NumPy forward pass of phi(r) for a pair-MLP config."""
    p = jax.tree.map(np.asarray, params)["params"]
    silu = lambda x: x / (1 + np.exp(-x))
    inside = r < config.cutoff
    h = np.where(inside, r, 0.0)[:, None] / config.cutoff
    layers = [p["hidden"][f"dense_{k}"] for k in range(len(config.hidden_sizes))] + [p["out"]]
    for k, layer in enumerate(layers):
        h = h @ layer["kernel"] + layer["bias"]
        if k < len(layers) - 1:
            h = silu(h)
    env = 0.5 * (np.cos(np.pi * np.minimum(r, config.cutoff) / config.cutoff) + 1)
    learned = np.where(inside, config.energy_scale * env * h[:, 0], 0.0)
    s, e, rc = config.prior_sigma, config.prior_epsilon, config.cutoff
    prior = np.where(inside, 4 * e * ((s / np.where(inside, r, rc)) ** 12 - (s / rc) ** 12), 0.0)
    return learned + prior


def test_pair_mlp_matches_numpy_and_padding_invariant():
    pos = random_fluid(seed=4)
    n = pos.shape[0]
    config = small_mlp_config()
    pot = factory.build(config)
    params = pot.init(jax.random.PRNGKey(1), np.ones(n, int), jnp.asarray(pos), BOX)
    e = pot.per_atom_energies(params, None, jnp.asarray(pos), all_pairs_edges(n), BOX)
    r = numpy_pair_distances(pos, BOX)
    phi = numpy_mlp_phi(params, r.reshape(-1), config).reshape(n, n)
    phi[~np.isfinite(r)] = 0.0
    np.testing.assert_allclose(e, 0.5 * phi.sum(axis=1), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        pair.pair_mlp_phi(config)(params, r[0, 1:]), phi[0, 1:], rtol=1e-10, atol=1e-14
    )
    check_padding(
        pot, params, np.ones(n, int), jnp.asarray(pos), all_pairs_edges(n), BOX, atol=1e-12
    )


def test_lennard_jones_padding_invariant():
    pos = jnp.asarray(random_fluid(seed=5))
    pot = pair.build(lj_config())
    params = pot.init(None, None, pos, BOX)
    check_padding(pot, params, np.ones(10, int), pos, all_pairs_edges(10), BOX, atol=1e-14)


def test_pair_mlp_zero_init_is_the_prior_and_smooth_at_cutoff():
    pos = random_fluid(n=6, seed=6)
    n = pos.shape[0]
    for prior, reference in (
        ("lennard_jones", lambda p: numpy_lj_per_atom(p, BOX, SIGMA, EPSILON, CUTOFF)),
        ("none", lambda p: np.zeros(len(p))),
    ):
        config = small_mlp_config(prior=prior, zero_init_output=True)
        pot = pair.build(config)
        params = pot.init(jax.random.PRNGKey(2), None, jnp.asarray(pos), BOX)
        e = pot.per_atom_energies(params, None, jnp.asarray(pos), all_pairs_edges(n), BOX)
        np.testing.assert_allclose(e, reference(pos), rtol=1e-12, atol=1e-15)
    # Learned term only (cosine envelope, C1): energy and forces continuous at the cutoff.
    config = small_mlp_config(prior="none", energy_scale=1.0)
    pot = pair.build(config)
    params = pot.init(jax.random.PRNGKey(3), None, jnp.asarray(pos), BOX)
    species = np.ones(n, int)
    check_cutoff_smoothness(
        pot, params, species, pos, moving_atom=1, anchor_atom=0, box=BOX,
        energy_atol=1e-8, force_atol=1e-3,
    )  # fmt: skip


def test_wca_prior_is_repulsive_and_continuous():
    r = jnp.linspace(2.5, 4.0, 301)
    phi = pair.wca_pair(r, sigma=SIGMA, epsilon=EPSILON)
    r_min = 2 ** (1 / 6) * SIGMA
    lj = 4 * EPSILON * ((SIGMA / r) ** 12 - (SIGMA / r) ** 6) + EPSILON
    np.testing.assert_allclose(phi, np.where(r < r_min, lj, 0.0), rtol=1e-12, atol=1e-16)
    assert np.all(np.asarray(phi) >= 0) and np.all(np.diff(np.asarray(phi)) <= 0)


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown pair potential"):
        pair.default_config("morse")
    c = pair.default_config("pair_mlp")
    c.prior = "coulomb"
    with pytest.raises(ValueError, match="prior"):
        pair.build(c)
    c = pair.default_config("lennard_jones")
    c.cutoff = -1.0
    with pytest.raises(ValueError, match="cutoff"):
        pair.build(c)
