"""eQASC reader: `eqasc_{train,dev,test}_grc.json` question arrays -> one `Example` per chain.

Why: eQASC gives, for each QASC question, retrieved two-fact explanation chains that crowd
workers judged as valid or not. Each chain of the CORRECT answer choice (`answerKey`) becomes
one example: problem "Question: <stem>\\nAnswer: <choice text>", steps [fact 1, fact 2], and the
human label `chain[2].turk_label.label` as target ("yes" -> 1.0, any other string -> 0.0).
By default only the last step carries the target (fact 1 alone is not judged); the option
`label_all_steps` puts it on both steps. The facts' `score` fields are retrieval scores, never
labels, and are never read. Chains of wrong answer choices are not used: they are unlabelled.
Note: the official evaluator labels a chain 1 if its turk label is "yes" OR it is the QASC gold
chain; this reader uses the turk label only (a gold chain rated otherwise would differ; in
the 20 real dev chains saved under shared/data both agree).

Skipped and counted: a chain with missing/null turk_label ("no_label"), malformed chains and
questions (reason names the field), questions whose correct choice has no chains
("no_chains"), an unparseable remainder of the file ("bad_json"), and a file that is no JSON array
("not_a_json_array"). Example id = chain_id.
The file (tens of MB) is parsed once at start-up; the array is decoded element by element so a
corrupt question cannot take the rest of the file down with it unless the JSON itself breaks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from rmjax.data.example import Example, SkipCounter
from rmjax.data.reader_base import ListReader, Skip, SkipLog, resolve_file, text_field
from rmjax.data.record_files import iter_json_array, read_text

SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class EqascOptions:
  """label_all_steps: put the chain's target on both facts (default: on fact 2 only)."""

  label_all_steps: bool = False


def _chain_example(chain: Any, problem: str, options: EqascOptions, source: str) -> Example:
  if not isinstance(chain, list) or len(chain) < 3:
    raise Skip("bad_chain", "chain should be a list [fact1, fact2, meta]")
  fact1 = text_field(chain[0], "text", "bad_fact", allow_empty=False)
  fact2 = text_field(chain[1], "text", "bad_fact", allow_empty=False)
  chain_id = text_field(chain[2], "chain_id", "bad_chain_id", allow_empty=False)
  turk = chain[2].get("turk_label")
  if turk is None or (isinstance(turk, dict) and turk.get("label") is None):
    raise Skip("no_label", f"chain {chain_id} has no turk_label")
  label = text_field(turk, "label", "bad_turk_label")
  target = 1.0 if label.strip().lower() == "yes" else 0.0
  targets = (target, target) if options.label_all_steps else (None, target)
  return Example(source=source, id=chain_id, problem=problem, steps=(fact1, fact2), targets=targets)


def _correct_choice(question: Any) -> tuple[str, list]:
  """(problem text, chains of the answer choice) of one question object."""
  if not isinstance(question, dict):
    raise Skip("bad_question", f"question entry is a {type(question).__name__}")
  body = question.get("question")
  stem = text_field(body, "stem", "bad_question", allow_empty=False)
  choices = body.get("choices")
  if not isinstance(choices, list):
    raise Skip("bad_choices", "question.choices should be a list")
  key = text_field(question, "answerKey", "bad_answer_key", allow_empty=False)
  matching = [c for c in choices if isinstance(c, dict) and c.get("label") == key]
  if len(matching) != 1:
    raise Skip("bad_answer_key", f"answerKey {key!r} matches {len(matching)} choices")
  answer = text_field(matching[0], "text", "bad_choices", allow_empty=False)
  chains = matching[0].get("chains", [])
  if not isinstance(chains, list):
    raise Skip("bad_chains", "choice.chains should be a list")
  if not chains:
    raise Skip("no_chains", f"answer choice {key!r} has no chains")
  return f"Question: {stem}\nAnswer: {answer}", chains


class EqascReader(ListReader):
  """All usable chains of one eQASC file, built at start-up (random access, thread-safe).

  `path` is an eqasc_{split}_grc.json file, or a directory holding it together with `split`.
  """

  def __init__(self, path: str, split: Optional[str] = None, options: EqascOptions = EqascOptions(),
               skips: Optional[SkipCounter] = None, strict: bool = False, source: str = "eqasc"):
    self.path = resolve_file(path, split, SPLITS, lambda s: [f"eqasc_{s}_grc.json"], "eqasc")
    self.source = source
    self.options = options
    self._log = SkipLog(source, self.path, skips, strict)
    self.skips = self._log.counter
    self._examples = self._build(read_text(self.path))

  def _build(self, text: str) -> list[Example]:
    examples: list[Example] = []
    index = -1
    try:
      for index, question in iter_json_array(text):
        examples.extend(self._question_examples(index, question))
    except Skip as skip:  # the JSON itself broke: the rest of the file is one skip
      self._log.record(("file", index + 1), skip, f"question {index + 1}")
    return examples

  def _question_examples(self, index: int, question: Any) -> list[Example]:
    where = f"question {index}"
    try:
      problem, chains = _correct_choice(question)
    except Skip as skip:
      self._log.record(("question", index), skip, where)
      return []
    out = []
    for j, chain in enumerate(chains):
      try:
        out.append(_chain_example(chain, problem, self.options, self.source))
      except Skip as skip:
        self._log.record(("chain", index, j), skip, f"{where} chain {j}")
    return out


__all__ = ["EqascOptions", "EqascReader", "iter_json_array"]
