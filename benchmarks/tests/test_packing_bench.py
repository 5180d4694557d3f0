"""Tests of `python -m benchmarks.packing`: packed against padded rows through the real step."""

import pytest

from benchmarks.tests import json_lines


def test_packing_bench_steps_the_same_examples_in_both_layouts(capsys):
  from benchmarks import packing
  rc = packing.main(["--preset", "tiny", "--row", "64", "--examples", "24", "--batch", "2", "--median", "20",
                     "--min-length", "8", "--buckets", "16,32,64"])
  unpacked, packed, ratio = json_lines(capsys.readouterr().out)
  assert rc == 0 and (unpacked["layout"], packed["layout"]) == ("unpacked", "packed")
  assert unpacked["steps"] == 12 and packed["steps"] < unpacked["steps"]  # 24 examples, 2 per padded step
  assert unpacked["markers"] == packed["markers"] and unpacked["real_tokens"] == packed["real_tokens"]
  assert packed["token_fill"] > unpacked["token_fill"]
  assert ratio["packed_over_unpacked_markers_per_s"] == pytest.approx(
    packed["markers_per_s"] / unpacked["markers_per_s"])
  with pytest.raises(SystemExit):
    packing.main(["--preset", "tiny", "--row", "64", "--buckets", "16,32"])


def test_packing_bench_steps_the_packed_rows_with_each_segment_attention(capsys):
  """`--segment-attention both`: the same packed batches once with the segment mask and once with
  cuDNN's packed layout (on a CPU both run XLA's masked attention, and the records say so)."""
  from benchmarks import packing
  assert packing.main(["--preset", "tiny", "--row", "64", "--examples", "12", "--batch", "2", "--median", "20",
                       "--min-length", "8", "--buckets", "32,64", "--segment-attention", "both"]) == 0
  unpacked, mask, mask_ratio, cudnn_packed, cudnn_packed_ratio = json_lines(capsys.readouterr().out)
  assert [r["layout"] for r in (unpacked, mask, cudnn_packed)] == ["unpacked", "packed", "packed_cudnn_packed"]
  assert (mask["segment_attention"], cudnn_packed["segment_attention"]) == ("mask", "cudnn_packed")
  assert mask["attention"] == cudnn_packed["attention"] == "xla"
  assert mask["steps"] == cudnn_packed["steps"] and mask["markers"] == cudnn_packed["markers"] == unpacked["markers"]
  assert unpacked["most_examples_per_row"] == 1 and mask["most_examples_per_row"] > 1
  for ratio, (name, r) in ((mask_ratio, ("packed", mask)), (cudnn_packed_ratio, ("packed_cudnn_packed", cudnn_packed))):
    assert ratio == {f"{name}_over_unpacked_markers_per_s": pytest.approx(r["markers_per_s"] / unpacked["markers_per_s"])}


def test_packing_bench_reports_a_failed_run_and_goes_on(capsys, monkeypatch):
  """One layout's run fails after its step took (donated) the train state: an error line, and the
  next layout still runs, from a fresh state, and gets its ratio line."""
  import jax
  from benchmarks import packing
  real, calls = packing.time_layout, []

  def second_run_fails(steps, state, batches, mesh):
    calls.append(len(batches))
    if len(calls) == 2:
      jax.tree.map(lambda x: x.delete(), state)
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmore detail")
    return real(steps, state, batches, mesh)
  monkeypatch.setattr(packing, "time_layout", second_run_fails)
  assert packing.main(["--preset", "tiny", "--row", "64", "--examples", "12", "--batch", "2", "--median", "20",
                       "--min-length", "8", "--buckets", "32,64", "--segment-attention", "both"]) == 1
  unpacked, failed, cudnn_packed, ratio = json_lines(capsys.readouterr().out)
  assert (unpacked["layout"], cudnn_packed["layout"]) == ("unpacked", "packed_cudnn_packed")
  assert failed == {"layout": "packed", "lookahead": failed["lookahead"], "max_segments": 0,
                    "attention_mask": "segments", "segment_attention": "mask",
                    "error": "RuntimeError: RESOURCE_EXHAUSTED: out of memory"}
  assert ratio == {"packed_cudnn_packed_over_unpacked_markers_per_s": pytest.approx(
    cudnn_packed["markers_per_s"] / unpacked["markers_per_s"])}
