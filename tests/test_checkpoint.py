"""Round trips of training-state pytrees through stablejax.training.checkpoint."""

import dataclasses
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stablejax.training.checkpoint import CheckpointManager


@flax.struct.dataclass
class ReplicaState:
    positions: jax.Array
    velocities: jax.Array
    inner: dict


@dataclasses.dataclass
class Counters:
    epoch: int
    phase: int


jax.tree_util.register_dataclass(Counters, data_fields=["epoch", "phase"], meta_fields=[])


def _make_state(seed):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4))), "bias": jnp.zeros(4)},
        "embed": jnp.asarray(rng.normal(size=(5, 2)).astype(np.float32)),
    }
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    # A few updates so that mu, nu and the step count are not at their initial values.
    for _ in range(3):
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    replicas = ReplicaState(
        positions=jnp.asarray(rng.normal(size=(2, 3, 3))),
        velocities=np.asarray(rng.normal(size=(2, 3, 3))),
        inner={"count": np.int64(7), "mask": np.array([True, False])},
    )
    return {
        "params": params,
        "opt_state": opt_state,
        "replicas": replicas,
        "key": jax.random.key(seed),
        "legacy_key": jax.random.PRNGKey(seed + 1),
        "counters": Counters(epoch=seed, phase=seed % 2),
        "lr": 1e-3 * (seed + 1),
        "done": False,
        "nothing": None,
    }


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            np.testing.assert_array_equal(jax.random.key_data(x), jax.random.key_data(y))
        elif isinstance(x, (jax.Array, np.ndarray, np.generic)):
            assert x.dtype == y.dtype and np.shape(x) == np.shape(y)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y


def test_round_trip_optax_dataclasses_keys_and_python_values(tmp_path):
    state = _make_state(3)
    ckpt = CheckpointManager(tmp_path / "ck", max_to_keep=2)
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest(_make_state(0)) is None
    ckpt.save(5, state)
    step, restored = ckpt.restore_latest(_make_state(0))
    assert step == 5
    _assert_same(state, restored)
    # The restored optax state must be usable for the next update.
    assert isinstance(restored["opt_state"][1][0], optax.ScaleByAdamState)
    assert int(restored["opt_state"][1][0].count) == 3
    # Keys restore as typed keys that draw the same numbers.
    np.testing.assert_array_equal(
        jax.random.normal(state["key"], (3,)), jax.random.normal(restored["key"], (3,))
    )
    ckpt.close()


def test_max_to_keep_latest_and_new_manager_sees_old_steps(tmp_path):
    ckpt = CheckpointManager(tmp_path / "ck", max_to_keep=2)
    for epoch in range(4):
        ckpt.save(epoch, _make_state(epoch))
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()
    # A fresh manager (a restarted process) finds the latest checkpoint.
    again = CheckpointManager(tmp_path / "ck", max_to_keep=2)
    step, restored = again.restore_latest(_make_state(0))
    assert step == 3
    _assert_same(_make_state(3), restored)
    _assert_same(_make_state(2), again.restore(_make_state(0), step=2))
    with pytest.raises(FileNotFoundError, match="step 0"):
        again.restore(_make_state(0), step=0)
    again.close()


