"""Checkpointer: real Orbax on a temporary directory, 8 fake CPU devices for resharding."""

from __future__ import annotations

import gc
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from bert_jax.checkpoint import Checkpointer, MissingStep

# After a failed read, Orbax leaves the other shards' read coroutines unawaited; Python
# reports them when they are collected. They are expected in the damage tests, so they are
# collected before each test ends, where this filter applies, not at exit.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
    yield
    gc.collect()


METADATA = {"config": {"model": {"num_layers": 2, "dtype": "float32", "dropout": 0.1},
                       "rules": [["batch", ["data", "fsdp"]], ["embed", None]],
                       "scan": False, "seeds": [1, 2, 3]},
            "loader_step": 7, "note": "ü and \"quotes\"", "lr": 1e-4}


def _state(seed: int = 0, shardings: dict | None = None) -> dict:
    """A train-state-like tree; `seed` makes each step's values distinct."""
    rng = np.random.default_rng(seed)
    state = {"params": {"dense": {"kernel": rng.standard_normal((8, 16), np.float32),
                                  "bias": rng.standard_normal((16,), np.float32)},
                        # Over OCDBT's 1 KiB inline limit: stored in a data file of its own.
                        "table": rng.standard_normal((64, 64), np.float32)},
             "opt_state": {"count": np.arange(4, dtype=np.int32) + seed},
             "step": np.int32(seed)}
    state = jax.tree.map(jnp.asarray, state)
    if shardings is not None:
        state = jax.device_put(state, _shardings_like(state, shardings))
    return {**state, "rng": jax.random.key(seed)}


