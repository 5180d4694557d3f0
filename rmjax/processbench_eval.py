"""ProcessBench: does the model find the earliest wrong step of a solution?

  python -m rmjax.evaluate --checkpoint RUN --benchmark processbench --path DIR [--output OUT]
                           [--threshold 0.5] [--set data.max_length=N]

DIR holds the benchmark's files, `<split>.json` (or .jsonl) for gsm8k, math, olympiadbench and
omnimath; every split present is scored (rmjax.data.processbench reads them). Each sample's
steps are scored whole with the run's checkpoint (rmjax.inference); the predicted error is the
first step scored BELOW the threshold (a score equal to it is no error, as
rmjax.metrics.first_below), -1 when none is. The benchmark's definition (QwenLM/ProcessBench):

  error_acc    share of samples with an error (label >= 0) whose predicted index equals label
  correct_acc  share of samples without one (label -1) with nothing flagged
  f1           harmonic mean of the two (0 when both are 0; null when a split lacks one kind)
  average_f1   mean f1 over the splits that have one

A step whose marker falls past max_length has no score: a sample with one is listed under
`unscored` and its prediction is only what the scored steps before it decide (a step flagged
there); otherwise it counts as wrong, never as right. `best_threshold` is the threshold that
maximises average_f1 ON THESE SAMPLES (tuned on the data it is reported on, so optimistic);
the smallest such threshold is reported.

OUT (default <run_dir>/eval/step_<N>) receives processbench.json
  {"threshold", "splits": {split: {"error_acc", "correct_acc", "f1", "count"}}, "average_f1",
   "best_threshold": {"threshold", "average_f1", "note"}, "unscored": {"count", "ids"}, ...}
and predictions.jsonl (per sample: id, split, label, step_scores, predicted).
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from rmjax.metrics import first_below

SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")
TUNED_NOTE = "tuned on the samples it is reported on: an optimistic figure, not a held-out result"


# -- the metric: pure functions of (label, step_scores) ------------------------------------------
def predicted_error(step_scores: Sequence[Optional[float]], threshold: float) -> Optional[int]:
  """The first step scored below `threshold`, -1 if none; None when an unscored step comes
  before any flagged one (the prediction is unknown)."""
  scored = []
  for s in step_scores:
    if s is None:
      return first_below(scored, threshold)
    scored.append(s)
  hit = first_below(scored, threshold)
  return -1 if hit is None else hit


def harmonic(a: Optional[float], b: Optional[float]) -> Optional[float]:
  if a is None or b is None:
    return None
  return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def split_report(labels: Sequence[int], predicted: Sequence[Optional[int]]) -> dict[str, Any]:
  err = [p == y for y, p in zip(labels, predicted) if y >= 0]
  ok = [p == -1 for y, p in zip(labels, predicted) if y == -1]
  error_acc = sum(err) / len(err) if err else None
  correct_acc = sum(ok) / len(ok) if ok else None
  return {"error_acc": error_acc, "correct_acc": correct_acc, "f1": harmonic(error_acc, correct_acc),
          "count": len(labels)}


def report(samples: Sequence[dict], threshold: float) -> dict[str, Any]:
  """{"threshold", "splits", "average_f1"} of samples {"split", "label", "step_scores"}."""
  splits = {}
  for name in _split_names(samples):
    own = [s for s in samples if s["split"] == name]
    splits[name] = split_report([s["label"] for s in own], [predicted_error(s["step_scores"], threshold) for s in own])
  f1s = [m["f1"] for m in splits.values() if m["f1"] is not None]
  return {"threshold": threshold, "splits": splits, "average_f1": sum(f1s) / len(f1s) if f1s else None}


def _split_names(samples: Sequence[dict]) -> list[str]:
  names = {s["split"] for s in samples}
  return [n for n in SPLITS if n in names] + sorted(names - set(SPLITS))


def right_interval(label: int, step_scores: Sequence[Optional[float]]) -> tuple[float, float]:
  """(lo, hi): the sample is predicted right exactly for thresholds lo < t <= hi (empty when
  lo >= hi). An error at `label` is found when its step is below t and no step before it is."""
  scored = []
  for s in step_scores:
    if s is None:
      break
    scored.append(float(s))
  if label == -1:
    return (-np.inf, min(scored)) if len(scored) == len(step_scores) and scored else (0.0, 0.0)
  if label >= len(scored):
    return (0.0, 0.0)
  return scored[label], min(scored[:label], default=np.inf)


def best_threshold(samples: Sequence[dict]) -> dict[str, Any]:
  """The smallest threshold in [0, 1] with the highest average_f1, found exactly: average_f1
  only changes at the ends of the samples' right intervals, so those ends are the candidates."""
  per_split = {}
  for name in _split_names(samples):
    own = [s for s in samples if s["split"] == name]
    groups = []
    for has_error in (True, False):
      ivals = [right_interval(s["label"], s["step_scores"]) for s in own if (s["label"] >= 0) == has_error]
      lo = np.sort([a for a, b in ivals if a < b])
      hi = np.sort([b for a, b in ivals if a < b])
      groups.append((lo, hi, len(ivals)))
    per_split[name] = groups
  ends = {float(x) for groups in per_split.values() for lo, hi, _ in groups for x in (*lo, *hi) if np.isfinite(x)}
  candidates = np.asarray(sorted(t for t in ends | {0.0, 1.0} if 0.0 <= t <= 1.0))
  f1 = []
  for groups in per_split.values():
    accs = []
    for lo, hi, n in groups:  # right count at t: #(lo < t) - #(hi < t)
      right = np.searchsorted(lo, candidates, "left") - np.searchsorted(hi, candidates, "left")
      accs.append(right / n if n else None)
    if accs[0] is None or accs[1] is None:
      continue
    total = accs[0] + accs[1]
    f1.append(np.where(total > 0, 2 * accs[0] * accs[1] / np.where(total > 0, total, 1), 0.0))
  if not f1:
    return {"threshold": None, "average_f1": None, "note": TUNED_NOTE}
  mean = np.mean(f1, axis=0)
  best = int(np.argmax(mean))  # the first maximum: the smallest threshold
  return {"threshold": float(candidates[best]), "average_f1": float(mean[best]), "note": TUNED_NOTE}


