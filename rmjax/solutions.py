"""A solution as steps: split raw text into steps, and fold step scores into one solution score.

Why it exists: `rmjax.score` and `rmjax.rerank` both accept a whole solution as `text` instead
of a `steps` list, and both report a solution score; the two must split and aggregate the same
way, so both call this module.

Splitting: the text is cut at every occurrence of the separator (default a blank line,
"\\n\\n"); each piece is stripped of surrounding whitespace and empty pieces are dropped.
Before cutting, line endings are made "\\n" (Windows' "\\r\\n" and old Mac's "\\r", in the
text and in the separator), and a line of only spaces or tabs is made empty: it is a blank line
to a reader, so "a\\n  \\nb" is two steps, as "a\\r\\n\\r\\nb" is.

Aggregations of the step scores s_1..s_k (P(step correct) each):
  min   the weakest step (a solution is as good as its worst step)
  prod  the product: P(every step correct) if the steps were independent
  mean  the average step score
  last  the score of the last step
A solution with no step, or with a step that has no score (it did not fit in max_length), has
no solution score (None): an aggregate over part of the steps would rank it as if the unscored
steps were fine.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

AGGREGATIONS = ("min", "prod", "mean", "last")
DEFAULT_SEPARATOR = "\n\n"


def parse_separator(text: str) -> str:
  """A separator as typed on a command line: the escapes \\n, \\t and \\\\ are read as such."""
  out, i = [], 0
  escapes = {"n": "\n", "t": "\t", "\\": "\\"}
  while i < len(text):
    if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in escapes:
      out.append(escapes[text[i + 1]])
      i += 2
    else:
      out.append(text[i])
      i += 1
  if not out:
    raise ValueError("--step-separator must not be empty")
  return "".join(out)


def _normalise(text: str) -> str:
  """Line endings as "\\n", whitespace-only lines empty (module docstring)."""
  return _BLANK_LINE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


_BLANK_LINE = re.compile(r"^[^\S\n]+$", re.MULTILINE)  # a line of whitespace other than newlines


def split_steps(text: str, separator: str = DEFAULT_SEPARATOR) -> list[str]:
  """The non-empty, stripped pieces of `text` between separators, line endings normalised first."""
  if not separator:
    raise ValueError("the step separator must not be empty")
  sep = separator.replace("\r\n", "\n").replace("\r", "\n")
  return [p.strip() for p in _normalise(text).split(sep) if p.strip()]


def solution_steps(obj: dict, separator: str = DEFAULT_SEPARATOR) -> list[str] | str:
  """The steps of a solution object: its `steps` (a list of strings) or its `text` split at
  `separator`; or a one-line reason why it has neither."""
  steps, text = obj.get("steps"), obj.get("text")
  if steps is not None:
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
      return "'steps' must be a list of strings"
    return list(steps)
  if text is not None:
    if not isinstance(text, str):
      return "'text' must be a string"
    return split_steps(text, separator)
  return "needs 'steps' (a list of strings) or 'text' (a string)"


def aggregate(scores: Sequence[Optional[float]], how: str) -> Optional[float]:
  """The solution score of `scores` by `how` (one of AGGREGATIONS); None when a step has no
  score or there is no step."""
  if how not in AGGREGATIONS:
    raise ValueError(f"aggregation {how!r} must be one of {AGGREGATIONS}")
  if not scores or any(s is None for s in scores):
    return None
  values = [float(s) for s in scores]
  if how == "min":
    return min(values)
  if how == "prod":
    return math.prod(values)
  if how == "mean":
    return math.fsum(values) / len(values)
  return values[-1]


def add_solution_args(parser: Any, with_aggregate: bool = True) -> None:
  """--step-separator (and --aggregate) on a command's argparse parser."""
  parser.add_argument("--step-separator", default="\\n\\n", metavar="SEP",
                      help="splits a solution given as 'text' into steps (escapes \\n \\t; default a blank line; "
                           "\\r\\n counts as \\n, a line of spaces as blank)")
  if with_aggregate:
    parser.add_argument("--aggregate", choices=AGGREGATIONS, default=None,
                        help="also write solution_score, the step scores aggregated this way")
