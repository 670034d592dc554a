"""benchmarks/potential_throughput.py: the disjoint-graph batching layout equals the vmap
of the one-frame call (float64, per-frame padded cutoff edges), and the JSON has the
flop, batching-efficiency and disjoint-speedup keys (tiny SchNet, in process)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import potential_throughput as pt
from stablejax.geometry import cutoff_edges_np
from stablejax.potentials import factory, testing


def test_disjoint_graph_offsets_frames_and_maps_padding_to_flat_padding():
    n, batch = 3, 2
    edges = np.array(
        [
            [[0, 1, 2, 3, 0], [1, 0, 1, 3, 3]],  # frame 0: 3 edges, 2 padded (one half-padded)
            [[2, 1, 3, 0, 1], [0, 2, 3, 1, 0]],  # frame 1: 4 edges, 1 padded
        ],
        dtype=np.int32,
    )
    flat = np.asarray(pt.disjoint_graph(edges, batch, n))
    pad = batch * n
    expected = np.array(
        [[0, 1, 2, pad, pad, 5, 4, pad, 3, 4], [1, 0, 1, pad, pad, 3, 5, pad, 4, 3]]
    )
    np.testing.assert_array_equal(flat, expected)
    # Shared edges broadcast over frames; lattice-shift rows are carried unchanged.
    shared = np.array([[0, 1, 3], [2, 2, 3], [1, 0, 0], [0, -1, 0], [0, 0, 0]], np.int32)
    flat5 = np.asarray(pt.disjoint_graph(shared, batch, n))
    np.testing.assert_array_equal(flat5[:2], [[0, 1, pad, 3, 4, pad], [2, 2, pad, 5, 5, pad]])
    np.testing.assert_array_equal(flat5[2:], np.tile(shared[2:], (1, batch)))


def _frames(batch, seed=0):
    """Perturbed aspirin frames with per-frame 4 Å edge lists, shuffled and padded
    (padding n) to one capacity: frames differ in edges, order and padding."""
    species, x = testing.aspirin()
    rng = np.random.default_rng(seed)
    xs = x[None] + 0.15 * rng.normal(size=(batch, *x.shape))
    lists = [cutoff_edges_np(p, 4.0) for p in xs]
    lists = [e[:, rng.permutation(e.shape[1])] for e in lists]
    capacity = max(e.shape[1] for e in lists) + 7
    n = species.size
    edges = np.full((batch, 2, capacity), n, np.int32)
    for b, e in enumerate(lists):
        edges[b, :, : e.shape[1]] = e
    assert len({e.shape[1] for e in lists}) > 1  # the frames' edge counts differ
    return species, jnp.asarray(xs), jnp.asarray(edges)


@pytest.mark.parametrize("name", ["schnet", "gemnet_t"])
def test_disjoint_layout_equals_vmap_float64(name):
    config = pt.model_config(name, tiny=True)
    potential = factory.build(config)
    species, xs, edges = _frames(batch=3)
    params = jax.jit(potential.init)(jax.random.key(1), species, xs[0], None)
    assert jax.tree.leaves(params)[0].dtype == jnp.float64
    flat_potential = pt.layout_potential(config, species.size)

    @jax.jit
    def reference(params, xs, edges):
        return jax.vmap(lambda x, e: potential.energy_and_forces(params, species, x, e, None))(
            xs, edges
        )

    @jax.jit
    def disjoint(params, xs, edges):
        return pt.disjoint_energy_forces(flat_potential, params, species, xs, edges, None)

    e_ref, f_ref = reference(params, xs, edges)
    e_flat, f_flat = disjoint(params, xs, edges)
    assert e_flat.shape == e_ref.shape == (3,) and f_flat.shape == f_ref.shape == xs.shape
    assert float(jnp.max(jnp.abs(f_ref))) > 1e-3  # non-trivial forces
    np.testing.assert_allclose(e_flat, e_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(f_flat, f_ref, rtol=0, atol=1e-10)
    # Frames are told apart: without the offsets every frame's edges would join
    # frame 0's atoms, and the energies would differ.
    flat_no_offset = jnp.moveaxis(edges, 0, 1).reshape(2, -1)
    e_bad = jax.jit(flat_potential.per_atom_energies)(
        params, np.tile(species, 3), xs.reshape(-1, 3), flat_no_offset, None
    )
    e_bad = e_bad.reshape(3, -1).sum(axis=1)
    assert not np.allclose(e_bad, e_ref, atol=1e-6)


def test_gemnet_flat_graph_slot_cap_is_per_frame():
    config = pt.model_config("gemnet_t", tiny=True)
    assert config.max_neighbors == 50
    assert pt.layout_potential(config, 21).config.max_neighbors == 20
    assert pt.layout_potential(config, 192).config.max_neighbors == 50
    assert config.max_neighbors == 50  # the caller's config is left alone


def test_json_has_flops_batching_efficiency_and_disjoint_speedup(tmp_path):
    report = pt.main(
        [
            "--tiny", "--models", "schnet", "--batches", "1,8", "--repeats", "1",
            "--min-time", "0.001", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    on_disk = json.loads((tmp_path / "potential_throughput.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    res = on_disk["models"]["schnet"]
    assert set(res["cases"]) == {"aspirin_b1", "aspirin_b8", "water_192"}

    def positive(x):
        return isinstance(x, float) and math.isfinite(x) and x > 0

    for case, c in res["cases"].items():
        for key in ("compile_s", "ms_per_call", "evaluations_per_s", "flops_per_call"):
            assert positive(c[key]), (case, key)
        assert c["achieved_gflops"] == pytest.approx(
            c["flops_per_call"] * c["evaluations_per_s"] / c["batch"] / 1e9
        )
    b1, b4 = res["cases"]["aspirin_b1"], res["cases"]["aspirin_b8"]
    # XLA counts the flops of the whole batch: about 8x one frame's.
    assert 6.0 < b4["flops_per_call"] / b1["flops_per_call"] < 10.0
    assert res["batching_efficiency_batch"] == 8
    assert res["batching_efficiency"] == pytest.approx(
        b4["evaluations_per_s"] / b1["evaluations_per_s"]
    )
    for c in (b1, b4):
        d = c["disjoint"]
        assert d["rel_err_energy"] <= pt.DISJOINT_RTOL and d["rel_err_forces"] <= pt.DISJOINT_RTOL
        assert positive(d["evaluations_per_s"]) and positive(d["flops_per_call"])
        assert c["disjoint_speedup"] == pytest.approx(
            d["evaluations_per_s"] / c["evaluations_per_s"]
        )
    assert res["batching_efficiency_disjoint"] == pytest.approx(
        b4["disjoint"]["evaluations_per_s"] / b1["disjoint"]["evaluations_per_s"]
    )
    assert "disjoint" not in res["cases"]["water_192"]
    # The library's layout (stablejax.batching): 420-edge frames, so 4 per pass on a CPU.
    on_cpu = jax.default_backend() == "cpu"
    assert b4["passes"]["frames_per_pass"] == (4 if on_cpu else 8)
    for c in (b1, b4):
        p = c["passes"]
        # A loop body counts once in XLA's cost analysis: the passes report vmap's flops.
        assert p["flops_per_call"] == c["flops_per_call"]
        assert p["rel_err_energy"] <= pt.DISJOINT_RTOL and p["rel_err_forces"] <= pt.DISJOINT_RTOL
        assert c["passes_speedup"] == pytest.approx(p["evaluations_per_s"] / c["evaluations_per_s"])
    assert res["batching_efficiency_passes"] == pytest.approx(
        b4["passes"]["evaluations_per_s"] / b1["passes"]["evaluations_per_s"]
    )


def test_flops_reads_dict_and_list_cost_analyses():
    class Compiled:
        def __init__(self, analysis):
            self.analysis = analysis

        def cost_analysis(self):
            return self.analysis

    assert pt.flops(Compiled({"flops": 12.0, "bytes accessed": 3.0})) == 12.0
    assert pt.flops(Compiled([{"flops": 12.0}])) == 12.0
    assert pt.flops(Compiled([])) is None
    assert pt.flops(Compiled(None)) is None
    assert pt.flops(Compiled({"bytes accessed": 3.0})) is None
