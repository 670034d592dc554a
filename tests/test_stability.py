"""Stability criteria: agreement with NumPy, firing on broken frames, not on normal ones."""

import ase.io
import jax
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from stablejax import observables as obs
from stablejax import stability as st
from stablejax.data import topology

ASPIRIN = "/work/shared/data/aspirin_md17_dft_frames.xyz"
BOX = np.full(3, 12.44287777)
WATER_SPECIES = np.tile([8, 1, 1], 64)
MOLECULE = np.arange(192) // 3


def water_box(rng, *, n_side=4, box=BOX[0], max_tilt_deg=15.0, jitter=0.05):
    """64 SPC/Fw-like waters (O,H,H order) on a jittered lattice, wrapped into the box.

    Same construction as in test_topology: closest intermolecular pairs ~1.6-1.9 Å.
    """
    r0, theta = 1.012, np.deg2rad(113.24)
    s, c = r0 * np.sin(theta / 2), r0 * np.cos(theta / 2)
    local = np.array([[0, 0, 0], [s, c, 0], [-s, c, 0]])
    local = local @ Rotation.from_euler("xyz", [35, 45, 10], degrees=True).as_matrix().T
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centres = (grid + 0.9) * box / n_side + rng.normal(scale=jitter, size=grid.shape)
    rot = Rotation.from_rotvec(
        rng.normal(size=(len(grid), 3)) * np.deg2rad(max_tilt_deg) / np.sqrt(3)
    ).as_matrix()
    x = centres[:, None, :] + np.einsum("mij,aj->mai", rot, local)
    return np.mod(x.reshape(-1, 3), box)


def np_min_image_dist(a, b, box):
    d = b - a
    if box is not None:
        d = d - box * np.round(d / box)
    return np.linalg.norm(d, axis=-1)


@pytest.fixture(scope="module")
def aspirin():
    frames = ase.io.read(ASPIRIN, index=":")
    x = np.stack([a.positions for a in frames])
    bonds = topology.find_bonds(frames[0].numbers, x[0])
    return x, bonds, topology.equilibrium_bond_lengths(x, bonds)


def test_max_bond_deviation_matches_numpy_periodic():
    rng = np.random.default_rng(0)
    box = np.array([4.0, 5.0, 6.0])
    x = rng.uniform(0, 1, size=(3, 2, 8, 3)) * box
    bonds = np.array([[0, 1], [1, 2], [3, 7], [5, 6]])
    eq = rng.uniform(1.0, 1.5, size=4)
    dev = jax.jit(lambda x: st.max_bond_deviation(x, bonds, eq, box))(x)
    assert dev.shape == (3, 2)
    for idx in np.ndindex(3, 2):
        f = x[idx]
        ref = max(
            abs(np_min_image_dist(f[i], f[j], box) - e) for (i, j), e in zip(bonds, eq, strict=True)
        )
        np.testing.assert_allclose(dev[idx], ref, atol=1e-12)


def test_bond_criterion_on_aspirin(aspirin):
    x, bonds, eq = aspirin
    train = st.bond_length_criterion(bonds, eq)
    evaluation = st.bond_length_criterion(bonds, eq, threshold=st.BOND_DEVIATION_EVAL_THRESHOLD)
    assert train.threshold == 0.25 and evaluation.threshold == 0.5
    is_unstable = jax.jit(train.is_unstable)  # one compile per input shape
    assert not np.any(is_unstable(x))  # real 500 K MD17 frames: deviations ~0.1 Å
    # stretch bond 7 by 0.6 Å (move its second atom along the bond)
    i, j = bonds[7]
    u = (x[0, j] - x[0, i]) / np.linalg.norm(x[0, j] - x[0, i])
    broken = x[0].copy()
    broken[j] += 0.6 * u
    assert bool(is_unstable(broken)) and bool(jax.jit(evaluation.is_unstable)(broken))
    np.testing.assert_allclose(
        train.metric(broken), np.linalg.norm(broken[j] - broken[i]) - eq[7], atol=1e-12
    )
    # a 0.3 Å compression trips the conservative training threshold only
    squeezed = x[0].copy()
    squeezed[j] = squeezed[i] + (eq[7] - 0.3) * u
    assert bool(is_unstable(squeezed)) and not bool(jax.jit(evaluation.is_unstable)(squeezed))
    # batched over [replicas, frames]
    batch = np.stack([x[:4], np.concatenate([x[:3], broken[None]])])
    np.testing.assert_array_equal(is_unstable(batch), [[0, 0, 0, 0], [0, 0, 0, 1]])


