"""SchNet (Schütt et al. 2018) as a per-atom energy model.

Continuous-filter convolutions on interatomic distances: atoms start from a
species embedding; each interaction block builds filters from a Gaussian
expansion of |r_ij| (times a cosine cutoff), multiplies them into linearly
transformed neighbour features, sums over neighbours, and adds the result
back through a two-layer update. A two-layer head gives one number per atom.

The StABlE paper's aspirin model (Supplementary Table 1): 64 hidden features,
64 filters, 6 interactions, 25 Gaussians, cosine cutoff 5 Å, shifted softplus.
Follows the module contract in `stablejax.potentials.factory`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from stablejax.potentials.base import safe_norm
from stablejax.potentials.common import (
    MLP,
    cosine_cutoff,
    gaussian_basis,
    segment_sum,
    shifted_softplus,
)


def default_config() -> ml_collections.ConfigDict:
    """SchNet hyperparameters of the StABlE paper's aspirin model."""
    config = ml_collections.ConfigDict()
    config.cutoff = 5.0  # Å, cosine cutoff radius
    config.hidden_features = 64  # atom feature width
    config.n_filters = 64  # continuous-filter width
    config.n_interactions = 6
    config.n_gaussians = 25  # centres evenly spaced on [0, cutoff]
    config.head_features = 32  # hidden width of the per-atom output head
    return config


class Interaction(nn.Module):
    """One SchNet interaction block (cfconv + atom-wise update), residual."""

    hidden_features: int
    n_filters: int
    cutoff: float

    @nn.compact
    def __call__(self, h, rbf, weight, edges):
        n = h.shape[0]
        # Filter-generating network on the radial basis; the cosine cutoff and
        # the edge mask (both in `weight`) switch edges off smoothly/exactly.
        w = MLP((self.n_filters, self.n_filters), name="filter")(rbf) * weight[:, None]
        x = nn.Dense(self.n_filters, use_bias=False, name="in2f")(h)
        messages = x[edges[1]] * w
        v = segment_sum(messages, edges[0], n)
        v = MLP((self.hidden_features, self.hidden_features), name="f2out")(v)
        return h + v


class SchNet(nn.Module):
    """SchNet per-atom outputs (module contract of `stablejax.potentials.factory`)."""

    n_species: int
    cutoff: float = 5.0
    hidden_features: int = 64
    n_filters: int = 64
    n_interactions: int = 6
    n_gaussians: int = 25
    head_features: int = 32

    @nn.compact
    def __call__(self, species_idx, vectors, edges, mask):
        """[n] raw per-atom outputs from species indices [n], edge vectors [e,3] Å,
        edges [2,e] and the edge mask [e]."""
        r = safe_norm(vectors)
        rbf = gaussian_basis(r, r_max=self.cutoff, n_basis=self.n_gaussians)
        weight = cosine_cutoff(r, r_cut=self.cutoff) * mask.astype(r.dtype)
        h = nn.Embed(self.n_species, self.hidden_features, name="embedding")(species_idx)
        h = h.astype(r.dtype)
        for t in range(self.n_interactions):
            h = Interaction(
                self.hidden_features, self.n_filters, self.cutoff, name=f"interaction_{t}"
            )(h, rbf, weight, edges)
        out = MLP((self.head_features, 1), activation=shifted_softplus, name="head")(h)
        return jnp.squeeze(out, -1)


def make_module(config: ml_collections.ConfigDict, n_species: int) -> SchNet:
    """The SchNet module for `config` (see `default_config`)."""
    return SchNet(
        n_species=n_species,
        cutoff=float(config.cutoff),
        hidden_features=int(config.hidden_features),
        n_filters=int(config.n_filters),
        n_interactions=int(config.n_interactions),
        n_gaussians=int(config.n_gaussians),
        head_features=int(config.head_features),
    )


def receptive_field(config: ml_collections.ConfigDict) -> float:
    """Distance (Å) beyond which atoms cannot influence an atom's energy."""
    return float(config.cutoff) * int(config.n_interactions)


__all__ = ["SchNet", "default_config", "make_module", "receptive_field"]
