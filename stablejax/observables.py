"""Observables: distance histograms h(r), element-pair RDFs, VACF, MSD/diffusivity, bonds.

All functions are pure JAX and jit-able (the caller owns the jit boundary).

Batching convention:
  * Structural observables (`distance_histogram`, `radial_distribution_function`,
    `bond_lengths`, `mean_bond_length`) are written for one frame `[n, 3]` and also
    accept any number of leading batch axes (`[..., n, 3]`, e.g. `[replicas, frames,
    n, 3]`); the result gets the same leading axes. The box is shared by all frames
    (for NPT, `jax.vmap` over positions and box yourself).
  * Time-correlation observables (`velocity_autocorrelation`,
    `mean_squared_displacement`) take a trajectory `[t, n, 3]` and also accept leading
    batch axes (`[replicas, t, n, 3]`).

Species and bond lists select atoms and pairs, so they must be concrete (NumPy or
concrete JAX arrays), not traced: close over them, do not vmap over them.

Smearing. Both h(r) and g(r) are histograms of the *Gaussian-smeared* distance
distribution: every pair distance d contributes to bin [r_k, r_k + dr) the exact
probability mass of N(d, sigma^2) in that bin,
    w_k(d) = Phi((r_k + dr - d) / sigma) - Phi((r_k - d) / sigma),
which is smooth (differentiable) in the positions, conserves the total mass of
every pair, and reduces exactly to the plain histogram when `sigma=0` (the
unsmeared, non-differentiable variant used by MDsim/StABlE's evaluation RDFs). The
reference implementation instead evaluates Gaussians at the bin centres and
renormalises, which loses ~1% of the mass periodically when sigma < dr; bin
integration has no such aliasing. Each pair only touches the bins within
~6 sigma of it (a scatter-add), so memory is O(pairs * sigma/dr), not O(pairs * bins).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import erf

from stablejax import geometry

# How far (in units of sigma) a pair's Gaussian is integrated; the mass beyond is ~2e-9.
_SMEAR_TAIL_SIGMAS = 6.0

#: Element pairs of the water RDFs (O-O, O-H, H-H) used by the RDF criterion and reports;
#: g_OH = g_HO, so one order is enough.
WATER_PAIRS = ((8, 8), (8, 1), (1, 1))


# --------------------------------------------------------------------------- helpers


def _n_bins(r_max: float, dr: float) -> int:
    if r_max <= 0 or dr <= 0:
        raise ValueError(f"r_max and dr must be positive, got r_max={r_max}, dr={dr}")
    n = int(round(r_max / dr))
    if n < 1 or abs(n * dr - r_max) > 1e-6 * r_max:
        raise ValueError(f"r_max={r_max} must be an integer multiple of dr={dr}")
    return n


def bin_centers(r_max: float, dr: float) -> np.ndarray:
    """Centres of the histogram bins [0, dr), [dr, 2 dr), ..., up to r_max.

    Args:
      r_max: upper edge of the last bin, Å (an integer multiple of dr).
      dr: bin width, Å.

    Returns:
      [n_bins] NumPy array of bin centres in Å, n_bins = r_max / dr.

    Example:
      >>> bin_centers(1.0, 0.25)
      array([0.125, 0.375, 0.625, 0.875])
    """
    n = _n_bins(r_max, dr)
    return (np.arange(n) + 0.5) * dr


def bin_edges(r_max: float, dr: float) -> np.ndarray:
    """[n_bins + 1] bin edges in Å matching `bin_centers`."""
    n = _n_bins(r_max, dr)
    return np.arange(n + 1) * dr


def _minimum_image(d: jax.Array, box) -> jax.Array:
    return geometry.minimum_image(d, box)


def _check_box(box, r_max: float) -> None:
    """Minimum-image distances are only complete up to half the smallest cell width."""
    if box is None:
        return
    try:
        b = np.asarray(box, dtype=float)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced box (e.g. vmapped NPT boxes): the caller is responsible
    if b.shape not in ((3,), (3, 3)):
        raise ValueError(
            f"box must be [3] side lengths or a [3, 3] cell (lattice vectors as rows) in Å, "
            f"got shape {b.shape}"
        )
    half = 0.5 * float(geometry.perpendicular_widths(b).min())
    if r_max > half + 1e-9:
        raise ValueError(
            f"r_max={r_max} Å exceeds half the shortest box side (perpendicular width of "
            f"the cell; {half:.4f} Å); minimum-image distances beyond it are incomplete"
        )


def _rdf_image_shifts(box, r_max: float, sigma: float) -> np.ndarray | None:
    """Lattice shifts for an RDF whose r_max exceeds half the smallest width, else None.

    The shifts cover r_max plus the smearing tail, so that every image whose
    Gaussian reaches the histogram is counted. None (minimum image) for a box
    that fits or is traced (vmapped NPT boxes: the caller is responsible).
    """
    try:
        b = np.asarray(box, dtype=float)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    if b.shape not in ((3,), (3, 3)):
        raise ValueError(
            f"box must be [3] side lengths or a [3, 3] cell (lattice vectors as rows) in Å, "
            f"got shape {b.shape}"
        )
    if r_max <= 0.5 * float(geometry.perpendicular_widths(b).min()) + 1e-9:
        return None
    return geometry.image_shifts(b, r_max + _SMEAR_TAIL_SIGMAS * sigma)


def _image_distances(positions, i, j, box, shifts) -> jax.Array:
    """|x_j - x_i + n cell| [p * k] for the listed pairs and every shift n [k, 3]."""
    d = _minimum_image(positions[j] - positions[i], box)
    vec = d[:, None, :] + geometry.shift_vectors(shifts, jnp.asarray(box, positions.dtype))
    return jnp.sqrt(jnp.maximum(jnp.sum(vec * vec, axis=-1), 1e-24)).reshape(-1)


def _concrete_int_array(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x).astype(np.int64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            f"{name} selects atoms/pairs and must be concrete (close over it instead of "
            "passing it through jit/vmap)"
        ) from e


def _over_leading_axes(fn, x: jax.Array, core_ndim: int):
    """Apply a function written for one `core_ndim`-dimensional item over leading axes."""
    x = jnp.asarray(x)
    if x.ndim < core_ndim:
        raise ValueError(f"expected at least {core_ndim} dimensions, got shape {x.shape}")
    if x.ndim == core_ndim:
        return fn(x)
    lead = x.shape[:-core_ndim]
    flat = x.reshape((-1,) + x.shape[-core_ndim:])
    out = jax.vmap(fn)(flat)
    return out.reshape(lead + out.shape[1:])


def _pair_distances(positions: jax.Array, i: np.ndarray, j: np.ndarray, box) -> jax.Array:
    d = _minimum_image(positions[j] - positions[i], box)
    # i != j for every listed pair; the floor keeps gradients finite for overlapping atoms.
    return jnp.sqrt(jnp.maximum(jnp.sum(d * d, axis=-1), 1e-24))


def smeared_histogram(distances: jax.Array, *, n_bins: int, dr: float, sigma: float) -> jax.Array:
    """Counts of distances in bins [k dr, (k+1) dr), each distance smeared by N(d, sigma^2).

    Args:
      distances: [p] Å.
      n_bins: number of bins starting at 0.
      dr: bin width, Å.
      sigma: Gaussian smearing width, Å; 0 gives the plain (unsmeared) histogram.

    Returns:
      [n_bins] (fractional) counts; each distance contributes its Gaussian mass inside
      [0, n_bins * dr), so the total is the number of distances well inside the range.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    distances = jnp.asarray(distances)
    dtype = distances.dtype
    half_width = 0 if sigma == 0 else int(math.ceil(_SMEAR_TAIL_SIGMAS * sigma / dr))
    # Exploded replicas give huge or NaN distances: park them beyond the last bin (their
    # whole window then lands in the discarded overflow bin) instead of overflowing int32.
    far = n_bins + half_width + 1
    u = jnp.where(jnp.isfinite(distances), distances / dr, far)
    k0 = jnp.floor(jnp.clip(u, -1.0 - half_width, far)).astype(jnp.int32)
    if sigma == 0:
        idx = jnp.where((k0 >= 0) & (k0 < n_bins), k0, n_bins)
        counts = jnp.zeros(n_bins + 1, dtype).at[idx].add(jnp.ones_like(distances))
        return counts[:n_bins]
    k = k0[:, None] + jnp.arange(-half_width, half_width + 1, dtype=jnp.int32)[None, :]
    lower = k.astype(dtype) * dr
    scale = 1.0 / (math.sqrt(2.0) * sigma)
    d = distances[:, None]
    w = 0.5 * (erf((lower + dr - d) * scale) - erf((lower - d) * scale))
    idx = jnp.where((k >= 0) & (k < n_bins), k, n_bins)
    counts = jnp.zeros(n_bins + 1, dtype).at[idx.reshape(-1)].add(w.reshape(-1))
    return counts[:n_bins]


