"""Tests of `python -m benchmarks.optimizer_update`."""

import json

import jax
import numpy as np

from benchmarks import optimizer_update


def test_trainable_arrays_follow_the_mode():
  full = optimizer_update.trainable_arrays("tiny", "full")
  lora = optimizer_update.trainable_arrays("tiny", "lora")
  count = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
  assert 0 < count(lora) < count(full)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(full))


def test_every_form_and_torch_are_timed(capsys):
  assert optimizer_update.main(["--preset", "tiny", "--repeats", "1", "--torch"]) == 0
  record = json.loads(capsys.readouterr().out)
  assert record["preset"] == "tiny" and record["mode"] == "full" and record["trained_params"] > 0
  for key in ("select_s", "branch_s", "none_s", "torch_s"):
    assert record[key] > 0, key
