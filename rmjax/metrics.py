"""Evaluation metrics for step-level confidence models (pure numpy, no jax).

Why this module exists: every consumer (the training loop's eval, `rmjax.evaluate`, the
reliability plot) must compute the same numbers the same way, with undefined cases handled
explicitly instead of producing NaN that poisons logs. Conventions:

* Inputs are flat arrays of predictions p in [0, 1] and targets y in [0, 1], one entry per
  supervised step. Undefined metrics are returned as ``None`` (JSON null), never NaN.
* ``r2`` is None when there are fewer than 2 steps or the targets are constant (SS_tot = 0).
* ``ece`` uses equal-width bins over [0, 1] (default 10); p = 1.0 falls in the last bin.
* ``brier`` and ``auroc`` use only the "hard" steps whose target is exactly 0 or 1 (soft
  targets such as the neutral 0.5 carry no binary outcome). When every target is hard,
  ``brier == mse``; the squared error on soft targets is in ``mse``.
* ``auroc`` gives tied scores half credit (average ranks, Mann-Whitney U); None when the hard
  steps hold only one class.
* MAE by target band: ``mae_low`` for y < 1/3, ``mae_medium`` for 1/3 <= y <= 2/3,
  ``mae_high`` for y > 2/3 (None when a band is empty).
* Solution-level PRM metrics (ProcessBench style) live in `solution_metrics`.
"""

from __future__ import annotations

import collections
from typing import Iterable, Mapping, Sequence

import numpy as np

BAND_LOW = 1.0 / 3.0  # targets strictly below are "low"
BAND_HIGH = 2.0 / 3.0  # targets strictly above are "high"
STEP_METRICS = ("count", "count_hard", "mean_pred", "mean_target", "mse", "mae", "r2", "ece",
                "brier", "auroc", "mae_low", "mae_medium", "mae_high")


def as_pair(preds: Iterable[float], targets: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
  """Flattens and validates (preds, targets); raises a one-line ValueError on bad input."""
  p = np.asarray(preds, dtype=np.float64).ravel()
  y = np.asarray(targets, dtype=np.float64).ravel()
  if p.shape != y.shape:
    raise ValueError(f"preds and targets differ in size: {p.size} vs {y.size}")
  if not np.all(np.isfinite(p)):
    raise ValueError(f"predictions contain {int(np.sum(~np.isfinite(p)))} NaN/inf values")
  if not np.all(np.isfinite(y)):
    raise ValueError(f"targets contain {int(np.sum(~np.isfinite(y)))} NaN/inf values")
  if p.size and (p.min() < 0.0 or p.max() > 1.0):
    raise ValueError(f"predictions must lie in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]")
  if y.size and (y.min() < 0.0 or y.max() > 1.0):
    raise ValueError(f"targets must lie in [0, 1], got range [{y.min():.4g}, {y.max():.4g}]")
  return p, y


def mse(preds, targets) -> float | None:
  p, y = as_pair(preds, targets)
  return float(np.mean((p - y) ** 2)) if p.size else None


def mae(preds, targets) -> float | None:
  p, y = as_pair(preds, targets)
  return float(np.mean(np.abs(p - y))) if p.size else None


def r2(preds, targets) -> float | None:
  """1 - SS_res / SS_tot; None when undefined (n < 2 or constant targets)."""
  p, y = as_pair(preds, targets)
  if p.size < 2:
    return None
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  if ss_tot == 0.0:
    return None
  return 1.0 - float(np.sum((y - p) ** 2)) / ss_tot


def reliability_bins(preds, targets, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per equal-width bin: (counts, mean prediction, mean target); empty bins hold NaN means."""
  if n_bins < 1:
    raise ValueError(f"n_bins must be >= 1, got {n_bins}")
  p, y = as_pair(preds, targets)
  idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
  counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
  sum_p = np.bincount(idx, weights=p, minlength=n_bins)
  sum_y = np.bincount(idx, weights=y, minlength=n_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    return counts, sum_p / counts, sum_y / counts


def ece(preds, targets, n_bins: int = 10) -> float | None:
  """Expected calibration error: sum_b (n_b / N) |mean pred_b - mean target_b|."""
  counts, mean_p, mean_y = reliability_bins(preds, targets, n_bins)
  total = counts.sum()
  if total == 0:
    return None
  used = counts > 0
  return float(np.sum(counts[used] / total * np.abs(mean_p[used] - mean_y[used])))


def _hard(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  keep = (y == 0.0) | (y == 1.0)
  return p[keep], y[keep]


def brier(preds, targets) -> float | None:
  """Mean squared error on the steps whose target is exactly 0 or 1; None if there are none."""
  p, y = _hard(*as_pair(preds, targets))
  return float(np.mean((p - y) ** 2)) if p.size else None


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x, ties sharing the mean of the ranks they span."""
  x = np.asarray(x, dtype=np.float64).ravel()
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Start index of each run of equal values, and the run each sorted position belongs to.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], x.size]
  run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
  run_of = np.repeat(np.arange(starts.size), ends - starts)
  ranks = np.empty(x.size, dtype=np.float64)
  ranks[order] = run_rank[run_of]
  return ranks


