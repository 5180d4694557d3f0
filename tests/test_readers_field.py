"""The field's stepwise readers on the real records in shared/data, checked against targets
written by hand from each format's definition (FORMATS.md), never against the reader's own output.
"""

import json

import pytest

from rmjax.data.example import BadRecord, SkipCounter
from rmjax.data.processbench import ProcessbenchReader
from rmjax.data.sources import build_source


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