def test_min_intermolecular_distance_matches_numpy():
    rng = np.random.default_rng(1)
    box = np.array([6.0, 7.0, 8.0])
    mol = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    x = rng.uniform(0, 1, size=(4, 9, 3)) * box
    exclude = np.array([[4, 0], [8, 7]])
    d = jax.jit(lambda x: st.min_intermolecular_distance(x, mol, box))(x)
    d_ex = jax.jit(lambda x: st.min_intermolecular_distance(x, mol, box, exclude_pairs=exclude))(x)
    for f in range(4):
        pairs = [(i, j) for i in range(9) for j in range(i + 1, 9) if mol[i] != mol[j]]
        dist = {p: np_min_image_dist(x[f, p[0]], x[f, p[1]], box) for p in pairs}
        np.testing.assert_allclose(d[f], min(dist.values()), atol=1e-12)
        kept = [v for p, v in dist.items() if p not in {(0, 4), (7, 8)}]
        np.testing.assert_allclose(d_ex[f], min(kept), atol=1e-12)


def test_intermolecular_criterion_on_water():
    rng = np.random.default_rng(2)
    crit = st.intermolecular_distance_criterion(MOLECULE, box=BOX)
    assert crit.threshold == 1.2 and crit.unstable_below
    frames = np.stack([water_box(rng) for _ in range(3)])
    metric = jax.jit(crit.metric)
    values = metric(frames)
    assert np.all(values > 1.4)  # intramolecular O-H (1.01 Å) and H-H (1.69 Å) never count
    assert not np.any(crit.flags(values))
    # push molecule 5 onto molecule 6: its O ends up 1.0 Å from molecule 6's O
    broken = frames[0].copy()
    shift = broken[18] - broken[15]
    shift -= BOX * np.round(shift / BOX)
    shift -= 1.0 * shift / np.linalg.norm(shift)
    broken[15:18] = np.mod(broken[15:18] + shift, BOX)
    both = metric(np.stack([frames[1], broken]))
    assert float(both[1]) <= 1.0 + 1e-9
    np.testing.assert_array_equal(crit.flags(both), [False, True])


def test_rdf_mae_definition():
    rng = np.random.default_rng(3)
    g = rng.uniform(0, 3, size=(2, 12, 50))
    ref = rng.uniform(0, 3, size=50)
    dr = 0.12  # r_max = 6 Å
    mae = st.rdf_mae(g, ref, dr=dr)
    np.testing.assert_allclose(mae, 6.0 * np.abs(g.mean(1) - ref).mean(-1), atol=1e-12)
    win = st.rdf_mae(g, ref, dr=dr, window=5)  # 2 full windows of 5, 2 frames dropped
    assert win.shape == (2, 2)
    for r in range(2):
        for w in range(2):
            ref_w = dr * np.abs(g[r, 5 * w : 5 * w + 5].mean(0) - ref).sum()
            np.testing.assert_allclose(win[r, w], ref_w, atol=1e-12)


def test_rdf_mae_criterion_on_water():
    """Fires on an ideal gas (no structure), not on a fresh sample of the reference liquid."""
    rng = np.random.default_rng(4)

    @jax.jit
    def rdfs(frames):
        return {
            pair: obs.radial_distribution_function(
                frames, WATER_SPECIES, BOX, pair=pair, r_max=6.0, dr=0.01, sigma=0.0
            )
            for pair in obs.WATER_PAIRS
        }

    refs = {p: g.mean(0) for p, g in rdfs(np.stack([water_box(rng) for _ in range(12)])).items()}
    crit = st.rdf_mae_criterion(WATER_SPECIES, BOX, refs)
    assert crit.threshold == 3.0
    normal = np.stack([water_box(rng) for _ in range(4)])
    gas = rng.uniform(0, 1, size=(4, 192, 3)) * BOX
    windows = np.stack([normal, gas])  # [2 replicas, 4 frames, 192, 3]
    values = np.asarray(jax.jit(crit.metric)(windows))
    assert values[0] < 1.0 and values[1] > 3.0
    np.testing.assert_array_equal(crit.flags(values), [False, True])
    # the metric is the largest per-pair MAE of the window-averaged RDFs
    per_pair = [st.rdf_mae(g, refs[p], dr=0.01) for p, g in rdfs(gas).items()]
    np.testing.assert_allclose(values[1], max(per_pair), rtol=1e-10)


