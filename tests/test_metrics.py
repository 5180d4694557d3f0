"""Tests for rmjax.metrics: hand-computed values, brute-force AUROC, and properties."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmjax import metrics


def brute_force_auroc(scores, labels):
  """P(score_pos > score_neg) + 0.5 P(tie), by counting every pair (independent of the ranks)."""
  pos = [s for s, l in zip(scores, labels) if l]
  neg = [s for s, l in zip(scores, labels) if not l]
  total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
  return total / (len(pos) * len(neg))


def test_summarize_hand_computed_binary():
  # p = [.9, .2, .6, .4], y = [1, 0, 1, 0]
  # errors -.1, .2, -.4, .4 -> squares .01 .04 .16 .16 (sum .37) -> mse .0925, mae 1.1/4 = .275
  # mean y .5, SS_tot = 1 -> r2 = 1 - .37 = .63; positives (.9, .6) beat negatives (.2, .4) -> auroc 1
  # each prediction in its own bin (9, 2, 6, 4) -> ece = mean |p - y| = .275
  # low band (y=0): |.2|, |.4| -> .3; high band (y=1): .1, .4 -> .25; medium empty -> None
  m = metrics.summarize([0.9, 0.2, 0.6, 0.4], [1, 0, 1, 0])
  expected = {"count": 4, "count_hard": 4, "mse": 0.0925, "mae": 0.275, "r2": 0.63, "ece": 0.275,
              "brier": 0.0925, "auroc": 1.0, "mae_low": 0.3, "mae_high": 0.25,
              "mean_pred": 0.525, "mean_target": 0.5}
  for k, v in expected.items():
    assert m[k] == pytest.approx(v, abs=1e-12), k
  assert m["mae_medium"] is None
  assert set(m) == set(metrics.STEP_METRICS)


def test_summarize_hand_computed_ties_and_soft_targets():
  # p = [.7, .7, .3, .7, .5], y = [1, 0, 0, 1, .5]; hard steps are the first four.
  # auroc: pos {.7, .7} vs neg {.7, .3}: pairs tie(.5) + win + tie(.5) + win = 3/4
  # brier (hard): squares .09 .49 .09 .09 = .76 / 4 = .19; mse (all five) = .76 / 5 = .152
  # mae = (.3 + .7 + .3 + .3 + 0) / 5 = .32; mean y = .5, SS_tot = 1 -> r2 = 1 - .76 = .24
  # ece: bin 7 holds the three .7s (targets 1, 0, 1): 3/5 * |.7 - 2/3| = .02;
  #      bin 3 holds .3 (target 0): 1/5 * .3 = .06; bin 5 holds .5 (target .5): 0 -> .08
  # bands: low (y=0): .7, .3 -> .5; medium (y=.5): 0; high (y=1): .3, .3 -> .3
  m = metrics.summarize([0.7, 0.7, 0.3, 0.7, 0.5], [1, 0, 0, 1, 0.5])
  expected = {"count": 5, "count_hard": 4, "auroc": 0.75, "brier": 0.19, "mse": 0.152,
              "mae": 0.32, "r2": 0.24, "ece": 0.08, "mae_low": 0.5, "mae_medium": 0.0,
              "mae_high": 0.3}
  for k, v in expected.items():
    assert m[k] == pytest.approx(v, abs=1e-12), k


def test_undefined_metrics_are_none():
  m = metrics.summarize([0.2, 0.4, 0.9], [1, 1, 1])  # constant targets, one class
  assert m["r2"] is None and m["auroc"] is None
  assert m["mse"] == pytest.approx((0.64 + 0.36 + 0.01) / 3)
  empty = metrics.summarize([], [])
  assert empty["count"] == 0
  assert all(empty[k] is None for k in metrics.STEP_METRICS if not k.startswith("count"))
  soft = metrics.summarize([0.5, 0.6], [0.5, 0.4])  # no hard targets at all
  assert soft["brier"] is None and soft["auroc"] is None and soft["count_hard"] == 0


def test_ece_bin_edges():
  # 1.0 falls in the last bin with 0.95: mean p .975 vs mean y 1 -> |.025|, weight 2/3
  # 0.1 falls in bin 1 alone with target .1 -> 0
  assert metrics.ece([1.0, 0.95, 0.1], [1, 1, 0.1]) == pytest.approx(2 / 3 * 0.025)
  counts, mean_p, mean_y = metrics.reliability_bins([1.0, 0.95, 0.1], [1, 1, 0.1], n_bins=10)
  assert counts.tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 2]
  assert np.isnan(mean_p[0]) and mean_y[9] == 1.0


def test_perfect_predictions():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, size=200).astype(float)
  m = metrics.summarize(y, y)
  assert m["mse"] == 0 and m["mae"] == 0 and m["brier"] == 0 and m["ece"] == 0
  assert m["r2"] == 1 and m["auroc"] == 1


def test_bad_input_is_one_line_value_error():
  with pytest.raises(ValueError, match="differ in size"):
    metrics.mse([0.1, 0.2], [1])
  with pytest.raises(ValueError, match="NaN"):
    metrics.summarize([np.nan], [1])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    metrics.summarize([1.5], [1])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=30))
def test_auroc_matches_pairwise_count_with_ties(pairs):
  scores = [s / 4 for s, _ in pairs]  # few distinct values -> many ties
  labels = [l for _, l in pairs]
  got = metrics.auroc(scores, [float(l) for l in labels])
  if all(labels) or not any(labels):
    assert got is None
  else:
    assert got == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)


def test_average_ranks():
  # values 3, 1, 3, 2, 3 -> sorted 1(r1) 2(r2) 3,3,3 (r3,4,5 -> 4 each)
  assert metrics.average_ranks(np.array([3, 1, 3, 2, 3])).tolist() == [4, 1, 4, 2, 4]


def test_evaluate_sources_pools_all_steps():
  per_source = {"a": ([0.9, 0.2], [1, 0]), "b": ([0.6, 0.4], [1, 0])}
  out = metrics.evaluate_sources(per_source)
  # a: errors .1 .2 -> mse (.01 + .04)/2 = .025; b: .4 .4 -> .16; pooled = .37/4 = .0925
  assert out["a/mse"] == pytest.approx(0.025)
  assert out["b/mse"] == pytest.approx(0.16)
  assert out["mse"] == pytest.approx(0.0925)
  assert out["count"] == 4 and out["a/count"] == 2
  with pytest.raises(ValueError, match="no '/'"):
    metrics.evaluate_sources({"a/b": ([0.5], [1])})


SOLUTION_SCORES = [[0.9, 0.3, 0.8], [0.9, 0.8, 0.2], [0.9, 0.7], [0.25, 0.9], [0.6, 0.55]]
SOLUTION_TARGETS = [[1, 0, 1], [1, 0, 0], [1, 1], [1, 1], [1, 1]]


def test_solution_metrics_hand_computed():
  # A: true first error 1, predicted 1 -> right.   B: true 1, predicted 2 -> wrong.
  # C: no error, nothing flagged -> right.          D: no error, step 0 flagged -> wrong.
  # E: no error, nothing < .5 -> right.
  # acc_error = 1/2, acc_correct = 2/3, F1 = 2 * (1/2)(2/3) / (1/2 + 2/3) = 4/7
  # min scores: A .3, B .2 (not fully correct); C .7, D .25, E .55 (fully correct)
  # pairs pos>neg: C 2, D 1 (.25 > .2 only), E 2 -> 5/6
  m = metrics.solution_metrics(SOLUTION_SCORES, SOLUTION_TARGETS)
  assert m["solutions"] == 5 and m["solutions_with_error"] == 2
  assert m["first_error_acc_error"] == pytest.approx(0.5)
  assert m["first_error_acc_correct"] == pytest.approx(2 / 3)
  assert m["first_error_f1"] == pytest.approx(4 / 7)
  assert m["min_score_auroc"] == pytest.approx(5 / 6)


def test_solution_metrics_threshold_and_soft_targets():
  # With threshold .6: E's .55 is now flagged (wrong), D still wrong, C right -> acc_correct 1/3.
  assert metrics.solution_metrics(SOLUTION_SCORES, SOLUTION_TARGETS, threshold=0.6)[
      "first_error_acc_correct"] == pytest.approx(1 / 3)
  # A neutral .5 target is not an error, but the solution is not fully correct either.
  m = metrics.solution_metrics([[0.9, 0.9], [0.8]], [[1, 0.5], [1]])
  assert m["solutions_with_error"] == 0 and m["first_error_acc_correct"] == 1.0
  assert m["first_error_f1"] is None  # no erroneous solution -> F1 undefined
  assert m["min_score_auroc"] == 0.0  # the fully correct one has the lower min (.8 < .9)


def test_accumulator_matches_direct_computation():
  acc = metrics.EvalAccumulator()
  # Batch 1 of source "a": two rows, three slots; row 1's slots are stored out of step order.
  acc.add("a", preds_BM=[[0.9, 0.3, 0.8], [0.2, 0.9, 0.8]], targets_BM=[[1, 0, 1], [0, 1, 0]],
          mask_BM=[[1, 1, 1], [1, 1, 1]], example_ids=np.array(["A", "B"]),
          step_index_BM=[[0, 1, 2], [2, 0, 1]])
  # Batch 2 of "a": packed row holding examples C (slots 0-1) and D (slot 2); slot 3 is padding.
  acc.add_batch("a", [[0.9, 0.7, 0.25, 0.5]], {
      "targets": np.array([[1, 1, 1, 0]], np.float32), "target_mask": np.array([[1, 1, 1, 0]], np.float32),
      "example_ids": np.array(["C", "D"]), "example_index": np.array([[0, 0, 1, 0]]),
      "step_index": np.array([[0, 1, 0, 0]])})
  acc.add("b", [[0.6, 0.55]], [[1, 1]], [[1, 1]], example_ids=np.array(["E"]))
  out = acc.result()
  # Solutions rebuilt in step order equal the hand example minus D's second step.
  exp_a = metrics.solution_metrics(
      [[0.9, 0.3, 0.8], [0.9, 0.8, 0.2], [0.9, 0.7], [0.25]], [[1, 0, 1], [1, 0, 0], [1, 1], [1]])
  for k, v in exp_a.items():
    assert out[f"a/{k}"] == v, k
  assert out["solutions"] == 5 and out["b/solutions"] == 1
  assert out["first_error_f1"] == pytest.approx(4 / 7)
  steps = metrics.evaluate_sources({
      "a": ([0.9, 0.3, 0.8, 0.2, 0.9, 0.8, 0.9, 0.7, 0.25], [1, 0, 1, 0, 1, 0, 1, 1, 1]),
      "b": ([0.6, 0.55], [1, 1])})
  for k, v in steps.items():
    assert out[k] == pytest.approx(v) if v is not None else out[k] is None, k
  assert out["count"] == 11  # the masked padding slot is not counted
  acc.reset()
  assert acc.result()["count"] == 0


def test_a_step_scored_exactly_at_the_threshold_is_not_a_predicted_error():
  # The predicted first error is the first step scored below the threshold (0.5), not at it.
  assert metrics.solution_metrics([[0.5, 0.9]], [[1, 1]])["first_error_acc_correct"] == 1.0
  assert metrics.solution_metrics([[0.49, 0.9]], [[1, 1]])["first_error_acc_correct"] == 0.0
