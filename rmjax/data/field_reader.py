"""The reader shape shared by the field's stepwise formats: files -> records -> `Example`s.

Why: ProcessBench, Math-Shepherd, TRL stepwise rows and rmjax's JSONL differ only in the rule
that turns one record into (problem, steps, targets). `FieldReader` does the rest once: file
resolution and storage (`record_files`), random access from grain's thread pool, ids, and the
skip rule every reader obeys (a bad record is counted once by reason in the `SkipCounter`, or
raises `BadRecord` in strict mode). A format module subclasses it with `convert` and an
options dataclass, and is registered in `sources.py`.

Records are converted when read, so a reader builds in the time it takes to index its files,
and each process of a sharded run counts the skips of the records it reads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from rmjax.data.example import Example, SkipCounter
from rmjax.data.reader_base import LazyReader, Skip, SkipLog, check_text, text_field
from rmjax.data.record_files import RecordFiles, resolve_record_files


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """Options of a format that defines its targets completely."""


class FieldReader(LazyReader):
  """Random-access, thread-safe source (grain `MapDataset.source`) of one stepwise format.

  `path`: a file, a directory plus `split`, or hf://datasets/<owner>/<name>[/<file>].
  `reader[i]` is record i's `Example`, or None for a skipped record (counted once in `skips`).
  Example ids are the record's own string `id` when it has one, else "<file stem>:<record
  number>" (1-based; the line number in a JSONL file).
  """

  kind = ""  # the reader's name in specs and on the preview command line
  Options: type = NoOptions

  def __init__(self, path: str, split: Optional[str] = None, options: Any = None,
               skips: Optional[SkipCounter] = None, strict: bool = False, source: Optional[str] = None):
    self.options = options if options is not None else self.Options()
    self.source = source or self.kind
    self.path, files = resolve_record_files(path, split, self.kind)
    self._log = SkipLog(self.source, self.path, skips, strict)
    self.skips = self._log.counter
    self._records = RecordFiles(files)
    self._stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    for file, skip in self._records.tail_skips:
      self._log.record(("tail", file), skip, f"{os.path.basename(file)} (the rest of the array)")

  def convert(self, record: dict, example_id: str) -> Example:
    """The `Example` of one record; raises Skip(reason) for a record that cannot be used."""
    raise NotImplementedError

  def make(self, example_id: str, problem: str, steps: list[str], targets: list[Optional[float]],
           meta: Optional[dict] = None) -> Example:
    if not steps:
      raise Skip("no_steps")
    if all(t is None for t in targets):
      raise Skip("no_supervised_step")
    return Example(source=self.source, id=example_id, problem=problem, steps=tuple(steps),
                   targets=tuple(targets), meta=meta or {})

  def __len__(self) -> int:
    return len(self._records)

  def _example(self, i: int) -> Example:
    k, n = self._records.locate(i)
    record = self._records.record(i)
    if not isinstance(record, dict):
      raise Skip("not_an_object", f"record is a {type(record).__name__}")
    return self.convert(record, record_id(record, f"{self._stems[k]}:{n}"))

  def _location(self, i: int) -> int | str:
    k, n = self._records.locate(i)
    return n if len(self._stems) == 1 else f"{self._stems[k]}:{n}"


def record_id(record: dict, default: str) -> str:
  """The record's own id (a non-empty string or an int), else `default`."""
  value = record.get("id")
  if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
    return default
  text = str(value)
  try:
    check_text(text, "bad_id")
  except Skip:
    return default
  return text


def text_list(record: dict, key: str, reason: str) -> list[str]:
  """record[key] as a list of strings, each non-blank (a blank step has nothing to judge)."""
  values = record.get(key)
  if not isinstance(values, (list, tuple)):
    raise Skip(reason, f"{key!r} should be a list of strings, got {type(values).__name__}")
  out = []
  for j, value in enumerate(values):
    if not isinstance(value, str):
      raise Skip(reason, f"{key}[{j}] should be a string, got {type(value).__name__}")
    if not value.strip():
      raise Skip("empty_step", f"{key}[{j}] is blank")
    check_text(value, reason)
    out.append(value)
  return out


def problem_text(record: dict, key: str) -> str:
  return text_field(record, key, f"bad_{key}", allow_empty=False)


def probability(value: Any, reason: str, allow_none: bool = False) -> Optional[float]:
  """A target from a label: bool -> 1.0 / 0.0, a finite number in [0, 1] -> float, else Skip."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool):
    return 1.0 if value else 0.0
  if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:  # NaN and inf fail the range; no int overflows
    return float(value)
  raise Skip(reason, f"label {value!r} is not a bool or a number in [0, 1]")


__all__ = ["FieldReader", "NoOptions", "record_id", "text_list", "problem_text", "probability"]
