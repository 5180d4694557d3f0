"""Tests of `python -m benchmarks.attention` and `python -m benchmarks.blocked_attention`."""

import json

import numpy as np
import pytest

from benchmarks.tests import json_lines


def test_attention_probe_compares_the_packed_variants(capsys):
  """On a CPU the two public variants run XLA's attention: causal-only attention differs from the
  segment mask's on rows holding several examples, in values and gradients; the cuDNN-only
  variant says it is unavailable, and so does the H100 compile without jax's CUDA plugin."""
  from benchmarks import attention
  assert attention.main(["--seq-len", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                         "--median", "20", "--steps", "1"]) == 0
  rows = {r["variant"]: r for r in json_lines(capsys.readouterr().out)}
  assert list(rows) == ["segments", "causal", "segments_no_mask_grad", "segments_cudnn_packed",
                        "segments_cudnn_packed_tight"]
  assert rows["segments"]["segments_per_row"] > 1 and rows["segments"]["ms"] > 0
  assert "max_abs_diff_out" not in rows["segments"]  # the reference
  assert all(rows["causal"][f"max_abs_diff_{part}"] > 0.1 for part in ("out", "dq", "dk", "dv"))
  assert all("unavailable" in rows[v] for v in list(rows)[2:])
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
  except ImportError:
    assert attention.main(["--target", "h100"]) == 2
  segments = attention.packed_segment_ids(3, 64, 20.0, np.random.default_rng(0))
  for row in segments:  # ids 1..k from the left, each a contiguous run, padding (0) only at the end
    ids = row[row > 0]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(np.unique(ids)) == 1)
    assert np.all(row[len(ids):] == 0)



def test_attention_probe_reports_a_failed_variant_and_goes_on(capsys, monkeypatch):
  """The reference variant fails: an error line, the next variant still runs, and with no
  reference it gives no differences (not differences from itself or another variant)."""
  from benchmarks import attention
  real, calls = attention.time_grads, []

  def first_fails(attend, args, steps):
    calls.append(steps)
    if len(calls) == 1:
      raise RuntimeError("cuDNN: no plan\nmore detail")
    return real(attend, args, steps)
  monkeypatch.setattr(attention, "time_grads", first_fails)
  assert attention.main(["--seq-len", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                         "--median", "20", "--steps", "1"]) == 1
  rows = {r["variant"]: r for r in json_lines(capsys.readouterr().out)}
  assert rows["segments"]["error"] == "RuntimeError: cuDNN: no plan" and "ms" not in rows["segments"]
  assert rows["causal"]["ms"] > 0 and not any(k.startswith("max_abs_diff_") for k in rows["causal"])
  assert len(rows) == 5


def test_private_cudnn_attention_is_used_only_with_the_expected_parameters(monkeypatch):
  from benchmarks import attention
  from rmjax.model import cudnn_attention
  module = cudnn_attention._private_module()
  if module is None:
    pytest.skip("this jax has no jax._src.cudnn")
  import inspect

  def taking(names):
    def fake(*args):
      raise AssertionError("not to be called")
    fake.__signature__ = inspect.Signature(
      [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return fake
  expected = attention._EXPECTED_PARAMETERS
  monkeypatch.setattr(module, "_dot_product_attention", taking(expected), raising=False)
  assert attention.constant_mask_available()
  monkeypatch.setattr(module, "_dot_product_attention", taking(expected[:-1]))  # a jax that changed it
  assert not attention.constant_mask_available()
  with pytest.raises(RuntimeError, match="expected parameters"):
    attention.causal_attention_constant_mask(None, None, None, None, 1.0)


def test_block_size_benchmark_prints_one_timing_per_block(capsys):
  from benchmarks import blocked_attention
  assert blocked_attention.main(["--seq-lens", "16,24", "--blocks", "0,8,16", "--batch", "1", "--heads", "2",
                                 "--kv-heads", "1", "--head-dim", "8", "--repeats", "1"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["T"] for r in rows] == [16, 24]
  assert set(rows[0]) == {"T", "device", "0", "8", "jax"} and set(rows[1]) == {"T", "device", "0", "8", "16", "jax"}
  assert all(r[b] > 0 for r in rows for b in r if b not in ("T", "device"))


@pytest.mark.parametrize("mask", ["causal", "segments"])
def test_block_size_benchmark_times_torchs_attention_beside(capsys, mask):
  pytest.importorskip("torch")
  from benchmarks import blocked_attention
  assert blocked_attention.main(["--seq-lens", "16", "--blocks", "8", "--batch", "1", "--heads", "2", "--kv-heads",
                                 "1", "--head-dim", "8", "--repeats", "1", "--mask", mask, "--torch"]) == 0
  (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert set(row) == {"T", "device", "8", "jax", "torch"} and row["torch"] > 0