def test_first_unstable_time_and_survival_curve():
    rng = np.random.default_rng(5)
    flags = rng.uniform(size=(20, 30)) < 0.05
    flags[3] = False  # never unstable
    times = 0.5 * np.arange(30)  # ps
    first = np.asarray(st.first_unstable_time(flags, times))
    for r in range(20):
        hits = np.flatnonzero(flags[r])
        assert first[r] == (times[hits[0]] if len(hits) else np.inf)
    grid = np.linspace(0, 20, 41)
    surv = np.asarray(st.survival_curve(first, grid))
    np.testing.assert_allclose(surv, [np.mean(first > t) for t in grid])
    assert surv[-1] == pytest.approx(np.mean(~flags.any(1)))
    assert np.all(np.diff(surv) <= 0)
    # integer frame indices work as times too
    np.testing.assert_allclose(st.first_unstable_time(flags, np.arange(30)), first / 0.5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="equilibrium_lengths"):
        st.max_bond_deviation(np.zeros((4, 3)), np.array([[0, 1]]), np.ones(2))
    with pytest.raises(ValueError, match="one molecule"):
        st.min_intermolecular_distance(np.zeros((3, 3)), np.zeros(3, int))
    with pytest.raises(ValueError, match="frame_times"):
        st.first_unstable_time(np.zeros((2, 5), bool), np.arange(4))


def test_median_confidence_interval_coverage_and_exact_ranks():
    """The order-statistic CI covers the true median at >= the stated level (exponential
    stable times, 2000 trials: within 3 SE) and uses the binomial ranks (n = 32: the 10th
    and 23rd values, the classic table entry)."""
    from scipy import stats

    from stablejax.evaluation import median_confidence_interval

    x = np.arange(1.0, 33.0)
    lo, hi, level = median_confidence_interval(x)
    assert (lo, hi) == (10.0, 23.0)
    assert level == pytest.approx(stats.binom.cdf(22, 32, 0.5) - stats.binom.cdf(9, 32, 0.5))
    assert level >= 0.95
    # One rank narrower would fall below 95 %.
    assert stats.binom.cdf(21, 32, 0.5) - stats.binom.cdf(10, 32, 0.5) < 0.95

    rng = np.random.default_rng(0)
    true_median = np.log(2.0)  # exponential, mean 1
    trials = 2000
    hits = 0
    for _ in range(trials):
        lo, hi, level = median_confidence_interval(rng.exponential(size=32))
        hits += lo <= true_median <= hi
    se = np.sqrt(level * (1 - level) / trials)
    assert hits / trials >= level - 3 * se
    # Too few samples for 95 %: (min, max) with its real coverage.
    assert median_confidence_interval([3.0, 1.0]) == (1.0, 3.0, 0.5)
    with pytest.raises(ValueError):
        median_confidence_interval([])


def test_paired_stable_time_test():
    """A clear paired gain gives a small p, a clear loss a p near 1, identical models p = 1;
    under the null (exchangeable pairs) p is uniform: P(p < 0.05) within 3 SE of 0.05."""
    from stablejax.evaluation import paired_stable_time_test

    rng = np.random.default_rng(1)
    base = rng.exponential(size=32)
    better = paired_stable_time_test(base, base + 0.5 + 0.1 * rng.random(32))
    assert better["p_value"] < 1e-4 and better["n_longer"] == 32 and better["n_shorter"] == 0
    worse = paired_stable_time_test(base, base - 0.5)
    assert worse["p_value"] > 0.99
    assert paired_stable_time_test(base, base)["p_value"] == 1.0
    trials = 600
    small = sum(
        paired_stable_time_test(rng.exponential(size=32), rng.exponential(size=32))["p_value"]
        < 0.05
        for _ in range(trials)
    )
    assert abs(small / trials - 0.05) < 3 * np.sqrt(0.05 * 0.95 / trials)
    with pytest.raises(ValueError):
        paired_stable_time_test([1.0, 2.0], [1.0])