# ------------------------------------------------------------------- structure: h(r)


def distance_histogram(
    positions: jax.Array,
    *,
    r_max: float = 10.0,
    dr: float = 0.02,
    sigma: float = 0.01,
    box=None,
) -> jax.Array:
    """Distribution of all interatomic distances h(r), Gaussian-smeared (the aspirin observable).

    h(r) = 1/n_pairs * sum_{i<j} N(r; d_ij, sigma^2), bin-averaged over bins of width dr.
    Normalised as a probability density in r (Å^-1): sum(h) * dr equals the fraction
    of pairs closer than r_max, i.e. 1 for a molecule smaller than r_max. This is the
    paper's definition (A.4); the reference code additionally divides by the relative
    shell volume 3 r^2 dr / r_max^3, which only rescales bins (and the loss weights).
    Differentiable with respect to positions when sigma > 0.

    Args:
      positions: [..., n, 3] Å (leading axes are batch axes, e.g. frames).
      r_max: upper edge of the histogram, Å (paper: 10 for aspirin, 15 for the peptide).
      dr: bin width, Å (paper: 0.02).
      sigma: Gaussian smearing width, Å (paper: 0.01); 0 = plain histogram.
      box: [3] Å box or [3, 3] Å cell (lattice vectors as rows) for minimum-image
        distances, or None (free space).

    Returns:
      [..., n_bins] density in 1/Å at `bin_centers(r_max, dr)`.

    Example:
      >>> h = distance_histogram(positions)          # [500] for aspirin
      >>> h_mean = distance_histogram(trajectory).mean(0)   # [t, n, 3] -> [500]
    """
    n_bins = _n_bins(r_max, dr)
    _check_box(box, r_max)
    n = jnp.shape(positions)[-2]
    if n < 2:
        raise ValueError("distance_histogram needs at least two atoms")
    i, j = np.triu_indices(n, k=1)

    def one(x):
        d = _pair_distances(x, i, j, box)
        return smeared_histogram(d, n_bins=n_bins, dr=dr, sigma=sigma) / (len(i) * dr)

    return _over_leading_axes(one, positions, 2)


