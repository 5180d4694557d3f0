"""eQASC reader on the 20 real dev chains, arranged in the question-level _grc format.

The official labels (chainid_to_label_dev.json, from AllenAI's evaluator) are the reference;
the reader must reproduce them from turk_label alone and never read the retrieval `score`.
"""

import json

import pytest

from rmjax.data.eqasc import EqascOptions, EqascReader
from rmjax.data.example import BadRecord

LABELS = "ABCDEFGH"


def real_questions(shared_data) -> list[dict]:
  """The 20 notebook chains grouped into 2 question objects, plus one wrong choice each.

  The wrong choice reuses the other question's chains with chain ids suffixed "_WRONG", so a
  reader that reads non-answer choices would produce ids that are not in the label file.
  """
  path = shared_data / "eqasc" / "eqasc_dev_chains_from_author_notebook.reconstructed.jsonl"
  grouped: dict[str, dict] = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      chain = row["chain"]
      qid = chain[2]["chain_id"].split("_")[0]
      q = grouped.setdefault(qid, {"stem": row["_printed_question_lower"], "answer": row["_printed_option_lower"], "chains": []})
      q["chains"].append(chain)
  questions = []
  for k, (qid, q) in enumerate(grouped.items()):
    other = list(grouped.values())[1 - k]["chains"]
    wrong = [json.loads(json.dumps(c)) for c in other]
    for c in wrong:
      c[2]["chain_id"] += "_WRONG"
    choices = [{"label": "A", "text": "a wrong answer", "chains": wrong},
               {"label": "B", "text": q["answer"], "chains": q["chains"]}]
    questions.append({"id": qid, "question": {"stem": q["stem"], "choices": choices}, "answerKey": "B"})
  return questions


def _write(tmp_path, questions, name="eqasc_dev_grc.json"):
  path = tmp_path / name
  path.write_text(json.dumps(questions))
  return path


def test_real_chains_give_official_labels(shared_data, tmp_path):
  questions = real_questions(shared_data)
  _write(tmp_path, questions)
  reader = EqascReader(str(tmp_path), split="dev")
  official = json.loads((shared_data / "eqasc" / "chainid_to_label_dev.json").read_text())
  examples = list(reader)
  assert len(examples) == 20 and reader.skips.total() == 0
  assert all(not e.id.endswith("_WRONG") for e in examples)  # wrong choice's chains unused
  for ex in examples:
    assert ex.id in official
    assert ex.targets == (None, float(official[ex.id]))
  assert sum(e.targets[1] for e in examples) == 5.0  # 5 "yes" among the 20 (FORMATS.md)
  first = next(e for e in examples if e.id == "3X4JMASXCM8FCX94IM0KEMYGMLZ0BD_1_1")
  assert first.steps == ("Art can find the lost Art can find the lost Art can find the lost.",
                         "North Star clip art was created by Peter Reynolds, author and illustrator of The North Star.")
  assert first.problem == "Question: what can be used to find your way if you're lost in the dark?\nAnswer: the north star"
  assert first.targets == (None, 0.0)  # turk "no"; its facts' scores are 20.3 and 29.1


def test_label_all_steps_and_score_is_ignored(shared_data, tmp_path):
  questions = real_questions(shared_data)
  for q in questions:
    for c in q["question"]["choices"][1]["chains"]:
      c[0]["score"], c[1]["score"] = -1e9, "not a number"  # scores must never matter
  path = _write(tmp_path, questions)
  official = json.loads((shared_data / "eqasc" / "chainid_to_label_dev.json").read_text())
  examples = list(EqascReader(str(path), options=EqascOptions(label_all_steps=True)))
  assert len(examples) == 20
  assert all(e.targets == (float(official[e.id]),) * 2 for e in examples)


def test_missing_labels_and_bad_questions_are_counted(shared_data, tmp_path):
  questions = real_questions(shared_data)
  chains = questions[0]["question"]["choices"][1]["chains"]
  chains[0][2]["turk_label"] = None
  chains[1][2]["turk_label"] = {"label": None}
  del chains[2][2]["turk_label"]
  chains[3][2]["turk_label"] = {"label": 7}
  chains[4] = [chains[4][0]]
  questions[1]["answerKey"] = "Z"
  questions.append({"id": "x", "question": {"stem": "s", "choices": [{"label": "A", "text": "t"}]}, "answerKey": "A"})
  reader = EqascReader(str(_write(tmp_path, questions)))
  assert len(reader) == 5
  assert reader.skips.as_dict() == {"eqasc": {"no_label": 3, "bad_turk_label": 1, "bad_chain": 1,
                                              "bad_answer_key": 1, "no_chains": 1}}
  with pytest.raises(BadRecord, match=r"eqasc_dev_grc\.json:question 0 chain 0: eqasc record rejected \(no_label\)"):
    EqascReader(str(_write(tmp_path, questions)), strict=True)


def test_truncated_file_keeps_complete_questions(shared_data, tmp_path):
  text = json.dumps(real_questions(shared_data))
  path = tmp_path / "eqasc_test_grc.json"
  path.write_text(text[: len(text) - 500])
  reader = EqascReader(str(path))
  assert len(reader) == 10  # the first question survives; the cut one is one "bad_json" skip
  assert reader.skips.as_dict() == {"eqasc": {"bad_json": 1}}


def test_paths_and_splits(tmp_path):
  with pytest.raises(ValueError, match="unknown split 'validation'.*'train', 'dev', 'test'"):
    EqascReader(str(tmp_path), split="validation")
  with pytest.raises(FileNotFoundError, match="eqasc_train_grc.json"):
    EqascReader(str(tmp_path), split="train")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    EqascReader(str(tmp_path / "missing.json"))
