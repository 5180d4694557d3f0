"""The field's stepwise readers on the real records in shared/data, checked against targets
written by hand from each format's definition (FORMATS.md), never against the reader's own output.
"""

import json

import pytest

from rmjax.data.example import BadRecord, SkipCounter
from rmjax.data.math_shepherd import MathShepherdReader
from rmjax.data.processbench import ProcessbenchReader
from rmjax.data.rmjax_jsonl import RmjaxReader
from rmjax.data.sources import build_source
from rmjax.data.stepwise import StepwiseReader


def _pb(shared_data, split):
  return shared_data / "processbench" / f"processbench_{split}.subset.jsonl"


# (split, id, label, steps): label k -> 1.0 before k, 0.0 at k, None after; -1 -> all 1.0.
PROCESSBENCH_CASES = [
    ("gsm8k", "gsm8k-0", 1, (1.0, 0.0, None, None)),
    ("gsm8k", "gsm8k-20", 0, (0.0, None, None)),
    ("gsm8k", "gsm8k-30", 2, (1.0, 1.0, 0.0)),
    ("gsm8k", "gsm8k-210", -1, (1.0,) * 6),
    ("math", "math-0", 0, (0.0, None)),
    ("math", "math-504", -1, (1.0,) * 8),
    ("olympiadbench", "olympiadbench-12", 4, (1.0, 1.0, 1.0, 1.0, 0.0, None)),
    ("olympiadbench", "olympiadbench-360", 1, (1.0, 0.0)),
    ("omnimath", "omnimath-0", 2, (1.0, 1.0, 0.0, None, None, None)),
    ("omnimath", "omnimath-516", -1, (1.0,) * 7),
]


@pytest.mark.parametrize("split,ident,label,targets", PROCESSBENCH_CASES)
def test_processbench_targets_from_the_earliest_wrong_step(shared_data, split, ident, label, targets):
  reader = ProcessbenchReader(str(_pb(shared_data, split)))
  by_id = {e.id: e for e in reader}
  ex = by_id[ident]
  assert ex.targets == targets
  assert ex.meta["label"] == label
  raw = next(json.loads(l) for l in open(_pb(shared_data, split)) if json.loads(l)["id"] == ident)
  assert ex.problem == raw["problem"] and list(ex.steps) == raw["steps"]
  assert ex.meta["final_answer_correct"] == raw["final_answer_correct"]
  assert ex.meta["generator"] == raw["generator"]


def test_processbench_reads_every_real_record(shared_data):
  counts = {"gsm8k": 53, "math": 57, "olympiadbench": 57, "omnimath": 56}
  for split, n in counts.items():
    skips = SkipCounter()
    reader = build_source("pb", {"reader": "processbench", "path": str(_pb(shared_data, split))}, skips=skips)
    examples = list(reader)
    assert len(examples) == len(reader) == n and skips.total() == 0
    assert all(e.source == "pb" and e.id.startswith(f"{split}-") for e in examples)