def test_template_mismatch_is_a_clear_error(tmp_path):
    ckpt = CheckpointManager(tmp_path / "ck")
    ckpt.save(0, {"a": jnp.ones(2), "b": 1})
    with pytest.raises(ValueError, match="leaves"):
        ckpt.restore({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="saved as python:int"):
        ckpt.restore({"a": jnp.ones(2), "b": jnp.ones(())})
    with pytest.raises(ValueError, match="unsupported type"):
        ckpt.save(1, {"a": object()})
    ckpt.close()


def test_only_python_values_and_interrupted_save_leaves_previous(tmp_path):
    ckpt = CheckpointManager(tmp_path / "ck")
    ckpt.save(0, {"epoch": 0, "lr": 1e-3, "done": True})
    with pytest.raises(ValueError, match="unsupported type str"):
        ckpt.save(1, {"phase": "simulation"})
    # A save that dies half way leaves only an orbax temporary folder, which is not a step.
    os.makedirs(tmp_path / "ck" / "1.orbax-checkpoint-tmp-123")
    step, restored = ckpt.restore_latest({"epoch": -1, "lr": 0.0, "done": False})
    assert step == 0 and restored == {"epoch": 0, "lr": 1e-3, "done": True}
    assert type(restored["done"]) is bool and type(restored["epoch"]) is int
    ckpt.close()


def test_plain_orbax_restore_names_leaves_by_key_path(tmp_path):
    """Without this module or a template, orbax alone reads a checkpoint as a tree
    named like the state (no anonymous leaf_000001 names)."""
    import orbax.checkpoint as ocp

    state = _make_state(3)
    with CheckpointManager(tmp_path / "ck") as ckpt:
        ckpt.save(5, state)
        path = ckpt.state_path(5)
    plain = ocp.StandardCheckpointer().restore(path)
    np.testing.assert_array_equal(
        plain["params"]["dense"]["kernel"], state["params"]["dense"]["kernel"]
    )
    assert int(plain["opt_state"][1][0]["count"]) == 3
    np.testing.assert_array_equal(plain["replicas"]["inner"]["mask"], [True, False])
    assert plain["counters"] == {"epoch": 3, "phase": 1}
    np.testing.assert_array_equal(plain["key"], jax.random.key_data(state["key"]))
    assert plain["lr"] == pytest.approx(4e-3)
    leaf_names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(plain)]
    assert not any("leaf_" in n for n in leaf_names)


def _state(k):
    return {"w": np.random.default_rng(k).normal(size=256), "epoch": k}


def _truncate_meta(step_dir):
    meta = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "meta")) for f in fs]
    assert meta, "no metadata file found"
    for path in meta:
        with open(path, "r+b") as f:
            f.truncate(max(1, os.path.getsize(path) // 2))


def _flip_array_bytes(step_dir):
    """Flips bytes in the middle of every array data file (OCDBT `d/` files)."""
    files = [
        os.path.join(r, f)
        for r, _, fs in os.walk(os.path.join(step_dir, "state"))
        for f in fs
        if os.path.basename(r) == "d"
    ]
    assert files, "no array data files found"
    for path in files:
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
                data[i] ^= 0x5A
            f.seek(0)
            f.write(bytes(data))


@pytest.mark.parametrize("corrupt", [_truncate_meta, _flip_array_bytes])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, corrupt):
    directory = tmp_path / "ckpt"
    with CheckpointManager(directory, max_to_keep=3) as m:
        m.save(1, _state(1))
        m.save(2, _state(2))
    corrupt(str(directory / "2"))
    with CheckpointManager(directory, max_to_keep=3) as m:
        with pytest.warns(UserWarning, match=r"ckpt/2 cannot be restored.*corrupt-2"):
            step, state = m.restore_latest(_state(0))
        assert step == 1
        np.testing.assert_array_equal(state["w"], _state(1)["w"])
        assert state["epoch"] == 1
        # Training goes on from step 1: step 2 can be written again.
        m.save(2, _state(2))
        step, state = m.restore_latest(_state(0))
        assert step == 2 and state["epoch"] == 2
    assert (directory / "corrupt-2").exists()


def test_checkpoint_of_another_format_version_is_refused_and_kept(tmp_path):
    """A checkpoint of the older leaf-numbered format is not moved aside as corrupt (the
    run would silently restart): restoring raises CheckpointFormatError."""
    import json

    from stablejax.training.checkpoint import CheckpointFormatError

    directory = tmp_path / "ckpt"
    with CheckpointManager(directory) as m:
        m.save(1, _state(1))
    path = directory / "1" / "meta" / "metadata"
    data = json.loads(path.read_text())
    data["format_version"] = 1
    path.write_text(json.dumps(data))
    with CheckpointManager(directory) as m:
        with pytest.raises(CheckpointFormatError, match="format version 1"):
            m.restore_latest(_state(0))
        assert m.all_steps() == [1]
    assert not (directory / "corrupt-1").exists()
