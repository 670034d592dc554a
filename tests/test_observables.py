"""Observables against plain NumPy computations and known answers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax import observables as obs

RNG = np.random.default_rng(0)


def jitted(fn, *args, **kwargs):
    """Call fn(x, *args, **kwargs) under jit in x (one compile beats eager op dispatch)."""
    return lambda x: jax.jit(lambda y: fn(y, *args, **kwargs))(x)


def np_pair_distances(x, box=None, pairs=None):
    """Minimum-image distances by an explicit double loop."""
    n = len(x)
    if pairs is None:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    out = []
    for i, j in pairs:
        d = x[j] - x[i]
        if box is not None:
            for k in range(3):
                while d[k] > box[k] / 2:
                    d[k] -= box[k]
                while d[k] < -box[k] / 2:
                    d[k] += box[k]
        out.append(math.sqrt(d @ d))
    return np.array(out)


def np_smeared_counts(d, edges, sigma):
    """Gaussian mass of each distance in each bin, dense (no windowing)."""
    erf = np.vectorize(math.erf)
    s = math.sqrt(2) * sigma
    hi = erf((edges[None, 1:] - d[:, None]) / s)
    lo = erf((edges[None, :-1] - d[:, None]) / s)
    return (0.5 * (hi - lo)).sum(0)


def test_bin_centers_and_bad_grid():
    np.testing.assert_allclose(obs.bin_centers(1.0, 0.25), [0.125, 0.375, 0.625, 0.875])
    assert len(obs.bin_centers(10.0, 0.02)) == 500
    with pytest.raises(ValueError, match="multiple"):
        obs.bin_centers(1.0, 0.3)


@pytest.mark.parametrize("box", [None, np.array([7.0, 8.0, 9.0])])
def test_distance_histogram_matches_numpy(box):
    x = RNG.uniform(0, 7.0, size=(12, 3))
    r_max, dr, sigma = 3.5, 0.05, 0.03
    edges = obs.bin_edges(r_max, dr)
    d = np_pair_distances(x, box)
    h = jitted(obs.distance_histogram, r_max=r_max, dr=dr, sigma=sigma, box=box)(x)
    ref = np_smeared_counts(d, edges, sigma) / (len(d) * dr)
    np.testing.assert_allclose(h, ref, atol=1e-9)
    # unsmeared variant is exactly np.histogram as a density over all pairs
    h0 = jitted(obs.distance_histogram, r_max=r_max, dr=dr, sigma=0.0, box=box)(x)
    ref0 = np.histogram(d, bins=edges)[0] / (len(d) * dr)
    np.testing.assert_allclose(h0, ref0, atol=1e-12)


def test_distance_histogram_is_normalised_density_and_batched():
    frames = RNG.normal(scale=1.5, size=(3, 2, 9, 3))  # all distances well below 10 Å
    hist = jitted(obs.distance_histogram)  # paper settings: 0-10 Å, dr 0.02, sigma 0.01
    h = hist(frames)
    assert h.shape == (3, 2, 500)
    np.testing.assert_allclose(h.sum(-1) * 0.02, 1.0, atol=1e-8)
    np.testing.assert_allclose(h[1, 0], hist(frames[1, 0]), atol=1e-12)


def test_histogram_survives_exploded_replicas():
    """Huge or NaN distances (an exploded replica) fall outside the range, never into a bin."""
    d = jnp.array([0.55, 1e12, -3.0, jnp.nan, jnp.inf, 0.35])
    for sigma in (0.0, 0.02):
        counts = jitted(obs.smeared_histogram, n_bins=10, dr=0.1, sigma=sigma)(d)
        assert np.all(np.isfinite(counts))
        np.testing.assert_allclose(counts.sum(), 2.0, atol=1e-6)
        assert counts[5] > 0.9 and counts[3] > 0.9


def test_distance_histogram_gradient_matches_finite_differences():
    x = RNG.uniform(0, 3.0, size=(6, 3))
    w = RNG.normal(size=100)

    @jax.jit
    def f(x):
        return jnp.dot(w, obs.distance_histogram(x, r_max=5.0, dr=0.05, sigma=0.04))

    g = jax.grad(f)(x)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    eps = 1e-6
    for a, k in [(0, 0), (3, 1), (5, 2)]:
        dx = np.zeros_like(x)
        dx[a, k] = eps
        fd = (f(x + dx) - f(x - dx)) / (2 * eps)
        np.testing.assert_allclose(g[a, k], fd, rtol=1e-5, atol=1e-7)


def test_rdf_element_pairs_match_numpy_histogram():
    box = np.array([9.0, 10.0, 11.0])
    species = np.array([8, 1, 1] * 6)
    x = RNG.uniform(0, 1, size=(18, 3)) * box
    r_max, dr = 4.5, 0.1
    edges = obs.bin_edges(r_max, dr)
    shell = 4 / 3 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    vol = np.prod(box)
    o, h = np.flatnonzero(species == 8), np.flatnonzero(species == 1)
    cases = {
        (8, 1): ([(i, j) for i in o for j in h], len(o) * len(h)),
        (1, 8): ([(i, j) for i in o for j in h], len(o) * len(h)),
        (8, 8): ([(i, j) for i in o for j in o if i != j], len(o) * (len(o) - 1)),
        (1, 1): ([(i, j) for i in h for j in h if i != j], len(h) * (len(h) - 1)),
        None: ([(i, j) for i in range(18) for j in range(18) if i != j], 18 * 17),
    }
    for pair, (pairs, n_ordered) in cases.items():
        d = np_pair_distances(x, box, pairs)  # ordered pairs for like species
        counts = np.histogram(d, bins=edges)[0]
        ref = counts * vol / (n_ordered * shell)
        g = jitted(
            obs.radial_distribution_function, species, box, pair=pair, r_max=r_max, dr=dr, sigma=0
        )(x)
        np.testing.assert_allclose(g, ref, atol=1e-10, err_msg=str(pair))
        sigma = 0.07
        gs = jitted(
            obs.radial_distribution_function,
            species,
            box,
            pair=pair,
            r_max=r_max,
            dr=dr,
            sigma=sigma,
        )(x)
        refs = np_smeared_counts(d, edges, sigma) * vol / (n_ordered * shell)
        np.testing.assert_allclose(gs, refs, atol=1e-9, err_msg=str(pair))


def test_rdf_of_ideal_gas_is_one():
    """Uniform random points: g(r) = 1 for all r; check the mean over 1-4 Å to its stderr."""
    box = np.array([8.5, 8.5, 8.5])
    frames = RNG.uniform(0, 1, size=(200, 16, 3)) * box  # few atoms: N vs N-1 matters
    g = jitted(
        obs.radial_distribution_function, None, box, pair=None, r_max=4.0, dr=0.1, sigma=0.02
    )(frames)
    per_frame = np.asarray(g[:, 10:38].mean(-1))  # bins inside [1.0, 3.8] Å
    mean, se = per_frame.mean(), per_frame.std(ddof=1) / np.sqrt(len(per_frame))
    assert abs(mean - 1.0) < 4 * se, (mean, se)
    assert 4 * se < 1 / 16  # would detect the N^2 normalisation, g -> (N - 1) / N


def test_rdf_rejects_bad_input():
    x = np.zeros((4, 3))
    # r_max beyond half the box: the RDF counts images (tests/test_image_edges.py), the
    # per-pair distance histogram h(r) refuses.
    with pytest.raises(ValueError, match="half the shortest"):
        obs.distance_histogram(x, box=np.array([5.0, 5, 5]), r_max=3.0)
    with pytest.raises(ValueError, match="no atoms"):
        obs.radial_distribution_function(
            x, np.array([8, 1, 1, 1]), np.array([13.0] * 3), pair=(8, 6)
        )


def test_bond_lengths_periodic_and_mean_oh():
    box = np.array([5.0, 6.0, 7.0])
    x = RNG.uniform(0, 1, size=(2, 7, 3)) * box
    bonds = np.array([[0, 1], [0, 2], [3, 4], [3, 5], [6, 2]])
    species = np.array([8, 1, 1, 8, 1, 1, 6])
    lengths = jitted(obs.bond_lengths, bonds, box)(x)
    assert lengths.shape == (2, 5)
    for f in range(2):
        np.testing.assert_allclose(lengths[f], np_pair_distances(x[f], box, bonds), atol=1e-12)
    m = jitted(obs.mean_bond_length, bonds, species, pair=(1, 8), box=box)(x)
    np.testing.assert_allclose(m, np.asarray(lengths[:, :4]).mean(-1), atol=1e-12)


def test_vacf_matches_direct_loop():
    v = RNG.normal(size=(2, 30, 5, 3))
    window = 8
    c = jitted(obs.velocity_autocorrelation, window=window)(v)
    assert c.shape == (2, window)
    for r in range(2):
        n_orig = 30 - window + 1
        ref = np.zeros(window)
        for lag in range(window):
            for t0 in range(n_orig):
                for i in range(5):
                    ref[lag] += v[r, t0, i] @ v[r, t0 + lag, i]
        np.testing.assert_allclose(c[r], ref / ref[0], atol=1e-12)


def test_vacf_of_harmonic_oscillator_is_cosine():
    """v_i(t) = a_i cos(w t + phi_i), random phases: VACF -> cos(w tau)."""
    t = np.arange(4000) * 0.05
    phase = RNG.uniform(0, 2 * np.pi, size=(50, 1))
    v = np.cos(1.3 * t[:, None, None] + phase[None]) * np.array([1.0, 0.0, 0.0])
    c = jitted(obs.velocity_autocorrelation, window=40)(v)
    np.testing.assert_allclose(c, np.cos(1.3 * t[:40]), atol=0.02)


def test_msd_matches_direct_loop_with_com_and_masses():
    x = np.cumsum(RNG.normal(size=(25, 6, 3)), axis=0)
    masses = RNG.uniform(1, 16, size=6)
    max_lag = 10
    msd = obs.mean_squared_displacement(x, max_lag=max_lag, masses=masses)
    com = (masses[None, :, None] * x).sum(1) / masses.sum()
    y = x - com[:, None, :]
    for lag in range(max_lag):
        vals = [
            np.sum((y[t0 + lag, i] - y[t0, i]) ** 2) for t0 in range(25 - lag) for i in range(6)
        ]
        np.testing.assert_allclose(msd[lag], np.mean(vals), atol=1e-10)
    raw = obs.mean_squared_displacement(x, max_lag=max_lag, remove_com=False)
    ref = [np.mean(np.sum((x[lag:] - x[: 25 - lag]) ** 2, -1)) for lag in range(max_lag)]
    np.testing.assert_allclose(raw, ref, atol=1e-10)


def test_msd_ignores_rigid_drift_and_ballistic_motion_is_quadratic():
    v = RNG.normal(size=(8, 3))
    t = np.arange(20.0)
    x = RNG.normal(size=(8, 3))[None] + t[:, None, None] * v[None]
    msd = obs.mean_squared_displacement(x, max_lag=12, remove_com=False)
    np.testing.assert_allclose(msd, np.mean(np.sum(v**2, -1)) * t[:12] ** 2, rtol=1e-10)
    drift = x[:, :1, :] * 0 + t[:, None, None] * np.array([0.3, -0.2, 0.1])
    static = np.broadcast_to(RNG.normal(size=(1, 8, 3)), (20, 8, 3)) + drift
    np.testing.assert_allclose(obs.mean_squared_displacement(static, max_lag=12), 0.0, atol=1e-12)


def test_diffusion_coefficient_of_random_walk():
    """Gaussian steps of std s per component every dt: D = s^2 / (2 dt) exactly in expectation."""
    s, dt_ps = 0.1, 0.01
    steps = RNG.normal(scale=s, size=(10, 200, 40, 3))  # 10 independent replicas
    x = np.cumsum(steps, axis=1)
    msd = jitted(obs.mean_squared_displacement, max_lag=20, remove_com=False)(x)  # [10, 20]
    d = np.asarray(obs.diffusion_coefficient(msd, dt_ps, fit_range=(1, 20)))
    expected = s**2 / (2 * dt_ps)
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert abs(d.mean() - expected) < 4 * se, (d.mean(), se, expected)
    assert se < 0.05 * expected  # the check has power
    # exact line: MSD = 6 D t + c
    lags = np.arange(50) * dt_ps
    assert float(obs.diffusion_coefficient(6 * 2.5 * lags + 0.3, dt_ps)) == pytest.approx(2.5)


def test_observables_jit_and_float32():
    x = jnp.asarray(RNG.uniform(0, 6, size=(10, 3)), dtype=jnp.float32)
    box = np.array([12.0, 12.0, 12.0])
    h = jax.jit(lambda x: obs.distance_histogram(x, r_max=6.0, dr=0.05, box=box))(x)
    assert h.dtype == jnp.float32 and np.all(np.isfinite(h))
    g = jax.jit(lambda x: obs.radial_distribution_function(x, None, box, pair=None))(x)
    assert g.dtype == jnp.float32
    v = RNG.normal(size=(50, 4, 3))
    c32 = jitted(obs.velocity_autocorrelation, window=10)(jnp.asarray(v, jnp.float32))
    assert c32.dtype == jnp.float32
    np.testing.assert_allclose(c32, obs.velocity_autocorrelation(v, window=10), atol=1e-5)
