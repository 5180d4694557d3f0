"""PRM800K reader: raw `phase{1,2}_{train,test}.jsonl` lines -> canonical `Example`s.

Why a careful reader: PRM800K stores each labelled solution as a sequence of labelling steps,
not as a finished trajectory, and the step that carries the negative label is exactly the one
a naive reader drops (in phase 2 the error step has `chosen_completion: null`; its -1 rated
candidate sits in `completions`). The trajectory rule, per step in `label.steps`:

1. `chosen_completion` is an int: take that completion; target from its rating
   (+1 -> 1.0, -1 -> 0.0, 0 -> `neutral_target`, null -> None, i.e. shown but unsupervised).
2. else `human_completion` is an object: take its "text" as a correct step (target 1.0).
3. else (the last labelled step): take the first completion rated -1, failing that the first
   completion with a non-null rating, failing that nothing; the trajectory stops here.
The trajectory also ends right after its first step with target 0.0 (rating -1).

Skipped (counted by reason): unparseable lines, `finish_reason == "bad_problem"`, records with
no labelled step or no supervised step, mistyped/missing fields, ratings outside {-1,0,1,null},
and optionally quality-control / initial-screening records.

Example ids are "<file stem>:<1-based line number>" (e.g. "phase2_train:1234"): stable across
runs for the same file, and they say where to look when a prediction needs checking.
Lines are indexed lazily (byte offsets, see `jsonl_index`) and parsed on access.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

from rmjax.data.example import Example, SkipCounter
from rmjax.data.jsonl_index import LineFile, LineTooLong
from rmjax.data.reader_base import LazyReader, Skip, SkipLog, check_text, resolve_file, text_field
from rmjax.data.record_files import parse_json_line as parse_line

SPLITS = ("train", "test")
PHASES = (1, 2)
DEFAULT_PHASE = 2  # phase 2 holds most of the labels
FINISH_REASONS = ("found_error", "solution", "bad_problem", "give_up")
_RATINGS = (-1, 0, 1, None)


@dataclasses.dataclass(frozen=True)
class Prm800kOptions:
  """neutral_target: target for rating 0; drop_*: skip quality-control / screening records."""

  neutral_target: float = 0.5
  drop_quality_control: bool = False
  drop_screening: bool = False

  def __post_init__(self):
    if not 0.0 <= float(self.neutral_target) <= 1.0:
      raise ValueError(f"neutral_target must be in [0, 1], got {self.neutral_target}")


def prm800k_candidates(phase: Optional[int]) -> Callable[[str], list[str]]:
  def candidates(split: str) -> list[str]:
    name = f"phase{phase}_{split}.jsonl"
    return [name, os.path.join("data", name), os.path.join("prm800k", "data", name)]
  return candidates


def _rating_target(rating: Any, options: Prm800kOptions) -> Optional[float]:
  if rating is None:
    return None
  return {1: 1.0, -1: 0.0, 0: float(options.neutral_target)}[rating]


def _completions(step: dict, allow_null: bool) -> list[dict]:
  comps = step.get("completions")
  if comps is None and allow_null:
    return []
  if not isinstance(comps, list):
    raise Skip("bad_completions", f"completions should be a list, got {type(comps).__name__}")
  for c in comps:
    text_field(c, "text", "bad_completion")
    if "rating" not in c:
      raise Skip("bad_rating", "completion has no rating key")
    rating = c["rating"]
    if isinstance(rating, bool) or rating not in _RATINGS:
      raise Skip("bad_rating", f"rating {rating!r} not in {{-1, 0, 1, null}}")
  return comps


def _step_choice(step: Any, options: Prm800kOptions) -> tuple[Optional[tuple[str, Optional[float]]], bool]:
  """(text, target) chosen at one labelling step (or None), and whether the trajectory stops."""
  if not isinstance(step, dict):
    raise Skip("bad_step", f"step should be an object, got {type(step).__name__}")
  chosen = step.get("chosen_completion")
  human = step.get("human_completion")
  if chosen is not None:
    if isinstance(chosen, bool) or not isinstance(chosen, int):
      raise Skip("bad_chosen_completion", f"chosen_completion should be an int, got {chosen!r}")
    comps = _completions(step, allow_null=False)
    if not 0 <= chosen < len(comps):
      raise Skip("bad_chosen_completion", f"chosen_completion {chosen} outside {len(comps)} completions")
    rating = comps[chosen]["rating"]
    # The trajectory ends at its first error (rating -1), whatever target a neutral step maps to.
    return (comps[chosen]["text"], _rating_target(rating, options)), rating == -1
  if human is not None:
    text = text_field(human, "text", "bad_human_completion")
    return (text, 1.0), False
  comps = _completions(step, allow_null=True)
  pick = next((c for c in comps if c["rating"] == -1), None)
  if pick is None:
    pick = next((c for c in comps if c["rating"] is not None), None)
  if pick is None:
    return None, True
  return (pick["text"], _rating_target(pick["rating"], options)), True


def trajectory(record: Any, options: Prm800kOptions) -> tuple[str, list[str], list[Optional[float]]]:
  """(problem, steps, targets) of one parsed PRM800K record; raises Skip for unusable ones."""
  if not isinstance(record, dict):
    raise Skip("not_an_object", f"record is a {type(record).__name__}")
  problem = text_field(record.get("question"), "problem", "bad_question", allow_empty=False)
  label = record.get("label")
  if not isinstance(label, dict):
    raise Skip("bad_label", f"label should be an object, got {type(label).__name__}")
  finish = label.get("finish_reason")
  if finish not in FINISH_REASONS:
    raise Skip("bad_finish_reason", f"finish_reason {finish!r} not in {list(FINISH_REASONS)}")
  if finish == "bad_problem":
    raise Skip("bad_problem")
  for key, drop, reason in (("is_quality_control_question", options.drop_quality_control, "quality_control"),
                            ("is_initial_screening_question", options.drop_screening, "screening")):
    flag = record.get(key, False)
    if not isinstance(flag, bool):
      raise Skip("bad_flag", f"{key} should be a bool, got {flag!r}")
    if flag and drop:
      raise Skip(reason)
  raw_steps = label.get("steps")
  if not isinstance(raw_steps, list):
    raise Skip("bad_steps", f"label.steps should be a list, got {type(raw_steps).__name__}")
  steps: list[str] = []
  targets: list[Optional[float]] = []
  for raw in raw_steps:
    choice, stop = _step_choice(raw, options)
    if choice is not None:
      steps.append(choice[0])
      targets.append(choice[1])
    if stop:
      break
  if not steps:
    raise Skip("no_labelled_step")
  if all(t is None for t in targets):
    raise Skip("no_supervised_step")
  return problem, steps, targets


class Prm800kReader(LazyReader):
  """Random-access, thread-safe PRM800K source (grain `MapDataset.source`).

  `path` is a phase{p}_{split}.jsonl file, or a directory holding it (directly, under data/ or
  under prm800k/data/) together with `phase` and `split`. `reader[i]` parses line i + 1 and
  returns an `Example`, or None for a skipped line (counted once in `skips`).
  """

  kind = "prm800k"

  def __init__(self, path: str, split: Optional[str] = None, phase: Optional[int] = None,
               options: Prm800kOptions = Prm800kOptions(), skips: Optional[SkipCounter] = None,
               strict: bool = False, source: str = "prm800k", chunk_bytes: Optional[int] = None):
    if os.path.isdir(os.fspath(path)) and phase not in PHASES:
      raise ValueError(f"prm800k: unknown phase {phase!r} for directory {path!r}; expected one of {list(PHASES)}")
    self.path = resolve_file(path, split, SPLITS, prm800k_candidates(phase), "prm800k")
    self.source = source
    self.options = options
    self.strict = strict
    self._lines = LineFile(self.path, **({"chunk_bytes": chunk_bytes} if chunk_bytes else {}))
    self._log = SkipLog(source, self.path, skips, strict)
    self.skips = self._log.counter
    self._stem = os.path.splitext(os.path.basename(self.path))[0]

  def __len__(self) -> int:
    return len(self._lines)

  def _example(self, i: int) -> Example:
    try:
      record = parse_line(self._lines.read(i))
    except LineTooLong as e:
      raise Skip("line_too_long", str(e)) from None
    problem, steps, targets = trajectory(record, self.options)
    return Example(source=self.source, id=f"{self._stem}:{i + 1}", problem=problem,
                   steps=tuple(steps), targets=tuple(targets))


__all__ = ["Prm800kOptions", "Prm800kReader", "trajectory", "parse_line", "check_text"]