# ------------------------------------------------------------------- structure: g(r)


def _rdf_pairs(species, pair, n: int):
    """Pair lists (i, j) and the number of ordered pairs for the ideal-gas normalisation."""
    if pair is None:
        i, j = np.triu_indices(n, k=1)
        return i, j, n * (n - 1)
    if species is None:
        raise ValueError("species is required when pair is given")
    s = _concrete_int_array(species, "species")
    if s.shape != (n,):
        raise ValueError(f"species must have shape [{n}], got {s.shape}")
    a, b = (int(p) for p in pair)
    ia = np.flatnonzero(s == a)
    ib = np.flatnonzero(s == b)
    if len(ia) == 0 or len(ib) == 0:
        raise ValueError(f"pair {pair}: no atoms of species {a if len(ia) == 0 else b}")
    if a == b:
        if len(ia) < 2:
            raise ValueError(f"pair {pair}: need at least two atoms of species {a}")
        u, v = np.triu_indices(len(ia), k=1)
        return ia[u], ia[v], len(ia) * (len(ia) - 1)
    i, j = np.meshgrid(ia, ib, indexing="ij")
    return i.reshape(-1), j.reshape(-1), len(ia) * len(ib)


def radial_distribution_function(
    positions: jax.Array,
    species,
    box,
    *,
    pair: tuple[int, int] | None = (8, 1),
    r_max: float = 6.0,
    dr: float = 0.01,
    sigma: float = 0.01,
) -> jax.Array:
    """Element-pair radial distribution function g_ab(r) in a periodic box.

    g_ab(r_k) = V / (N_a N_b) * C_ab(r_k) / (4/3 pi (r_{k+1}^3 - r_k^3)),
    where C_ab(r_k) is the (smeared) number of ordered a-b pairs, i in a, j in b,
    j != i, at distance in bin k (minimum image). For a == b the normaliser is
    N_a (N_a - 1), so an ideal gas gives g = 1 exactly in expectation (MDsim uses
    N_a^2, which tends to (N_a - 1)/N_a). With `pair=None` all atoms count as one
    species (e.g. a Lennard-Jones fluid).

    Small cells. When r_max exceeds half the smallest perpendicular width, C_ab
    counts every periodic image within reach instead (i in the cell, j any
    image of a b atom, including i's own images i + n cell, n != 0, for a == b),
    as a supercell large enough for minimum image would; the normaliser V /
    (N_a N_b) or V / (N_a (N_a - 1)) is unchanged, so the bins below half the
    width are the same as with a smaller r_max. Unlike pairs then give exactly
    the supercell's g(r) (an ideal gas -> 1 everywhere); for like pairs the
    supercell (M copies) normalises by M N_a (M N_a - 1) instead, so
    g_cell N_a (N_a - 1) = g_supercell M N_a (M N_a - 1) / M^2, and the atom's
    own images (a lattice) add on average N_a / (N_a - 1) - 1 beyond the
    shortest lattice vector for an ideal gas. Cost O(pairs x shifts) per frame.

    Smearing: see the module docstring; sigma=0 gives the plain histogram RDF that
    MDsim/StABlE use for evaluation (the RDF-MAE stability criterion), sigma > 0 a
    differentiable RDF (needed only by differentiable-simulation baselines; the
    Boltzmann estimator does not need a differentiable observable).

    Args:
      positions: [..., n, 3] Å (leading axes are batch axes).
      species: [n] atomic numbers (concrete), or None when pair is None.
      box: [3] Å box side lengths or [3, 3] Å cell (lattice vectors as rows). The
        density uses the cell volume (|det| for a cell). An r_max beyond half the
        smallest perpendicular width counts periodic images (see above; needs a
        concrete box: with a traced box the minimum image is used regardless).
      pair: (a, b) atomic numbers, order irrelevant ((8, 1) = O-H), or None for all atoms.
      r_max: upper edge of the histogram, Å (water: 6).
      dr: bin width, Å (water: 0.01).
      sigma: Gaussian smearing width, Å; 0 = unsmeared.

    Returns:
      [..., n_bins] dimensionless g(r) at `bin_centers(r_max, dr)`.

    Example:
      >>> g_oo = radial_distribution_function(traj, species, box, pair=(8, 8)).mean(0)
    """
    if box is None:
        raise ValueError(
            "radial_distribution_function needs a periodic box; use distance_histogram"
        )
    n_bins = _n_bins(r_max, dr)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    shifts = _rdf_image_shifts(box, r_max, sigma)
    n = jnp.shape(positions)[-2]
    i, j, n_ordered = _rdf_pairs(species, pair, n)
    like = pair is None or int(pair[0]) == int(pair[1])
    # Unordered like pairs are counted once, so they weigh twice in the ordered count.
    multiplicity = 2.0 if like else 1.0
    edges = bin_edges(r_max, dr)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    self_counts = None
    if shifts is not None and like:
        # Each atom's own images at the lattice vectors n cell, n != 0: half of them
        # (n > 0 lexicographically) with multiplicity 2, like the unordered pairs.
        if pair is None:
            n_centres = n
        else:
            n_centres = int(np.sum(_concrete_int_array(species, "species") == int(pair[0])))
        half = shifts[[tuple(v) > (0, 0, 0) for v in shifts.tolist()]]
        lattice = np.linalg.norm(half @ geometry.cell_matrix(box), axis=-1)
        self_counts = n_centres * smeared_histogram(
            jnp.asarray(lattice), n_bins=n_bins, dr=dr, sigma=sigma
        )

    def one(x):
        volume = geometry.cell_volume(jnp.asarray(box, dtype=x.dtype))
        if shifts is None:
            d = _pair_distances(x, i, j, box)
        else:
            d = _image_distances(x, i, j, box, shifts)
        counts = smeared_histogram(d, n_bins=n_bins, dr=dr, sigma=sigma)
        if self_counts is not None:
            counts = counts + self_counts.astype(x.dtype)
        return multiplicity * counts * volume / (n_ordered * jnp.asarray(shell, x.dtype))

    return _over_leading_axes(one, positions, 2)


