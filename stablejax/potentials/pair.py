"""Pair potentials: Lennard-Jones and a pair MLP (learned function of the distance).

Both follow the contract of `stablejax.potentials.base`: per-atom energies
e_i = 1/2 sum_{j in edges from i} phi(r_ij) in eV, with directed edges holding both
directions of every pair (as `all_pairs_edges` and jax-md Sparse neighbour lists do) and
padded edges (value n) contributing nothing to energies or gradients. Both are
single-species: `species` is accepted for the common signature and ignored.

Build through `stablejax.potentials.factory.build(config)` or `build(config)` here, with
`config = default_config('lennard_jones' | 'pair_mlp')`. Units are those of the caller:
Å and eV throughout the package (the LJ benchmark uses LJ reduced units, sigma =
epsilon = 1, which is the same code with different numbers).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from stablejax.potentials.base import Potential, edge_vectors, safe_norm
from stablejax.potentials.common import MLP, cosine_cutoff, gaussian_basis, polynomial_envelope

__all__ = [
    "build",
    "default_config",
    "lennard_jones_pair",
    "lennard_jones",
    "pair_mlp",
    "pair_mlp_phi",
    "repulsive_pair",
    "wca_pair",
]

#: Pair potentials built here (the names `factory.build` routes to this module).
NAMES = ("lennard_jones", "pair_mlp")
#: Priors the pair MLP can be added to.
PRIORS = ("none", "repulsive", "wca", "lennard_jones")
_ACTIVATIONS = {"silu": jax.nn.silu, "tanh": jnp.tanh, "softplus": jax.nn.softplus}


# --------------------------------------------------------------------------------------
# pair functions phi(r) (eV), safe for r beyond the cutoff and for masked edges
# --------------------------------------------------------------------------------------


def _lj(r, sigma, epsilon):
    s6 = (sigma / r) ** 6
    return 4.0 * epsilon * (s6 * s6 - s6)


def lennard_jones_pair(r, *, sigma, epsilon, cutoff: float, shift: bool = True, valid=None):
    """Truncated (and by default shifted) LJ pair energy phi(r) in eV.

    phi(r) = 4 eps [(sigma/r)^12 - (sigma/r)^6] - phi_LJ(cutoff) for r < cutoff, 0 beyond
    (the shift makes phi continuous at the cutoff; forces still jump there by
    -phi'_LJ(cutoff)). Differentiable in r, sigma and epsilon: excluded distances are
    replaced by the cutoff before the power laws ("double where"), so neither NaN nor inf
    reaches the gradient (jax-md 0.2.29's LJ helpers give NaN w.r.t. sigma/epsilon).

    Args:
      r: [...] distances, Å.
      sigma: Å (scalar or broadcastable to r).
      epsilon: eV (scalar or broadcastable to r).
      cutoff: Å.
      shift: subtract phi_LJ(cutoff) so phi(cutoff) = 0.
      valid: optional [...] bool of pairs to include (e.g. the edge mask).

    Returns:
      [...] pair energies, eV.
    """
    inside = r < cutoff if valid is None else valid & (r < cutoff)
    r_safe = jnp.where(inside, r, cutoff)
    phi = _lj(r_safe, sigma, epsilon)
    if shift:
        phi = phi - _lj(jnp.asarray(cutoff, r.dtype), sigma, epsilon)
    return jnp.where(inside, phi, 0.0)


def repulsive_pair(r, *, sigma, epsilon, cutoff: float, valid=None):
    """Repulsive term of LJ, 4 eps (sigma/r)^12, shifted to zero at the cutoff (eV)."""
    inside = r < cutoff if valid is None else valid & (r < cutoff)
    r_safe = jnp.where(inside, r, cutoff)
    phi = 4.0 * epsilon * ((sigma / r_safe) ** 12 - (sigma / cutoff) ** 12)
    return jnp.where(inside, phi, 0.0)


def wca_pair(r, *, sigma, epsilon, valid=None):
    """Weeks-Chandler-Andersen repulsion: LJ + eps for r < 2^(1/6) sigma, else 0 (eV).

    The purely repulsive part of LJ in the WCA split; phi and its first derivative are
    continuous at 2^(1/6) sigma.
    """
    r_min = 2.0 ** (1.0 / 6.0) * sigma
    inside = r < r_min if valid is None else valid & (r < r_min)
    r_safe = jnp.where(inside, r, r_min)
    return jnp.where(inside, _lj(r_safe, sigma, epsilon) + epsilon, 0.0)


def _pair_sum(phi, edges, n):
    """Per-atom energies [n]: half the pair energies of the edges centred on each atom."""
    return 0.5 * jax.ops.segment_sum(phi, edges[0], num_segments=n)


def _distances(positions, edges, box):
    vectors, mask = edge_vectors(positions, edges, box)
    return safe_norm(vectors), mask


# --------------------------------------------------------------------------------------
# Lennard-Jones
# --------------------------------------------------------------------------------------


def _lennard_jones_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "lennard_jones"
    c.sigma = 3.405  # Å (argon); initial value of params['sigma']
    c.epsilon = 0.0103  # eV (argon, 119.8 K); initial value of params['epsilon']
    c.cutoff = 2.5 * 3.405  # Å; must be <= half the box for minimum-image edges
    c.shift = True  # shift phi to zero at the cutoff
    return c


def lennard_jones(config: ml_collections.ConfigDict) -> Potential:
    """Lennard-Jones potential with trainable params {'sigma': Å, 'epsilon': eV}.

    phi(r) = 4 eps [(sigma/r)^12 - (sigma/r)^6], truncated at `config.cutoff` Å and, with
    `config.shift`, shifted by -phi(cutoff) so that the energy is continuous there (the
    force still jumps by a tiny amount at the cutoff). Gradients w.r.t. sigma and epsilon
    are exact and finite (see `lennard_jones_pair`).

    Args:
      config: `default_config('lennard_jones')` (fields sigma Å, epsilon eV, cutoff Å,
        shift).

    Returns:
      A `Potential`; `init(key, species, positions, box)` returns the config's sigma and
      epsilon as scalars in the dtype of `positions`.
    """
    cutoff = float(config.cutoff)
    if cutoff <= 0:
        raise ValueError(f"config.cutoff must be positive (Å); got {cutoff}")
    shift = bool(config.shift)

    def init(key, species, positions, box=None):
        del key, species, box
        dtype = jnp.asarray(positions).dtype
        return {
            "sigma": jnp.asarray(config.sigma, dtype),
            "epsilon": jnp.asarray(config.epsilon, dtype),
        }

    def per_atom_energies(params, species, positions, edges, box=None):
        """Per-atom LJ energies [n] eV (see `stablejax.potentials.base`)."""
        del species
        r, mask = _distances(positions, edges, box)
        phi = lennard_jones_pair(
            r,
            sigma=params["sigma"],
            epsilon=params["epsilon"],
            cutoff=cutoff,
            shift=shift,
            valid=mask,
        )
        return _pair_sum(phi, edges, positions.shape[0])

    return Potential(
        name="lennard_jones",
        config=config,
        cutoff=cutoff,
        init=init,
        per_atom_energies=per_atom_energies,
    )


# --------------------------------------------------------------------------------------
# pair MLP
# --------------------------------------------------------------------------------------


def _pair_mlp_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "pair_mlp"
    c.cutoff = 5.0  # Å; the envelope takes the learned term smoothly to zero here
    c.hidden_sizes = (128, 128, 128, 128, 128)  # 5 hidden layers of 128 (paper A.13)
    c.activation = "silu"  # 'silu' | 'tanh' | 'softplus' (smooth: forces are continuous)
    c.n_rbf = 0  # 0: the MLP sees r / cutoff; > 0: that many Gaussians on [0, cutoff]
    c.envelope = "cosine"  # 'cosine' (C1) | 'polynomial' (C2, p = 6)
    c.energy_scale = 1.0  # eV; the MLP output is multiplied by this
    c.zero_init_output = True  # learned term is exactly 0 at init: the model = the prior
    c.prior = "repulsive"  # 'none' | 'repulsive' (4 eps (sigma/r)^12) | 'wca' | 'lennard_jones'
    c.prior_sigma = 3.405  # Å
    c.prior_epsilon = 0.0103  # eV
    return c


class _PairNet(nn.Module):
    """Scalar learned pair term of a distance feature vector."""

    hidden_sizes: tuple[int, ...]
    activation: str
    zero_init_output: bool

    @nn.compact
    def __call__(self, features):
        act = _ACTIVATIONS[self.activation]
        h = MLP(tuple(self.hidden_sizes), activation=act, name="hidden")(features)
        h = act(h)
        init = nn.initializers.zeros if self.zero_init_output else nn.initializers.lecun_normal()
        return nn.Dense(1, kernel_init=init, name="out")(h)[..., 0]


def _pair_mlp_parts(config: ml_collections.ConfigDict):
    """(flax module, phi(params, r, valid) eV) of a pair-MLP config."""
    cutoff = float(config.cutoff)
    if cutoff <= 0:
        raise ValueError(f"config.cutoff must be positive (Å); got {cutoff}")
    if config.activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {tuple(_ACTIVATIONS)}; got {config.activation!r}"
        )
    if config.envelope not in ("cosine", "polynomial"):
        raise ValueError(f"envelope must be 'cosine' or 'polynomial'; got {config.envelope!r}")
    if config.prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}; got {config.prior!r}")
    net = _PairNet(
        hidden_sizes=tuple(int(h) for h in config.hidden_sizes),
        activation=str(config.activation),
        zero_init_output=bool(config.zero_init_output),
    )
    n_rbf = int(config.n_rbf)
    sigma0, eps0 = float(config.prior_sigma), float(config.prior_epsilon)
    scale = float(config.energy_scale)
    envelope_name, prior_name = str(config.envelope), str(config.prior)

    def features(r):
        if n_rbf:
            return gaussian_basis(r, r_max=cutoff, n_basis=n_rbf)
        return (r / cutoff)[..., None]

    def envelope(r):
        if envelope_name == "cosine":
            return cosine_cutoff(r, r_cut=cutoff)
        return polynomial_envelope(r, r_cut=cutoff)

    def prior(r, valid):
        if prior_name == "repulsive":
            return repulsive_pair(r, sigma=sigma0, epsilon=eps0, cutoff=cutoff, valid=valid)
        if prior_name == "wca":
            return wca_pair(r, sigma=sigma0, epsilon=eps0, valid=valid)
        if prior_name == "lennard_jones":
            return lennard_jones_pair(r, sigma=sigma0, epsilon=eps0, cutoff=cutoff, valid=valid)
        return jnp.zeros_like(r)

    def phi(params, r, valid=None):
        if valid is None:
            valid = jnp.ones(jnp.shape(r), bool)
        inside = valid & (r < cutoff)
        r_in = jnp.where(inside, r, 0.5 * cutoff)  # keep the MLP input in range
        learned = scale * envelope(r_in) * net.apply(params, features(r_in))
        return jnp.where(inside, learned, 0.0) + prior(r, valid)

    return net, phi


def pair_mlp_phi(config: ml_collections.ConfigDict):
    """The pair energy of a pair-MLP config: `(params, r [...] Å) -> phi(r) [...] eV`."""
    _, phi = _pair_mlp_parts(config)
    return lambda params, r: phi(params, jnp.asarray(r))


def pair_mlp(config: ml_collections.ConfigDict) -> Potential:
    """Pair potential phi(r) = prior(r) + energy_scale * envelope(r) * MLP(r).

    The MLP (`hidden_sizes`, smooth `activation`) maps the distance (as r / cutoff, or a
    Gaussian expansion when `n_rbf > 0`) to a scalar; the envelope takes it to zero at
    the cutoff with a continuous derivative ('cosine') or two ('polynomial'), so energies
    and forces are continuous. The optional fixed prior (not trained; its sigma/epsilon
    come from the config) is the repulsive part of LJ, 4 eps (sigma/r)^12 shifted to zero
    at the cutoff ('repulsive'), the WCA repulsion ('wca'), or the full shifted LJ
    ('lennard_jones'). With `zero_init_output` the learned term is exactly zero at init,
    so training starts from the prior.

    Args:
      config: `default_config('pair_mlp')` (cutoff, prior_sigma in Å; energy_scale,
        prior_epsilon in eV).

    Returns:
      A `Potential` whose params are the Flax variables of the MLP ({'params': ...}).
    """
    net, phi = _pair_mlp_parts(config)
    n_in = max(int(config.n_rbf), 1)

    def init(key, species, positions, box=None):
        del species, box
        dtype = jnp.asarray(positions).dtype
        params = net.init(key, jnp.zeros((1, n_in), dtype))
        return jax.tree.map(lambda x: x.astype(dtype), params)

    def per_atom_energies(params, species, positions, edges, box=None):
        """Per-atom energies [n] eV (see `stablejax.potentials.base`)."""
        del species
        r, mask = _distances(positions, edges, box)
        return _pair_sum(phi(params, r, mask), edges, positions.shape[0])

    return Potential(
        name="pair_mlp",
        config=config,
        cutoff=float(config.cutoff),
        init=init,
        per_atom_energies=per_atom_energies,
    )


# --------------------------------------------------------------------------------------
# factory entry points
# --------------------------------------------------------------------------------------


def default_config(name: str = "lennard_jones") -> ml_collections.ConfigDict:
    """Default config of a pair potential ('lennard_jones' or 'pair_mlp'); units in comments."""
    if name == "lennard_jones":
        return _lennard_jones_config()
    if name == "pair_mlp":
        return _pair_mlp_config()
    raise ValueError(f"unknown pair potential {name!r}; expected one of {NAMES}")


def build(config: ml_collections.ConfigDict) -> Potential:
    """Builds the pair potential named by `config.name`."""
    if config.name == "lennard_jones":
        return lennard_jones(config)
    if config.name == "pair_mlp":
        return pair_mlp(config)
    raise ValueError(f"unknown pair potential {config.name!r}; expected one of {NAMES}")
