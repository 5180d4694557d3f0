"""Packing must not change the loss: several examples per row (segment ids, restarted
positions, offset markers) give the same per-marker logits and the same loss as one example
per row, because attention never crosses segments and positions restart per segment."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.packing import pack_stream
from rmjax.data.packing import batch_rows, pack_batch, pack_examples
from rmjax.data.render import RenderConfig, Tokenized
from rmjax.model.confidence import ConfidenceModel
from rmjax.model.config import ModelConfig
from rmjax.model.head import HeadConfig
from rmjax.train.step import masked_loss_sum

MARKER = 511
ROW = 128


def _examples(rng: np.random.Generator, count: int) -> list[Tokenized]:
  """Examples of 10-60 tokens, markers at random sorted positions, random targets, one unsupervised."""
  out = []
  for i in range(count):
    n = int(rng.integers(10, 61))
    k = int(rng.integers(1, 5))
    pos = np.sort(rng.choice(np.arange(3, n), size=k, replace=False)).astype(np.int32)
    ids = rng.integers(0, MARKER, size=n).astype(np.int32)
    ids[pos] = MARKER
    mask = np.ones(k, np.float32)
    if i == 3:
      mask[0] = 0.0
    out.append(Tokenized("synthetic", f"ex{i}", ids, pos, rng.random(k).astype(np.float32), mask))
  return out


@pytest.fixture(scope="module")
def model_and_params():
  cfg = ModelConfig.tiny("qwen3", vocab_size=512, marker_id=MARKER)
  model = ConfidenceModel(cfg, HeadConfig(hidden_dims=(32,), dropout=0.0, final_init_std=0.5))
  ids = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), ids, ids, ids + 1, jnp.zeros((1, 1), jnp.int32))["params"]
  return model, params


def _per_marker(model, params, batch) -> tuple[np.ndarray, float]:
  """(logits at supervised slots in batch order, mean MSE loss over supervised markers)."""
  b = {k: jnp.asarray(v) for k, v in batch.items() if k != "example_ids"}
  logits = model.apply({"params": params}, b["input_ids"], b["positions"], b["segment_ids"],
                       b["marker_positions"], deterministic=True)
  loss = masked_loss_sum(logits, b["targets"], b["target_mask"], "mse") / jnp.sum(b["target_mask"])
  keep = np.asarray(batch["target_mask"]) > 0
  return np.asarray(logits)[keep], float(loss)


@pytest.mark.parametrize("loss_kind", ["mse", "bce"])
def test_packed_loss_equals_unpacked(model_and_params, loss_kind):
  model, params = model_and_params
  examples = _examples(np.random.default_rng(1), 9)
  render = RenderConfig(max_length=ROW, length_buckets=(64, ROW), max_markers=16)
  unpacked = batch_rows(examples, render, pad_id=0)
  rows = pack_examples(examples, ROW, 16)
  assert len(rows) < len(examples) and max(len(r.example_ids) for r in rows) >= 3  # really packed
  packed = batch_rows(rows, render, pad_id=0)
  assert packed["target_mask"].sum() == unpacked["target_mask"].sum()

  def loss(batch):
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    logits = model.apply({"params": params}, b["input_ids"], b["positions"], b["segment_ids"],
                         b["marker_positions"], deterministic=True)
    return float(masked_loss_sum(logits, b["targets"], b["target_mask"], loss_kind) / jnp.sum(b["target_mask"]))

  assert abs(loss(packed) - loss(unpacked)) <= 1e-5
  # The same marker's logit, example by example (packing keeps example order within rows).
  got = _logits_by_example(model, params, packed, rows)
  want = _logits_by_example(model, params, unpacked, [[e.id] for e in examples])
  for ex_id, logits in want.items():
    np.testing.assert_allclose(got[ex_id], logits, atol=1e-5, rtol=0)


def _logits_by_example(model, params, batch, row_ids) -> dict[str, np.ndarray]:
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  logits = np.asarray(model.apply({"params": params}, b["input_ids"], b["positions"], b["segment_ids"],
                                  b["marker_positions"], deterministic=True))
  out = {}
  for r, ids in enumerate(row_ids):
    ids = ids.example_ids if hasattr(ids, "example_ids") else ids
    seg_of_slot = batch["segment_ids"][r][batch["marker_positions"][r]]
    n = int((batch["marker_positions"][r] > 0).sum())  # markers are never at position 0 here
    for s, ex_id in enumerate(ids, start=1):
      slots = np.nonzero(seg_of_slot[:n] == s)[0]
      out[ex_id] = logits[r, slots]
  return out


def test_packing_changes_loss_when_segments_leak(model_and_params):
  """Control: the same packed rows with one segment id per row (attention crosses examples and
  positions restart is lost) give a different loss, so the equality above is not vacuous."""
  model, params = model_and_params
  examples = _examples(np.random.default_rng(2), 9)
  render = RenderConfig(max_length=ROW, length_buckets=(64, ROW), max_markers=16)
  packed = batch_rows(pack_examples(examples, ROW, 16), render, pad_id=0)
  leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
  unpacked = batch_rows(examples, render, pad_id=0)
  assert abs(_per_marker(model, params, leaky)[1] - _per_marker(model, params, unpacked)[1]) > 1e-4


def _sized(lengths) -> list[Tokenized]:
  """Examples of the given token counts, one marker each (ids are irrelevant to packing)."""
  return [Tokenized("synthetic", f"ex{i}", np.zeros(n, np.int32), np.asarray([n - 1], np.int32),
                    np.zeros(1, np.float32), np.ones(1, np.float32)) for i, n in enumerate(lengths)]


def test_lookahead_fills_the_hole_a_long_example_leaves():
  examples = _sized([6, 6, 3, 1, 9])  # one row of 10 tokens per batch
  layout = lambda lookahead: [[r.example_ids for r in batch] for batch in pack_stream(examples, 1, 10, 4, lookahead)]
  # Lookahead 0 closes the batch at the first example that does not fit.
  assert layout(0) == [[("ex0",)], [("ex1", "ex2", "ex3")], [("ex4",)]]
  # Lookahead 1 reads past ex1 (held over, it starts the next batch) and fills the row with ex2, ex3.
  assert layout(1) == [[("ex0", "ex2", "ex3")], [("ex1",)], [("ex4",)]]


@pytest.mark.parametrize("lookahead", [0, 3, 16])
def test_streaming_packer_places_every_example_once_within_limits(lookahead):
  rng = np.random.default_rng(lookahead)
  examples = _sized(np.clip(rng.lognormal(np.log(30), 0.6, size=400), 4, ROW).astype(int))
  stream, pending, seen = iter((t, i) for i, t in enumerate(examples)), [], []
  while True:
    before = len(pending)
    rows, pending = pack_batch(pending, lambda: next(stream, None), 4, ROW, 8, lookahead)
    if not rows:
      break
    assert len(rows) <= 4 and all(len(r.input_ids) <= ROW and len(r.marker_positions) <= 8 for r in rows)
    assert len(pending) <= max(lookahead + 1, before - 1)  # held-over examples stay bounded
    seen += [int(i[2:]) for r in rows for i in r.example_ids]
  assert sorted(seen) == list(range(len(examples)))


def test_lookahead_fills_rows_better_on_prm800k_like_lengths():
  rng = np.random.default_rng(0)
  examples = _sized(np.clip(rng.lognormal(np.log(30), 0.6, size=2000), 4, ROW).astype(int))

  def fill(lookahead):  # mean share of real tokens in 4 x ROW batches, the stream's last 2 left out
    batches = pack_stream(examples, 4, ROW, 8, lookahead)
    return np.mean([sum(len(r.input_ids) for r in rows) / (4 * ROW) for rows in batches[:-2]])

  closed_at_first_miss, default = fill(0), fill(16)
  assert closed_at_first_miss < 0.92 and default > 0.96, (closed_at_first_miss, default)


def test_causal_only_attention_is_exact_on_unpacked_rows_and_not_on_packed_ones(model_and_params):
  """ModelConfig.attention_mask="causal" (no mask array; cuDNN's plain causal kernel) gives the
  segment mask's supervised logits on unpacked, right-padded rows with varying lengths, and
  different ones on packed rows, where only the segment mask keeps examples apart."""
  model, params = model_and_params
  causal = ConfidenceModel(model.model_cfg.replace(attention_mask="causal"), model.head_cfg)
  examples = _examples(np.random.default_rng(3), 9)
  render = RenderConfig(max_length=ROW, length_buckets=(64, ROW), max_markers=16)
  unpacked = batch_rows(examples, render, pad_id=0)
  assert (unpacked["segment_ids"] == 0).any()  # padded rows: the case the causal mask must get right
  np.testing.assert_allclose(_per_marker(causal, params, unpacked)[0], _per_marker(model, params, unpacked)[0],
                             atol=1e-6, rtol=0)
  packed = batch_rows(pack_examples(examples, ROW, 16), render, pad_id=0)
  assert np.abs(_per_marker(causal, params, packed)[0] - _per_marker(model, params, packed)[0]).max() > 1e-3


def test_training_picks_causal_attention_only_for_unpacked_rows():
  from rmjax.spec import load_spec_file
  from rmjax.train.build import model_overrides
  spec = load_spec_file(str(pathlib.Path(__file__).parents[1] / "specs" / "demo.py"))
  assert spec.data.pack is False and model_overrides(spec)["attention_mask"] == "causal"
  spec.data.pack = True
  assert model_overrides(spec)["attention_mask"] == "segments"


def test_segment_cap_is_kept_by_the_packer_and_checked_at_batching():
  """data.max_segments_per_row: no packed row holds more examples (cuDNN's packed layout has that
  many slots), every example is still placed once, and batch_rows refuses a row over the cap."""
  examples = _sized([3] * 12)  # twelve 3-token examples, one marker each: ROW and markers allow 8 a row
  uncapped = pack_stream(examples, 4, ROW, 8)
  capped = pack_stream(examples, 4, ROW, 8, max_segments=3)
  assert [len(r.example_ids) for rows in uncapped for r in rows] == [8, 4]
  assert [len(r.example_ids) for rows in capped for r in rows] == [3, 3, 3, 3]
  assert sorted(i for rows in capped for r in rows for i in r.example_ids) == sorted(t.id for t in examples)
  render = RenderConfig(max_length=ROW, length_buckets=(ROW,), max_markers=8, max_segments=3)
  assert render.segments == 3 and RenderConfig(max_length=ROW, length_buckets=(ROW,), max_markers=8).segments == 8
  batch_rows(capped[0], render, pad_id=0)
  with pytest.raises(ValueError, match="row with 8 examples exceeds 3 per row"):
    batch_rows(uncapped[0], render, pad_id=0)


def test_segment_cap_reaches_the_packer_and_the_model_from_the_spec(monkeypatch):
  """One spec key sets both sides: the pipeline's rows and the slots of the model's packed layout
  (whose cuDNN call is stood in for here: it needs a GPU)."""
  from rmjax.model import cudnn_attention
  from rmjax.spec import load_spec_file
  from rmjax.train.build import model_overrides
  spec = load_spec_file(str(pathlib.Path(__file__).parents[1] / "specs" / "demo.py"))
  spec.data.pack, spec.data.max_segments_per_row = True, 5
  assert RenderConfig.from_spec(spec.data).segments == 5 and model_overrides(spec)["max_segments"] == 5
  slots = []

  def stand_in(q, k, v, seqlen_BS, offsets_BS1, scale):
    slots.append(seqlen_BS.shape[1])
    return q
  monkeypatch.setattr(cudnn_attention, "packed_causal_attention", stand_in)
  monkeypatch.setattr(cudnn_attention, "packed_unsupported_reason", lambda device=None: None)
  cfg = ModelConfig.tiny("qwen3", attention_mask="segments", segment_attention="cudnn_packed", attention_impl="cudnn")
  ids = jnp.ones((1, 16), jnp.int32)
  for max_segments, want in ((5, 6), (0, 9)):  # 5 slots + padding; 0: the 8 marker slots + padding
    model = ConfidenceModel(cfg.replace(max_segments=max_segments), HeadConfig(hidden_dims=(8,)))
    jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids, jnp.zeros((1, 8), jnp.int32)))
    assert set(slots) == {want}, slots
    slots.clear()
