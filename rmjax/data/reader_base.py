"""Pieces every dataset reader shares: skip bookkeeping, strict mode, path checks, field checks.

The readers parse very different formats, but they must treat bad input the same way:
a bad record is skipped and counted once (by source and reason) in a `SkipCounter`, or, in
strict mode, raises `BadRecord` naming the file and line. Keeping that logic here means the
rule is written once and every reader obeys it identically.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Hashable, Iterator, Optional, Sequence

from rmjax.data.example import BadRecord, Example, SkipCounter, format_location
from rmjax.data.jsonl_index import MISSING, path_kind


class Skip(Exception):
  """Internal signal: this record cannot be used. `reason` is a short snake_case key."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


class SkipLog:
  """Counts each skipped record once (however often it is read) or raises in strict mode.

  Lazy readers are read once per epoch, so counting every read would inflate the numbers;
  a set of already-counted record keys keeps the counts equal to the number of bad records.
  """

  def __init__(self, source: str, path: str, skips: Optional[SkipCounter], strict: bool):
    self.source = source
    self.path = path
    self.counter = skips if skips is not None else SkipCounter()
    self.strict = strict
    self._seen: set = set()
    self._lock = threading.Lock()

  def record(self, key: Hashable, skip: Skip, line: Optional[int | str]) -> None:
    """Counts `skip` for record `key` (once), or raises `BadRecord` when strict."""
    if self.strict:
      raise BadRecord(f"{format_location(self.path, line)}: {self.source} record rejected "
                      f"({skip.reason}){': ' + skip.detail if skip.detail else ''}")
    with self._lock:
      if key in self._seen:
        return
      self._seen.add(key)
    self.counter.add(self.source, skip.reason)

  def note(self, reason: str, line: Optional[int | str], detail: str = "") -> None:
    """Counts something that is kept but worth reporting (e.g. an unknown label value)."""
    if self.strict:
      raise BadRecord(f"{format_location(self.path, line)}: {self.source} ({reason})"
                      f"{': ' + detail if detail else ''}")
    self.counter.add(self.source, reason)

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()


def resolve_file(path: str, split: Optional[str], valid_splits: Sequence[str],
                 candidates: Callable[[str], Sequence[str]], what: str) -> str:
  """`path` itself if it is a file, else the first existing candidate under the directory.

  Raises a one-line FileNotFoundError/ValueError naming the path and what was expected.
  """
  path = os.fspath(path) if path is not None else ""
  if not path:
    raise ValueError(f"no path given for {what}")
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise unusable_path_error(path, what)
  if split is None:
    raise ValueError(f"{what}: {path!r} is a directory; name the split to read (one of {list(valid_splits)}), "
                     f"or give the file itself")
  if split not in valid_splits:
    raise ValueError(f"{what}: unknown split {split!r} for directory {path!r}; expected one of {list(valid_splits)}")
  tried = [os.path.join(path, c) for c in candidates(split)]
  for candidate in tried:
    if os.path.isfile(candidate):
      return candidate
    if path_kind(candidate) != MISSING:  # a directory or FIFO named like the file: said, not skipped
      raise ValueError(f"{what}: {candidate!r} is {path_kind(candidate)}, not a data file")
  raise FileNotFoundError(f"{what}: no file for split {split!r} in {path!r}; expected one of {tried}")


def unusable_path_error(path: str, what: str) -> Exception:
  """The error for a data path that is neither a regular file nor a directory: nothing there
  (FileNotFoundError), or what it is instead (a FIFO, a device, a symlink loop: ValueError)."""
  kind = path_kind(path)
  if kind == MISSING:
    return FileNotFoundError(f"{what}: path {path!r} does not exist (expected a file or a directory)")
  return ValueError(f"{what}: path {path!r} is {kind}, not a regular file or a directory")


def text_field(obj: Any, key: str, reason: str, allow_empty: bool = True) -> str:
  """obj[key] as a str (obj must be a dict), else Skip(reason)."""
  if not isinstance(obj, dict):
    raise Skip(reason, f"expected an object holding {key!r}, got {type(obj).__name__}")
  value = obj.get(key)
  if not isinstance(value, str):
    raise Skip(reason, f"{key!r} should be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise Skip(reason, f"{key!r} is empty")
  check_text(value, reason)
  return value


def check_text(value: str, reason: str) -> None:
  """Rejects strings holding undecodable bytes (lone surrogates from `surrogateescape`)."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise Skip("not_utf8", f"{reason}: text holds bytes that are not UTF-8") from None


class LazyReader:
  """A reader that parses record i when it is read: `reader[i]` is an `Example` or None for a
  skipped record (counted once). Subclasses define `kind`, `path`, `__len__` and `_example(i)`
  (raising Skip, with the record's location for the count)."""

  kind = ""
  path: str
  _log: SkipLog

  def __len__(self) -> int:
    raise NotImplementedError

  def _example(self, i: int) -> Example:
    raise NotImplementedError

  def _location(self, i: int) -> int | str:
    return i + 1

  def __getitem__(self, i: int) -> Optional[Example]:
    if not -len(self) <= i < len(self):
      raise IndexError(f"{self.kind} index {i} out of range ({len(self)} records in {self.path})")
    i %= len(self)
    try:
      return self._example(i)
    except Skip as skip:
      self._log.record(i, skip, self._location(i))
      return None

  def __iter__(self) -> Iterator[Example]:
    """Examples in file order, skipped records left out (and counted)."""
    for i in range(len(self)):
      example = self[i]
      if example is not None:
        yield example

  def __repr__(self) -> str:
    return f"{type(self).__name__}(path={self.path!r}, records={len(self)})"


class ListReader:
  """A reader whose examples are all built at start-up (small files: eQASC, REVEAL).

  Skipped records were already counted while building, so `__getitem__` never returns None.
  """

  source: str
  path: str
  skips: SkipCounter
  _examples: list[Example]

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, i: int) -> Example:
    return self._examples[i]

  def __iter__(self) -> Iterator[Example]:
    return iter(list(self._examples))

  def __repr__(self) -> str:
    return f"{type(self).__name__}(path={self.path!r}, examples={len(self)})"