# ------------------------------------------------------------------------- bonds


def bond_lengths(positions: jax.Array, bonds, box=None) -> jax.Array:
    """Lengths of the listed bonds.

    Args:
      positions: [..., n, 3] Å.
      bonds: [b, 2] int atom index pairs (e.g. from `stablejax.data.topology.find_bonds`).
      box: [3] Å box, [3, 3] Å cell (rows), or None (minimum image).

    Returns:
      [..., b] bond lengths in Å.
    """
    bonds = _concrete_int_array(bonds, "bonds")
    if bonds.ndim != 2 or bonds.shape[1] != 2:
        raise ValueError(f"bonds must have shape [b, 2], got {bonds.shape}")
    positions = jnp.asarray(positions)
    d = positions[..., bonds[:, 1], :] - positions[..., bonds[:, 0], :]
    d = _minimum_image(d, box)
    return jnp.sqrt(jnp.maximum(jnp.sum(d * d, axis=-1), 1e-24))


def mean_bond_length(
    positions: jax.Array,
    bonds,
    species,
    *,
    pair: tuple[int, int] = (8, 1),
    box=None,
) -> jax.Array:
    """Mean length of the bonds between two elements (water: the O-H bond length).

    Args:
      positions: [..., n, 3] Å.
      bonds: [b, 2] int atom index pairs.
      species: [n] atomic numbers (concrete).
      pair: (a, b) atomic numbers; a bond matches in either order.
      box: [3] Å box, [3, 3] Å cell (rows), or None.

    Returns:
      [...] mean bond length in Å.
    """
    bonds = _concrete_int_array(bonds, "bonds")
    s = _concrete_int_array(species, "species")
    a, b = (int(p) for p in pair)
    si, sj = s[bonds[:, 0]], s[bonds[:, 1]]
    keep = np.flatnonzero(((si == a) & (sj == b)) | ((si == b) & (sj == a)))
    if len(keep) == 0:
        raise ValueError(f"no bonds between species {a} and {b}")
    return jnp.mean(bond_lengths(positions, bonds[keep], box), axis=-1)


