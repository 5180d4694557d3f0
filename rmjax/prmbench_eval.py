"""PRMBench: does the model tell the erroneous steps of a process from the valid ones, per error class?

  python -m rmjax.evaluate --checkpoint RUN --benchmark prmbench --path DIR_OR_FILE [--output OUT]
                           [--threshold 0.5] [--set data.max_length=N]

--path is one PRMBench JSONL file or a directory of them (the official repo's
mr_eval/tasks/prmtest_classified/data/). Samples follow the official evaluator (ssmisya/PRMBench):
  * each record is scored on `modified_question` / `modified_process`; its erroneous steps are
    `error_steps` (1-based); the key is (classification, idx), read once: its first good record
    gives the sample, a later record with a taken key is counted as `duplicate_key`;
  * every `redundency` record also gives a sample of class "correct": `original_question` /
    `original_process` with no erroneous step (once per idx).
A step is judged valid when its score is at least the threshold (below it is an error, as in
ProcessBench). Over a class's steps: TP valid steps judged valid, FN valid steps judged
erroneous, TN erroneous steps judged erroneous, FP erroneous steps judged valid;
  f1 = F1 of the valid class, negative_f1 = F1 of the erroneous class,
  prm_score = (f1 + negative_f1) / 2 (the paper's PRMScore, weights 0.5 and 0.5);
null where a class has no step of a kind. `overall` pools every class but "correct", as the
official evaluator does. Error step numbers past the end of a process (they occur in the data)
are ignored, as there. A step past max_length has no score: it is left out of the counts and
counted in `unscored_steps` (with its sample listed), never judged.

OUT (default <run_dir>/eval/step_<N>) receives prmbench.json
  {"threshold", "classes": {class: {"samples", "steps", "f1", "negative_f1", "prm_score"}},
   "overall": {...}, "unscored_steps", "unscored_ids", "skipped_records"}
and predictions.jsonl (per sample: id, classification, error_steps (0-based), step_scores).
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional, Sequence

from rmjax.data.jsonl_index import MISSING, REGULAR, path_kind
from rmjax.data.reader_base import Skip
from rmjax.data.record_files import RecordFiles

CORRECT = "correct"
CORRECT_FROM = "redundency"  # sic: the class name in the data


# -- reading -------------------------------------------------------------------------------------
def _steps(value: Any) -> Optional[list[str]]:
  return value if isinstance(value, list) and value and all(isinstance(s, str) for s in value) else None


def _count(skips: dict[str, int], reason: str) -> None:
  skips[reason] = skips.get(reason, 0) + 1


def samples_of(records: Sequence[dict], skips: dict[str, int]) -> list[dict]:
  """The evaluator's samples {id, classification, problem, steps, error_steps (0-based)}.

  A key is taken by its first good copy: a bad copy is counted under its reason and leaves the
  key to a later good one, and a record whose key is already taken counts as `duplicate_key`
  (its "correct" sample is a copy too, and is not counted apart)."""
  out, seen = [], set()

  def add(key: str, cls: str, problem: Any, steps: Any, errors: Any, counted: bool = True) -> None:
    if key in seen:
      if counted:
        _count(skips, "duplicate_key")
      return
    steps = _steps(steps)
    if not isinstance(problem, str) or steps is None:
      _count(skips, "bad_process")
      return
    if not isinstance(errors, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1
                                               for e in errors):
      _count(skips, "bad_error_steps")
      return
    seen.add(key)
    out.append({"id": key, "classification": cls, "problem": problem, "steps": steps,
                "error_steps": sorted({e - 1 for e in errors})})

  for rec in records:
    cls, idx = rec.get("classification"), rec.get("idx")
    if not isinstance(cls, str) or not isinstance(idx, str):
      _count(skips, "no_classification_or_idx")
      continue
    if cls == CORRECT_FROM:
      add(f"{CORRECT}_{idx}", CORRECT, rec.get("original_question"), rec.get("original_process"), [],
          counted=False)
    add(f"{cls}_{idx}", cls, rec.get("modified_question"), rec.get("modified_process"), rec.get("error_steps"))
  return out


def read_records(path: str | pathlib.Path, skips: dict[str, int]) -> list[dict]:
  """The JSON objects of the JSONL file `path`, or of every *.jsonl under the directory `path`;
  a line that is none (bad JSON or UTF-8, nesting too deep, a line too long) is counted in
  `skips` under its reason, empty lines are passed over. A scan's match that is no regular file
  (a FIFO would block the read, a directory holds no lines) is refused, naming it: scores over
  fewer files than the folder shows would pass for the whole benchmark's."""
  path = pathlib.Path(path)
  files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
  if not files:
    raise FileNotFoundError(f"--path {path}: no PRMBench JSONL file there")
  for f in files:
    kind = path_kind(f)
    if kind == MISSING:
      raise FileNotFoundError(f"--path {path}: no PRMBench JSONL file there")
    if kind != REGULAR:
      raise ValueError(f"--path {path}{'' if f == path else f': {f}'} is {kind}, not a PRMBench JSONL file")
  lines, records = RecordFiles([str(f) for f in files]), []
  for _, skip in lines.tail_skips:  # a .json array's undecodable tail
    _count(skips, skip.reason)
  for i in range(len(lines)):
    try:
      rec = lines.record(i)
    except Skip as skip:
      if skip.reason != "empty_line":
        _count(skips, skip.reason)
      continue
    if isinstance(rec, dict):
      records.append(rec)
    else:
      _count(skips, "bad_json")
  return records