def _shardings_like(tree, by_path: dict):
    """Shardings for `tree`: `by_path["a/b"]` where given, else `by_path["*"]`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: by_path.get("/".join(k.key for k in path), by_path["*"]), tree)


def _abstract(state, shardings) -> dict:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def _assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes()


def _save_steps(directory, steps, **kwargs) -> None:
    with Checkpointer(directory, every_steps=1, **kwargs) as checkpointer:
        for step in steps:
            assert checkpointer.save(step, _state(step), {"step": step})


def _single_device(state):
    return jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), state)


def test_round_trip_is_bitwise(tmp_path):
    state = _state(3)
    with Checkpointer(tmp_path, every_steps=10, async_save=False) as checkpointer:
        assert checkpointer.save(10, state, METADATA)
        restored, metadata, step = checkpointer.restore(_abstract(state, _single_device(state)))
    assert step == 10
    assert metadata == METADATA
    _assert_bitwise_equal(restored, state)
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.uniform(restored["rng"], (3,)),
                          jax.random.uniform(state["rng"], (3,)))


def test_restore_reshards_onto_another_mesh_and_a_single_device(tmp_path):
    devices = np.array(jax.devices())
    saved_mesh = Mesh(devices.reshape(2, 4), ("data", "fsdp"))
    saved = _state(5, {"params/dense/kernel": NamedSharding(saved_mesh, P("fsdp", None)),
                       "params/table": NamedSharding(saved_mesh, P(None, ("data", "fsdp"))),
                       "*": NamedSharding(saved_mesh, P())})
    with Checkpointer(tmp_path, every_steps=1) as checkpointer:
        checkpointer.save(1, saved, METADATA)

    mesh = Mesh(devices, ("x",))
    on_new_mesh = _shardings_like(saved, {"params/dense/kernel": NamedSharding(mesh, P(None, "x")),
                                          "params/table": NamedSharding(mesh, P("x", None)),
                                          "*": NamedSharding(mesh, P())})
    for shardings in (on_new_mesh, _single_device(saved)):
        with Checkpointer(tmp_path) as checkpointer:
            restored, _, _ = checkpointer.restore(_abstract(saved, shardings))
        _assert_bitwise_equal(restored, saved)
        for array, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
            assert array.sharding == sharding


def test_keeps_only_the_newest_steps(tmp_path):
    _save_steps(tmp_path, range(1, 5), keep=2)
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]


def test_should_save_at_multiples_of_every_steps_not_saved_yet(tmp_path):
    with Checkpointer(tmp_path, every_steps=10) as checkpointer:
        assert [checkpointer.should_save(s) for s in (1, 9, 10, 15, 20)] == [
            False, False, True, False, True]
        assert not checkpointer.save(15, _state(), METADATA)
        assert checkpointer.save(10, _state(), METADATA)
        assert not checkpointer.should_save(10)
        assert not checkpointer.save(10, _state(), METADATA, force=True)  # already saved
        assert checkpointer.save(15, _state(), METADATA, force=True)
        checkpointer.wait()
        assert checkpointer.all_steps() == [10, 15]


def test_async_save_is_visible_to_a_new_checkpointer_after_wait(tmp_path):
    state = _state(4)
    with Checkpointer(tmp_path, every_steps=5) as checkpointer:
        assert checkpointer.save(5, state, METADATA)
        for array in jax.tree.leaves(state):  # as a donating train step would
            array.delete()
        checkpointer.wait()
        with Checkpointer(tmp_path) as fresh:
            assert fresh.latest_step() == 5
            restored, _, _ = fresh.restore(_abstract(state, _single_device(state)))
    _assert_bitwise_equal(restored, _state(4))


def test_restore_metadata_alone(tmp_path):
    _save_steps(tmp_path, [1])
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(2, _state(), METADATA, force=True)
        assert checkpointer.restore_metadata() == METADATA
        assert checkpointer.restore_metadata(1) == {"step": 1}


def test_metadata_must_be_json(tmp_path):
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(TypeError):
        checkpointer.save(1, _state(), {"array": np.zeros(2)}, force=True)


def test_no_checkpoint_raises_file_not_found(tmp_path):
    state = _state()
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() is None and checkpointer.all_steps() == []
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            checkpointer.restore(_abstract(state, _single_device(state)))
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            checkpointer.restore_metadata()
        checkpointer.save(1, state, METADATA, force=True)
        with pytest.raises(MissingStep, match=r"no checkpoint for step 2 .*: expected one of "
                                              r"\[1\]"):
            checkpointer.restore(_abstract(state, _single_device(state)), step=2)


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    _save_steps(tmp_path, [1, 2])
    data_file = _largest_file(tmp_path / "2" / "state")  # holds the table's chunks
    if damage == "truncate":
        data_file.write_bytes(data_file.read_bytes()[:data_file.stat().st_size // 2])
    else:
        data_file.unlink()
    state = _state(1)
    with Checkpointer(tmp_path, every_steps=1) as checkpointer:
        with pytest.warns(UserWarning) as warned:
            restored, metadata, step = checkpointer.restore(
                _abstract(state, _single_device(state)))
        messages = [str(w.message) for w in warned]
        assert any("checkpoint step 2 " in m and "damaged" in m for m in messages), messages
        assert (step, metadata) == (1, {"step": 1})
        _assert_bitwise_equal(restored, state)
        # The damaged step is gone, so the resumed run can save step 2 again.
        assert checkpointer.all_steps() == [1] and not (tmp_path / "2").exists()
        assert checkpointer.save(2, _state(2), {"step": 2})


def test_damaged_metadata_falls_back_and_an_explicit_damaged_step_raises(tmp_path):
    _save_steps(tmp_path, [1, 2])
    (tmp_path / "2" / "metadata" / "metadata").write_text('{"step": ')
    state = _state(2)
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.warns(UserWarning, match="checkpoint step 2 .* damaged"):
            assert checkpointer.restore_metadata() == {"step": 1}
        with pytest.warns(UserWarning, match="step 2"), pytest.raises(ValueError, match="\\[2\\]"):
            checkpointer.restore(_abstract(state, _single_device(state)), step=2)
        assert checkpointer.all_steps() == [1, 2]  # an explicit step is never deleted


def test_every_checkpoint_damaged_raises_and_deletes_nothing(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for step in ("1", "2"):
        _largest_file(tmp_path / step / "state").unlink()
    state = _state()
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable checkpoint"):
            checkpointer.restore(_abstract(state, _single_device(state)))
        assert checkpointer.all_steps() == [1, 2]


def test_interrupted_save_is_never_listed(tmp_path):
    _save_steps(tmp_path, [1, 2])
    # An interrupted local save: Orbax writes `<step>.orbax-checkpoint-tmp` and renames it
    # to `<step>` only on commit (orbax/checkpoint/_src/path/atomicity.py).
    shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp")
    state = _state(2)
    with Checkpointer(tmp_path, every_steps=1) as checkpointer:
        assert checkpointer.latest_step() == 2 and checkpointer.all_steps() == [1, 2]
        _, metadata, step = checkpointer.restore(_abstract(state, _single_device(state)))
        assert (step, metadata) == (2, {"step": 2})
        assert checkpointer.save(3, _state(3), {"step": 3})  # the leftover does not block it
        checkpointer.wait()
        assert checkpointer.restore_metadata() == {"step": 3}
    assert not (tmp_path / "3.orbax-checkpoint-tmp").exists()
