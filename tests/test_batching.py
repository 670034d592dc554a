"""`stablejax.batching`: passes of a few frames give what one vmapped call gives (MD
forces, the QM loss and its gradient), for every pass size, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_md_common import ARGON, lattice, make_lj
from test_training_qm import make_pair_potential, morse_dataset

from stablejax import batching, md, units
from stablejax.training import qm


def _quadratic(params, x):
    """A per-frame (value, aux) with a non-trivial parameter gradient."""
    v = jnp.sum(jnp.tanh(params["w"] @ x["a"]) ** 2) + params["b"] * x["c"]
    return v, {"v2": v**2, "c": x["c"]}


@pytest.mark.parametrize("per_pass", [1, 2, 3, 4, 6, 100])
def test_summed_value_and_grad_equals_the_vmapped_sum(per_pass):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 5))), "b": jnp.asarray(0.7)}
    xs = {"a": jnp.asarray(rng.normal(size=(6, 5))), "c": jnp.asarray(rng.normal(size=6))}

    def total(p):
        v, aux = jax.vmap(_quadratic, in_axes=(None, 0))(p, xs)
        return jnp.sum(v), jax.tree.map(lambda a: jnp.sum(a, 0), aux)

    (want_v, want_aux), want_g = jax.value_and_grad(total, has_aux=True)(params)
    # 4 does not divide 6: lowered to 3 passes of 2.
    (v, aux), g = jax.jit(
        lambda p: batching.summed_value_and_grad(_quadratic, p, xs, per_pass=per_pass)
    )(params)
    np.testing.assert_allclose(v, want_v, rtol=1e-13)
    for a, b in zip(jax.tree.leaves((aux, g)), jax.tree.leaves((want_aux, want_g)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_map_frames_and_pass_sizes():
    xs = jnp.arange(12.0).reshape(6, 2)
    for k in (1, 4, 6):
        np.testing.assert_array_equal(
            batching.map_frames(lambda x: x * x[0], xs, per_pass=k), xs * xs[:, :1]
        )
    assert batching.frames_per_pass(8, 3) == 3 and batching.frames_per_pass(2, 5) == 2
    with pytest.raises(ValueError, match="per pass must be >= 0"):
        batching.frames_per_pass(8, -1)
    on_cpu = jax.default_backend() == "cpu"
    assert batching.frames_per_pass(8) == (1 if on_cpu else 8)
    edges = batching.CPU_EDGES_PER_PASS // 4
    assert batching.frames_per_pass(8, edges_per_frame=edges) == (4 if on_cpu else 8)
    assert batching.frames_per_pass(8, edges_per_frame=10**6) == (1 if on_cpu else 8)


def test_qm_loss_value_and_grad_equals_differentiating_the_batch_loss():
    potential = make_pair_potential()
    train = morse_dataset(8, seed=3)
    params = potential.init(jax.random.key(1), train.species, train.positions[0])
    frames = qm.prepare_frames(train, potential)
    idx = jnp.array([5, 1, 7, 2, 2])
    weight = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])  # padding
    for per_pass in (1, 2, 5):
        loss_fn = qm.make_qm_loss(
            potential, energy_weight=2.0, force_weight=30.0, frames_per_pass=per_pass
        )
        (want, want_aux), want_g = jax.value_and_grad(loss_fn, has_aux=True)(
            params, frames, idx, weight
        )
        (got, aux), g = jax.jit(loss_fn.value_and_grad)(params, frames, idx, weight)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        np.testing.assert_allclose(aux.force_mse, want_aux.force_mse, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("integrator", [md.Langevin(dt_fs=2.0), md.BerendsenNPT(dt_fs=2.0)])
def test_md_replicas_one_per_pass_follow_the_vmapped_trajectories(integrator):
    """Periodic LJ with neighbour lists (and NPT's virial): 4 replicas, 60 steps; a small
    skin so that the lists are rebuilt inside the run (one replica per pass builds them one
    at a time, with lax.map)."""
    positions, box = lattice(3, 11.0)
    rng = np.random.default_rng(2)
    starts = positions[None] + 0.05 * rng.normal(size=(4,) + positions.shape)
    params = {"sigma": jnp.asarray(ARGON["sigma"]), "epsilon": jnp.asarray(ARGON["epsilon"])}
    out = {}
    for k in (4, 1):
        sim = md.Simulator(
            make_lj(cutoff=5.0), species=np.full(len(positions), 18), box=box,
            integrator=integrator, cutoff=5.0, skin=0.2, chunk_steps=20, replicas_per_pass=k,
        )  # fmt: skip
        state = sim.init(jax.random.key(0), params, starts, units.kT_from_kelvin(80.0))
        built_at_start = np.asarray(state.neighbors.reference)
        state, traj = sim.run(params, state, 60, record_every=20)
        reference = np.asarray(state.neighbors.reference)
        assert np.abs(reference - built_at_start).max() > 1e-6, "no list was rebuilt"
        out[k] = (np.asarray(traj.position), np.asarray(state.box), reference)
    np.testing.assert_allclose(out[1][0], out[4][0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out[1][1], out[4][1], rtol=1e-12)
    np.testing.assert_allclose(out[1][2], out[4][2], rtol=0, atol=1e-12)
