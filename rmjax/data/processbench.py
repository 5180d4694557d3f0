"""ProcessBench reader: `{gsm8k,math,olympiadbench,omnimath}.json` records -> `Example`s.

Why: ProcessBench (Qwen) marks, for each model solution split into paragraphs (`steps`), the
0-based index of the EARLIEST wrong paragraph in `label`, or -1 when every paragraph is right.
That gives step targets only up to the error: steps before `label` are right (1.0), the step
at `label` is wrong (0.0), and steps after it are shown but unsupervised (None): the dataset
does not say whether a later step is right or wrong. With label -1 every step is 1.0.
`final_answer_correct` is not a step label (a wrong process can still reach the right answer)
and is never turned into a target.

The record's `id` ("gsm8k-0") is the example id, and `meta` keeps `label` (with `generator`
and `final_answer_correct` when present), so a ProcessBench evaluation can compare the first
step a model rejects with `label` on the very examples it scored.

Splits are the hub's files: a directory holding `<split>.json` (hf://datasets/Qwen/ProcessBench)
with split gsm8k | math | olympiadbench | omnimath, or any one file. Skipped and counted: a
missing or blank problem or step, steps that are not a list of strings, and a `label` that is
not an int in [-1, len(steps)).
"""

from __future__ import annotations

from rmjax.data.example import Example
from rmjax.data.field_reader import FieldReader, problem_text, text_list
from rmjax.data.reader_base import Skip

SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")


def targets_from_label(label: int, n_steps: int) -> list:
  """1.0 before the earliest wrong step, 0.0 at it, None after it; all 1.0 for label -1."""
  if label == -1:
    return [1.0] * n_steps
  return [1.0] * label + [0.0] + [None] * (n_steps - label - 1)


class ProcessbenchReader(FieldReader):
  kind = "processbench"

  def convert(self, record: dict, example_id: str) -> Example:
    problem = problem_text(record, "problem")
    steps = text_list(record, "steps", "bad_steps")
    label = record.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
      raise Skip("bad_label", f"label {label!r} is not -1 or a step index below {len(steps)}")
    meta = {"label": label}
    for key, kind in (("generator", str), ("final_answer_correct", bool)):
      if isinstance(record.get(key), kind):
        meta[key] = record[key]
    return self.make(example_id, problem, steps, targets_from_label(label, len(steps)), meta)


__all__ = ["ProcessbenchReader", "SPLITS", "targets_from_label"]
