"""Shared potential machinery: common blocks, factory wrapping, normalization,
and the property checks of `stablejax.potentials.testing` — each shown to pass
on a correct toy model and to FAIL on a deliberately broken one."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from stablejax.potentials import common, factory, testing
from stablejax.potentials.base import Potential, all_pairs_edges, edge_vectors, safe_norm

CUTOFF = 3.0
SPECIES = np.array([8, 1, 1, 6, 1, 8])


def _cluster(seed=0, n=6, spread=1.6, min_dist=1.0):
    """Random free-space cluster with no two atoms closer than min_dist (Å)."""
    rng = np.random.default_rng(seed)
    while True:
        x = rng.normal(size=(n, 3)) * spread
        d = np.linalg.norm(x[:, None] - x[None], axis=-1) + 10 * np.eye(n)
        if d.min() > min_dist:
            return x


class ToyPair(nn.Module):
    """A pair-energy module obeying the architecture contract, with switchable bugs.

    raw_i = 1/2 sum_j phi_{s_i s_j}(r_ij) * envelope(r_ij) over masked edges.
    """

    n_species: int
    cutoff: float
    hard_cutoff: bool = False  # bug: no envelope, energy jumps at the cutoff
    leak_padding: bool = False  # bug: ignores the mask; scatter clamps index n

    @nn.compact
    def __call__(self, species_idx, vectors, edges, mask):
        n = species_idx.shape[0]
        r = safe_norm(vectors)
        rbf = common.gaussian_basis(r, r_max=self.cutoff, n_basis=8)
        pair_emb = nn.Embed(self.n_species * self.n_species, 8)(
            species_idx[edges[0]] * self.n_species + species_idx[edges[1]]
        ).astype(r.dtype)
        phi = common.MLP((16, 1))(rbf * pair_emb)[:, 0] + 0.5
        if self.hard_cutoff:
            weight = mask.astype(r.dtype)
        else:
            weight = common.polynomial_envelope(r, r_cut=self.cutoff) * mask
        if self.leak_padding:
            # Padded edges (index n) are clamped onto atom n-1 and a constant
            # per-edge term ignores the mask.
            contrib = phi * weight + 0.01
            return jnp.zeros(n, r.dtype).at[jnp.minimum(edges[0], n - 1)].add(contrib)
        return 0.5 * common.segment_sum(phi * weight, edges[0], n)


def _toy_potential(**bugs):
    config = ml_collections.ConfigDict(
        {"name": "toy_pair", "species": [1, 6, 8], "cutoff": CUTOFF, "train_energy_shift": False}
    )
    module = ToyPair(n_species=3, cutoff=CUTOFF, **bugs)
    return factory.from_module(module, config)


def _hand_potential(kind):
    """Potentials built by hand around the good toy model, with a positional bug."""
    good = _toy_potential()

    def per_atom(params, species, positions, edges, box=None):
        if kind == "absolute_positions":
            e = good.per_atom_energies(params, species, positions, edges, box)
            return e + 0.05 * jnp.sin(positions[:, 0])
        if kind == "no_minimum_image":
            # Computes displacements without the box: periodic images are missed.
            return good.per_atom_energies(params, species, positions, edges, None)
        raise ValueError(kind)

    return Potential("broken", good.config, good.cutoff, good.init, per_atom)


@pytest.fixture(scope="module")
def toy():
    potential = _toy_potential()
    x = _cluster()
    params = potential.init(jax.random.key(0), SPECIES, x, None)
    return potential, params, x


# ----------------------------------------------------------------------------- common blocks


def test_envelopes_vanish_smoothly_at_cutoff():
    rc = 2.5
    r = jnp.array([0.0, 1.0, rc, rc + 0.1, 100.0])
    poly = common.polynomial_envelope(r, r_cut=rc, p=6)
    np.testing.assert_allclose(np.asarray(poly)[2:], 0.0, atol=1e-15)
    assert float(poly[0]) == 1.0
    cos = common.cosine_cutoff(r, r_cut=rc)
    np.testing.assert_allclose(cos, [1.0, 0.5 * (np.cos(np.pi / rc) + 1), 0, 0, 0], atol=1e-15)
    # First and second derivatives of the polynomial envelope vanish at r_cut.
    d1 = jax.grad(lambda s: common.polynomial_envelope(s, r_cut=rc))
    d2 = jax.grad(d1)
    assert abs(float(d1(rc - 1e-9))) < 1e-6 and abs(float(d2(rc - 1e-9))) < 1e-5
    # Cosine: first derivative vanishes at r_cut; gradients finite beyond it.
    dc = jax.grad(lambda s: common.cosine_cutoff(s, r_cut=rc))
    assert abs(float(dc(rc - 1e-9))) < 1e-7 and float(dc(50.0)) == 0.0


def test_bases_match_numpy():
    r = np.array([0.7, 1.3, 4.9])
    g = common.gaussian_basis(jnp.asarray(r), r_max=5.0, n_basis=25)
    mu = np.linspace(0, 5, 25)
    np.testing.assert_allclose(g, np.exp(-0.5 * ((r[:, None] - mu) / (mu[1] - mu[0])) ** 2))
    b = common.bessel_basis(jnp.asarray(r), r_cut=5.0, n_basis=4)
    k = np.arange(1, 5)
    np.testing.assert_allclose(b, np.sqrt(2 / 5) * np.sin(k * np.pi * r[:, None] / 5) / r[:, None])
    assert float(common.shifted_softplus(jnp.zeros(()))) == 0.0


# ----------------------------------------------------------------------------- factory


def test_factory_species_errors_and_mapping(toy):
    potential, params, x = toy
    with pytest.raises(ValueError, match=r"\[7, 9\]"):
        potential.init(jax.random.key(0), np.array([9, 1, 7, 6, 1, 8]), x, None)
    with pytest.raises(ValueError, match=r"\[17\]"):
        potential.energy(params, np.array([17, 1, 1, 6, 1, 8]), x, all_pairs_edges(6))
    with pytest.raises(ValueError, match=r"\[2\]"):
        factory.check_species(potential.config, [1, 2])
    idx, valid = factory.species_indices(potential.config, jnp.array([8, 1, 6, 5]))
    np.testing.assert_array_equal(idx[:3], [2, 0, 1])
    np.testing.assert_array_equal(valid, [True, True, True, False])
    # Traced species that slip past the check poison the energy instead of using H.
    e = jax.jit(potential.per_atom_energies)(
        params, jnp.array([9, 1, 1, 6, 1, 8]), x, all_pairs_edges(6)
    )
    assert np.isnan(e[0]) and np.all(np.isfinite(e[1:]))


def test_factory_shift_scale_and_stop_gradient(toy):
    potential, params, x = toy
    edges = all_pairs_edges(6)
    raw = potential.per_atom_energies(params, SPECIES, x, edges)
    p2 = dict(params, energy_shift=jnp.array([0.1, -0.2, 0.3]), energy_scale=jnp.asarray(2.0))
    shifted = potential.per_atom_energies(p2, SPECIES, x, edges)
    shift_of = {1: 0.1, 6: -0.2, 8: 0.3}
    np.testing.assert_allclose(shifted, 2.0 * raw + np.array([shift_of[z] for z in SPECIES]))
    g = jax.grad(potential.energy)(p2, SPECIES, x, edges)
    assert float(jnp.abs(g["energy_shift"]).sum()) == 0.0 and float(g["energy_scale"]) == 0.0
    config = ml_collections.ConfigDict(potential.config.to_dict())
    config.train_energy_shift = True
    trainable = factory.from_module(ToyPair(n_species=3, cutoff=CUTOFF), config)
    g = jax.grad(trainable.energy)(p2, SPECIES, x, edges)
    np.testing.assert_allclose(g["energy_shift"], [3.0, 1.0, 2.0])  # species counts


def test_factory_masks_edges_beyond_cutoff(toy):
    potential, params, x = toy
    # An isolated far atom contributes only its shift: no interaction at 2 x cutoff.
    far = np.concatenate([x, x[:1] + [0, 0, 40.0]])
    species = np.append(SPECIES, 1)
    e = potential.per_atom_energies(params, species, far, all_pairs_edges(7))
    e0 = potential.per_atom_energies(params, SPECIES, x, all_pairs_edges(6))
    np.testing.assert_allclose(e[:6], e0, atol=1e-14)
    assert float(e[6]) == 0.0


def test_default_config_and_unknown_name():
    config = factory.default_config("schnet")
    assert config.name == "schnet" and config.cutoff == 5.0 and config.species == [1, 6, 7, 8]
    assert config.train_energy_shift is False
    with pytest.raises(ValueError, match="Unknown architecture"):
        factory.default_config("painn")


def test_edge_vectors_minimum_image():
    box = np.array([4.0, 5.0, 6.0])
    x = jnp.array([[0.1, 0.2, 0.3], [3.9, 4.8, 5.9]])
    v, mask = edge_vectors(x, jnp.array([[0, 1, 2], [1, 0, 2]]), box)
    np.testing.assert_allclose(v[0], [-0.2, -0.4, -0.4], atol=1e-12)
    np.testing.assert_array_equal(mask, [True, True, False])


# ----------------------------------------------------------------------------- checks pass


def test_checks_pass_on_correct_toy_model(toy):
    potential, params, x = toy
    edges = all_pairs_edges(6)
    testing.check_invariances(potential, params, SPECIES, x, edges, atol=1e-10)
    testing.check_padding(potential, params, SPECIES, x, edges, atol=1e-12)
    testing.check_cutoff_smoothness(
        potential,
        params,
        SPECIES[:2],
        np.array([[0.0, 0, 0], [1.0, 0.5, 0]]),
        moving_atom=1,
        anchor_atom=0,
        energy_atol=1e-9,
        force_atol=1e-3,
    )
    testing.check_nve_energy_conservation(
        potential, params, SPECIES, x, temperature_K=600.0, dt_fs=0.5, n_steps=200, max_drift=1e-4
    )


def test_checks_pass_on_correct_toy_model_periodic(toy):
    potential, params, _ = toy
    rng = np.random.default_rng(3)
    box = np.array([6.5, 7.0, 6.2])
    x = rng.uniform(size=(6, 3)) * box
    edges = all_pairs_edges(6)
    testing.check_invariances(potential, params, SPECIES, x, edges, box, atol=1e-10)
    testing.check_periodic_images(
        potential, params, SPECIES, x, box, receptive_field=CUTOFF, atol=1e-10
    )


# ----------------------------------------------------------------------------- checks fail


def test_invariance_check_fails_on_absolute_positions(toy):
    _, params, x = toy
    broken = _hand_potential("absolute_positions")
    with pytest.raises(AssertionError, match="rotation"):
        testing.check_invariances(broken, params, SPECIES, x, all_pairs_edges(6), atol=1e-8)


def test_permutation_check_fails_on_order_dependent_model(toy):
    potential, params, x = toy

    def per_atom(params, species, positions, edges, box=None):
        e = potential.per_atom_energies(params, species, positions, edges, box)
        # Bug: an atom-index feature (e.g. a positional encoding).
        return e * (1.0 + 0.01 * jnp.arange(species.shape[0]))

    broken = Potential("broken", potential.config, potential.cutoff, potential.init, per_atom)
    with pytest.raises(AssertionError, match="permutation"):
        testing.check_invariances(broken, params, SPECIES, x, all_pairs_edges(6), atol=1e-8)


def test_periodic_check_fails_without_minimum_image(toy):
    _, params, _ = toy
    broken = _hand_potential("no_minimum_image")
    rng = np.random.default_rng(3)
    box = np.array([6.5, 7.0, 6.2])
    x = rng.uniform(size=(6, 3)) * box
    with pytest.raises(AssertionError, match="periodic images"):
        testing.check_periodic_images(
            broken, params, SPECIES, x, box, receptive_field=CUTOFF, atol=1e-8
        )


def test_periodic_check_fails_when_receptive_field_understated():
    # A two-step model (a nonlinear function of neighbours' neighbour counts, receptive
    # field 2 cutoffs) checked as if its receptive field were smaller: the replicated
    # cluster is then too small for the forces on the central cell to agree.
    base = _toy_potential()

    def per_atom(params, species, positions, edges, box=None):
        v, mask = edge_vectors(positions, edges, box)
        w = common.polynomial_envelope(safe_norm(v), r_cut=CUTOFF) * mask
        n = positions.shape[0]
        degree = common.segment_sum(w, edges[0], n)
        return common.segment_sum(w * degree[jnp.minimum(edges[1], n - 1)], edges[0], n) ** 2

    two_hop = Potential("two_hop", base.config, base.cutoff, base.init, per_atom)
    rng = np.random.default_rng(4)
    box = np.array([6.2, 6.2, 6.2])
    x = rng.uniform(size=(8, 3)) * box
    species = np.ones(8, dtype=int)
    testing.check_periodic_images(
        two_hop, {}, species, x, box, receptive_field=2 * CUTOFF, atol=1e-10
    )
    with pytest.raises(AssertionError, match="periodic images"):
        testing.check_periodic_images(
            two_hop, {}, species, x, box, receptive_field=0.5 * CUTOFF, atol=1e-8
        )


def test_cutoff_check_fails_on_hard_cutoff(toy):
    _, params, _ = toy
    broken = _toy_potential(hard_cutoff=True)
    with pytest.raises(AssertionError, match="cutoff smoothness"):
        testing.check_cutoff_smoothness(
            broken,
            params,
            SPECIES[:2],
            np.array([[0.0, 0, 0], [1.0, 0.5, 0]]),
            moving_atom=1,
            anchor_atom=0,
            energy_atol=1e-9,
            force_atol=1e-3,
        )


def test_cutoff_check_fails_on_c0_envelope(toy):
    # Envelope (1 - r/rc): energy continuous, force jumps at the cutoff.
    good = _toy_potential()

    def per_atom(params, species, positions, edges, box=None):
        v, mask = edge_vectors(positions, edges, box)
        r = safe_norm(v)
        w = jnp.where(mask & (r < CUTOFF), 1.0 - r / CUTOFF, 0.0)
        return 0.5 * common.segment_sum(w, edges[0], positions.shape[0])

    broken = Potential("c0", good.config, good.cutoff, good.init, per_atom)
    with pytest.raises(AssertionError, match="force jumps"):
        testing.check_cutoff_smoothness(
            broken,
            {},
            SPECIES[:2],
            np.array([[0.0, 0, 0], [1.0, 0.5, 0]]),
            moving_atom=1,
            anchor_atom=0,
            energy_atol=1e-4,  # loose: the energy is continuous, only the force jumps
            force_atol=1e-3,
        )


def test_padding_check_fails_on_leaky_model(toy):
    _, params, x = toy
    broken = _toy_potential(leak_padding=True)
    with pytest.raises(AssertionError, match="padding"):
        testing.check_padding(broken, params, SPECIES, x, all_pairs_edges(6), atol=1e-10)


def test_nve_check_fails_on_hard_cutoff():
    broken = _toy_potential(hard_cutoff=True)
    # A loose, hot cluster whose pairs keep crossing the cutoff.
    x = _cluster(seed=5, n=6, spread=2.0, min_dist=1.2)
    params = broken.init(jax.random.key(1), SPECIES, x, None)
    with pytest.raises(AssertionError, match="NVE"):
        testing.check_nve_energy_conservation(
            broken,
            params,
            SPECIES,
            x,
            temperature_K=2000.0,
            dt_fs=0.5,
            n_steps=200,
            max_drift=1e-4,
        )


# ----------------------------------------------------------------------------- normalization


def _dataset(species, n_frames, per_species, rng, noise=0.0):
    from stablejax.data.dataset import Dataset

    counts = np.array([np.sum(np.asarray(species) == z) for z in (1, 6, 8)])
    energies = counts @ per_species + noise * rng.normal(size=n_frames)
    forces = rng.normal(size=(n_frames, len(species), 3)) * 0.3
    x = rng.normal(size=(n_frames, len(species), 3))
    return Dataset(species=np.asarray(species), positions=x, energies=energies, forces=forces)


def test_normalization_recovers_per_species_energies():
    from stablejax.potentials import normalization

    rng = np.random.default_rng(0)
    true = np.array([-13.6, -1029.5, -2041.2])
    sets = [
        _dataset([8, 1, 1], 5, true, rng, noise=1e-3),
        _dataset([6, 1, 1, 1, 1], 5, true, rng, noise=1e-3),
        _dataset([6, 8, 8], 5, true, rng, noise=1e-3),
    ]
    shift = normalization.fit_energy_shift(sets, [1, 6, 8])
    np.testing.assert_allclose(shift, true, atol=5e-3)
    forces = np.concatenate([d.forces.ravel() for d in sets])
    assert normalization.fit_energy_scale(sets) == pytest.approx(np.sqrt(np.mean(forces**2)))


def test_normalization_single_composition_is_mean_per_atom(toy):
    from stablejax.potentials import normalization

    potential, params, x = toy
    rng = np.random.default_rng(1)
    data = _dataset(SPECIES, 7, np.array([-13.6, -1029.5, -2041.2]), rng, noise=0.5)
    fitted = normalization.fit_energy_normalization(params, data, potential.config)
    e_bar = np.mean(data.energies) / SPECIES.size
    np.testing.assert_allclose(fitted["energy_shift"], [e_bar] * 3, rtol=1e-12)
    assert float(fitted["energy_scale"]) == pytest.approx(np.sqrt(np.mean(data.forces**2)))
    assert fitted["net"] is params["net"]
    # A freshly normalised model's energy is near the data mean (raw outputs O(1)).
    e = potential.energy(fitted, SPECIES, x, all_pairs_edges(6))
    assert (
        abs(float(e) - np.mean(data.energies)) < 10 * float(fitted["energy_scale"]) * SPECIES.size
    )
    with pytest.raises(ValueError, match=r"\[7\]"):
        normalization.fit_energy_shift(_dataset([7, 1], 2, np.zeros(3), rng), [1, 6, 8])


def test_factory_dispatches_pair_potentials():
    config = factory.default_config("lennard_jones")
    assert config.name == "lennard_jones"
    assert factory.build(config).name == "lennard_jones"


def test_architectures_are_found_from_the_package_not_listed():
    """`factory.ARCHITECTURES` holds exactly the modules that define `make_module` (so a new
    architecture is one file); each builds, and pair potentials come from `pair.NAMES`."""
    from stablejax.potentials import pair

    assert set(factory.ARCHITECTURES) == {"schnet", "nequip", "gemnet_t"}
    assert factory.MODEL_NAMES == factory.ARCHITECTURES + pair.NAMES
    for name in factory.ARCHITECTURES:
        config = factory.default_config(name)
        assert config.name == name and config.cutoff > 0
    with pytest.raises(ValueError, match="Unknown architecture 'painn'"):
        factory.default_config("painn")
