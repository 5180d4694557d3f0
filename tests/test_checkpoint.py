"""Tests for the rmjax.checkpoint package: exact round trips, corrupt/partial checkpoints, write
failures, and grain iterator state (retention and best.json: test_checkpoint_retention.py)."""

import resource
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rmjax import checkpoint as ck
from rmjax.checkpoint import agreement


def _adam_state(seed: int = 0) -> dict:
  """A small train-state-like pytree with non-trivial Adam moments after two updates."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"w": jax.random.normal(k1, (3, 5)), "b": jax.random.normal(k2, (5,)).astype(jnp.bfloat16)}
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  for i in range(2):
    grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)).astype(p.dtype), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return {"step": jnp.asarray(2, jnp.int32), "params": params, "opt_state": opt_state,
          "rng": k3, "key": jax.random.key(seed + 7)}


def _leaves_equal(a, b) -> None:
  """Bit-identical leaves (typed PRNG keys compared through their key data)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(x)).view(np.uint8),
                                  np.atleast_1d(np.asarray(y)).view(np.uint8))


def _dirs(directory) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if p.is_dir())


def _tiny():
  return {"x": jnp.arange(4, dtype=jnp.float32)}


def test_round_trip_adam_state_exact(tmp_path):
  state = _adam_state()
  with ck.Checkpointer(tmp_path / "checkpoints") as c:
    assert c.save(2, state, val_loss=0.5, metadata={"config_hash": "abc"})
    assert not c.save(2, state)  # same step twice: no second write
    c.wait_until_finished()
    assert _dirs(tmp_path / "checkpoints") == ["checkpoint_step_2"]
    r = c.restore_latest(ck.abstract_like(state))
  assert r.step == 2
  assert r.metadata == {"config_hash": "abc", "step": 2, "val_loss": 0.5}
  assert jax.tree.structure(r.state) == jax.tree.structure(state)
  assert type(r.state["opt_state"][0]) is type(state["opt_state"][0])  # ScaleByAdamState
  _leaves_equal(r.state, state)


def test_sharded_array_restored_with_target_sharding(tmp_path):
  mesh2 = Mesh(np.array(jax.devices()[:2]), ("data",))
  sharding2 = NamedSharding(mesh2, P("data"))
  x = jax.device_put(np.arange(24, dtype=np.float32).reshape(8, 3), sharding2)
  state = {"x": x, "r": jax.device_put(jnp.ones(3), NamedSharding(mesh2, P()))}
  with ck.Checkpointer(tmp_path / "checkpoints") as c:
    c.save(1, state)
    c.wait_until_finished()
    same = c.restore(1, ck.abstract_like(state)).state
    mesh4 = Mesh(np.array(jax.devices()[:4]), ("data",))
    target4 = {"x": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=NamedSharding(mesh4, P("data"))),
               "r": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh4, P()))}
    resharded = c.restore(1, target4).state
  assert same["x"].sharding == sharding2
  assert [s.data.shape for s in same["x"].addressable_shards] == [(4, 3), (4, 3)]
  assert resharded["x"].sharding == target4["x"].sharding
  assert [s.data.shape for s in resharded["x"].addressable_shards] == [(2, 3)] * 4
  for got in (same, resharded):
    np.testing.assert_array_equal(np.asarray(got["x"]), np.arange(24, dtype=np.float32).reshape(8, 3))


def _save_steps(d, steps, losses=None):
  with ck.Checkpointer(d, ck.CheckpointConfig(max_to_keep=None)) as c:
    for i, s in enumerate(steps):
      c.save(s, {"x": jnp.full((4,), float(s))}, val_loss=None if losses is None else losses[i])


