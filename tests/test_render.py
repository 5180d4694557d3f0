"""Rendering, truncation, bucketed batching and packing keep every target on its marker."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rmjax.data.example import Example, SkipCounter
from rmjax.data.packing import batch_rows, pack_examples
from rmjax.data.render import RenderConfig, Renderer, Tokenized, render_text
from rmjax.tokenizer import MARKER, build_demo_tokenizer, marker_id

BUCKETS = (16, 32, 64, 128)


@pytest.fixture(scope="module")
def tok():
  return build_demo_tokenizer()


def _example(steps, targets, problem="Compute 12 + 7 - 3.", ident="e"):
  return Example("test", ident, problem, tuple(steps), tuple(targets))


def test_ids_equal_full_tokenization_and_markers_sit_on_marker_ids(tok):
  ex = _example(["12 + 7 = 19", "19 - 3 = 16", "# Answer\n\n16"], [1.0, None, 0.0])
  out = Renderer(tok, RenderConfig(max_length=128, length_buckets=BUCKETS))(ex)
  text = "Problem: Compute 12 + 7 - 3.\n\nSolution:\n" + "".join(
    f"{s} {MARKER}\n" for s in ex.steps)
  assert out.input_ids.tolist() == tok(text)["input_ids"]
  assert out.input_ids.dtype == np.int32
  assert (out.input_ids[out.marker_positions] == marker_id(tok)).all()
  assert out.marker_positions.tolist() == np.flatnonzero(out.input_ids == marker_id(tok)).tolist()
  assert out.targets.tolist() == [1.0, 0.0, 0.0]
  assert out.target_mask.tolist() == [1.0, 0.0, 1.0]  # the None step is shown, not supervised


def test_literal_marker_in_record_text_does_not_create_a_target(tok):
  ex = _example([f"a {MARKER} b", "c"], [1.0, 0.0], problem=f"p {MARKER}")
  out = Renderer(tok, RenderConfig(max_length=128, length_buckets=BUCKETS))(ex)
  assert out.marker_positions.shape == (2,)
  assert (out.input_ids == marker_id(tok)).sum() == 2


def test_max_steps_per_example_keeps_the_first_steps(tok):
  ex = _example([f"{i} + 1 = {i + 1}" for i in range(6)], [1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
  out = Renderer(tok, RenderConfig(max_length=128, max_steps_per_example=4, length_buckets=BUCKETS))(ex)
  assert out.targets.tolist() == [1.0, 0.0, 1.0, 0.0]
  assert tok.decode(out.input_ids).count(MARKER) == 4


def test_first_marker_that_does_not_fit_is_skipped_and_counted(tok):
  skips = SkipCounter()
  render = Renderer(tok, RenderConfig(max_length=8, length_buckets=(8,)), skips)
  ex = _example(["a long first step that cannot fit in eight tokens"], [1.0])
  assert render(ex) is None
  assert render(ex) is None  # read again (next epoch): counted once
  assert skips.as_dict() == {"test": {"first_marker_truncated": 1}}
  assert render(_example([], [], ident="empty")) is None
  assert skips.as_dict()["test"]["no_steps"] == 1


_text = st.lists(st.sampled_from(list("ab 12+=\n.é∑") + [MARKER, " x", "Step"]), max_size=40).map("".join)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_text, min_size=1, max_size=8),
       targets=st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=8, max_size=8),
       problem=_text, max_length=st.integers(2, 128), max_steps=st.integers(1, 8))
def test_truncation_never_leaves_a_target_beyond_the_kept_tokens(tok, steps, targets, problem,
                                                                 max_length, max_steps):
  ex = _example(steps, targets[: len(steps)], problem=problem)
  skips = SkipCounter()
  cfg = RenderConfig(max_length=max_length, max_steps_per_example=max_steps, length_buckets=(128,))
  out = Renderer(tok, cfg, skips)(ex)
  n = min(len(steps), max_steps)
  full = np.asarray(tok(render_text(ex, tok, "default", n))["input_ids"])
  full_markers = np.flatnonzero(full == marker_id(tok))
  assert len(full_markers) == n
  if full_markers[0] >= max_length:
    assert out is None and skips.as_dict() == {"test": {"first_marker_truncated": 1}}
    return
  assert out is not None and skips.total() == 0
  k = out.marker_positions.shape[0]
  assert len(out) <= max_length
  assert (out.marker_positions < len(out)).all()
  assert (out.input_ids[out.marker_positions] == marker_id(tok)).all()
  assert out.input_ids.tolist() == full[: len(out)].tolist()  # a prefix of the real tokenization
  assert k == int((full_markers < max_length).sum())  # every marker that fits is kept
  assert out.targets.shape == out.target_mask.shape == (k,)
  expect = [0.0 if t is None else t for t in targets[:k]]
  np.testing.assert_array_equal(out.targets, np.asarray(expect, np.float32))
  np.testing.assert_array_equal(out.target_mask, [0.0 if t is None else 1.0 for t in targets[:k]])


def _tokenized(n_tokens, marker_positions, ident, fill=7):
  ids = np.full(n_tokens, fill, np.int32)
  k = len(marker_positions)
  return Tokenized("t", ident, ids, np.asarray(marker_positions, np.int32),
                   np.linspace(0, 1, k).astype(np.float32), np.ones(k, np.float32))


@pytest.mark.parametrize("lengths", [[3], [16], [17, 2], [33, 64, 5], [128]])
def test_batches_pad_right_to_the_smallest_bucket(lengths):
  cfg = RenderConfig(max_length=128, max_steps_per_example=3, length_buckets=(64, 16, 32, 128))
  rows = [_tokenized(n, [n - 1], f"r{i}", fill=i + 5) for i, n in enumerate(lengths)]
  b = batch_rows(rows + [None], cfg, pad_id=0, with_meta=True)
  expect_t = min(x for x in (16, 32, 64, 128) if x >= max(lengths))
  assert b["input_ids"].shape == (len(lengths) + 1, expect_t)
  assert b["marker_positions"].shape == (len(lengths) + 1, 3)
  for i, n in enumerate(lengths):
    assert (b["input_ids"][i, :n] == i + 5).all() and (b["input_ids"][i, n:] == 0).all()
    assert (b["segment_ids"][i, :n] == 1).all() and (b["segment_ids"][i, n:] == 0).all()
    assert b["positions"][i, :n].tolist() == list(range(n))
    assert b["marker_positions"][i].tolist() == [n - 1, 0, 0]
    assert b["target_mask"][i].tolist() == [1.0, 0.0, 0.0]
  assert b["example_ids"].tolist() == [f"r{i}" for i in range(len(lengths))] + [""]
  assert (b["segment_ids"][-1] == 0).all() and (b["target_mask"][-1] == 0).all()
  assert b["input_ids"].dtype == np.int32 and b["targets"].dtype == np.float32


def test_render_config_asserts_a_max_length_no_bucket_holds():
  # The user's message comes from spec validation (test_spec); the dataclass only asserts.
  with pytest.raises(AssertionError, match="length_buckets"):
    RenderConfig(max_length=300, length_buckets=(128, 256))


def test_packing_keeps_markers_and_targets_with_their_segment(tok):
  render = Renderer(tok, RenderConfig(max_length=64, length_buckets=(64,)))
  rng = np.random.default_rng(0)
  examples = []
  for i in range(30):
    k = int(rng.integers(1, 4))
    steps = [f"{i} + {j} = {i + j}" for j in range(k)]
    examples.append(render(_example(steps, list(rng.uniform(0, 1, k)), ident=f"x{i}")))
  rows = pack_examples(examples, row_length=64, max_markers=8)
  by_id = {e.id: e for e in examples}
  seen = []
  for row in rows:
    assert len(row) <= 64 and row.marker_positions.shape[0] <= 8
    slot = 0
    for s, ident in enumerate(row.example_ids, start=1):
      ex = by_id[ident]
      span = np.flatnonzero(row.segment_ids == s)
      assert span.tolist() == list(range(span[0], span[0] + len(ex)))  # contiguous
      assert row.input_ids[span].tolist() == ex.input_ids.tolist()
      assert row.positions[span].tolist() == list(range(len(ex)))
      k = ex.marker_positions.shape[0]
      assert (row.marker_positions[slot:slot + k] - span[0]).tolist() == ex.marker_positions.tolist()
      assert row.targets[slot:slot + k].tolist() == ex.targets.tolist()
      assert row.step_index[slot:slot + k].tolist() == list(range(k))
      slot += k
      seen.append(ident)
  assert sorted(seen) == sorted(by_id)
  assert len(rows) < len(examples)  # it actually packs
  b = batch_rows(rows, RenderConfig(max_length=64, length_buckets=(64,), max_markers=8), pad_id=0)
  assert b["segment_ids"].max() > 1
  ids = b["input_ids"][np.arange(len(rows))[:, None], b["marker_positions"]]
  assert (ids[b["target_mask"] > 0] == marker_id(tok)).all()


def test_chat_template_puts_markers_after_steps(tok):
  import copy
  t = copy.deepcopy(tok)
  t.chat_template = ("{% for m in messages %}<eos>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}")
  ex = _example(["1 + 1 = 2", "2 + 2 = 5"], [1.0, 0.0])
  out = Renderer(t, RenderConfig(template="chat", max_length=128, length_buckets=BUCKETS))(ex)
  text = t.apply_chat_template([{"role": "user", "content": ex.problem},
                                {"role": "assistant", "content": "1 + 1 = 2 <CONFIDENCE>\n2 + 2 = 5 <CONFIDENCE>\n"}],
                               tokenize=False)
  assert out.input_ids.tolist() == t(text, add_special_tokens=False)["input_ids"]
  assert out.targets.tolist() == [1.0, 0.0]
  assert t.decode(out.input_ids[: out.marker_positions[1] + 1]).endswith("2 + 2 = 5 <CONFIDENCE>")
  with pytest.raises(ValueError, match="chat template"):
    Renderer(tok, RenderConfig(template="chat", max_length=128, length_buckets=BUCKETS))(ex)


def test_render_config_from_the_real_spec():
  import importlib.util
  spec_file = __import__("pathlib").Path(__file__).resolve().parents[1] / "specs" / "common.py"
  if not spec_file.exists():
    pytest.skip("specs/common.py not written yet")
  mod = importlib.util.spec_from_file_location("specs_common", spec_file)
  common = importlib.util.module_from_spec(mod)
  mod.loader.exec_module(common)
  getter = getattr(common, "base_spec", None) or getattr(common, "get_config", None)
  if getter is None:
    pytest.skip("specs/common.py has no base_spec")
  data = getter().data
  cfg = RenderConfig.from_spec(data)
  assert cfg.max_length == data.max_length and cfg.markers == data.max_steps_per_example
  assert cfg.length_buckets == tuple(sorted(data.length_buckets))
  assert RenderConfig(max_length=cfg.max_length, length_buckets=cfg.length_buckets) == cfg  # same defaults
