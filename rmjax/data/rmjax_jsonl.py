"""rmjax's own format: the JSONL `python -m rmjax.data.preview` prints, read back (reader "rmjax").

Why: with a reader for its own output, any source converts once (preview > file.jsonl) into a
file that reads back without loss: same ids, problems, steps, targets (null = unsupervised)
and `meta`; `source` is not read back, since a run names its sources itself. It also makes the
simplest format to write a dataset in by hand: {"problem", "steps", "targets"} per line, with
an optional "id" and "meta" (an object).

Skipped and counted: a blank problem or step, targets of another length than steps or outside
[0, 1], a meta that is not an object, and records with no supervised step.
"""

from __future__ import annotations

import dataclasses

from rmjax.data.example import Example
from rmjax.data.field_reader import FieldReader, problem_text, text_list
from rmjax.data.reader_base import Skip
from rmjax.data.stepwise import labels_of


@dataclasses.dataclass(frozen=True)
class RmjaxOptions:
  """No options: the format is the `Example` itself."""


class RmjaxReader(FieldReader):
  kind = "rmjax"
  Options = RmjaxOptions

  def convert(self, record: dict, example_id: str) -> Example:
    problem = problem_text(record, "problem")
    steps = text_list(record, "steps", "bad_steps")
    targets = labels_of(record, "targets", len(steps))
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
      raise Skip("bad_meta", f"meta should be an object, got {type(meta).__name__}")
    return self.make(example_id, problem, steps, targets, meta)


__all__ = ["RmjaxOptions", "RmjaxReader"]