def test_truncated_checkpoint_reported_by_path_and_fallback(tmp_path):
  d = tmp_path / "checkpoints"
  _save_steps(d, [1, 2, 3], losses=[0.5, 0.4, 0.3])
  data_files = [p for p in (d / "checkpoint_step_3" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files, "expected OCDBT data files under state/d"
  for f in data_files:  # truncate the array data
    f.write_bytes(f.read_bytes()[:8])
  (d / "checkpoint_step_2" / "state" / "manifest.ocdbt").unlink()  # step 2 loses its manifest
  target = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with ck.Checkpointer(d) as c:
    with pytest.raises(ck.CheckpointCorrupt) as err:
      c.restore_latest(target)
    assert err.value.path == d / "checkpoint_step_3"
    assert str(d / "checkpoint_step_3") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ck.CheckpointCorrupt, match="checkpoint_step_2"):
      c.restore(2, target)
    assert ck.read_best_file(d)["step"] == 3
    r = c.restore_latest(target, fallback_to_previous=True)
    assert r.step == 1
    np.testing.assert_array_equal(np.asarray(r.state["x"]), np.full((4,), 1.0, np.float32))
    # the unreadable steps are set aside, not deleted, and off best.json: training reaches those
    # step numbers again and must save them
    assert c.all_steps() == [1] and ck.read_best_file(d)["step"] == 1
    assert sorted(p.name for p in (d / ck.CORRUPT_DIR).iterdir()) == ["checkpoint_step_2", "checkpoint_step_3"]
    assert c.save(3, {"x": jnp.full((4,), 33.0)}, val_loss=0.1)
    c.wait_until_finished()
    assert ck.read_best_file(d)["step"] == 3
    np.testing.assert_array_equal(np.asarray(c.restore(3, target).state["x"]), np.full((4,), 33.0, np.float32))


def test_all_corrupt_raises_newest_and_missing_step(tmp_path):
  d = tmp_path / "checkpoints"
  _save_steps(d, [1, 2])
  for s in (1, 2):
    shutil.rmtree(d / f"checkpoint_step_{s}" / "state")
  target = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with ck.Checkpointer(d) as c:
    with pytest.raises(ck.CheckpointCorrupt, match="checkpoint_step_2"):
      c.restore_latest(target, fallback_to_previous=True)
    with pytest.raises(ck.CheckpointNotFound, match="step 9"):
      c.restore(9, target)
  with ck.Checkpointer(tmp_path / "empty") as c:
    assert c.restore_latest(target) is None and c.latest_step() is None


def test_uncommitted_tmp_dir_is_ignored_and_cleaned(tmp_path):
  # What a kill mid-save leaves behind: the step folder under the temporary name orbax
  # 0.12 writes to (seen in test_failed_write_is_clear_and_keeps_previous) before renaming.
  d = tmp_path / "checkpoints"
  _save_steps(d, [1, 2])
  tmp = d / "checkpoint_step_3.orbax-checkpoint-tmp"
  shutil.copytree(d / "checkpoint_step_2", tmp)
  with ck.Checkpointer(d) as c:
    assert c.all_steps() == [1, 2] and c.latest_step() == 2
    r = c.restore_latest({"x": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert r.step == 2
    c.save(3, {"x": jnp.full((4,), 3.0)})  # orbax removes leftovers (in the background) on reopen;
  assert not tmp.exists()                  # a save waits for that clean-up to finish
  assert _dirs(d) == ["checkpoint_step_1", "checkpoint_step_2", "checkpoint_step_3"]


def test_directory_that_is_a_file_is_a_write_error(tmp_path):
  not_a_dir = tmp_path / "checkpoints"
  not_a_dir.write_text("oops")
  with pytest.raises(ck.CheckpointWriteError, match=str(not_a_dir)):
    ck.Checkpointer(not_a_dir)


# orbax's failed background threads leave an asyncio loop-closed message at teardown.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_failed_write_is_clear_and_keeps_previous(tmp_path):
  # Tests run as root, where chmod does not stop writes. RLIMIT_FSIZE does: while it is
  # lowered, any write past 16 bytes fails with EFBIG (SIGXFSZ ignored) for root too.
  d = tmp_path / "checkpoints"
  c = ck.Checkpointer(d)
  c.save(1, {"x": jnp.arange(64, dtype=jnp.float32)})
  c.wait_until_finished()
  new_x = jnp.arange(64, dtype=jnp.float32) + 1  # computed (and compiled) before the limit
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (16, old_limit[1]))
  try:
    with pytest.raises(ck.CheckpointWriteError, match=str(d)) as err:
      c.save(2, {"x": new_x})
      c.wait_until_finished()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)
  assert "\n" not in str(err.value)
  assert c.all_steps() == [1]
  assert "checkpoint_step_2" not in _dirs(d)
  r = c.restore_latest({"x": jax.ShapeDtypeStruct((64,), jnp.float32)})
  assert r.step == 1
  np.testing.assert_array_equal(np.asarray(r.state["x"]), np.arange(64, dtype=np.float32))
  # The checkpointer stays usable once the disk accepts writes again.
  assert c.save(3, {"x": jnp.arange(64, dtype=jnp.float32) + 3})
  c.close()
  assert _dirs(d) == ["checkpoint_step_1", "checkpoint_step_3"]  # no leftover tmp folder


def _grain_iter():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())


def test_grain_iterator_state_round_trip(tmp_path):
  reference = _grain_iter()
  for _ in range(5):
    next(reference)
  expected = [next(reference) for _ in range(3)]

  it = _grain_iter()
  for _ in range(5):
    next(it)
  with ck.Checkpointer(tmp_path / "checkpoints") as c:
    c.save(5, _tiny(), iterator=it)
    for _ in range(4):  # the loop moves on while the async write may still be running
      next(it)
    c.wait_until_finished()
    fresh = _grain_iter()
    r = c.restore_latest(ck.abstract_like(_tiny()), iterator=fresh)
    assert r.step == 5
    got = [next(fresh) for _ in range(3)]
    for g, e in zip(got, expected):
      np.testing.assert_array_equal(g, e)
    assert not np.array_equal(expected[0], np.arange(4))  # the shuffle is really on
    c.save(6, _tiny())  # no iterator in this one
    with pytest.raises(ck.CheckpointCorrupt, match="data-iterator"):
      c.restore(6, ck.abstract_like(_tiny()), iterator=_grain_iter())


