"""NequIP: O(3) equivariance with proper parity, padding safety, smoothness, PBC, NVE.

The property checks come from `stablejax.potentials.testing` (each shown there
to fail on a deliberately broken model); here they run on the real NequIP
(default config, ~0.12M parameters, float64) on a real MD17 aspirin frame and
on a small periodic box. Parity gets its own tests: the features must carry
the irreps they are labelled with under reflections, and a model whose edge
harmonics are mislabelled 1e (axial) must lose reflection invariance.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax.potentials import common, factory, nequip, testing
from stablejax.potentials.base import all_pairs_edges, edge_vectors


@pytest.fixture(scope="module")
def aspirin():
    return testing.aspirin()  # an MD17 DFT frame (Å)


@pytest.fixture(scope="module")
def model(aspirin):
    config = factory.default_config("nequip")
    potential = factory.build(config)
    species, positions = aspirin
    params = jax.jit(potential.init)(jax.random.key(0), species, jnp.asarray(positions))
    return config, potential, params


def _periodic_box(seed=1, n=8, side=10.5, min_dist=1.1):
    """Random H/C/N/O atoms in a cubic box (cutoff 5 Å < side / 2), no close pairs."""
    rng = np.random.default_rng(seed)
    box = np.full(3, side)
    while True:
        x = rng.uniform(size=(n, 3)) * box
        d = x[:, None] - x[None]
        d -= box * np.round(d / box)
        r = np.linalg.norm(d, axis=-1) + 10 * np.eye(n)
        if r.min() > min_dist:
            species = np.array([1, 6, 7, 8] * (n // 4))
            return species, x, box


def _random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _reflection(rng):
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    return np.eye(3) - 2.0 * np.outer(normal, normal)


def test_parameter_count_matches_nequip_reference(model):
    """Count of the reference NequIP (l_max 1, full parity, 3 layers, 32 features).

    Derived by hand from the original architecture with 4 species (H, C, N, O),
    8 Bessel functions and a 2 x 64 bias-free radial MLP:
      embedding 4x32; layer 1 (0e -> 0e+1o): linear 32^2, radial 8*64+64^2+64*64
      (2 paths), linear_out 32*64 + 32*32, self-connection 4*32*64;
      layer 2 (-> 0e+1o+1e): 2*32^2, 8*64+64^2+64*160 (5 paths),
      64*96+64*32+32*32, 4*(32*96+32*32); layer 3 (-> 0e+0o+1o+1e): 3*32^2,
      8*64+64^2+64*256 (8 paths), 64*96+32*32+96*32+64*32, 4*(32*96+2*32*32);
      readout 32*16 + 16; 8 trainable Bessel frequencies.
    The StABlE paper (Supplementary Table 1) quotes 0.12M.
    """
    _, _, params = model
    expected = (
        4 * 32
        + (32 * 32 + (8 * 64 + 64 * 64 + 64 * 64) + (32 * 64 + 32 * 32) + 4 * 32 * 64)
        + (2 * 32 * 32 + (8 * 64 + 64 * 64 + 64 * 160) + (64 * 96 + 64 * 32 + 32 * 32))
        + 4 * (32 * 96 + 32 * 32)
        + (3 * 32 * 32 + (8 * 64 + 64 * 64 + 64 * 256))
        + (64 * 96 + 32 * 32 + 96 * 32 + 64 * 32)
        + 4 * (32 * 96 + 2 * 32 * 32)
        + (32 * 16 + 16)
        + 8
    )
    count = common.count_params(params["net"])
    assert count == expected
    assert abs(count - 0.12e6) / 0.12e6 < 0.05


def test_irreps_and_polar_spherical_harmonics():
    config = nequip.default_config()
    assert [str(ir) for ir in nequip.layer_irreps(config)] == [
        "32x0e",
        "32x0e+32x1o",
        "32x0e+32x1o+32x1e",
        "32x0e+32x0o+32x1o+32x1e",
    ]
    config.parity = False
    assert str(nequip.layer_irreps(config)[-1]) == "32x0e+32x1o"

    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 3))
    sh = nequip.edge_spherical_harmonics(jnp.asarray(v), l_max=1)
    assert str(sh.irreps) == "1x0e+1x1o"
    # Component normalisation: Y^0 = 1, Y^1 = sqrt(3) v / |v| (x, y, z order).
    np.testing.assert_allclose(sh.array[:, 0], 1.0, atol=1e-14)
    np.testing.assert_allclose(
        sh.array[:, 1:], np.sqrt(3) * v / np.linalg.norm(v, axis=1, keepdims=True), atol=1e-14
    )
    # The label is consistent with how the values transform, reflections included:
    # Y(Q v) = D_label(Q) Y(v). A 1e label would fail for the reflection.
    for q in (_random_rotation(rng), _reflection(rng), -np.eye(3)):
        rotated = nequip.edge_spherical_harmonics(jnp.asarray(v @ q.T), l_max=1).array
        np.testing.assert_allclose(rotated, sh.array @ sh.irreps.D_from_matrix(q).T, atol=1e-13)
        wrong = e3nn.Irreps("0e+1e").D_from_matrix(q)
        if np.linalg.det(q) < 0:
            assert np.max(np.abs(rotated - sh.array @ wrong.T)) > 0.1


def test_bessel_basis_matches_numpy():
    r = np.linspace(0.3, 6.0, 50)
    rc = 5.0
    w = np.pi * np.arange(1, 9)
    got = common.bessel_basis(
        jnp.asarray(r), r_cut=rc, frequencies=jnp.asarray(w), prefactor=2.0 / rc
    )
    expected = 2.0 / rc * np.sin(np.outer(r, w) / rc) / r[:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_invariances_molecule(model, aspirin):
    _, potential, params = model
    species, positions = aspirin
    errors = testing.check_invariances(
        potential, params, species, positions, all_pairs_edges(species.size), atol=1e-10
    )
    assert errors["net_force"] < 1e-10


def test_features_transform_with_their_irreps_under_O3(model, aspirin):
    """Every hidden feature h(Q x) = D(Q) h(x) for rotations AND reflections.

    This is where parity shows: the 0o channels of the last layer are non-zero
    and flip sign under a reflection while the 0e channels do not.
    """
    config, _, params = model
    species, positions = aspirin
    module = nequip.make_module(config, len(config.species))
    idx, _ = factory.species_indices(config, species)
    edges = jnp.asarray(all_pairs_edges(species.size))

    def features(x):
        vectors, mask = edge_vectors(x, edges)
        _, state = module.apply(params["net"], idx, vectors, edges, mask, mutable=["intermediates"])
        return [state["intermediates"][f"features_{k}"][0] for k in range(config.num_layers)]

    rng = np.random.default_rng(3)
    qs = [_random_rotation(rng), _reflection(rng)]
    centre = positions.mean(0)
    batch = jnp.asarray(np.stack([positions] + [(positions - centre) @ q.T for q in qs]))
    feats = jax.jit(jax.vmap(features))(batch)
    irreps = nequip.layer_irreps(config)[1:]
    for k, (f, ir) in enumerate(zip(feats, irreps, strict=True)):
        f = np.asarray(f)
        assert np.max(np.abs(f[0])) > 1e-3, f"layer {k} features vanish"
        for q, fq in zip(qs, f[1:], strict=True):
            np.testing.assert_allclose(fq, f[0] @ ir.D_from_matrix(q).T, atol=1e-10)
    last = e3nn.IrrepsArray(irreps[-1], jnp.asarray(np.asarray(feats[-1])))
    pseudo = np.asarray(last.filter(keep="0o").array)
    scalars = np.asarray(last.filter(keep="0e").array)
    # Pseudoscalars need a chiral environment (the frame is one); they first
    # appear in layer 3 (1e x 1o -> 0o) and are small at initialisation, but
    # far above the 1e-10 equivariance tolerance.
    assert np.max(np.abs(pseudo[0])) > 1e-5
    np.testing.assert_allclose(pseudo[2], -pseudo[0], atol=1e-10)
    np.testing.assert_allclose(scalars[2], scalars[0], atol=1e-10)


def _filled_params(shapes, seed):
    """Cheap stand-in for init (no RNG compile): N(0, 1) e3nn weights, N(0, 1/fan_in)
    dense kernels, Bessel frequencies n*pi."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "bessel_frequencies" in name:
            return jnp.pi * jnp.arange(1, leaf.shape[0] + 1, dtype=leaf.dtype)
        scale = 1.0 / np.sqrt(leaf.shape[0]) if "kernel" in name else 1.0
        return jnp.asarray(rng.normal(size=leaf.shape) * scale, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_mislabelled_axial_harmonics_break_reflection_invariance(aspirin, monkeypatch):
    """Negative control for parity. With Y^1 labelled 1e (axial), the path
    1e x 1e -> 1e is a cross product (a true axial vector) and 1e x 1e -> 0e in
    the next layer a triple product: a pseudoscalar counted as a scalar. The
    energy stays rotation invariant but changes under reflection, which the
    correctly labelled model (test_invariances_molecule) does not."""
    true_sh = nequip.edge_spherical_harmonics

    def axial_sh(vectors, *, l_max):
        return e3nn.IrrepsArray("0e+1e", true_sh(vectors, l_max=l_max).array)

    monkeypatch.setattr(nequip, "edge_spherical_harmonics", axial_sh)
    config = factory.default_config("nequip")
    config.num_features = 8
    assert config.num_layers >= 3  # the triple product needs three layers
    module = nequip.make_module(config, len(config.species))
    species, positions = aspirin
    idx, _ = factory.species_indices(config, species)
    edges = jnp.asarray(all_pairs_edges(species.size))

    def energy(p, x):
        vectors, mask = edge_vectors(x, edges)
        return jnp.sum(module.apply(p, idx, vectors, edges, mask))

    vectors, mask = edge_vectors(jnp.asarray(positions), edges)
    shapes = jax.eval_shape(module.init, jax.random.key(0), idx, vectors, edges, mask)
    params = _filled_params(shapes, seed=1)
    rng = np.random.default_rng(5)
    centre = positions.mean(0)
    batch = np.stack(
        [positions]
        + [(positions - centre) @ q.T for q in (_random_rotation(rng), _reflection(rng))]
    )
    e = np.asarray(jax.jit(jax.vmap(energy, in_axes=(None, 0)))(params, jnp.asarray(batch)))
    assert abs(e[1] - e[0]) < 1e-10
    assert abs(e[2] - e[0]) > 1e-7, e


def test_smooth_at_cutoff(model, aspirin):
    """An atom leaves the cutoff sphere of its only neighbour within reach.

    A 6-atom aspirin fragment plus one H placed on the outward line through the
    fragment atom farthest from the centroid, so that while it scans
    [r_c - 0.02, r_c + 0.02] it interacts with that atom only. Its pair terms
    go as the envelope, (1 - r/r_c)^3 near r_c, so on this window the force
    changes by at most ~1e-6 eV/Å per step (5e-8 measured); a force that did not vanish at r_c (a
    missing or C0 envelope) would jump by the pair force itself.
    """
    _, potential, params = model
    species, positions = aspirin
    keep = np.array([0, 1, 2, 7, 8, 13])
    frag = positions[keep]
    far = int(np.argmax(np.linalg.norm(frag - frag.mean(0), axis=1)))
    u = frag[far] - frag.mean(0)
    u /= np.linalg.norm(u)
    x = np.concatenate([frag, frag[far] + 5.0 * u[None]])
    z = np.concatenate([species[keep], [1]])
    others = np.delete(np.linalg.norm(x[:-1] - x[-1], axis=1), far)
    assert others.min() > 5.05  # only `far` is within reach of the moving atom
    result = testing.check_cutoff_smoothness(
        potential,
        params,
        z,
        x,
        moving_atom=z.size - 1,
        anchor_atom=far,
        width=0.02,
        n_points=81,
        energy_atol=1e-11,
        force_atol=1e-5,
    )
    # Beyond the cutoff the moving atom feels nothing at all.
    beyond = result["distances"] >= potential.cutoff
    assert np.all(result["force_along"][beyond] == 0.0)


def _module_grads(module):
    """jit(value_and_grad) of the summed raw outputs w.r.t. params and edge vectors."""

    def total(p, idx, vectors, edges, mask):
        return jnp.sum(module.apply(p, idx, vectors, edges, mask))

    return jax.jit(jax.value_and_grad(total, argnums=(0, 2)))


def test_padding_and_masked_edges_contribute_nothing(model, aspirin):
    """Module contract: padded edges (index n, dummy vector) and masked real edges,
    even with zero-length vectors, change neither the output nor any gradient,
    and every gradient stays finite."""
    config, _, params = model
    species, positions = aspirin
    n = species.size
    module = nequip.make_module(config, len(config.species))
    idx, _ = factory.species_indices(config, species)
    edges = all_pairs_edges(n)
    vectors, mask = edge_vectors(jnp.asarray(positions), jnp.asarray(edges))
    e_count = edges.shape[1]

    n_pad, n_masked = 9, 6
    rng = np.random.default_rng(2)
    extra = np.concatenate(
        [np.full((2, n_pad), n), edges[:, rng.choice(e_count, n_masked, replace=False)]], axis=1
    )
    extra_vectors = np.concatenate(
        [np.tile([100.0, 0.0, 0.0], (n_pad, 1)), np.zeros((n_masked, 3))]
    )
    order = rng.permutation(e_count + n_pad + n_masked)
    edges2 = np.concatenate([edges, extra], axis=1)[:, order]
    vectors2 = np.concatenate([np.asarray(vectors), extra_vectors])[order]
    mask2 = np.concatenate([np.asarray(mask), np.zeros(n_pad + n_masked, bool)])[order]

    grads = _module_grads(module)
    e_ref, (gp_ref, gv_ref) = grads(params["net"], idx, vectors, jnp.asarray(edges), mask)
    e_pad, (gp_pad, gv_pad) = grads(
        params["net"], idx, jnp.asarray(vectors2), jnp.asarray(edges2), jnp.asarray(mask2)
    )
    assert abs(float(e_pad - e_ref)) < 1e-12
    for a, b in zip(jax.tree.leaves(gp_ref), jax.tree.leaves(gp_pad), strict=True):
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_allclose(b, a, atol=1e-12)
    gv_pad = np.asarray(gv_pad)
    assert np.all(np.isfinite(gv_pad))
    inverse = np.argsort(order)
    np.testing.assert_allclose(gv_pad[inverse[:e_count]], gv_ref, atol=1e-12)
    assert np.all(gv_pad[inverse[e_count:]] == 0.0)


@pytest.mark.slow
def test_padding_harness(model, aspirin):
    _, potential, params = model
    species, positions = aspirin
    errors = testing.check_padding(
        potential,
        params,
        species,
        jnp.asarray(positions),
        all_pairs_edges(species.size),
        atol=1e-10,
    )
    assert errors["param_grads"] < 1e-10


def test_periodic_images(model):
    _, potential, params = model
    species, positions, box = _periodic_box()
    errors = testing.check_periodic_images(
        potential,
        params,
        species,
        positions,
        box,
        receptive_field=3 * 5.0,  # three interactions of 5 Å
        atol=1e-10,
        check_forces=False,
    )
    assert errors["replication"] == 5


@pytest.mark.slow
def test_periodic_invariances_and_image_forces(model):
    _, potential, params = model
    species, positions, box = _periodic_box()
    testing.check_invariances(
        potential, params, species, positions, all_pairs_edges(species.size), box, atol=1e-10
    )
    testing.check_periodic_images(
        potential, params, species, positions, box, receptive_field=15.0, atol=1e-10
    )


def test_nve_energy_error_scales_as_dt_squared(model, aspirin):
    """Velocity Verlet on a smooth surface: energy error ~ dt^2 (ratio 4 per halving)."""
    _, potential, params = model
    species, positions = aspirin
    runs = [
        testing.check_nve_energy_conservation(
            potential,
            params,
            species,
            positions,
            temperature_K=300.0,
            dt_fs=dt,
            n_steps=int(round(10.0 / dt)),
            max_drift=1e-3,
        )
        for dt in (0.5, 0.25)
    ]
    ratio = runs[0]["max_deviation"] / runs[1]["max_deviation"]
    assert 3.0 < ratio < 5.0, ratio
