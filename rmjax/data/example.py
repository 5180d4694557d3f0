"""The one canonical example type every reader produces and every later stage consumes.

Readers differ wildly in format (PRM800K JSONL trajectories, eQASC question arrays, REVEAL
multi-row CSV); after reading they all become `Example`s, so rendering, batching, mixing and
evaluation never need to know where an example came from.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from typing import Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Example:
  """A problem and its reasoning steps, with one target per step.

  `targets[i]` is a float in [0, 1] (the probability that step i is correct) or None for a
  step that is shown to the model but not supervised. `meta` keeps record fields a benchmark
  scores against but training never reads (ProcessBench's `label`, the index of the earliest
  wrong step), so an evaluator can work from the same `Example` the pipeline saw; JSON values
  only, and it takes no part in hashing.
  """

  source: str
  id: str
  problem: str
  steps: tuple[str, ...]
  targets: tuple[Optional[float], ...]
  meta: dict = dataclasses.field(default_factory=dict, hash=False)

  def __post_init__(self):
    if len(self.steps) != len(self.targets):
      raise ValueError(f"{self.source}/{self.id}: {len(self.steps)} steps but {len(self.targets)} targets")
    for t in self.targets:
      if t is not None and not 0.0 <= t <= 1.0:
        raise ValueError(f"{self.source}/{self.id}: target {t} outside [0, 1]")

  def to_json(self) -> dict:
    out = {"source": self.source, "id": self.id, "problem": self.problem,
           "steps": list(self.steps), "targets": list(self.targets)}
    if self.meta:
      out["meta"] = dict(self.meta)
    return out


class SkipCounter:
  """Thread-safe count of skipped records by (source, reason).

  grain reads sources from a thread pool, so skips are counted under a lock. Counts are
  reported in logs and in final_results.json: bad input is never silently dropped.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._counts: Counter = Counter()

  def add(self, source: str, reason: str, n: int = 1) -> None:
    with self._lock:
      self._counts[(source, reason)] += n

  def as_dict(self) -> dict[str, dict[str, int]]:
    with self._lock:
      out: dict[str, dict[str, int]] = {}
      for (source, reason), n in sorted(self._counts.items()):
        out.setdefault(source, {})[reason] = n
      return out

  def total(self) -> int:
    with self._lock:
      return sum(self._counts.values())

  def add_all(self, counts: "SkipCounter | dict[str, dict[str, int]]") -> None:
    """Adds another counter's counts (or an `as_dict()` of them)."""
    for source, reasons in (counts.as_dict() if isinstance(counts, SkipCounter) else counts).items():
      for reason, n in reasons.items():
        self.add(source, reason, n)


# Skip reasons a spec key can avoid, and that key (said beside the counts).
_SKIP_HINTS = {"first_marker_truncated": "data.max_length"}


def describe_skips(skipped: dict[str, dict[str, int]]) -> str:
  """'prm800k: first_marker_truncated 30 (first_marker_truncated -> raise data.max_length)':
  the counts of `SkipCounter.as_dict()` in one line, with the key that keeps such records."""
  parts = [f"{source}: " + ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
           for source, reasons in sorted(skipped.items())]
  hints = sorted({f"{r} -> raise {_SKIP_HINTS[r]}" for reasons in skipped.values() for r in reasons if r in _SKIP_HINTS})
  return "; ".join(parts) + (f" ({'; '.join(hints)})" if hints else "")


class BadRecord(ValueError):
  """Raised (in strict mode) for a record that cannot be read; names file and line."""


def format_location(path: str, line: int | None) -> str:
  return f"{path}:{line}" if line is not None else path


__all__ = ["Example", "SkipCounter", "BadRecord", "format_location", "Sequence"]
