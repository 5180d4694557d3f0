"""cuDNN's packed layout for packed rows (model.segment_attention="cudnn_packed").

cuDNN itself needs a GPU: here the layout arrays are checked against the segment mask they
replace, and the model's choice between mask and layout is checked where it is made. The
GPU comparison of values and gradients is `python -m benchmarks.attention` (gpu_checks.sh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.attention import packed_segment_ids
from rmjax.bench import gpu_target
from rmjax.model import cudnn_attention
from rmjax.model.config import ModelConfig
from rmjax.model.transformer import Decoder, attention_inputs, attention_mask, init_params


def _mask_from_layout(seqlen_S: np.ndarray, offsets_S1: np.ndarray, t: int) -> np.ndarray:
  """(T, T) bool: causal within each sequence the layout lists (what cuDNN's packed layout with
  the causal mask attends), written independently of segment ids."""
  allowed = np.zeros((t, t), bool)
  for length, start in zip(seqlen_S, offsets_S1[:-1]):
    if length < 0:
      assert start == -1
      continue
    block = np.tril(np.ones((length, length), bool))
    allowed[start:start + length, start:start + length] = block
  return allowed


def test_segment_layout_by_hand():
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0, 0],   # two examples, then padding
                          [1, 1, 1, 1, 1, 1, 1],   # one example filling the row
                          [0, 0, 0, 0, 0, 0, 0],   # an all-padding row (evaluation batches have them)
                          [1, 2, 3, 3, 3, 3, 0]], jnp.int32)  # as many examples as slots
  seqlen, offsets = cudnn_attention.segment_layout(segments, max_segments=3)
  np.testing.assert_array_equal(seqlen, [[3, 2, -1, 2], [7, -1, -1, -1], [-1, -1, -1, 7], [1, 1, 4, 1]])
  np.testing.assert_array_equal(offsets, [[0, 3, -1, 5, -1], [0, -1, -1, -1, -1], [-1, -1, -1, 0, -1],
                                          [0, 1, 2, 6, -1]])
  assert seqlen.dtype == offsets.dtype == jnp.int32


@pytest.mark.parametrize("median", [12.0, 30.0])
def test_layout_attends_as_the_segment_mask_on_every_real_token(median):
  """Real query rows see exactly the keys the segment mask allows; every position belongs to
  exactly one sequence (padding forms its own, so no output is left undefined)."""
  t = 96
  segments = packed_segment_ids(6, t, median, np.random.default_rng(1))
  assert segments.max() > 1 and (segments == 0).any()
  max_segments = int(segments.max())
  seqlen, offsets = map(np.asarray, cudnn_attention.segment_layout(jnp.asarray(segments), max_segments))
  mask = np.asarray(attention_mask(jnp.asarray(segments)))[:, 0]
  for b in range(segments.shape[0]):
    covered = np.zeros(t, int)
    for length, start in zip(seqlen[b], offsets[b][:-1]):
      if length > 0:
        covered[start:start + length] += 1
    np.testing.assert_array_equal(covered, 1)
    real = segments[b] > 0
    np.testing.assert_array_equal(_mask_from_layout(seqlen[b], offsets[b], t)[real], mask[b][real])


def _packed_cfg(**changes) -> ModelConfig:
  return ModelConfig.tiny("qwen3", **({"attention_mask": "segments", "segment_attention": "cudnn_packed",
                                       "compute_dtype": "bfloat16"} | changes))


def test_the_model_gives_cudnn_the_layout_only_when_asked_and_on_cudnn():
  segments = jnp.asarray(packed_segment_ids(2, 32, 8.0, np.random.default_rng(0)))
  layout = attention_inputs(_packed_cfg(attention_impl="cudnn"), segments, max_segments=16)
  assert isinstance(layout, tuple) and [x.shape for x in layout] == [(2, 17), (2, 18)]
  for cfg in (_packed_cfg(attention_impl="xla"), _packed_cfg(attention_impl="cudnn", segment_attention="mask")):
    np.testing.assert_array_equal(attention_inputs(cfg, segments, 16), attention_mask(segments))
  assert attention_inputs(_packed_cfg(attention_impl="cudnn", attention_mask="causal"), segments, 16) is None
  with pytest.raises(ValueError, match="needs max_segments"):
    attention_inputs(_packed_cfg(attention_impl="cudnn"), segments, None)
  with pytest.raises(ValueError, match="segment_attention='ragged'; choose 'auto', 'mask' or 'cudnn_packed'"):
    ModelConfig.tiny("qwen3", segment_attention="ragged")


def test_auto_takes_the_packed_layout_where_it_can_run_and_the_mask_elsewhere(monkeypatch, caplog):
  """"auto" (the spec's default): cuDNN's packed layout where it can run, the mask under XLA or
  where cuDNN cannot take the layout, and never a refusal; an info line says what it picked."""
  from rmjax.train.build import check_on_this_device
  segments = jnp.asarray(packed_segment_ids(2, 32, 8.0, np.random.default_rng(0)))
  auto = _packed_cfg(attention_impl="cudnn", segment_attention="auto")
  assert isinstance(attention_inputs(auto, segments, 16), tuple)
  np.testing.assert_array_equal(attention_inputs(auto.replace(attention_impl="xla"), segments, 16),
                                attention_mask(segments))
  caplog.set_level("INFO")
  check_on_this_device(auto)
  assert "model.segment_attention='auto': packed rows go to cuDNN as its packed layout" in caplog.text
  ampere = "cuDNN's packed layout needs a Hopper or later GPU (compute capability 9.0); this A100 has 8.0"
  monkeypatch.setattr(cudnn_attention, "packed_unsupported_reason", lambda device=None: ampere)
  np.testing.assert_array_equal(attention_inputs(auto, segments, 16), attention_mask(segments))
  caplog.clear()
  check_on_this_device(auto)  # not refused
  assert f"model.segment_attention='auto': packed rows use the segment mask here ({ampere})" in caplog.text


class _Device:
  def __init__(self, platform: str, capability: str | None = None, kind: str = ""):
    self.platform, self.compute_capability, self.device_kind = platform, capability, kind


def test_packed_layout_is_refused_in_one_line_where_it_cannot_run(monkeypatch):
  """An Ampere GPU, or a jax whose private module changed: one line before anything compiles
  (the launcher prints SpecError as is), whereas a CPU quietly keeps the mask."""
  from rmjax import spec as spec_lib
  from rmjax.train.build import check_on_this_device
  assert cudnn_attention.packed_unsupported_reason(_Device("gpu", "9.0", "NVIDIA H100 80GB HBM3")) is None
  assert cudnn_attention.packed_unsupported_reason(_Device("cpu")) is None
  ampere = cudnn_attention.packed_unsupported_reason(_Device("gpu", "8.0", "NVIDIA A100-SXM4-80GB"))
  assert ampere == ("cuDNN's packed layout needs a Hopper or later GPU (compute capability 9.0); "
                    "this NVIDIA A100-SXM4-80GB has 8.0")
  monkeypatch.setattr(cudnn_attention, "packed_unsupported_reason", lambda device=None: ampere)
  with pytest.raises(spec_lib.SpecError) as refused:
    check_on_this_device(_packed_cfg(attention_impl="cudnn"))
  assert str(refused.value) == f"model.segment_attention='cudnn_packed': {ampere}; use 'auto' or 'mask'"
  check_on_this_device(_packed_cfg(attention_impl="xla"))  # the mask: nothing to refuse
  check_on_this_device(_packed_cfg(attention_impl="cudnn", segment_attention="mask"))
  with pytest.raises(ValueError, match="Hopper or later GPU"):  # the model itself, used directly
    attention_inputs(_packed_cfg(attention_impl="cudnn"), jnp.ones((1, 8), jnp.int32), 4)
  monkeypatch.undo()
  monkeypatch.setattr(cudnn_attention, "_packed_function", lambda: None)
  assert not cudnn_attention.packed_available()
  assert cudnn_attention.packed_unsupported_reason(_Device("gpu", "9.0")).startswith("this jax (")


def test_on_xla_the_packed_choice_runs_the_segment_mask():
  """One spec runs on both platforms: without cuDNN, "cudnn_packed" attends through the mask,
  and the confidence model's decoder gives the same hidden states either way."""
  cfg = _packed_cfg(compute_dtype="float32")
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  segments = packed_segment_ids(2, 32, 8.0, rng)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, segments.shape), jnp.int32)
  pos = jnp.asarray(np.concatenate([np.arange(32)[None]] * 2), jnp.int32)
  out = lambda c: Decoder(c).apply({"params": params}, ids, pos, jnp.asarray(segments), max_segments=16)
  np.testing.assert_array_equal(out(cfg), out(cfg.replace(segment_attention="mask")))


def test_deviceless_cudnn_checks_answer_for_the_target_and_are_restored():
  fa = cudnn_attention._private_module()
  if fa is None:
    pytest.skip("this jax has no jax._src.cudnn")
  assert gpu_target.compute_capability("h100") == (9, 0)
  before = fa.check_compute_capability
  with gpu_target.cudnn_checks_for("h100"):
    assert fa.check_compute_capability("9.0") and fa.check_compute_capability("8.0")
    assert not fa.check_compute_capability("10.0")
    assert fa.is_cuda_compute_capability_equal("9.0") and not fa.is_cuda_compute_capability_equal("10.3")
  assert fa.check_compute_capability is before and not fa.check_compute_capability("9.0")  # a CPU has none
