"""Build a `Potential` from an ml_collections config.

Architecture module contract
----------------------------
Each message-passing architecture lives in `stablejax/potentials/<name>.py`
(`schnet`, `nequip`, `gemnet_t`) and provides:

* `default_config() -> ml_collections.ConfigDict` with the architecture's
  hyperparameters, including `cutoff` (Å). `factory.default_config(name)` adds
  the shared fields listed below.
* `make_module(config, n_species) -> flax.linen.Module`, where `config` is the
  full config (shared fields included) and `n_species = len(config.species)`.
* The module's `__call__(species_idx, vectors, edges, mask) -> [n]`:

  - species_idx: [n] int32 species indices in [0, n_species) (not atomic numbers;
    index k means atomic number config.species[k]).
  - vectors: [e, 3] Å, r_j - r_i (minimum image under periodic boundaries, or
    r_j - r_i + s cell for edges with image shifts).
    Padded and masked edges carry a dummy non-zero vector (|v| = 100 Å), so
    norms and their gradients are finite everywhere.
  - edges: [2, e] int32, edges[0] = centre atom i, edges[1] = neighbour j,
    padding value n; or [5, e] with rows 2..4 the integer lattice shift of j
    (cells narrower than twice the cutoff, see `potentials/base.py`; i == j is
    then a valid edge to an image of i). Both directions of every pair are
    present. Use only rows 0 and 1 as atom indices.
  - mask: [e] bool, False for padded edges and for edges at or beyond
    config.cutoff. Masked edges must contribute exactly nothing to the output
    or its gradients: multiply every message by the mask (JAX gathers clamp
    index n to n - 1, so `h[edges[1]]` of a padded edge is a real atom's
    feature) and scatter with `jax.ops.segment_sum(..., num_segments=n)`,
    which drops index n. Envelopes must make each edge's contribution go to
    zero smoothly (at least C1) at the cutoff.
  - returns [n] raw per-atom outputs, dimensionless, before the energy scale
    and per-species shift that this factory applies.

  Modules see neither absolute positions nor the box, so translation
  invariance and periodicity are enforced by construction; rotation
  invariance, smoothness and padding-safety are checked by
  `stablejax.potentials.testing`.

Shared config fields (added by `default_config`):
  name: architecture name.
  species: list of supported atomic numbers; the model's species index k is
    atomic number species[k]. Inputs with any other atomic number are refused
    (ValueError outside jit; NaN energies if they reach a traced call).
  cutoff: Å. Edges with |r_ij| >= cutoff are masked.
  train_energy_shift / train_energy_scale: whether the per-species energy
    shift (eV) and the global energy scale (eV) receive gradients (default
    False: they are fitted once by `normalization.fit_energy_normalization`).

Per-atom energy = energy_scale * raw_i + energy_shift[species_idx_i] (eV).
Params pytree: {'net': <flax variables>, 'energy_shift': [n_species] eV,
'energy_scale': [] eV}.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stablejax.geometry import cutoff_edges_np, perpendicular_widths
from stablejax.potentials import pair as pair_potentials
from stablejax.potentials.base import (
    Potential,
    all_pairs_edges,
    edge_vectors,
    safe_norm,
)


def _find_architectures() -> tuple[str, ...]:
    """The modules of this package that define `make_module` (the contract above), found
    from their source without importing them (importing all would load e3nn-jax and ASE).

    A new architecture is one file, `stablejax/potentials/<name>.py`, plus its test:
    nothing here lists the names."""
    folder = os.path.dirname(os.path.abspath(__file__))
    names = []
    for info in pkgutil.iter_modules([folder]):
        path = os.path.join(folder, f"{info.name}.py")
        if info.ispkg or not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            if re.search(r"^def make_module\(", f.read(), flags=re.MULTILINE):
                names.append(info.name)
    return tuple(sorted(names))


#: Message-passing architectures built through the module contract above (found, not listed).
ARCHITECTURES = _find_architectures()
#: Pair potentials built by `stablejax.potentials.pair` (its own list of names).
PAIR_POTENTIALS = pair_potentials.NAMES
#: Every `config.model.name` that `build` accepts.
MODEL_NAMES = ARCHITECTURES + PAIR_POTENTIALS

#: Elements supported by default (H, C, N, O).
DEFAULT_SPECIES = (1, 6, 7, 8)


def _architecture_module(name: str):
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {name!r}; expected one of {MODEL_NAMES}.")
    return importlib.import_module(f"stablejax.potentials.{name}")


def default_config(name: str) -> ml_collections.ConfigDict:
    """Default config for a potential, shared fields included.

    Args:
      name: one of 'schnet', 'nequip', 'gemnet_t', 'lennard_jones', 'pair_mlp'.

    Returns:
      An unlocked ConfigDict; override fields, then pass it to `build`.
    """
    if name in PAIR_POTENTIALS:
        return pair_potentials.default_config(name)
    arch = _architecture_module(name)
    config = arch.default_config()
    if "cutoff" not in config:
        raise ValueError(f"{name}.default_config() must define `cutoff` (Å).")
    config.name = name
    if "species" not in config:
        config.species = list(DEFAULT_SPECIES)
    if "train_energy_shift" not in config:
        config.train_energy_shift = False
    if "train_energy_scale" not in config:
        config.train_energy_scale = False
    return config


def build(config: ml_collections.ConfigDict) -> Potential:
    """Build the potential described by `config` (see the module docstring).

    Example:
      >>> config = default_config('schnet')
      >>> config.species = [1, 6, 8]
      >>> potential = build(config)
      >>> params = potential.init(jax.random.key(0), species, positions, None)
      >>> e = potential.energy(params, species, positions, all_pairs_edges(n))
    """
    name = config.name
    if name in PAIR_POTENTIALS:
        return pair_potentials.build(config)
    arch = _architecture_module(name)
    module = arch.make_module(config, len(config.species))
    return from_module(module, config)


def _species_list(config) -> tuple[int, ...]:
    species = tuple(int(z) for z in config.species)
    if not species:
        raise ValueError("config.species must list at least one atomic number.")
    if len(set(species)) != len(species):
        raise ValueError(f"config.species has duplicates: {list(species)}.")
    if min(species) < 1:
        raise ValueError(f"config.species must hold atomic numbers >= 1, got {list(species)}.")
    return species


def check_species(config, species) -> None:
    """Raise ValueError naming any atomic number the model was not built for.

    Args:
      config: the potential's config (uses config.species).
      species: [n] atomic numbers (concrete, not traced).
    """
    supported = _species_list(config)
    present = np.unique(np.asarray(species))
    unknown = sorted(int(z) for z in present if int(z) not in supported)
    if unknown:
        raise ValueError(
            f"Atomic number(s) {unknown} not supported by this model "
            f"(built for config.species = {list(supported)})."
        )


def species_indices(config, species: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Map atomic numbers to model species indices (works under jit).

    Args:
      config: the potential's config.
      species: [n] int atomic numbers.

    Returns:
      (indices [n] int32, valid [n] bool); invalid atoms get index 0.
    """
    supported = _species_list(config)
    table = np.full(max(supported) + 1, -1, dtype=np.int32)
    table[list(supported)] = np.arange(len(supported), dtype=np.int32)
    species = jnp.asarray(species)
    in_range = (species >= 0) & (species < table.size)
    idx = jnp.asarray(table)[jnp.clip(species, 0, table.size - 1)]
    valid = in_range & (idx >= 0)
    return jnp.where(valid, idx, 0).astype(jnp.int32), valid


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _init_edges(positions, box, cutoff: float):
    """Edges for initialisation: within-cutoff pairs when positions are concrete.

    Params do not depend on the edge set, but a dense all-pairs graph of a
    large periodic system would make the initialising forward pass costly.
    """
    n = positions.shape[0]
    if not (_is_concrete(positions) and (box is None or _is_concrete(box))):
        return all_pairs_edges(n)
    if box is not None and cutoff > 0.5 * perpendicular_widths(np.asarray(box)).min():
        return all_pairs_edges(n)  # a cell too small for minimum-image edges
    edges = cutoff_edges_np(positions, cutoff, None if box is None else np.asarray(box))
    if edges.shape[1] == 0:
        return all_pairs_edges(n)
    return edges


