"""Save and load trained potentials: config as JSON, params with orbax.

A saved model is a directory:

  <path>/model.json   {"format": "stablejax-potential", "version": 1, "config": {...}}
  <path>/params/      orbax checkpoint of the params pytree

`load_model` rebuilds the potential from the config with
`stablejax.potentials.factory.build`, so a model can be used without any
training code or training state.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from stablejax import sharding as _sharding
from stablejax.potentials import factory
from stablejax.potentials.base import Potential

FORMAT = "stablejax-potential"
VERSION = 1


def _config_of(potential_or_config) -> ml_collections.ConfigDict:
    if isinstance(potential_or_config, Potential):
        return potential_or_config.config
    if isinstance(potential_or_config, ml_collections.ConfigDict | dict):
        return ml_collections.ConfigDict(potential_or_config)
    raise TypeError(
        f"Expected a Potential or a ConfigDict, got {type(potential_or_config).__name__}."
    )


def save_model(path, potential_or_config, params, *, overwrite: bool = False) -> str:
    """Write a potential's config and params to directory `path`.

    Args:
      path: directory to create.
      potential_or_config: the Potential (its config is saved) or its config.
      params: the params pytree.
      overwrite: replace an existing directory instead of raising.

    Returns:
      The absolute path written.

    With several processes (`jax.distributed`) only process 0 writes (params must be
    whole on every process: process-local or replicated arrays); the others return
    the path at once.
    """
    path = os.path.abspath(os.fspath(path))
    if jax.process_count() > 1:
        params = _sharding.to_host(params)  # replicated over processes: no collective
        if jax.process_index() != 0:
            return path
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    # Atomic: everything is written into a temporary sibling directory that is renamed
    # to `path` only when complete, so a kill never leaves a half-written model there.
    tmp = f"{path}.tmp-{os.getpid()}"
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.makedirs(tmp)
    config = _config_of(potential_or_config)
    meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict()}
    with open(os.path.join(tmp, "model.json"), "w") as f:
        json.dump(meta, f, indent=2, default=_json_default)
    if jax.process_count() == 1:
        params = jax.tree.map(jnp.asarray, params)
    # (else NumPy: orbax refuses jax arrays of one process's devices in a multi-process run)
    with _checkpointer() as checkpointer:
        checkpointer.save(os.path.join(tmp, "params"), params)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _checkpointer() -> ocp.StandardCheckpointer:
    """orbax's checkpointer for this process alone: a model is written by process 0 and
    read by each process on its own, with no barrier between processes."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    )


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"Cannot store {type(x).__name__} in model.json.")


def load_config(path) -> ml_collections.ConfigDict:
    """The config stored in a saved model directory."""
    path = os.path.abspath(os.fspath(path))
    meta_path = os.path.join(path, "model.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"No model.json in {path}: not a saved stablejax model.")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{meta_path}: unsupported format {meta.get('format')!r} version {meta.get('version')}."
        )
    return ml_collections.ConfigDict(meta["config"])


def load_model(path) -> tuple[Potential, dict]:
    """Load a saved model.

    Args:
      path: directory written by `save_model`.

    Returns:
      (potential, params): the rebuilt Potential and its params (jax arrays of
      the saved dtypes).

    Example:
      >>> potential, params = load_model('runs/aspirin/model')
      >>> e, f = potential.energy_and_forces(params, species, positions, edges)
    """
    config = load_config(path)
    potential = factory.build(config)
    with _checkpointer() as checkpointer:
        params = checkpointer.restore(os.path.join(os.path.abspath(os.fspath(path)), "params"))
    params = jax.tree.map(jnp.asarray, params)
    return potential, params
