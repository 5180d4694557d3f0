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

from rmjax.data.example import Example
from rmjax.data.field_reader import FieldReader, probability, problem_text, record_id, text_list
from rmjax.data.reader_base import Skip


class StepwiseReader(FieldReader):
  kind = "stepwise"
  # The record keys of (problem, steps, one label per step); rmjax's own format renames them.
  keys = ("prompt", "completions", "labels")

  def convert(self, record: dict, example_id: str) -> Example:
    problem_key, steps_key, labels_key = self.keys
    problem = problem_text(record, problem_key)
    steps = text_list(record, steps_key, f"bad_{steps_key}")
    labels = record.get(labels_key)
    if not isinstance(labels, (list, tuple)):
      raise Skip(f"bad_{labels_key}", f"{labels_key!r} should be a list, got {type(labels).__name__}")
    if len(labels) != len(steps):
      raise Skip(f"bad_{labels_key}", f"{len(labels)} {labels_key} for {len(steps)} steps")
    targets = [probability(v, f"bad_{labels_key}", allow_none=True) for v in labels]
    if "id" not in record and "index" in record:
      example_id = record_id({"id": record["index"]}, example_id)
    return self.make(example_id, problem, steps, targets, self.meta(record))

  def meta(self, record: dict) -> dict:
    return {}


__all__ = ["StepwiseReader"]
