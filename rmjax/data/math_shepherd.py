"""Math-Shepherd reader: `input` with a step tag after each step, `label` with +/- -> `Example`s.

Why careful alignment: a record's `label` is its `input` with every step tag's text ("ки")
replaced by one character, "+" (the step can still reach the gold answer) or "-". The maths
itself holds "+" and "-" ("8000 + 8000", "16 - 3"), so collecting those characters from
`label` would invent steps. This reader finds the tags in `input` and reads `label` at the
matching positions (each earlier tag shifts the text by len(tag) - 1 characters), and checks
that the text between tags is identical in both strings; a record where it is not (the
dataset's known misplaced labels) is skipped and counted as "label_mismatch".

Problem and first step share the text before the first tag ("<problem> Step 1: ..."): they
split at the first "Step 1:" (any case), else after the first "?" (TRL's conversion does the
same). Steps and problem are stripped, so the steps equal TRL's `completions`.

Option `step_tag` (default " ки"): the tag; whitespace around it is text, not tag (the label
keeps it). `good_label` / `bad_label`: the label characters ("+" -> 1.0, "-" -> 0.0).
"""

from __future__ import annotations

import dataclasses
import re

from rmjax.data.example import Example
from rmjax.data.field_reader import FieldReader, problem_text
from rmjax.data.reader_base import Skip

_FIRST_STEP = re.compile(r"step 1:", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class MathShepherdOptions:
  """step_tag: the tag ending each step in `input`; good_label / bad_label: its replacements."""

  step_tag: str = " ки"
  good_label: str = "+"
  bad_label: str = "-"

  def __post_init__(self):
    for key in ("step_tag", "good_label", "bad_label"):
      if not isinstance(getattr(self, key), str):
        raise ValueError(f"math_shepherd {key} must be a string, got {getattr(self, key)!r}")
    if not self.step_tag.strip():
      raise ValueError(f"math_shepherd step_tag must hold more than whitespace, got {self.step_tag!r}")
    if len(self.good_label) != 1 or len(self.bad_label) != 1 or self.good_label == self.bad_label:
      raise ValueError(f"math_shepherd good_label and bad_label must be two different single characters, "
                       f"got {self.good_label!r} and {self.bad_label!r}")


def aligned_labels(text: str, labelled: str, tag: str) -> tuple[list[str], list[str]]:
  """(the pieces of `text` before each tag, the label character that replaced each tag).

  Raises Skip when `labelled` is not `text` with each tag replaced by exactly one character.
  """
  pieces = text.split(tag)
  if len(pieces) < 2:
    raise Skip("no_step_tag", f"input holds no {tag!r}")
  if len(labelled) != len(text) - (len(pieces) - 1) * (len(tag) - 1):
    raise Skip("label_mismatch", f"label is not input with each {tag!r} replaced by one character")
  chars, pos = [], 0
  for piece in pieces[:-1]:
    if labelled[pos:pos + len(piece)] != piece:
      raise Skip("label_mismatch", f"label differs from input before tag {len(chars) + 1}")
    pos += len(piece)
    chars.append(labelled[pos])
    pos += 1
  if labelled[pos:] != pieces[-1]:
    raise Skip("label_mismatch", "label differs from input after the last tag")
  return pieces[:-1], chars


def split_problem(head: str) -> tuple[str, str]:
  """(problem, first step) from the text before the first tag."""
  m = _FIRST_STEP.search(head)
  cut = m.start() if m else head.find("?") + 1
  problem, first = head[:cut].strip(), head[cut:].strip() if cut > 0 else ""
  if not problem or not first:
    raise Skip("no_first_step", "cannot tell the problem from step 1 (no 'Step 1:' and no '?')")
  return problem, first


class MathShepherdReader(FieldReader):
  kind = "math_shepherd"
  Options = MathShepherdOptions

  def convert(self, record: dict, example_id: str) -> Example:
    text = problem_text(record, "input")
    labelled = problem_text(record, "label")
    tag = self.options.step_tag.strip()
    pieces, chars = aligned_labels(text, labelled, tag)
    problem, first = split_problem(pieces[0])
    steps = [first] + [p.strip() for p in pieces[1:]]
    if not all(steps):
      raise Skip("empty_step", "a step holds only whitespace")
    values = {self.options.good_label: 1.0, self.options.bad_label: 0.0}
    bad = [c for c in chars if c not in values]
    if bad:
      raise Skip("bad_step_label", f"step label {bad[0]!r} is neither {list(values)}")
    return self.make(example_id, problem, steps, [values[c] for c in chars])


__all__ = ["MathShepherdOptions", "MathShepherdReader", "aligned_labels", "split_problem"]
