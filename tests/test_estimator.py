"""Tests of the Boltzmann estimator against exact answers and independent implementations."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax.estimator import (
    boltzmann_grad,
    boltzmann_grad_local,
    neighbourhood_membership,
    reweight_observable,
)

# --------------------------------------------------------------------------------------
# harmonic oscillator: U = k |x|^2 / 2 in d dimensions, <x_a^2> = kT / k per dimension
# --------------------------------------------------------------------------------------

KT = 0.4  # eV; far from 1 so that a dropped beta is detectable


def harmonic_energy(params, x):
    return 0.5 * params["k"] * jnp.sum(x**2)


def gaussian_samples(key, n, dim, k):
    return jax.random.normal(key, (n, dim)) * jnp.sqrt(KT / k)


def harmonic_estimates(ks, dim, n, repeats, make_loss, seed=0):
    """Estimator gradients dL/dk and mean observables [len(ks), repeats, ...].

    `make_loss(k)` gives the loss of <x^2> used for spring constant k.
    """
    keys = jax.random.split(jax.random.PRNGKey(seed), repeats)

    def one(k, key):
        vg = boltzmann_grad(harmonic_energy, lambda x: x**2, make_loss(k), kT=KT)
        (loss, aux), g = vg({"k": k}, gaussian_samples(key, n, dim, k))
        return g["k"], aux.mean_observable

    over_keys = jax.vmap(one, in_axes=(None, 0))
    return jax.jit(jax.vmap(over_keys, in_axes=(0, None)))(jnp.asarray(ks), keys)


@pytest.mark.parametrize("dim", [1, 3])
def test_harmonic_gradient_matches_analytic(dim):
    ks = np.array([0.5, 2.0, 5.0])
    repeats, n = 24, 2000
    mean_x2 = KT / ks
    dmean_dk = -KT / ks**2
    # Quadratic loss with target 0.5 kT/k (<x^2> is twice the target: non-zero gradient)
    # and the linear loss L = sum_a <x_a^2> whose gradient is d<x^2>/dk itself.
    quadratic = lambda k: lambda o: jnp.sum((o - 0.5 * KT / k) ** 2)
    linear = lambda k: jnp.sum
    for make_loss, exact in (
        (quadratic, dim * 2.0 * (mean_x2 - 0.5 * mean_x2) * dmean_dk),
        (linear, dim * dmean_dk),
    ):
        g, mean_obs = harmonic_estimates(ks, dim, n, repeats, make_loss)
        g = np.asarray(g)  # [k, repeats]
        se = g.std(axis=1, ddof=1) / np.sqrt(repeats)
        np.testing.assert_array_less(np.abs(g.mean(axis=1) - exact), 5 * se)
        # The test can fail: a sign error or a dropped beta would be rejected.
        np.testing.assert_array_less(5 * se, np.abs(-g.mean(axis=1) - exact))
        np.testing.assert_array_less(5 * se, np.abs(g.mean(axis=1) * KT - exact))
        # <x_a^2> = kT/k in every dimension.
        m = np.asarray(mean_obs)
        assert m.shape == (len(ks), repeats, dim)
        se_m = np.sqrt(2.0) * mean_x2 / np.sqrt(n * repeats)  # Var(x^2) = 2 (kT/k)^2
        err = np.abs(m.mean(axis=1) - mean_x2[:, None])
        np.testing.assert_array_less(err, np.broadcast_to(5 * se_m[:, None], err.shape))


def test_harmonic_gradient_spread_shrinks_as_inverse_sqrt_n():
    k, target = 1.0, 0.2
    make_loss = lambda k: lambda o: jnp.sum((o - target) ** 2)
    sizes = np.array([64, 256, 1024, 4096])
    stds = []
    for i, n in enumerate(sizes):
        g, _ = harmonic_estimates([k], 1, int(n), 64, make_loss, seed=100 + i)
        stds.append(np.std(np.asarray(g)[0], ddof=1))
    slope = np.polyfit(np.log(sizes), np.log(stds), 1)[0]
    assert abs(slope + 0.5) < 0.12, slope


# --------------------------------------------------------------------------------------
# exact identities on a non-trivial model (any samples; these are algebraic identities)
# --------------------------------------------------------------------------------------


def model_energy(params, x):
    """A small non-linear energy of a 3-vector (eV)."""
    h = jnp.tanh(params["w1"] @ x + params["b1"])
    return jnp.sum(params["a"] * x**2) + params["w2"] @ h


def model_observable(x):
    r = jnp.linalg.norm(x)
    centres = jnp.linspace(0.0, 3.0, 10)
    return {"sq": x**2, "hist": jnp.exp(-((r - centres) ** 2) / 0.1)}


TARGET = {"sq": jnp.array([0.3, 0.6, 0.9]), "hist": jnp.linspace(0.1, 0.5, 10)}


def model_loss(o):
    return jnp.sum((o["sq"] - TARGET["sq"]) ** 2) + 0.7 * jnp.sum((o["hist"] - TARGET["hist"]) ** 2)


def model_setup(n=50, seed=1):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "a": jax.random.uniform(k1, (3,), minval=0.5, maxval=1.5),
        "w1": jax.random.normal(k2, (4, 3)),
        "b1": jax.random.normal(k3, (4,)),
        "w2": jnp.array([0.3, -0.2, 0.5, 0.1]),
    }
    x = jax.random.normal(k4, (n, 3))
    return params, x


def test_equals_difftre_reweighting_autodiff_at_reference():
    """Autodiff through self-normalised reweighting weights at theta = theta_ref."""
    params, x = model_setup()
    n = x.shape[0]
    vg = jax.jit(boltzmann_grad(model_energy, model_observable, model_loss, kT=KT))
    (loss, aux), g = vg(params, x)
    obs = jax.vmap(model_observable)(x)
    u_ref = jax.vmap(model_energy, (None, 0))(params, x)

    def difftre_loss(p):
        u = jax.vmap(model_energy, (None, 0))(p, x)
        w = jax.nn.softmax(-(u - u_ref) / KT)
        return model_loss(jax.tree.map(lambda o: jnp.tensordot(w, o, axes=1), obs))

    l_ref, g_ref = jax.jit(jax.value_and_grad(difftre_loss))(params)
    np.testing.assert_allclose(loss, l_ref, rtol=1e-12)
    for key in params:
        # 1/(N-1) (unbiased covariance) vs the 1/N of the reweighting average.
        np.testing.assert_allclose(g[key] * (n - 1) / n, g_ref[key], rtol=1e-10, atol=1e-14)
    assert int(aux.n_used) == n and int(aux.n_dropped) == 0


def test_equals_explicit_per_sample_jacobian():
    """The PyTorch-reference construction: d<O>/dtheta as a [bins, params] tensor."""
    params, x = model_setup(n=40, seed=2)
    n = x.shape[0]
    vg = jax.jit(boltzmann_grad(model_energy, model_observable, model_loss, kT=KT))
    (_, aux), g = vg(params, x)

    jac = jax.vmap(jax.grad(model_energy), (None, 0))(params, x)  # leaves [N, ...]
    obs = jax.vmap(model_observable)(x)
    flat_obs = jnp.concatenate([obs["hist"], obs["sq"]], axis=1)  # [N, D] (sorted keys)
    d = flat_obs - flat_obs.mean(axis=0)
    mean = jax.tree.map(lambda o: o.mean(axis=0), obs)
    w = jax.grad(model_loss)(mean)
    w_flat = jnp.concatenate([w["hist"], w["sq"]])
    for key in params:
        j = jac[key].reshape(n, -1)  # [N, P]
        cov = -(d.T @ (j - j.mean(axis=0))) / (KT * (n - 1))  # d<O>/dtheta, [D, P]
        expected = (w_flat @ cov).reshape(params[key].shape)
        np.testing.assert_allclose(g[key], expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(aux.mean_observable["sq"], mean["sq"], rtol=1e-12)


@pytest.mark.parametrize("batch_size", [7, 10])
def test_minibatched_equals_full_batch_jitted_without_recompilation(batch_size):
    chex.clear_trace_counter()  # counts are per function code, across tests
    params, x = model_setup(n=50, seed=3)
    full = jax.jit(boltzmann_grad(model_energy, model_observable, model_loss, kT=KT))
    # chex fails the call that would trace the estimator a second time.
    batched = jax.jit(
        chex.assert_max_traces(
            boltzmann_grad(
                model_energy, model_observable, model_loss, kT=KT, batch_size=batch_size
            ),
            n=1,
        )
    )
    (l_full, a_full), g_full = full(params, x)
    (l_b, a_b), g_b = batched(params, x)
    np.testing.assert_allclose(l_b, l_full, rtol=1e-13)
    np.testing.assert_allclose(a_b.energies, a_full.energies, rtol=1e-13)
    chex.assert_trees_all_close(g_b, g_full, rtol=1e-11, atol=1e-15)

    x2 = x * 1.1
    params2 = jax.tree.map(lambda p: p * 0.9, params)
    (l2, _), g2 = batched(params2, x2)  # new values, same shapes: no second trace
    assert batched._cache_size() == 1
    (l2_full, _), g2_full = full(params2, x2)
    np.testing.assert_allclose(l2, l2_full, rtol=1e-13)
    np.testing.assert_allclose(g2["w1"], g2_full["w1"], rtol=1e-11)


def test_vmap_over_parameter_sets():
    vg = boltzmann_grad(harmonic_energy, lambda x: x**2, lambda o: jnp.sum(o), kT=KT)
    x = gaussian_samples(jax.random.PRNGKey(4), 300, 2, 1.0)
    ks = jnp.array([0.5, 1.0, 2.0])
    (_, _), g = jax.jit(jax.vmap(vg, in_axes=({"k": 0}, None)))({"k": ks}, x)
    one = jax.jit(vg)
    for i, k in enumerate(ks):
        (_, _), gi = one({"k": k}, x)
        np.testing.assert_allclose(g["k"][i], gi["k"], rtol=1e-12)


# --------------------------------------------------------------------------------------
# dropped samples
# --------------------------------------------------------------------------------------

X_POLE = 0.123456789  # a sample placed here has an infinite energy


def pole_energy(params, x):
    # Finite for every sample except x == X_POLE, where energy and dU/dk are inf: a
    # naive "zero weight" would give 0 * inf = NaN in the gradient.
    return 0.5 * params["k"] * jnp.sum(x**2) + params["k"] / jnp.sum(x - X_POLE) ** 2


def spiky_observable(x):
    return jnp.where(x > 2.5, jnp.nan, x**2)  # NaN observable for a few samples


@pytest.mark.parametrize("batch_size,jit", [(None, False), (None, True), (6, True)])
def test_non_finite_samples_are_dropped_without_nan(batch_size, jit):
    x = jax.random.normal(jax.random.PRNGKey(5), (40, 1))
    x = x.at[3, 0].set(jnp.nan)  # non-finite input
    x = x.at[7, 0].set(X_POLE)  # infinite energy
    x = x.at[11, 0].set(3.0)  # NaN observable
    x = x.at[12, 0].set(jnp.inf)  # non-finite input
    bad = np.array([3, 7, 11, 12])
    loss_fn = lambda o: jnp.sum((o - 0.5) ** 2)
    vg = boltzmann_grad(pole_energy, spiky_observable, loss_fn, kT=KT, batch_size=batch_size)
    if jit:
        vg = jax.jit(vg)
    params = {"k": jnp.asarray(1.3)}
    (loss, aux), g = vg(params, x)
    clean = np.delete(np.asarray(x), bad, axis=0)
    assert np.all(np.asarray(clean) <= 2.5)
    ref = jax.jit(boltzmann_grad(pole_energy, spiky_observable, loss_fn, kT=KT))
    (loss_ref, aux_ref), g_ref = ref(params, jnp.asarray(clean))
    assert np.isfinite(g["k"])
    np.testing.assert_allclose(g["k"], g_ref["k"], rtol=1e-11)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
    assert int(aux.n_dropped) == 4 and int(aux.n_used) == 36
    assert not np.any(np.asarray(aux.used)[bad]) and np.sum(aux.used) == 36
    assert not np.isfinite(aux.energies[7])


def test_fewer_than_two_usable_samples():
    x = jnp.array([[0.3], [jnp.nan], [X_POLE]])
    vg = boltzmann_grad(pole_energy, lambda x: x**2, lambda o: jnp.sum(o), kT=KT)
    with pytest.raises(ValueError, match="at least 2 usable samples"):
        vg({"k": 1.0}, x)
    (loss, aux), g = jax.jit(vg)({"k": 1.0}, x)
    assert np.isnan(loss) and g["k"] == 0.0 and int(aux.n_used) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="kT"):
        boltzmann_grad(harmonic_energy, lambda x: x, jnp.sum, kT=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        boltzmann_grad(harmonic_energy, lambda x: x, jnp.sum, kT=1.0, batch_size=0)
    vg = boltzmann_grad(harmonic_energy, lambda x: x, jnp.sum, kT=1.0)
    with pytest.raises(ValueError, match="leading"):
        vg({"k": 1.0}, {"a": jnp.zeros((3, 1)), "b": jnp.zeros((4, 1))})


# --------------------------------------------------------------------------------------
# localized estimator
# --------------------------------------------------------------------------------------

BOX = jnp.array([5.0, 5.5, 6.0])
N_MOL, ATOMS_PER_MOL = 5, 2
MOLECULE_INDEX = np.repeat(np.arange(N_MOL), ATOMS_PER_MOL)


def soft_per_atom_energy(params, positions):
    """Per-atom energies [n] eV of a smooth periodic pair model (all pairs)."""
    d = positions[None, :, :] - positions[:, None, :]
    d = d - BOX * jnp.round(d / BOX)
    r2 = jnp.sum(d**2, axis=-1) + jnp.eye(positions.shape[0])
    pair = params["a"] * jnp.exp(-r2 / params["s"] ** 2) - params["b"] / (1.0 + r2)
    pair = jnp.where(jnp.eye(positions.shape[0], dtype=bool), 0.0, pair)
    return 0.5 * jnp.sum(pair, axis=1) + params["c"] * jnp.sum(positions**2, axis=1) * 1e-3


def local_observable(positions, members):
    """Smoothed histogram of member-member distances and the member count."""
    d = positions[None, :, :] - positions[:, None, :]
    d = d - BOX * jnp.round(d / BOX)
    r = jnp.sqrt(jnp.sum(d**2, axis=-1) + jnp.eye(positions.shape[0]))
    both = members[:, None] & members[None, :] & ~jnp.eye(positions.shape[0], dtype=bool)
    centres = jnp.linspace(0.5, 4.0, 8)
    hist = jnp.sum(
        jnp.where(both[..., None], jnp.exp(-((r[..., None] - centres) ** 2)), 0.0), (0, 1)
    )
    return {"hist": hist, "count": jnp.sum(members).astype(positions.dtype)}


def local_loss(o):
    return jnp.sum((o["hist"] - 0.3) ** 2) + 0.1 * (o["count"] - 5.0) ** 2


def local_frames(n_frames=6, seed=6):
    pos = jax.random.uniform(jax.random.PRNGKey(seed), (n_frames, N_MOL * ATOMS_PER_MOL, 3)) * BOX
    params = {"a": 0.8, "s": 1.1, "b": 0.3, "c": 0.5}
    return params, pos


@pytest.mark.parametrize("batch_size", [None, 4])
def test_local_equals_global_on_neighbourhoods_one_at_a_time(batch_size):
    params, pos = local_frames()
    n_frames = pos.shape[0]
    membership = jax.vmap(
        lambda p: neighbourhood_membership(p, MOLECULE_INDEX, box=BOX, k_nearest=2)
    )(pos)
    assert membership.shape == (n_frames, N_MOL, N_MOL * ATOMS_PER_MOL)
    vg_local = jax.jit(
        boltzmann_grad_local(
            soft_per_atom_energy, local_observable, local_loss, kT=KT, batch_size=batch_size
        )
    )
    (loss, aux), g = vg_local(params, pos, membership)

    # Slow reference: each neighbourhood is one sample of the global estimator, with its
    # energy from its own evaluation of the whole frame.
    samples = (
        jnp.repeat(pos, N_MOL, axis=0),
        membership.reshape(n_frames * N_MOL, -1),
    )
    energy = lambda p, s: jnp.sum(jnp.where(s[1], soft_per_atom_energy(p, s[0]), 0.0))
    observable = lambda s: local_observable(s[0], s[1])
    ref = jax.jit(boltzmann_grad(energy, observable, local_loss, kT=KT))
    (loss_ref, aux_ref), g_ref = ref(params, samples)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
    for key in params:
        np.testing.assert_allclose(g[key], g_ref[key], rtol=1e-10)
    np.testing.assert_allclose(aux.energies.reshape(-1), aux_ref.energies, rtol=1e-12)
    assert aux.observables["hist"].shape == (n_frames, N_MOL, 8)
    assert int(aux.n_used) == n_frames * N_MOL


def test_local_drops_bad_frames():
    params, pos = local_frames(n_frames=5, seed=7)
    pos = pos.at[2, 0, 0].set(jnp.nan)
    membership = jax.vmap(lambda p: neighbourhood_membership(p, MOLECULE_INDEX, box=None))(pos)
    vg = jax.jit(boltzmann_grad_local(soft_per_atom_energy, local_observable, local_loss, kT=KT))
    (loss, aux), g = vg(params, pos, membership)
    keep = np.array([0, 1, 3, 4])
    (loss_ref, _), g_ref = vg(params, pos[keep], membership[keep])
    assert int(aux.n_dropped) == N_MOL and not np.any(np.asarray(aux.used)[2])
    for key in params:
        np.testing.assert_allclose(g[key], g_ref[key], rtol=1e-11)


@pytest.mark.parametrize("centre", ["first_atom", "centroid"])
def test_neighbourhood_membership_matches_numpy(centre):
    rng = np.random.default_rng(8)
    n_mol, per, k = 7, 3, 2
    box = np.array([6.0, 7.0, 8.0])
    # Compact molecules placed anywhere (some straddle the periodic boundary).
    first = rng.uniform(0, 1, (n_mol, 3)) * box
    pos = (first[:, None, :] + rng.normal(0, 0.5, (n_mol, per, 3))).reshape(-1, 3) % box
    mol = np.repeat(np.arange(n_mol), per)
    got = np.asarray(neighbourhood_membership(pos, mol, box=box, k_nearest=k, centre=centre))

    def mi(d):
        return d - box * np.round(d / box)

    p = pos.reshape(n_mol, per, 3)
    if centre == "first_atom":
        c = p[:, 0]
    else:
        c = p[:, 0] + mi(p - p[:, :1]).mean(axis=1)
    dist = np.linalg.norm(mi(c[None] - c[:, None]), axis=-1)
    for m in range(n_mol):
        order = [j for j in np.argsort(dist[m]) if j != m][:k]
        expected = np.isin(mol, [m, *order])
        np.testing.assert_array_equal(got[m], expected)


# --------------------------------------------------------------------------------------
# temperature reweighting
# --------------------------------------------------------------------------------------


def test_reweight_observable_harmonic_and_numpy():
    kT_from, kT_to, k = 1.0, 0.9, 2.0
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (20000, 3))) * np.sqrt(kT_from / k)
    u = 0.5 * k * np.sum(x**2, axis=1)
    obs = x**2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ESS is large here: no warning
        mean, ess = reweight_observable(obs, u, kT_from=kT_from, kT_to=kT_to)
    # independent NumPy importance weights
    lw = -(1 / kT_to - 1 / kT_from) * u
    w = np.exp(lw - lw.max())
    w /= w.sum()
    np.testing.assert_allclose(mean, w @ obs, rtol=1e-10)
    np.testing.assert_allclose(ess, 1.0 / np.sum(w**2), rtol=1e-10)
    # physics: <x_a^2> = kT_to / k, standard error from the ESS (Var x^2 = 2 (kT/k)^2)
    se = np.sqrt(2.0) * (kT_to / k) / np.sqrt(float(ess))
    np.testing.assert_array_less(np.abs(np.asarray(mean) - kT_to / k), 5 * se)
    # stable with huge energies (a constant offset cancels in the normalisation)
    mean_off, ess_off = reweight_observable(obs, u + 1e5, kT_from=kT_from, kT_to=kT_to)
    np.testing.assert_allclose(mean_off, mean, rtol=1e-6)
    np.testing.assert_allclose(ess_off, ess, rtol=1e-6)


def test_reweight_observable_warns_drops_and_supports_pytrees():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(10), (2000,)))
    u = 0.5 * x**2
    with pytest.warns(UserWarning, match="effective sample size"):
        _, ess = reweight_observable(x**2, u, kT_from=1.0, kT_to=10.0)
    assert float(ess) < 50
    u_bad = u.copy()
    u_bad[5] = np.nan
    obs = {"x2": x**2, "x": x}
    mean, _ = reweight_observable(obs, u_bad, kT_from=1.0, kT_to=1.0)
    np.testing.assert_allclose(mean["x2"], np.delete(x**2, 5).mean(), rtol=1e-12)
    np.testing.assert_allclose(mean["x"], np.delete(x, 5).mean(), rtol=1e-10)
    mean_j, ess_j = jax.jit(lambda o, e: reweight_observable(o, e, kT_from=1.0, kT_to=10.0))(
        x**2, u
    )  # traced: no warning possible, values still returned
    assert np.isfinite(mean_j) and float(ess_j) < 50


@pytest.mark.parametrize("bad", [-1.0, 0.0, np.inf, np.nan])
@pytest.mark.parametrize("wrap", [float, np.float32, jnp.asarray])
def test_concrete_bad_kT_is_refused_whatever_its_type(bad, wrap):
    with pytest.raises(ValueError, match="kT"):
        boltzmann_grad(lambda p, x: p * x, lambda x: x, lambda o: o, kT=wrap(bad))
    with pytest.raises(ValueError, match="kT"):
        boltzmann_grad_local(lambda p, x: p * x, lambda x, m: x, lambda o: o, kT=wrap(bad))


def test_traced_kT_is_accepted_and_empty_samples_are_refused():
    def grad_at(kT):
        vg = boltzmann_grad(lambda p, x: 0.5 * p * x**2, lambda x: x**2, lambda o: o, kT=kT)
        return vg(1.0, jnp.linspace(-1.0, 1.0, 8))[1]

    g_traced = jax.jit(grad_at)(jnp.asarray(0.5))
    np.testing.assert_allclose(g_traced, grad_at(0.5), rtol=1e-10)
    vg = boltzmann_grad(lambda p, x: p * x, lambda x: x, lambda o: o, kT=1.0)
    with pytest.raises(ValueError, match="empty"):
        vg(1.0, jnp.zeros((0,)))
