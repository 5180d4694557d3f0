"""The host-to-device prefetcher: order, placement, checkpointable position and errors."""

import json

import numpy as np
import pytest

from rmjax import sharding as shd
from rmjax.train import step as sp


# -- host-to-device prefetch ---------------------------------------------------------------------
def _grain_iter(n: int = 10):
  import grain
  return iter(grain.MapDataset.range(n).map(lambda i: {"x": np.full((8, 2), i, np.int32)}).to_iter_dataset())


def test_prefetch_yields_the_same_batches_on_device_in_order():
  from rmjax.train.prefetch import DevicePrefetcher
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  place = lambda b: sp.device_batch(b, mesh, keys=("x",))
  got = list(DevicePrefetcher(_grain_iter(), place, depth=2))
  assert [int(p.host["x"][0, 0]) for p in got] == list(range(10))
  for i, p in enumerate(got):
    assert p.device["x"].sharding == shd.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(p.device["x"]), np.full((8, 2), i))


def test_prefetch_state_is_the_consumed_position_not_the_thread_position():
  import time
  from rmjax.train.prefetch import DevicePrefetcher
  pre = DevicePrefetcher(_grain_iter(), lambda b: b, depth=2)
  taken = [int(next(pre).host["x"][0, 0]) for _ in range(3)]
  time.sleep(0.2)  # let the thread run ahead by `depth` batches
  state = pre.get_state()
  pre.close()
  fresh = DevicePrefetcher(_grain_iter(), lambda b: b, depth=2)
  fresh.set_state(json.dumps(state).encode())  # as grain's checkpoint handler passes it
  rest = [int(p.host["x"][0, 0]) for p in fresh]
  assert taken == [0, 1, 2] and rest == list(range(3, 10))
  # set_state on a running prefetcher drops what it prefetched
  pre2 = DevicePrefetcher(_grain_iter(), lambda b: b, depth=3)
  next(pre2), next(pre2)
  pre2.set_state(state)
  assert int(next(pre2).host["x"][0, 0]) == 3


def test_prefetch_reraises_pipeline_errors_and_rejects_bad_depth():
  from rmjax.train.prefetch import DevicePrefetcher

  def broken():
    yield {"x": np.zeros((8, 2))}
    raise KeyError("bad record")

  pre = DevicePrefetcher(broken(), lambda b: b)
  next(pre)
  with pytest.raises(KeyError, match="bad record"):
    next(pre)
  with pytest.raises(ValueError, match="depth"):
    DevicePrefetcher(iter([]), lambda b: b, depth=0)