# ------------------------------------------------------------------------- dynamics


def velocity_autocorrelation(velocities: jax.Array, *, window: int) -> jax.Array:
    """Normalised velocity autocorrelation function (VACF).

    C(tau) = < v_i(t0) . v_i(t0 + tau) > / < v_i(t0) . v_i(t0) >, averaged over atoms i
    and the time origins t0 = 0 .. t - window (the same origins for every lag, so the
    normalisation by lag 0 is consistent and C(0) = 1).

    Args:
      velocities: [..., t, n, 3] any velocity unit (it cancels); leading axes are batch axes.
      window: number of lags (paper: 100 consecutive frames), 1 <= window <= t.

    Returns:
      [..., window] VACF at lags 0 .. window - 1 (in frames).
    """
    t = jnp.shape(velocities)[-3]
    if not 1 <= window <= t:
        raise ValueError(f"window must be in [1, t={t}], got {window}")
    n_origins = t - window + 1
    # Cross-correlation of the origin block with the whole trajectory by FFT: the lags
    # read (t0 + lag <= t - 1) never wrap around a length >= t, so no extra padding.
    n_fft = 1 << max(0, (t - 1).bit_length())

    def one(v):
        flat = v.reshape(t, -1)
        origins = jnp.zeros_like(flat).at[:n_origins].set(flat[:n_origins])
        spec_o = jnp.fft.rfft(origins, n=n_fft, axis=0)
        spec_v = jnp.fft.rfft(flat, n=n_fft, axis=0)
        cross = jnp.sum(jnp.conj(spec_o) * spec_v, axis=1)
        c = jnp.fft.irfft(cross, n=n_fft)[:window].astype(v.dtype)
        return c / c[0]

    return _over_leading_axes(one, velocities, 3)