def binary_auroc(scores, labels) -> float | None:
  """AUROC of scores for binary labels (1 = positive); ties count 1/2; None if one class."""
  s = np.asarray(scores, dtype=np.float64).ravel()
  lab = np.asarray(labels).ravel().astype(bool)
  n_pos = int(lab.sum())
  n_neg = lab.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return None
  u = average_ranks(s)[lab].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def auroc(preds, targets) -> float | None:
  """AUROC over hard steps (target exactly 0 or 1)."""
  p, y = _hard(*as_pair(preds, targets))
  return binary_auroc(p, y == 1.0)


def band_mae(preds, targets) -> dict[str, float | None]:
  """MAE within target bands low (< 1/3), medium ([1/3, 2/3]) and high (> 2/3)."""
  p, y = as_pair(preds, targets)
  err = np.abs(p - y)
  bands = {"mae_low": y < BAND_LOW, "mae_medium": (y >= BAND_LOW) & (y <= BAND_HIGH),
           "mae_high": y > BAND_HIGH}
  return {k: (float(err[m].mean()) if m.any() else None) for k, m in bands.items()}


def summarize(preds, targets, n_bins: int = 10) -> dict[str, float | int | None]:
  """All step-level metrics (keys in STEP_METRICS) for one set of supervised steps."""
  p, y = as_pair(preds, targets)
  ph, _ = _hard(p, y)
  out: dict[str, float | int | None] = {
      "count": int(p.size), "count_hard": int(ph.size),
      "mean_pred": float(p.mean()) if p.size else None,
      "mean_target": float(y.mean()) if p.size else None,
      "mse": mse(p, y), "mae": mae(p, y), "r2": r2(p, y), "ece": ece(p, y, n_bins),
      "brier": brier(p, y), "auroc": auroc(p, y)}
  out.update(band_mae(p, y))
  return out


def _join(source: str, name: str) -> str:
  return f"{source}/{name}" if source else name


def evaluate_sources(per_source: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                     n_bins: int = 10) -> dict[str, float | int | None]:
  """`{"<source>/<metric>": v, ..., "<metric>": pooled over every step of every source}`."""
  out: dict[str, float | int | None] = {}
  all_p, all_y = [], []
  for source in sorted(per_source):
    if not source or "/" in source:
      raise ValueError(f"source names must be non-empty and contain no '/', got {source!r}")
    p, y = as_pair(*per_source[source])
    all_p.append(p)
    all_y.append(y)
    out.update({_join(source, k): v for k, v in summarize(p, y, n_bins).items()})
  pooled_p = np.concatenate(all_p) if all_p else np.zeros(0)
  pooled_y = np.concatenate(all_y) if all_y else np.zeros(0)
  out.update(summarize(pooled_p, pooled_y, n_bins))
  return out


# ----------------------------------------------------------------------------- solution level


def first_below(values: Sequence[float], threshold: float) -> int | None:
  """Index of the first value < threshold, or None."""
  hits = np.flatnonzero(np.asarray(values, dtype=np.float64) < threshold)
  return int(hits[0]) if hits.size else None