def from_module(module: nn.Module, config: ml_collections.ConfigDict) -> Potential:
    """Wrap an architecture module (see the module contract) into a `Potential`.

    `build` uses this; tests use it to wrap deliberately broken modules.

    Args:
      module: a Flax module obeying the architecture contract.
      config: config with at least name, species, cutoff (Å); optional
        train_energy_shift / train_energy_scale (default False).

    Returns:
      A Potential whose params are {'net', 'energy_shift', 'energy_scale'}.
    """
    supported = _species_list(config)
    n_species = len(supported)
    cutoff = float(config.cutoff)
    if cutoff <= 0:
        raise ValueError(f"config.cutoff must be positive (Å), got {cutoff}.")
    train_shift = bool(config.get("train_energy_shift", False))
    train_scale = bool(config.get("train_energy_scale", False))

    def graph(species, positions, edges, box):
        idx, valid = species_indices(config, species)
        vectors, mask = edge_vectors(positions, edges, box)
        mask = mask & (safe_norm(vectors) < cutoff)
        return idx, valid, vectors, mask

    def init(key, species, positions, box=None):
        """Params for this potential: (key, species [n], positions [n,3] Å, box [3]|[3,3] Å|None)."""
        if _is_concrete(species):
            check_species(config, species)
        positions = jnp.asarray(positions)
        edges = _init_edges(positions, box, cutoff)
        idx, _, vectors, mask = graph(species, positions, edges, box)
        net = module.init(key, idx, vectors, jnp.asarray(edges), mask)
        dtype = positions.dtype
        # Params follow the dtype of the positions (float64 tests, float32 runs).
        net = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, net
        )
        return {
            "net": net,
            "energy_shift": jnp.zeros((n_species,), dtype),
            "energy_scale": jnp.ones((), dtype),
        }

    def per_atom_energies(params, species, positions, edges, box=None):
        """Per-atom energies [n] eV (see `stablejax.potentials.base`)."""
        if _is_concrete(species):
            check_species(config, species)
        idx, valid, vectors, mask = graph(species, positions, edges, box)
        raw = module.apply(params["net"], idx, vectors, edges, mask)
        shift = params["energy_shift"]
        scale = params["energy_scale"]
        if not train_shift:
            shift = jax.lax.stop_gradient(shift)
        if not train_scale:
            scale = jax.lax.stop_gradient(scale)
        e = scale * raw + shift[idx]
        # An unsupported atomic number that slipped past the concrete check
        # (traced species) poisons the energy rather than silently using H.
        return jnp.where(valid, e, jnp.nan)

    return Potential(
        name=str(config.name),
        config=config,
        cutoff=cutoff,
        init=init,
        per_atom_energies=per_atom_energies,
    )
