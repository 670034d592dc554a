"""NequIP: an E(3)-equivariant message-passing potential (Batzner et al., 2022).

Written in Flax linen on top of e3nn-jax. The defaults follow the NequIP
configuration of the StABlE paper for Ac-Ala3-NHMe (l_max 1, 3 interaction
layers, 32 features, full parity, 8 trainable Bessel functions with a p=6
polynomial envelope, radial MLP 2 x 64, cutoff 5 Å; ~0.12M parameters).

Architecture, per atom i with neighbours j (edge vector r_ij = r_j - r_i):

  h_i^0 = species embedding                                   32x0e
  for each interaction layer:
    x_j   = Linear(h_j)                                       (self-interaction)
    m_ij  = R(|r_ij|) * [x_j (x) Y(r_ij / |r_ij|)]            (uvu tensor product;
            one radial weight per path and channel from an MLP on the Bessel
            basis times the envelope)
    a_i   = Linear(sum_j m_ij / sqrt(avg_num_neighbors)) + SelfConnection_{Z_i}(h_i)
    h_i'  = Gate(a_i)  (+ h_i where the irreps agree, if residual)
  E_i = Linear(Linear(h_i[0e]))                               32x0e -> 16x0e -> 1x0e

Parity. The spherical harmonics are those of a polar vector: Y^0 = 0e, Y^1 = 1o.
With `parity=True` the hidden irreps are drawn from {0e, 0o, 1o, 1e} (the
"full parity set" of the original NequIP) and each layer keeps only those
reachable from its input by the tensor product (as in the original), so the
features grow 32x0e -> 0e+1o -> 0e+1o+1e -> 0e+0o+1o+1e. Pseudoscalars (0o)
therefore appear in the last layer and change sign under reflections, while
the energy, read from the 0e channels only, is invariant under the full O(3).
With `parity=False` only {0e, 1o} are kept (fewer parameters, same symmetry).

Parameters: 120,984 for the defaults with 4 species (the StABlE paper quotes
0.12M). As in the original, the linears and the radial MLP have no biases, the
self-connection is a species-indexed linear map (NequIP's tensor product with
the one-hot species), and the readout is two linears without a nonlinearity.

The module returns raw, dimensionless per-atom outputs; the wrapper in
`stablejax.potentials.factory` applies the energy scale and per-species shift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from stablejax.potentials.common import bessel_basis, polynomial_envelope

__all__ = [
    "NequIP",
    "default_config",
    "make_module",
    "layer_irreps",
    "edge_spherical_harmonics",
]


def default_config() -> ml_collections.ConfigDict:
    """Default NequIP hyperparameters (StABlE paper, Ac-Ala3-NHMe).

    Returns:
      ConfigDict with fields:
        name: 'nequip'.
        cutoff: interaction cutoff, Å.
        species: supported atomic numbers (index k of the embedding = species[k]).
        num_layers: number of interaction layers.
        l_max: highest rotation order of the features.
        parity: keep both parities of every l (full O(3) set) or only (-1)^l.
        num_features: multiplicity of every irrep in the hidden features.
        num_basis: number of Bessel radial basis functions.
        trainable_bessel: learn the Bessel frequencies (initialised at n*pi).
        envelope_p: exponent p of the polynomial cutoff envelope.
        radial_layers: hidden layers of the radial MLP.
        radial_neurons: width of the radial MLP.
        avg_num_neighbors: aggregated messages are divided by its square root;
          set it to the mean neighbour count within `cutoff` of the training data.
        self_connection: add a species-dependent linear map of the layer input.
        residual: add the layer input to the gated output on the irreps they share
          (True here; the StABlE/NequIP reference config has resnet: false, which
          `residual=False` reproduces; the parameter count is the same).
        output_hidden: width of the (linear) readout's hidden 0e layer.
    """
    c = ml_collections.ConfigDict()
    c.name = "nequip"
    c.cutoff = 5.0  # Å
    c.species = [1, 6, 7, 8]
    c.num_layers = 3
    c.l_max = 1
    c.parity = True
    c.num_features = 32
    c.num_basis = 8
    c.trainable_bessel = True
    c.envelope_p = 6
    c.radial_layers = 2
    c.radial_neurons = 64
    c.avg_num_neighbors = 20.0  # neighbours within 5 Å: aspirin ~17, Ac-Ala3-NHMe ~27
    c.self_connection = True
    c.residual = True
    c.output_hidden = 16
    return c


def edge_spherical_harmonics(vectors: jax.Array, *, l_max: int) -> e3nn.IrrepsArray:
    """Spherical harmonics Y^0..Y^l_max of the edge directions, with polar parity.

    Edge vectors are polar vectors (odd under inversion), so Y^l has parity
    (-1)^l: 0e + 1o (+ 2e ...). Component normalisation (|Y^l|^2 = 2l + 1).

    Args:
      vectors: [e, 3] Å, non-zero.
      l_max: highest order.

    Returns:
      IrrepsArray [e, (l_max + 1)^2] with irreps 1x0e+1x1o+...
    """
    irreps = e3nn.Irreps.spherical_harmonics(l_max, p=-1)
    return e3nn.spherical_harmonics(
        irreps, e3nn.IrrepsArray("1o", vectors), normalize=True, normalization="component"
    )


def _hidden_irreps(l_max: int, parity: bool, num_features: int) -> e3nn.Irreps:
    irs = []
    for ell in range(l_max + 1):
        natural = (-1) ** ell
        for p in (1, -1) if parity else (natural,):
            irs.append((num_features, e3nn.Irrep(ell, p)))
    return e3nn.Irreps(irs).sort().irreps.simplify()


def _layer_plan(irreps_in: e3nn.Irreps, sh_irreps: e3nn.Irreps, hidden: e3nn.Irreps):
    """Irreps a layer produces: hidden irreps reachable by (input x sh), as NequIP."""
    reachable = {ir for _, ir in e3nn.tensor_product(irreps_in, sh_irreps)}
    scalars = e3nn.Irreps([(m, ir) for m, ir in hidden if ir.l == 0 and ir in reachable])
    gated = e3nn.Irreps([(m, ir) for m, ir in hidden if ir.l > 0 and ir in reachable])
    # Gates are even scalars when an even scalar path exists (it always does here).
    gate_ir = e3nn.Irrep("0e") if e3nn.Irrep("0e") in reachable else e3nn.Irrep("0o")
    gates = e3nn.Irreps([(gated.num_irreps, gate_ir)]) if gated.num_irreps else e3nn.Irreps("")
    out_irreps = (scalars + gated).simplify()
    # Tensor-product paths are kept only towards irreps the layer outputs.
    paths = sorted({ir for _, ir in out_irreps})
    return scalars, gates, gated, out_irreps, paths


def layer_irreps(config: ml_collections.ConfigDict) -> list[e3nn.Irreps]:
    """Irreps of the node features after the embedding and after every layer.

    Args:
      config: a NequIP config (see `default_config`).

    Returns:
      list of num_layers + 1 Irreps; e.g. for the defaults
      [32x0e, 32x0e+32x1o, 32x0e+32x1o+32x1e, 32x0e+32x0o+32x1o+32x1e].
    """
    hidden = _hidden_irreps(config.l_max, config.parity, config.num_features)
    sh = e3nn.Irreps.spherical_harmonics(config.l_max, p=-1)
    irreps = [e3nn.Irreps(f"{config.num_features}x0e")]
    for _ in range(config.num_layers):
        *_, out, _ = _layer_plan(irreps[-1], sh, hidden)
        irreps.append(out)
    return irreps


def _residual_add(new: e3nn.IrrepsArray, old: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
    """new + old on the irreps both carry (old is zero-padded to new's irreps)."""
    chunks = []
    for mul_ir, chunk in zip(new.irreps, new.chunks, strict=True):
        match = [c for (m, ir), c in zip(old.irreps, old.chunks, strict=True) if (m, ir) == mul_ir]
        chunks.append(chunk if not match else chunk + match[0])
    return e3nn.from_chunks(new.irreps, chunks, new.shape[:-1], new.dtype)


class _RadialMLP(nn.Module):
    """Bias-free MLP with SiLU on the radial basis (its zero input maps to zero)."""

    hidden: Sequence[int]
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = e3nn.normalize_function(jax.nn.silu)
        for i, h in enumerate((*self.hidden, self.out)):
            x = nn.Dense(
                h,
                use_bias=False,
                kernel_init=nn.initializers.normal(1.0 / math.sqrt(x.shape[-1])),
                param_dtype=x.dtype,
                name=f"dense_{i}",
            )(x)
            if i < len(self.hidden):
                x = act(x)
        return x


class _Interaction(nn.Module):
    """One NequIP interaction layer (convolution + self-connection + gate)."""

    hidden: e3nn.Irreps
    n_species: int
    radial_hidden: Sequence[int]
    avg_num_neighbors: float
    self_connection: bool
    residual: bool

    @nn.compact
    def __call__(self, h, species_idx, sh, radial, edges, mask):
        n = h.shape[0]
        scalars, gates, gated, _, paths = _layer_plan(h.irreps, sh.irreps, self.hidden)
        pre_gate_irreps = scalars + gates + gated

        x = e3nn.flax.Linear(h.irreps, name="linear_in")(h)
        x_j = x[jnp.where(mask, edges[1], 0)]
        msg = e3nn.tensor_product(x_j, sh, filter_ir_out=paths)
        weights = _RadialMLP(self.radial_hidden, msg.irreps.num_irreps, name="radial")(radial)
        msg = msg * weights
        # Masked edges (padding, beyond cutoff) contribute exactly nothing.
        msg_arr = jnp.where(mask[:, None], msg.array, 0.0)
        agg = jax.ops.segment_sum(msg_arr, edges[0], num_segments=n)
        agg = e3nn.IrrepsArray(msg.irreps, agg / math.sqrt(self.avg_num_neighbors))
        out = e3nn.flax.Linear(pre_gate_irreps, force_irreps_out=True, name="linear_out")(agg)
        if self.self_connection:
            sc = e3nn.flax.Linear(
                pre_gate_irreps,
                num_indexed_weights=self.n_species,
                force_irreps_out=True,
                name="self_connection",
            )(species_idx, h)
            out = out + sc
        out = e3nn.gate(
            out,
            even_act=jax.nn.silu,
            odd_act=jnp.tanh,
            even_gate_act=jax.nn.silu,
            odd_gate_act=jnp.tanh,
        )
        if self.residual:
            out = _residual_add(out, h)
        return out


class NequIP(nn.Module):
    """NequIP network returning raw per-atom outputs.

    Attributes:
      n_species: number of species indices (embedding rows).
      cutoff: Å.
      num_layers, l_max, parity, num_features, num_basis, trainable_bessel,
      envelope_p, radial_layers, radial_neurons, avg_num_neighbors,
      self_connection, residual, output_hidden: see `default_config`.
    """

    n_species: int
    cutoff: float = 5.0
    num_layers: int = 3
    l_max: int = 1
    parity: bool = True
    num_features: int = 32
    num_basis: int = 8
    trainable_bessel: bool = True
    envelope_p: int = 6
    radial_layers: int = 2
    radial_neurons: int = 64
    avg_num_neighbors: float = 20.0
    self_connection: bool = True
    residual: bool = True
    output_hidden: int = 16

    @nn.compact
    def __call__(self, species_idx, vectors, edges, mask):
        """Per-atom raw outputs.

        Args:
          species_idx: [n] int32 in [0, n_species).
          vectors: [e, 3] Å, r_j - r_i (padded edges carry a non-zero dummy).
          edges: [2, e] int32, edges[0] = centre i, edges[1] = neighbour j;
            padding value n.
          mask: [e] bool, False for padding and for edges beyond the cutoff.

        Returns:
          [n] dimensionless per-atom outputs.
        """
        dtype = vectors.dtype
        mask = mask & (jnp.sum(vectors * vectors, axis=-1) < self.cutoff**2)
        # Replace masked vectors by a safe one inside the cutoff, so every norm,
        # 1/r and spherical harmonic below (and its derivative) is finite.
        safe = jnp.asarray([0.5 * self.cutoff, 0.0, 0.0], dtype=dtype)
        vec = jnp.where(mask[:, None], vectors, safe)
        r = jnp.sqrt(jnp.sum(vec * vec, axis=-1))

        sh = edge_spherical_harmonics(vec, l_max=self.l_max)
        frequencies = jnp.pi * jnp.arange(1, self.num_basis + 1, dtype=dtype)
        if self.trainable_bessel:
            frequencies = self.param("bessel_frequencies", lambda _: frequencies)
        radial = bessel_basis(
            r, r_cut=self.cutoff, frequencies=frequencies, prefactor=2.0 / self.cutoff
        )
        radial = radial * polynomial_envelope(r, r_cut=self.cutoff, p=self.envelope_p)[:, None]

        ones = e3nn.IrrepsArray("0e", jnp.ones((species_idx.shape[0], 1), dtype=dtype))
        h = e3nn.flax.Linear(
            f"{self.num_features}x0e", num_indexed_weights=self.n_species, name="embedding"
        )(species_idx, ones)

        hidden = _hidden_irreps(self.l_max, self.parity, self.num_features)
        for layer in range(self.num_layers):
            h = _Interaction(
                hidden=hidden,
                n_species=self.n_species,
                radial_hidden=(self.radial_neurons,) * self.radial_layers,
                avg_num_neighbors=self.avg_num_neighbors,
                self_connection=self.self_connection,
                residual=self.residual,
                name=f"interaction_{layer}",
            )(h, species_idx, sh, radial, edges, mask)
            # Exposed for tests and analysis: apply(..., mutable=['intermediates']).
            self.sow("intermediates", f"features_{layer}", h.array)

        scalars = h.filter(keep="0e")
        out = e3nn.flax.Linear(f"{self.output_hidden}x0e", name="readout_hidden")(scalars)
        out = e3nn.flax.Linear("0e", name="readout")(out)
        return out.array[:, 0]


def make_module(config: ml_collections.ConfigDict, n_species: int) -> NequIP:
    """Builds the NequIP Flax module from a config (see `default_config`).

    Args:
      config: NequIP ConfigDict.
      n_species: number of species indices the module will see.

    Returns:
      A `NequIP` module; `module.apply(params, species_idx, vectors, edges, mask)`
      gives [n] raw per-atom outputs.
    """
    if config.l_max < 0:
        raise ValueError(f"l_max must be >= 0, got {config.l_max}")
    if config.num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {config.num_layers}")
    if not config.avg_num_neighbors > 0:
        raise ValueError(f"avg_num_neighbors must be > 0, got {config.avg_num_neighbors}")
    if not config.cutoff > 0:
        raise ValueError(f"cutoff must be > 0 Å, got {config.cutoff}")
    return NequIP(
        n_species=int(n_species),
        cutoff=float(config.cutoff),
        num_layers=int(config.num_layers),
        l_max=int(config.l_max),
        parity=bool(config.parity),
        num_features=int(config.num_features),
        num_basis=int(config.num_basis),
        trainable_bessel=bool(config.trainable_bessel),
        envelope_p=int(config.envelope_p),
        radial_layers=int(config.radial_layers),
        radial_neurons=int(config.radial_neurons),
        avg_num_neighbors=float(config.avg_num_neighbors),
        self_connection=bool(config.self_connection),
        residual=bool(config.residual),
        output_hidden=int(config.output_hidden),
    )