def solution_metrics(step_scores: Sequence[Sequence[float]], step_targets: Sequence[Sequence[float]],
                     threshold: float = 0.5) -> dict[str, float | int | None]:
  """ProcessBench-style first-error identification plus min-score AUROC, per solution.

  True first error = first step whose target is exactly 0 (None = no error); predicted first
  error = first step with score < threshold. A solution with an error is right when the indices
  match; one without is right when no step is flagged. F1 is the harmonic mean of the two
  accuracies. `min_score_auroc` ranks solutions by their lowest step score against "fully
  correct" (every target == 1). Empty solutions are skipped.
  """
  if len(step_scores) != len(step_targets):
    raise ValueError(f"{len(step_scores)} score lists but {len(step_targets)} target lists")
  hits = {True: [], False: []}  # has_error -> list of correct identifications
  min_scores, fully_correct = [], []
  for i, (scores, targets) in enumerate(zip(step_scores, step_targets)):
    s, t = as_pair(scores, targets)
    if s.size == 0:
      continue
    zeros = np.flatnonzero(t == 0.0)
    true_first = int(zeros[0]) if zeros.size else None
    pred_first = first_below(s, threshold)
    hits[true_first is not None].append(pred_first == true_first)
    min_scores.append(s.min())
    fully_correct.append(bool(np.all(t == 1.0)))
  acc_err = float(np.mean(hits[True])) if hits[True] else None
  acc_ok = float(np.mean(hits[False])) if hits[False] else None
  if acc_err is None or acc_ok is None:
    f1 = None
  else:
    f1 = 0.0 if acc_err + acc_ok == 0 else 2 * acc_err * acc_ok / (acc_err + acc_ok)
  return {"solutions": len(min_scores), "solutions_with_error": len(hits[True]),
          "first_error_acc_error": acc_err, "first_error_acc_correct": acc_ok,
          "first_error_f1": f1, "min_score_auroc": binary_auroc(min_scores, fully_correct)}


# ----------------------------------------------------------------------------- streaming


class EvalAccumulator:
  """Collects eval batches (per source) and computes step- and solution-level metrics.

  `add` takes (B, M) arrays of predictions, targets and mask. When `example_ids` is given, steps
  are also grouped into solutions: slot (b, m) belongs to `example_ids[example_index[b, m]]`
  (default: `example_ids[b]`) and sits at step `step_index[b, m]` (default: m).
  """

  def __init__(self, n_bins: int = 10, threshold: float = 0.5):
    self.n_bins = n_bins
    self.threshold = threshold
    self.reset()

  def reset(self) -> None:
    self._preds: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    self._targets: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    # (source, example id) -> list of (step index, pred, target)
    self._solutions: dict[tuple[str, str], list[tuple[int, float, float]]] = collections.defaultdict(list)

  def add(self, source: str, preds_BM, targets_BM, mask_BM, *, example_ids=None,
          example_index_BM=None, step_index_BM=None) -> None:
    p = np.asarray(preds_BM, dtype=np.float64)
    y = np.asarray(targets_BM, dtype=np.float64)
    mask = np.asarray(mask_BM) > 0
    if not (p.shape == y.shape == mask.shape):
      raise ValueError(f"preds {p.shape}, targets {y.shape} and mask {mask.shape} must match")
    sel_p, sel_y = as_pair(p[mask], y[mask])
    self._preds[source].append(sel_p)
    self._targets[source].append(sel_y)
    if example_ids is None:
      return
    rows, cols = np.nonzero(mask)
    ex = rows if example_index_BM is None else np.asarray(example_index_BM)[rows, cols]
    st = cols if step_index_BM is None else np.asarray(step_index_BM)[rows, cols]
    ids = np.asarray(example_ids)
    for e, s, pv, yv in zip(ex, st, sel_p, sel_y):
      self._solutions[(source, str(ids[e]))].append((int(s), float(pv), float(yv)))

  def add_batch(self, source: str, preds_BM, batch: Mapping[str, np.ndarray]) -> None:
    """`add` reading targets, mask and (if present) example ids from a BUILD.md eval batch."""
    self.add(source, preds_BM, batch["targets"], batch["target_mask"],
             example_ids=batch.get("example_ids"), example_index_BM=batch.get("example_index"),
             step_index_BM=batch.get("step_index"))

  def per_source(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{source: (preds, targets)} of every step seen so far (input to plots/evaluate_sources)."""
    return {s: (np.concatenate(self._preds[s]), np.concatenate(self._targets[s])) for s in self._preds}

  def _solution_lists(self, source: str | None) -> tuple[list[list[float]], list[list[float]]]:
    scores, targets = [], []
    for (src, _), steps in sorted(self._solutions.items()):
      if source is None or src == source:
        steps = sorted(steps)
        scores.append([s[1] for s in steps])
        targets.append([s[2] for s in steps])
    return scores, targets

  def result(self) -> dict[str, float | int | None]:
    """Step metrics per source and pooled, plus solution metrics when example ids were given."""
    out = evaluate_sources(self.per_source(), self.n_bins)
    if self._solutions:
      for source in sorted({src for src, _ in self._solutions}):
        sol = solution_metrics(*self._solution_lists(source), threshold=self.threshold)
        out.update({_join(source, k): v for k, v in sol.items()})
      out.update(solution_metrics(*self._solution_lists(None), threshold=self.threshold))
    return out
