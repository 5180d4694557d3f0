"""rmjax's own format: the JSONL `python -m rmjax.data.preview` prints, read back (reader "rmjax").

Why: with a reader for its own output, any source converts once (preview > file.jsonl) into a
file that reads back without loss: same ids, problems, steps, targets (null = unsupervised)
and `meta`; `source` is not read back, since a run names its sources itself. It also makes the
simplest format to write a dataset in by hand: {"problem", "steps", "targets"} per line, with
an optional "id" and "meta" (an object). It is TRL's stepwise format under other key names,
so it shares that reader's rule.

Skipped and counted: a blank problem or step, targets of another length than steps or outside
[0, 1], a meta that is not an object, and records with no supervised step.
"""

from __future__ import annotations

from rmjax.data.reader_base import Skip
from rmjax.data.stepwise import StepwiseReader


class RmjaxReader(StepwiseReader):
  kind = "rmjax"
  keys = ("problem", "steps", "targets")

  def meta(self, record: dict) -> dict:
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
      raise Skip("bad_meta", f"meta should be an object, got {type(meta).__name__}")
    return meta


__all__ = ["RmjaxReader"]