def test_processbench_directory_of_hub_files(shared_data, tmp_path):
  """The hub layout: one JSON array per split (indent=2, no trailing newline)."""
  for split in ("gsm8k", "math"):
    records = [json.loads(l) for l in open(_pb(shared_data, split))]
    (tmp_path / f"{split}.json").write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
  reader = build_source("processbench", {"path": str(tmp_path)}, split="math")
  assert len(reader) == 57 and reader[0].id == "math-0" and reader[0].targets == (0.0, None)
  with pytest.raises(ValueError, match=r"name the split.*'gsm8k', 'math'"):
    build_source("processbench", {"path": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="no file for split 'omnimath'"):
    build_source("processbench", {"path": str(tmp_path)}, split="omnimath")


def test_a_split_held_by_two_files_is_refused_not_guessed(tmp_path):
  """math.jsonl beside math.json (a conversion kept beside its source) may not hold the same
  records: the directory read names both files instead of reading the .jsonl. Shards of one
  split (math-00000-of-00002.jsonl, ...) are still read together. Records are SYNTHETIC."""
  rows = [{"id": f"math-{i}", "problem": "p", "steps": ["s1", "s2"], "label": -1} for i in range(3)]
  (tmp_path / "math.json").write_text(json.dumps(rows))
  (tmp_path / "math.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n")
  with pytest.raises(ValueError, match=r"split 'math' has 2 files in .* \(math.jsonl, math.json\); give the file"):
    build_source("processbench", {"path": str(tmp_path)}, split="math")
  assert len(build_source("processbench", {"path": str(tmp_path / "math.json")})) == 3
  for i in range(2):
    (tmp_path / f"gsm8k-0000{i}-of-00002.jsonl").write_text(json.dumps(rows[i]) + "\n")
  assert len(build_source("processbench", {"path": str(tmp_path)}, split="gsm8k")) == 2


def test_processbench_bad_labels_are_counted(tmp_path):
  rows = [{"id": "a", "problem": "p", "steps": ["s1", "s2"], "label": 2},
          {"id": "b", "problem": "p", "steps": ["s1", "s2"], "label": True},
          {"id": "c", "problem": "p", "steps": ["s1", " "], "label": -1},
          {"id": "d", "problem": "p", "steps": [], "label": -1},
          {"id": "e", "problem": "", "steps": ["s"], "label": -1},
          {"id": "f", "problem": "p", "steps": ["s1", "s2"], "label": -1}]
  path = tmp_path / "x.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
  reader = ProcessbenchReader(str(path))
  assert [e.id for e in reader] == ["f"]
  assert reader.skips.as_dict()["processbench"] == {"bad_label": 2, "empty_step": 1, "no_steps": 1,
                                                     "bad_problem": 1, "bad_json": 1}
  with pytest.raises(BadRecord, match=r"x.jsonl:1: processbench record rejected \(bad_label\)"):
    ProcessbenchReader(str(path), strict=True)[0]


# ---------------------------------------------------------------------------------------------
# Math-Shepherd: one target per " ки" tag, read at the tag's position in `label`.

# The label characters that replace each tag, read off the five real lines by eye.
SHEPHERD_TARGETS = [(1.0, 1.0, 1.0, 1.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0), (0.0,) * 5, (0.0, 0.0, 0.0)]


def test_math_shepherd_targets_at_the_tags_not_at_every_plus_or_minus(shared_data):
  path = shared_data / "math_shepherd" / "openr_samples_math-shepherd.subset.jsonl"
  examples = list(MathShepherdReader(str(path)))
  assert [e.targets for e in examples] == SHEPHERD_TARGETS
  first = examples[0]
  assert first.problem == ("Janet pays $40/hour for 3 hours per week of clarinet lessons and $28/hour for 5 hours "
                           "a week of piano lessons. How much more does she spend on piano lessons than clarinet "
                           "lessons in a year?")
  assert first.steps[0] == "Step 1: Janet spends 3 hours + 5 hours = <<3+5=8>>8 hours per week on music lessons."
  assert first.steps[4] == ("Step 5: She spends 260 * 52 = <<260*52=13520>>13520 on music lessons in a year. "
                            "The answer is: 13520")
  assert examples[2].steps[1].startswith("Step 2: Since she landed in San Francisco 24 hours later")
  assert first.id == "openr_samples_math-shepherd.subset:1"


def test_math_shepherd_matches_trls_own_conversion(shared_data):
  """TRL's conversion script, run on the same five lines, gives the same problems, steps, labels."""
  ours = list(MathShepherdReader(str(shared_data / "math_shepherd" / "openr_samples_math-shepherd.subset.jsonl")))
  trl = [json.loads(l) for l in open(shared_data / "trl_stepwise" / "math_shepherd_to_trl.derived.jsonl")]
  assert [(e.problem, list(e.steps), list(e.targets)) for e in ours] == \
      [(r["prompt"], r["completions"], [1.0 if v else 0.0 for v in r["labels"]]) for r in trl]


def test_math_shepherd_misaligned_labels_and_options(tmp_path):
  good = {"input": "What is 1+1? Step 1: 1+1=2 ки\nStep 2: The answer is: 2 ки", "label":
          "What is 1+1? Step 1: 1+1=2 +\nStep 2: The answer is: 2 -"}
  rows = [good,
          {"input": good["input"], "label": good["label"].replace("1+1=2 +", "1+1=2+")},  # shifted
          {"input": good["input"], "label": good["label"].replace("What", "Wh+t")},       # text differs
          {"input": good["input"], "label": good["label"].replace("2 -", "2 ?")},         # unknown mark
          {"input": "no tags here", "label": "no tags here"},
          {"input": "Just text ки", "label": "Just text +"}]                              # no problem split
  path = tmp_path / "ms.jsonl"
  path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
  reader = MathShepherdReader(str(path))
  assert [(e.problem, e.steps, e.targets) for e in reader] == \
      [("What is 1+1?", ("Step 1: 1+1=2", "Step 2: The answer is: 2"), (1.0, 0.0))]
  assert reader.skips.as_dict()["math_shepherd"] == {"label_mismatch": 2, "bad_step_label": 1, "no_step_tag": 1,
                                                      "no_first_step": 1}
  tagged = tmp_path / "tag.jsonl"
  tagged.write_text(json.dumps({"input": "Q? A <s>\nB <s>", "label": "Q? A Y\nB N"}) + "\n")
  ex = build_source("m", {"reader": "math_shepherd", "path": str(tagged), "step_tag": " <s>",
                          "good_label": "Y", "bad_label": "N"})[0]
  assert (ex.problem, ex.steps, ex.targets) == ("Q?", ("A", "B"), (1.0, 0.0))
  with pytest.raises(ValueError, match="two different single characters"):
    build_source("m", {"reader": "math_shepherd", "path": str(tagged), "good_label": "++"})


# ---------------------------------------------------------------------------------------------
# TRL stepwise supervision.

def test_stepwise_trl_docs_example(shared_data):
  ex = StepwiseReader(str(shared_data / "trl_stepwise" / "trl_docs_prm_trainer_example.quoted.jsonl"))[0]
  assert ex.problem.startswith("Musa is the class teacher of a class of 45 students.")
  assert ex.steps[2] == ("Step 3: There are 45 students, so the third group will have 45 - 7 - 8 = "
                         "<<45-7-8=20>>20 students. The answer is: 20")
  assert ex.targets == (1.0, 0.0, 0.0)


def test_stepwise_prm800k_rows_against_their_provenance_table(shared_data):
  """The .sources.tsv beside the derived rows lists each row's labels as T/F, written when the
  rows were made: the targets must spell the same letters."""
  d = shared_data / "trl_stepwise"
  lines = open(d / "prm800k_phase1_to_trl.derived.sources.tsv").read().splitlines()
  header = lines[0].split("\t")
  table = [dict(zip(header, l.split("\t"))) for l in lines[1:]]
  examples = list(StepwiseReader(str(d / "prm800k_phase1_to_trl.derived.jsonl")))
  assert len(examples) == len(table) == 151
  for ex, row in zip(examples, table):
    assert ex.id == f"prm800k_phase1_to_trl.derived:{row['line']}"
    assert len(ex.steps) == int(row["n_completions"])
    assert "".join("T" if t == 1.0 else "F" for t in ex.targets) == row["labels"]


def test_stepwise_soft_and_null_labels(tmp_path):
  rows = [{"prompt": "p", "completions": ["a", "b", "c"], "labels": [0.25, None, True], "index": 7},
          {"prompt": "p", "completions": ["a", "b"], "labels": [True]},
          {"prompt": "p", "completions": ["a"], "labels": [1.5]},
          {"prompt": [{"role": "user", "content": "p"}], "completions": ["a"], "labels": [True]},
          {"prompt": "p", "completions": ["a"], "labels": [None]}]
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  reader = StepwiseReader(str(path))
  assert [(e.id, e.targets) for e in reader] == [("7", (0.25, None, 1.0))]
  assert reader.skips.as_dict()["stepwise"] == {"bad_labels": 2, "bad_prompt": 1, "no_supervised_step": 1}


# ---------------------------------------------------------------------------------------------
# rmjax's own JSONL.

def test_rmjax_reader_keeps_ids_targets_and_meta(tmp_path):
  rows = [{"source": "elsewhere", "id": "q1", "problem": "p", "steps": ["a", "b"], "targets": [None, 0.5],
           "meta": {"label": 1}},
          {"problem": "p", "steps": ["a"], "targets": [1]},
          {"problem": "p", "steps": ["a"], "targets": [1.0], "meta": [1]}]
  path = tmp_path / "mine.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  reader = RmjaxReader(str(path), source="mine")
  got = list(reader)
  assert [(e.source, e.id, e.targets, e.meta) for e in got] == [("mine", "q1", (None, 0.5), {"label": 1}),
                                                                 ("mine", "mine:2", (1.0,), {})]
  assert reader.skips.as_dict()["mine"] == {"bad_meta": 1}


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_the_record(tmp_path):
  """Windows editors start a UTF-8 file with a BOM: the first record of a .jsonl file reads like
  the others in every JSON Lines reader (field readers and PRM800K share the line index).
  Records are SYNTHETIC."""
  from rmjax.data.jsonl_index import LineFile
  from rmjax.data.prm800k import Prm800kReader
  from rmjax.data.synthetic import make_record
  rows = [{"id": f"gsm8k-{i}", "problem": "p", "steps": ["s1", "s2"], "label": -1} for i in range(2)]
  (tmp_path / "pb.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode() + b"\n")
  skips = SkipCounter()
  reader = build_source("processbench", {"path": str(tmp_path / "pb.jsonl")}, skips=skips)
  assert [reader[i].id for i in range(len(reader))] == ["gsm8k-0", "gsm8k-1"] and skips.total() == 0
  (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(make_record(0, 0)).encode() + b"\r\n")
  assert Prm800kReader(str(tmp_path / "p.jsonl"))[0] is not None
  (tmp_path / "bom_only.jsonl").write_bytes(b"\xef\xbb\xbf")
  (tmp_path / "bom_empty_line.jsonl").write_bytes(b"\xef\xbb\xbf\n")
  assert len(LineFile(str(tmp_path / "bom_only.jsonl"))) == 0
  assert LineFile(str(tmp_path / "bom_empty_line.jsonl")).read(0) == b""


def test_a_split_file_that_is_no_regular_file_is_named_not_dropped(tmp_path):
  """gsm8k.json a directory, math.jsonl a FIFO: the split is listed and reading it says what
  the path is (it was left out of the splits without a word; a FIFO would block the read).
  Paths given themselves say what they are too. Records are SYNTHETIC."""
  import os
  from rmjax.data.record_files import available_splits
  (tmp_path / "gsm8k.json").mkdir()
  os.mkfifo(tmp_path / "math.jsonl")
  (tmp_path / "omnimath.json").write_text(json.dumps([{"id": "o-0", "problem": "p", "steps": ["s"], "label": -1}]))
  assert available_splits(str(tmp_path)) == ["gsm8k", "math", "omnimath"]
  with pytest.raises(ValueError, match=r"processbench: '.*/gsm8k.json' is a directory, not a data file"):
    build_source("processbench", {"path": str(tmp_path)}, split="gsm8k")
  with pytest.raises(ValueError, match=r"processbench: '.*/math.jsonl' is a FIFO \(named pipe\), not a data file"):
    build_source("processbench", {"path": str(tmp_path)}, split="math")
  assert len(build_source("processbench", {"path": str(tmp_path)}, split="omnimath")) == 1
  with pytest.raises(ValueError, match=r"stepwise: path '.*/math.jsonl' is a FIFO \(named pipe\), not a regular file"):
    build_source("stepwise", {"path": str(tmp_path / "math.jsonl")})  # a spec's data.X.path
