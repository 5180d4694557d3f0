"""REVEAL reader: `eval/reveal_eval.csv` / `open/reveal_open.csv` -> one `Example` per answer.

Why: REVEAL (google/reveal, test-set-only terms) labels each step of a chain-of-thought
answer for logical correctness and for attribution to evidence passages. Its CSV holds one row
per (answer, step, evidence passage), so answer- and step-level fields repeat across rows and
rows need not be sorted. This reader groups rows by `answer_id`, makes one step per distinct
`step_idx` (ordered by int(step_idx)), and builds the step's target from:

- label="correctness" (default): column `correctness_column` ("correctness_label");
  "correct" -> 1.0, "incorrect" -> 0.0 (case-insensitive);
- label="attribution": column `attribution_column` (default "attribution_label"; the real
  column name is unverified, so it is configurable): "fully" -> 1.0, "partially" -> 0.5,
  "contradictory" / "unsupported" -> 0.0. The value taken is the one on the row marked
  `is_final_rated_evidence_for_step` when that column exists, else the first non-empty one;
- label="both": the minimum of the available targets (a step is right only if it is both
  logically correct and supported; the min is the AND of the two for 0/0.5/1 labels).
Values are matched case-insensitively, whole value first, then its first word ("Fully
attributable" -> "fully"). An empty value gives target None (step shown, not supervised); a
non-empty unknown value also gives None and is counted as "unknown_<kind>_label" (strict mode
raises), since the real value vocabulary is unverified.

Columns are found by header name; a missing required column fails at start-up with one line
listing the columns found. Skipped and counted per answer: rows with bad fields (the whole
answer goes), non-integer step_idx, answers without a supervised step. Example id = answer_id.
The file is small and parsed once at start-up with the csv module (quoted newlines are fine).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from typing import Mapping, Optional

from rmjax.data.example import Example, SkipCounter
from rmjax.data.reader_base import ListReader, Skip, SkipLog, check_text, resolve_file

SPLITS = ("eval", "open")
LABEL_MODES = ("correctness", "attribution", "both")
CORRECTNESS_VALUES = {"correct": 1.0, "incorrect": 0.0}
ATTRIBUTION_VALUES = {"fully": 1.0, "partially": 0.5, "contradictory": 0.0, "unsupported": 0.0}
BASE_COLUMNS = ("question", "answer_id", "step_idx", "step")
_TRUE = ("true", "1", "yes")


@dataclasses.dataclass(frozen=True)
class RevealOptions:
  label: str = "correctness"
  correctness_column: str = "correctness_label"
  attribution_column: str = "attribution_label"
  final_evidence_column: str = "is_final_rated_evidence_for_step"
  correctness_values: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(CORRECTNESS_VALUES))
  attribution_values: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(ATTRIBUTION_VALUES))

  def __post_init__(self):
    if self.label not in LABEL_MODES:
      raise ValueError(f"reveal label must be one of {list(LABEL_MODES)}, got {self.label!r}")
    for name, values in (("correctness_values", self.correctness_values), ("attribution_values", self.attribution_values)):
      for key, value in values.items():
        if not 0.0 <= float(value) <= 1.0:
          raise ValueError(f"reveal {name}[{key!r}] = {value} is outside [0, 1]")

  def required_columns(self) -> tuple[str, ...]:
    cols = list(BASE_COLUMNS)
    if self.label in ("correctness", "both"):
      cols.append(self.correctness_column)
    if self.label in ("attribution", "both"):
      cols.append(self.attribution_column)
    return tuple(cols)


def map_label(value: str, values: Mapping[str, float]) -> tuple[Optional[float], bool]:
  """(target, known): target of a label string; known=False for a non-empty unknown value."""
  norm = value.strip().lower()
  if not norm:
    return None, True
  table = {k.lower(): float(v) for k, v in values.items()}
  if norm in table:
    return table[norm], True
  first = re.split(r"[\s_\-:/,]+", norm)[0]
  if first in table:
    return table[first], True
  return None, False


def reveal_candidates(split: str) -> list[str]:
  name = f"reveal_{split}.csv"
  return [os.path.join(split, name), name]


def _step_index(value: str) -> int:
  try:
    number = float(value.strip())
  except ValueError:
    raise Skip("bad_step_idx", f"step_idx {value!r} is not an integer") from None
  if number != number or number in (float("inf"), float("-inf")) or number != int(number):
    raise Skip("bad_step_idx", f"step_idx {value!r} is not an integer")
  return int(number)


def _undecodable(text: str) -> bool:
  try:
    check_text(text, "")
  except Skip:
    return True
  return False


@dataclasses.dataclass
class _Answer:
  line: int
  rows: list = dataclasses.field(default_factory=list)
  bad: Optional[Skip] = None
  bad_line: Optional[int] = None


class RevealReader(ListReader):
  """All usable answers of one REVEAL CSV, built at start-up (random access, thread-safe).

  `path` is a reveal_{split}.csv file, or a directory holding {split}/reveal_{split}.csv (or
  reveal_{split}.csv) together with split "eval" or "open".
  """

  def __init__(self, path: str, split: Optional[str] = None, options: RevealOptions = RevealOptions(),
               skips: Optional[SkipCounter] = None, strict: bool = False, source: str = "reveal"):
    self.path = resolve_file(path, split, SPLITS, reveal_candidates, "reveal")
    self.source = source
    self.options = options
    self._log = SkipLog(source, self.path, skips, strict)
    self.skips = self._log.counter
    with open(self.path, "rb") as f:
      data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
      data = data[3:]
    text = data.decode("utf-8", errors="surrogateescape")
    header, answers = self._group_rows(text)
    self._col = {name: i for i, name in enumerate(header)}
    self._examples = [ex for aid, ans in answers.items() if (ex := self._answer_example(aid, ans)) is not None]

  def _group_rows(self, text: str) -> tuple[list[str], dict[str, _Answer]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
      header = next(reader, None)
    except csv.Error as e:
      raise ValueError(f"reveal: cannot read the CSV header of {self.path}: {e}") from None
    header = [h.strip() for h in header or []]
    missing = [c for c in self.options.required_columns() if c not in header]
    if missing:
      found = repr(header)  # repr: a binary file's control bytes come out escaped, not echoed
      found = found if len(found) <= 300 else f"{found[:300]}... ({len(header)} columns, is it a CSV file?)"
      raise ValueError(f"reveal: {self.path} lacks required column(s) {missing}; columns found: {found}")
    col = {name: i for i, name in enumerate(header)}
    answers: dict[str, _Answer] = {}
    line = reader.line_num + 1
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:
        self._log.record(("row", line), Skip("bad_csv_row", str(e)), line)
        if reader.line_num + 1 == line:  # no progress: count the rest as that one bad row
          break
        line = reader.line_num + 1
        continue
      self._add_row(row, line, header, col, answers)
      line = reader.line_num + 1
    return header, answers

  def _add_row(self, row: list[str], line: int, header: list[str], col: dict[str, int],
               answers: dict[str, _Answer]) -> None:
    if not row:  # blank line between records: not a record
      return
    aid_i = col["answer_id"]
    aid = row[aid_i].strip() if aid_i < len(row) else ""
    problem = None
    if len(row) != len(header):
      problem = Skip("wrong_field_count", f"row has {len(row)} fields, header has {len(header)}")
    else:
      try:
        for value in row:
          check_text(value, "csv field")
      except Skip as skip:
        problem = skip
    if not aid or _undecodable(aid):  # cannot tell which answer the row belongs to
      self._log.record(("row", line), problem or Skip("missing_answer_id"), line)
      return
    answer = answers.setdefault(aid, _Answer(line=line))
    if problem is not None and answer.bad is None:
      answer.bad, answer.bad_line = problem, line
    elif problem is None:
      answer.rows.append((line, row))

  def _answer_example(self, aid: str, answer: _Answer) -> Optional[Example]:
    try:
      if answer.bad is not None:
        raise answer.bad
      example = self._build(aid, answer)
    except Skip as skip:
      self._log.record(("answer", aid), skip, answer.bad_line or answer.line)
      return None
    return example

  def _value(self, row: list[str], name: str) -> str:
    i = self._col.get(name)
    return row[i] if i is not None else ""

  def _build(self, aid: str, answer: _Answer) -> Example:
    if not answer.rows:
      raise Skip("no_rows")
    question = next((q for _, r in answer.rows if (q := self._value(r, "question").strip())), "")
    if not question:
      raise Skip("bad_question", "empty question")
    by_step: dict[int, list[tuple[int, list[str]]]] = {}
    for line, row in answer.rows:
      by_step.setdefault(_step_index(self._value(row, "step_idx")), []).append((line, row))
    steps, targets = [], []
    for idx in sorted(by_step):
      rows = by_step[idx]
      text = next((t for _, r in rows if (t := self._value(r, "step").strip())), "")
      if not text:
        raise Skip("empty_step", f"step_idx {idx} has no text")
      steps.append(text)
      targets.append(self._step_target(rows))
    if all(t is None for t in targets):
      raise Skip("no_supervised_step")
    return Example(source=self.source, id=aid, problem=question, steps=tuple(steps), targets=tuple(targets))

  def _step_target(self, rows: list[tuple[int, list[str]]]) -> Optional[float]:
    opts = self.options
    found = []
    if opts.label in ("correctness", "both"):
      found.append(self._label(rows, opts.correctness_column, opts.correctness_values, "correctness", final_first=False))
    if opts.label in ("attribution", "both"):
      found.append(self._label(rows, opts.attribution_column, opts.attribution_values, "attribution", final_first=True))
    present = [t for t in found if t is not None]
    return min(present) if present else None

  def _label(self, rows, column: str, values: Mapping[str, float], kind: str, final_first: bool) -> Optional[float]:
    candidates = [(line, self._value(r, column)) for line, r in rows if self._value(r, column).strip()]
    if final_first and self.options.final_evidence_column in self._col:
      final = [(line, self._value(r, column)) for line, r in rows
               if self._value(r, self.options.final_evidence_column).strip().lower() in _TRUE
               and self._value(r, column).strip()]
      candidates = final or candidates
    if not candidates:
      return None
    line, value = candidates[0]
    target, known = map_label(value, values)
    if not known:
      self._log.note(f"unknown_{kind}_label", line, f"value {value!r} in column {column!r}")
    return target


__all__ = ["RevealOptions", "RevealReader", "map_label", "LABEL_MODES"]
