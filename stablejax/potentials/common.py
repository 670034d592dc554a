"""Building blocks shared by the message-passing potentials.

Radial bases, smooth cutoff envelopes, activations and a small MLP. All are
pure functions of arrays (or tiny Flax modules) and dtype-agnostic.

Distances `r` are in Å and the cutoff `r_cut` in Å. Every envelope here is
exactly zero for r >= r_cut, so masked (beyond-cutoff or padded) edges get a
zero weight even before the explicit edge mask is applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def shifted_softplus(x: jax.Array) -> jax.Array:
    """softplus(x) - log 2, so that ssp(0) = 0 (SchNet's activation)."""
    return jax.nn.softplus(x) - jnp.log(2.0).astype(x.dtype)


def cosine_cutoff(r: jax.Array, *, r_cut: float) -> jax.Array:
    """SchNet's cosine cutoff 0.5 (cos(pi r / r_cut) + 1) for r < r_cut, else 0.

    Continuous with a continuous first derivative at r_cut (the second
    derivative jumps), so forces are continuous as a neighbour crosses r_cut.

    Args:
      r: [...] distances, Å.
      r_cut: cutoff radius, Å.

    Returns:
      [...] weights in [0, 1].
    """
    inside = r < r_cut
    # Evaluate the cosine on a clipped argument so the discarded branch never
    # produces values whose gradient could leak through the `where`.
    x = jnp.where(inside, r, r_cut) / r_cut
    return jnp.where(inside, 0.5 * (jnp.cos(jnp.pi * x) + 1.0), 0.0)


def polynomial_envelope(r: jax.Array, *, r_cut: float, p: int = 6) -> jax.Array:
    """Polynomial envelope of DimeNet/NequIP (Klicpera et al. 2020, Eq. 8).

    u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2),
    x = r / r_cut, and 0 for x >= 1. u and its first two derivatives vanish at
    x = 1 (C2 at the cutoff).

    Args:
      r: [...] distances, Å.
      r_cut: cutoff radius, Å.
      p: polynomial order (NequIP default 6, DimeNet/GemNet 5 via exponent p+1=6).

    Returns:
      [...] weights, 1 at r = 0 and 0 for r >= r_cut.
    """
    inside = r < r_cut
    x = jnp.where(inside, r, r_cut) / r_cut
    u = (
        1.0
        - 0.5 * (p + 1) * (p + 2) * x**p
        + p * (p + 2) * x ** (p + 1)
        - 0.5 * p * (p + 1) * x ** (p + 2)
    )
    return jnp.where(inside, u, 0.0)


def gaussian_basis(
    r: jax.Array, *, r_min: float = 0.0, r_max: float, n_basis: int, width: float | None = None
) -> jax.Array:
    """Gaussians exp(-(r - mu_k)^2 / (2 width^2)) on evenly spaced centres mu_k.

    With width None the width is the centre spacing (SchNet / PyG
    GaussianSmearing convention).

    Args:
      r: [...] distances, Å.
      r_min, r_max: first and last centre, Å.
      n_basis: number of Gaussians.
      width: Gaussian standard deviation, Å.

    Returns:
      [..., n_basis] basis values.
    """
    centres = np.linspace(r_min, r_max, n_basis)
    if width is None:
        width = float(centres[1] - centres[0]) if n_basis > 1 else float(r_max - r_min)
    centres = jnp.asarray(centres, dtype=r.dtype)
    return jnp.exp(-0.5 * ((r[..., None] - centres) / width) ** 2)


def bessel_basis(
    r: jax.Array,
    *,
    r_cut: float,
    n_basis: int | None = None,
    frequencies: jax.Array | None = None,
    prefactor: float | None = None,
) -> jax.Array:
    """Radial Bessel basis prefactor * sin(w_k r / r_cut) / r.

    Two normalisations are in use, both from this one function: DimeNet/GemNet's
    fixed frequencies w_k = k pi (k = 1..n_basis) with prefactor sqrt(2 / r_cut) (the
    default), and NequIP's trainable frequencies (`frequencies`, initialised at k pi)
    with prefactor 2 / r_cut. Finite for r > 0; callers pass distances from
    `base.safe_norm`, which are bounded away from zero.

    Args:
      r: [...] distances, Å.
      r_cut: cutoff radius, Å.
      n_basis: number of fixed-frequency functions (when `frequencies` is None).
      frequencies: [n_basis] dimensionless w_k (e.g. trainable), instead of k pi.
      prefactor: 1/Å^(1/2) or 1/Å scale; default sqrt(2 / r_cut).

    Returns:
      [..., n_basis] basis values.
    """
    if frequencies is None:
        if n_basis is None:
            raise ValueError("bessel_basis needs n_basis or frequencies")
        frequencies = jnp.pi * jnp.arange(1, n_basis + 1, dtype=r.dtype)
    if prefactor is None:
        prefactor = jnp.sqrt(2.0 / r_cut)
    rr = r[..., None]
    return prefactor * jnp.sin(frequencies * rr / r_cut) / rr


def segment_sum(data: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Sum edge data into atoms; ids equal to num_segments (padding) are dropped."""
    return jax.ops.segment_sum(data, segment_ids, num_segments=num_segments)


class MLP(nn.Module):
    """Dense layers with an activation between them (none after the last).

    Attributes:
      features: output width of each layer.
      activation: elementwise nonlinearity.
      use_bias: whether the layers have biases.
    """

    features: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = shifted_softplus
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for k, width in enumerate(self.features):
            x = nn.Dense(width, use_bias=self.use_bias, name=f"dense_{k}")(x)
            if k < len(self.features) - 1:
                x = self.activation(x)
        return x


def count_params(params) -> int:
    """Number of scalar parameters in a pytree (arrays or jax.ShapeDtypeStruct)."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))