# -- the command ----------------------------------------------------------------------------------
def read_splits(path: str | pathlib.Path, skips: Any) -> dict[str, Any]:
  """{split: reader} for every ProcessBench split with a file in `path`."""
  from rmjax.data.record_files import available_splits
  from rmjax.data.sources import build_source
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"--path {path}: not a directory (expected <split>.json files for {', '.join(SPLITS)})")
  found = [s for s in SPLITS if s in available_splits(str(path))]
  if not found:
    raise FileNotFoundError(f"--path {path}: no ProcessBench split file ({', '.join(f'{s}.json' for s in SPLITS)})")
  return {s: build_source("processbench", {"path": str(path)}, split=s, skips=skips) for s in found}


def evaluate(checkpoint: str | pathlib.Path, path: str | pathlib.Path, output: str | None = None,
             threshold: float = 0.5, overrides: Sequence[str] = ()) -> tuple[pathlib.Path, dict[str, Any]]:
  from rmjax.benchmarks import check_threshold, load_scorer, write_results
  from rmjax.data.example import SkipCounter
  check_threshold(threshold)
  skips = SkipCounter()
  readers = read_splits(path, skips)
  scorer = load_scorer(checkpoint, overrides)
  examples = [(split, ex) for split, reader in readers.items()
              for ex in (reader[i] for i in range(len(reader))) if ex is not None]
  if not examples:
    raise ValueError(f"--path {path}: every record was skipped ({skips.as_dict()})")
  done = scorer.score([(ex.problem, ex.steps) for _, ex in examples])
  samples = [{"id": ex.id, "split": split, "label": int(ex.meta["label"]), "step_scores": d.scores,
              "predicted": predicted_error(d.scores, threshold)} for (split, ex), d in zip(examples, done)]
  unscored = [s["id"] for s in samples if None in s["step_scores"]]
  result = report(samples, threshold)
  result |= {"best_threshold": best_threshold(samples), "unscored": {"count": len(unscored), "ids": unscored},
             "skipped_records": skips.as_dict()}
  return write_results(scorer, output, "processbench", result, samples), result


def table(result: dict[str, Any]) -> str:
  fmt = lambda v: "   n/a" if v is None else f"{v:6.4f}"
  lines = [f"{'split':>14} {'count':>6} {'error_acc':>9} {'correct_acc':>11} {'f1':>6}"]
  for name, m in result["splits"].items():
    lines.append(f"{name:>14} {m['count']:>6} {fmt(m['error_acc']):>9} {fmt(m['correct_acc']):>11} {fmt(m['f1'])}")
  lines.append(f"{'average_f1':>14} {fmt(result['average_f1'])}  (threshold {result['threshold']})")
  best = result["best_threshold"]
  if best["threshold"] is not None:
    lines.append(f"best threshold {best['threshold']:.6g}: average_f1 {best['average_f1']:.4f} "
                 f"(tuned on these samples: optimistic)")
  if result["unscored"]["count"]:
    lines.append(f"{result['unscored']['count']} samples have steps past max_length {result['max_length']} "
                 f"(listed in processbench.json; --set data.max_length=N raises it)")
  return "\n".join(lines)
