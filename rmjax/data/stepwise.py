"""TRL stepwise-supervision reader: `prompt`, `completions`, `labels` -> `Example`s.

Why: TRL's PRM trainer format (trl-lib/math_shepherd, trl-lib/prm800k and the datasets made
for it) is the common currency of the field: one step per completion, one label per step.
Labels are bools (True -> 1.0) or probabilities in [0, 1] (soft labels, e.g. Monte-Carlo
estimates); null is an unsupervised step. The record's `id` (or `index`, as in
plaguss/prm_800k_trl) is the example id when present.

Skipped and counted: a prompt that is not a non-blank string (conversational prompts are not
read), completions that are not non-blank strings, labels of another length than
completions or outside [0, 1], and rows with no labelled step.
"""

from __future__ import annotations

import dataclasses

from rmjax.data.example import Example
from rmjax.data.field_reader import FieldReader, probability, problem_text, record_id, text_list
from rmjax.data.reader_base import Skip


@dataclasses.dataclass(frozen=True)
class StepwiseOptions:
  """No options: labels are read as bools or probabilities."""


def labels_of(record: dict, key: str, n_steps: int) -> list:
  """record[key] as targets, one per step (None for a null label)."""
  labels = record.get(key)
  if not isinstance(labels, (list, tuple)):
    raise Skip("bad_labels", f"{key!r} should be a list, got {type(labels).__name__}")
  if len(labels) != n_steps:
    raise Skip("bad_labels", f"{len(labels)} {key} for {n_steps} steps")
  return [probability(v, "bad_labels", allow_none=True) for v in labels]


class StepwiseReader(FieldReader):
  kind = "stepwise"
  Options = StepwiseOptions

  def convert(self, record: dict, example_id: str) -> Example:
    problem = problem_text(record, "prompt")
    steps = text_list(record, "completions", "bad_completions")
    targets = labels_of(record, "labels", len(steps))
    if "id" not in record and "index" in record:
      example_id = record_id({"id": record["index"]}, example_id)
    return self.make(example_id, problem, steps, targets)


__all__ = ["StepwiseOptions", "StepwiseReader", "labels_of"]