def test_config_from_spec_and_validation():
  import ml_collections
  spec = ml_collections.ConfigDict({"checkpoint": {"max_to_keep": 5, "keep_best": False, "async_save": False}})
  assert ck.CheckpointConfig.from_spec(spec) == ck.CheckpointConfig(5, False, False)
  with pytest.raises(ValueError, match="max_to_keep"):
    ck.CheckpointConfig(max_to_keep=0)
  assert ck.config_hash({"a": 1, "b": [2]}) == ck.config_hash({"b": [2], "a": 1})
  assert ck.config_hash({"a": 1}) != ck.config_hash({"a": 2})


_KILL_MID_SAVE = """
import os, signal, sys, time
import jax.numpy as jnp
from rmjax import checkpoint as ck
from rmjax.checkpoint import agreement
c = ck.Checkpointer(sys.argv[1])
c.save(1, {"x": jnp.zeros((4096, 4096), jnp.float32)})
c.wait_until_finished()
c.save(2, {"x": jnp.ones((4096, 4096), jnp.float32)})  # async: returns before the write ends
# The temporary folder may appear only after save returns (orbax creates it in the background):
# kill as soon as it exists, so the kill always lands mid-write.
tmp = os.path.join(sys.argv[1], "checkpoint_step_2.orbax-checkpoint-tmp")
while not os.path.exists(tmp) and not os.path.exists(os.path.join(sys.argv[1], "checkpoint_step_2")):
  time.sleep(0.001)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_real_kill_mid_save_leaves_previous_step(tmp_path):
  import subprocess
  import sys
  d = tmp_path / "checkpoints"
  proc = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(d)], capture_output=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  assert "checkpoint_step_2.orbax-checkpoint-tmp" in _dirs(d), _dirs(d)  # killed mid-write
  with ck.Checkpointer(d) as c:
    assert c.all_steps() == [1]
    r = c.restore_latest({"x": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)})
  assert r.step == 1 and float(jnp.abs(r.state["x"]).max()) == 0.0
  assert _dirs(d) == ["checkpoint_step_1"]


def test_read_only_open_restores_without_writing(tmp_path):
  d = tmp_path / "checkpoints"
  _save_steps(d, [1, 2])
  before = sorted(p.relative_to(d) for p in d.rglob("*"))
  with ck.Checkpointer(d, ck.CheckpointConfig(read_only=True)) as c:
    assert c.restore(1, {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}).metadata["step"] == 1
  assert sorted(p.relative_to(d) for p in d.rglob("*")) == before
  with pytest.raises(ck.CheckpointNotFound, match="does not exist"):
    ck.Checkpointer(tmp_path / "missing", ck.CheckpointConfig(read_only=True))


def test_flax_train_state_with_frozen_branch_and_subtree_restore(tmp_path):
  from flax import struct

  @struct.dataclass
  class State:
    step: jax.Array
    params: dict
    frozen: dict
    opt_state: object
    rng: jax.Array

  params = {"a": jnp.linspace(-1.0, 1.0, 3), "b": jnp.arange(2.0)}
  tx = optax.multi_transform({"train": optax.adam(1e-3), "freeze": optax.set_to_zero()},
                             {"a": "train", "b": "freeze"})
  state = State(jnp.asarray(4, jnp.int32), params, {"c": jnp.full((4,), 0.5, jnp.bfloat16)},
                tx.init(params), jnp.asarray([1, 2], jnp.uint32))
  with ck.Checkpointer(tmp_path / "checkpoints") as c:
    c.save(4, state)
  with ck.Checkpointer(tmp_path / "checkpoints") as c:
    r = c.restore_latest(ck.abstract_like(state))
  assert type(r.state) is State and jax.tree.structure(r.state) == jax.tree.structure(state)
  _leaves_equal(r.state, state)
  sub = ck.abstract_like({"params": state.params, "frozen": state.frozen})
  weights = ck.restore_subtree(tmp_path / "checkpoints" / "checkpoint_step_4", sub)
  assert set(weights) == {"params", "frozen"}
  _leaves_equal(weights, {"params": state.params, "frozen": state.frozen})
  with pytest.raises(ck.CheckpointNotFound, match="no state"):
    ck.restore_subtree(tmp_path / "checkpoints", sub)
  # init_from a checkpoint of another shape, or without the frozen weights a LoRA run needs: a
  # mismatch naming the array (it was "corrupt or unreadable" with orbax's advice about strict=False)
  other = ck.abstract_like({"params": {**state.params, "a": jnp.zeros(5)}, "frozen": state.frozen})
  with pytest.raises(ck.CheckpointMismatch, match=r"does not fit the model this spec builds \(params/a: stored "
                                                  r"\(3,\), this model \(5,\)\)"):
    ck.restore_subtree(tmp_path / "checkpoints" / "checkpoint_step_4", other)
  more = ck.abstract_like({"params": state.params, "frozen": {**state.frozen, "d": jnp.zeros(2)}})
  with pytest.raises(ck.CheckpointMismatch, match=r"1 array\(s\) of this model not in the checkpoint, e.g. frozen/d"):
    ck.restore_subtree(tmp_path / "checkpoints" / "checkpoint_step_4", more)


def test_data_positions_of_another_process_count_are_a_layout_error_not_corruption(tmp_path):
  with ck.Checkpointer(tmp_path / "checkpoints") as c:
    c.save(5, _tiny(), iterator=_grain_iter())
    c.wait_until_finished()
    data = c.step_path(5) / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")  # as 2 processes write it
    (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
    for fallback in (False, True):
      with pytest.raises(ck.CheckpointProcessMismatch,
                         match=r"checkpoint_step_5 was written by 2 process\(es\) and this run has 1.*init_from="):
        c.restore_latest(ck.abstract_like(_tiny()), iterator=_grain_iter(), fallback_to_previous=fallback)
    assert c.all_steps() == [5]  # not set aside as corrupt
    assert c.restore(5, ck.abstract_like(_tiny())).step == 5  # the weights alone still restore


def test_a_step_unreadable_on_another_process_counts_as_unreadable_here(tmp_path, monkeypatch):
  # Restoring is collective: if process 1 cannot read step 3 while this process can, both must
  # fall back together (or fail together), never one train while the other falls back.
  d = tmp_path / "checkpoints"
  _save_steps(d, [2, 3])
  reports = iter([[1], []])  # step 3 failed on process 1 (its files); (step 2 read everywhere)
  monkeypatch.setattr(agreement, "failed_on_processes", lambda failed: [0] * failed + next(reports))
  target = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with ck.Checkpointer(d) as c:
    with pytest.raises(ck.CheckpointCorrupt, match="checkpoint_step_3: unreadable on process.es. 1"):
      c.restore_latest(target)
    reports = iter([[], [1], [], []])  # step 3 read everywhere, failed in process 1's restore; step 2 fine
    assert c.restore_latest(target, fallback_to_previous=True).step == 2
    assert c.all_steps() == [2]
    assert (d / ck.CORRUPT_DIR / "checkpoint_step_3").is_dir()


def test_a_checkpoint_of_another_model_shape_is_a_mismatch_never_set_aside(tmp_path):
  d = tmp_path / "checkpoints"
  _save_steps(d, [1, 2])
  other = {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}  # the spec changed the model between launches
  with ck.Checkpointer(d) as c:
    for fallback in (False, True):
      with pytest.raises(ck.CheckpointMismatch, match=r"checkpoint_step_2 does not fit the model this spec builds "
                                                      r"\(x: stored \(4,\), this model \(3,\)\)"):
        c.restore_latest(other, fallback_to_previous=fallback)
    with pytest.raises(ck.CheckpointMismatch, match=r"1 array\(s\) of this model not in the checkpoint, e.g. y"):
      c.restore(2, {"x": jax.ShapeDtypeStruct((4,), jnp.float32), "y": jax.ShapeDtypeStruct((1,), jnp.float32)})
    assert c.all_steps() == [1, 2] and not (d / ck.CORRUPT_DIR).exists()
    assert float(c.restore_latest({"x": jax.ShapeDtypeStruct((4,), jnp.float32)}).state["x"][0]) == 2.0


def test_a_missing_data_position_of_this_process_is_found_before_the_collective_restore(tmp_path):
  # Several processes restore collectively: one that found its file missing inside orbax's restore
  # left the others waiting there, so the file is checked first (and agreed on, as corruption).
  with ck.Checkpointer(tmp_path / "checkpoints") as c:
    c.save(5, _tiny(), iterator=_grain_iter())
    c.wait_until_finished()
    (c.step_path(5) / "data" / "process_0-of-1.json").unlink()
    (c.step_path(5) / "data" / "process_1-of-1.json").write_text("{}")  # another process's, not ours
    with pytest.raises(ck.CheckpointCorrupt, match=r"no data position of this process \(process_0-of-1.json\)"):
      c.restore_latest(ck.abstract_like(_tiny()), iterator=_grain_iter())