# -- the metric ----------------------------------------------------------------------------------
def confusion(step_scores: Sequence[Optional[float]], error_steps: Sequence[int], threshold: float) -> dict[str, int]:
  """TP, FN (valid steps judged valid / erroneous), TN, FP (erroneous steps judged erroneous /
  valid) of one sample; steps without a score are counted apart ("unscored")."""
  errors = set(error_steps)
  out = {"TP": 0, "FN": 0, "TN": 0, "FP": 0, "unscored": 0}
  for i, s in enumerate(step_scores):
    if s is None:
      out["unscored"] += 1
    elif i in errors:
      out["FP" if s >= threshold else "TN"] += 1
    else:
      out["TP" if s >= threshold else "FN"] += 1
  return out


def _f1(tp: int, fp: int, fn: int) -> Optional[float]:
  if tp + fp == 0 or tp + fn == 0:
    return None
  precision, recall = tp / (tp + fp), tp / (tp + fn)
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def scores_of(counts: dict[str, int], samples: int) -> dict[str, Any]:
  f1 = _f1(counts["TP"], counts["FP"], counts["FN"])
  negative_f1 = _f1(counts["TN"], counts["FN"], counts["FP"])
  prm = None if f1 is None or negative_f1 is None else (f1 + negative_f1) / 2
  steps = counts["TP"] + counts["FN"] + counts["TN"] + counts["FP"]
  return {"samples": samples, "steps": steps, "f1": f1, "negative_f1": negative_f1, "prm_score": prm}


def report(samples: Sequence[dict], threshold: float) -> dict[str, Any]:
  """prmbench.json's scores of samples {classification, error_steps, step_scores}."""
  per_class: dict[str, dict[str, int]] = {}
  sizes: dict[str, int] = {}
  for s in samples:
    c = confusion(s["step_scores"], s["error_steps"], threshold)
    acc = per_class.setdefault(s["classification"], dict.fromkeys(c, 0))
    for k, v in c.items():
      acc[k] += v
    sizes[s["classification"]] = sizes.get(s["classification"], 0) + 1
  pooled = {k: sum(c[k] for name, c in per_class.items() if name != CORRECT) for k in ("TP", "FN", "TN", "FP")}
  return {"threshold": threshold,
          "classes": {name: scores_of(per_class[name], sizes[name]) for name in sorted(per_class)},
          "overall": scores_of(pooled, sum(n for name, n in sizes.items() if name != CORRECT)),
          "unscored_steps": sum(c["unscored"] for c in per_class.values())}


# -- the command ---------------------------------------------------------------------------------
def evaluate(checkpoint: str | pathlib.Path, path: str | pathlib.Path, output: str | None = None,
             threshold: float = 0.5, overrides: Sequence[str] = ()) -> tuple[pathlib.Path, dict[str, Any]]:
  from rmjax.benchmarks import check_threshold, load_scorer, write_results
  check_threshold(threshold)
  skips: dict[str, int] = {}
  samples = samples_of(read_records(path, skips), skips)
  if not samples:
    raise ValueError(f"--path {path}: no PRMBench sample (skipped: {skips})")
  scorer = load_scorer(checkpoint, overrides)
  for s, done in zip(samples, scorer.score([(s["problem"], s["steps"]) for s in samples])):
    s["step_scores"] = done.scores
  result = report(samples, threshold)
  result |= {"unscored_ids": [s["id"] for s in samples if None in s["step_scores"]],
             "skipped_records": {"prmbench": skips} if skips else {}}
  kept = [{k: s[k] for k in ("id", "classification", "error_steps", "step_scores")} for s in samples]
  return write_results(scorer, output, "prmbench", result, kept), result


def table(result: dict[str, Any]) -> str:
  fmt = lambda v: "   n/a" if v is None else f"{v:6.4f}"
  lines = [f"{'class':>22} {'samples':>7} {'steps':>6} {'f1':>6} {'neg_f1':>6} {'PRMScore':>8}"]
  rows = list(result["classes"].items()) + [("overall (no correct)", result["overall"])]
  for name, m in rows:
    lines.append(f"{name:>22} {m['samples']:>7} {m['steps']:>6} {fmt(m['f1'])} {fmt(m['negative_f1'])} "
                 f"{fmt(m['prm_score']):>8}")
  if result["unscored_steps"]:
    lines.append(f"{result['unscored_steps']} steps past max_length {result['max_length']} were not judged "
                 f"(their samples are listed in prmbench.json; --set data.max_length=N raises it)")
  return "\n".join(lines)