def mean_squared_displacement(
    unwrapped_positions: jax.Array,
    *,
    max_lag: int,
    remove_com: bool = True,
    masses=None,
) -> jax.Array:
    """Mean squared displacement averaged over atoms and all available time origins.

    MSD(tau) = < |r_i(t0 + tau) - r_i(t0)|^2 >, averaged over atoms i and origins
    t0 = 0 .. t - 1 - tau (every origin the trajectory allows for that lag).

    Args:
      unwrapped_positions: [..., t, n, 3] Å, *unwrapped* (continuous across the box).
        Pass only the atoms to track (water: the oxygens).
      max_lag: number of lags, 1 <= max_lag <= t.
      remove_com: subtract the (mass-weighted) centre of mass of the given atoms in
        every frame first, so that drift of the whole system does not count.
      masses: [n] amu for the centre of mass, or None for equal weights.

    Returns:
      [..., max_lag] MSD in Å^2 at lags 0 .. max_lag - 1 frames (MSD[0] = 0).

    Cost O(max_lag * t * n), computed lag by lag (`lax.map`) in O(t * n) memory; direct
    differences rather than the FFT formula, which cancels badly in float32.
    """
    t, n = jnp.shape(unwrapped_positions)[-3:-1]
    if not 1 <= max_lag <= t:
        raise ValueError(f"max_lag must be in [1, t={t}], got {max_lag}")
    if masses is not None and jnp.shape(masses) != (n,):
        raise ValueError(f"masses must have shape [{n}], got {jnp.shape(masses)}")

    def one(x):
        if remove_com:
            w = jnp.ones(n, x.dtype) if masses is None else jnp.asarray(masses, x.dtype)
            com = jnp.einsum("i,tid->td", w / jnp.sum(w), x)
            x = x - com[:, None, :]
        origins = jnp.arange(t)

        def at_lag(lag):
            later = jnp.roll(x, -lag, axis=0)
            sq = jnp.sum((later - x) ** 2, axis=(-2, -1))  # [t]
            valid = origins < t - lag
            return jnp.sum(jnp.where(valid, sq, 0.0)) / (n * (t - lag))

        return lax.map(at_lag, jnp.arange(max_lag))

    return _over_leading_axes(one, unwrapped_positions, 3)


def diffusion_coefficient(
    msd: jax.Array, dt_ps: float, *, fit_range: tuple[int, int] | None = None
) -> jax.Array:
    """Self-diffusion coefficient from the Einstein relation, D = slope(MSD vs t) / 6.

    Args:
      msd: [..., max_lag] Å^2 at lags 0, 1, ... frames (from `mean_squared_displacement`).
      dt_ps: time between frames in ps.
      fit_range: (start, stop) lag indices of the least-squares line fit, stop exclusive.
        Default: the second half of the lags, which skips the ballistic regime at short
        lags. For water at 300 K, fit over lags of several ps.

    Returns:
      [...] D in Å^2/ps (multiply by 1e-4 for cm^2/s).
    """
    msd = jnp.asarray(msd)
    m = msd.shape[-1]
    start, stop = (m // 2, m) if fit_range is None else fit_range
    if not 0 <= start < stop <= m or stop - start < 2:
        raise ValueError(f"fit_range must satisfy 0 <= start < stop <= {m}, stop - start >= 2")
    lags = jnp.arange(start, stop, dtype=msd.dtype) * dt_ps
    y = msd[..., start:stop]
    tc = lags - jnp.mean(lags)
    slope = jnp.sum((y - jnp.mean(y, axis=-1, keepdims=True)) * tc, axis=-1) / jnp.sum(tc * tc)
    return slope / 6.0
