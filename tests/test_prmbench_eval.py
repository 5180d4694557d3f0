"""PRMBench: the official sample rules on the real records, and the step-level F1 / PRMScore
against an independent computation."""

import json
import random

import pytest

from rmjax import prmbench_eval as pb


def independent_scores(samples, threshold, classes):
  """Step labels (valid = not an error step) vs judgements (valid = score >= threshold), F1 of
  each label over the pooled steps of `classes`, PRMScore their mean."""
  pairs = [(i not in s["error_steps"], v >= threshold) for s in samples if s["classification"] in classes
           for i, v in enumerate(s["step_scores"]) if v is not None]

  def f1(label):
    tp = sum(1 for y, p in pairs if y == label and p == label)
    predicted, actual = sum(1 for _, p in pairs if p == label), sum(1 for y, _ in pairs if y == label)
    if not predicted or not actual:
      return None
    return 0.0 if tp == 0 else 2 * tp / (predicted + actual)
  pos, neg = f1(True), f1(False)
  return pos, neg, None if pos is None or neg is None else (pos + neg) / 2


def test_real_records_follow_the_official_sample_rules(shared_data):
  lines = (shared_data / "prmbench" / "prmbench_classified.subset.jsonl").read_text().splitlines()
  records = [json.loads(x) for x in lines]
  skips = {}
  samples = pb.samples_of(records + records[:3], skips)  # repeated (classification, idx) keys: once, counted
  assert skips == {"duplicate_key": 3}
  assert len(samples) == len(records) + sum(r["classification"] == "redundency" for r in records)
  by_id = {s["id"]: s for s in samples}
  for r in records:
    s = by_id[f"{r['classification']}_{r['idx']}"]
    assert s["steps"] == r["modified_process"] and s["problem"] == r["modified_question"]
    assert s["error_steps"] == sorted(e - 1 for e in r["error_steps"])
    if r["classification"] == "redundency":
      c = by_id[f"correct_{r['idx']}"]
      assert c["steps"] == r["original_process"] and c["error_steps"] == [] and c["classification"] == "correct"
  assert any(max(s["error_steps"], default=-1) >= len(s["steps"]) for s in samples)  # occurs in the data


def test_scores_match_an_independent_computation_with_unscored_steps(shared_data):
  records = [json.loads(x) for x in
             (shared_data / "prmbench" / "prmbench_classified.subset.jsonl").read_text().splitlines()]
  samples = pb.samples_of(records, {})
  rng = random.Random(0)
  for s in samples:
    s["step_scores"] = [None if rng.random() < 0.05 else rng.choice([0.2, 0.5, 0.7, rng.random()]) for _ in s["steps"]]
  for threshold in (0.5, 0.3):
    result = pb.report(samples, threshold)
    for name, m in result["classes"].items():
      assert (m["f1"], m["negative_f1"], m["prm_score"]) == pytest.approx(
        independent_scores(samples, threshold, {name}), abs=1e-12)
      assert m["samples"] == sum(s["classification"] == name for s in samples)
    others = {s["classification"] for s in samples} - {"correct"}
    o = result["overall"]
    assert (o["f1"], o["negative_f1"], o["prm_score"]) == pytest.approx(
      independent_scores(samples, threshold, others), abs=1e-12)
    assert result["unscored_steps"] == sum(v is None for s in samples for v in s["step_scores"])
  correct_only = pb.report([s for s in samples if s["classification"] == "correct"], 0.5)["classes"]["correct"]
  assert correct_only["negative_f1"] is None and correct_only["prm_score"] is None  # no erroneous step


def test_bad_records_are_counted_not_fatal(tmp_path):
  good = {"classification": "circular", "idx": "a", "modified_question": "q", "modified_process": ["s1", "s2"],
          "error_steps": [2]}
  rows = [good, dict(good, idx="b", error_steps=[0]), dict(good, idx="c", modified_process=[]), {"idx": "d"}]
  (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
  skips = {}
  samples = pb.samples_of(pb.read_records(tmp_path, skips), skips)
  assert [s["id"] for s in samples] == ["circular_a"] and samples[0]["error_steps"] == [1]
  assert skips == {"bad_json": 1, "bad_error_steps": 1, "bad_process": 1, "no_classification_or_idx": 1}


def _record(idx, **changes):
  """A SYNTHETIC PRMBench record."""
  return {"classification": "circular", "idx": idx, "modified_question": "q", "modified_process": ["s1", "s2"],
          "error_steps": [2], **changes}


def test_repeated_keys_are_counted_and_a_bad_first_copy_hides_nothing(tmp_path):
  rows = [_record("a", error_steps=[0]), _record("a", error_steps=[1]), _record("a"),
          _record("r", classification="redundency", original_question="q", original_process=["o1"]),
          _record("r", classification="redundency", original_question="q", original_process=["o1"])]
  skips = {}
  samples = pb.samples_of(rows, skips)
  assert [(s["id"], s["error_steps"]) for s in samples] == [
    ("circular_a", [0]), ("correct_r", []), ("redundency_r", [1])]
  assert skips == {"bad_error_steps": 1, "duplicate_key": 2}  # one a record, one r record (its correct sample with it)


def test_deep_nesting_and_a_byte_order_mark_are_lines_like_others(tmp_path):
  """200,000 '[' on a line is a counted bad_json (was a RecursionError traceback); a UTF-8 BOM
  before the first record does not spoil it. SYNTHETIC records."""
  (tmp_path / "x.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(_record("a")).encode() + b"\n" +
                                     b"[" * 200_000 + b"\n\n" + json.dumps(_record("b")).encode() + b"\n")
  skips = {}
  assert [r["idx"] for r in pb.read_records(tmp_path, skips)] == ["a", "b"] and skips == {"bad_json": 1}


def test_a_scanned_path_that_is_no_regular_file_is_refused_by_name(tmp_path):
  """A FIFO named *.jsonl would block the read for ever, a directory named so holds no lines:
  either is named in the error, which comes at once. SYNTHETIC records."""
  import os
  import threading
  (tmp_path / "a.jsonl").write_text(json.dumps(_record("a")) + "\n")
  (tmp_path / "sub.jsonl").mkdir()
  with pytest.raises(ValueError, match=r"sub.jsonl is a directory, not a PRMBench JSONL file"):
    pb.read_records(tmp_path, {})
  (tmp_path / "sub.jsonl").rmdir()
  fifo = tmp_path / "b.jsonl"
  os.mkfifo(fifo)
  errors = []

  def read():
    try:
      pb.read_records(tmp_path, {})
    except ValueError as e:
      errors.append(str(e))
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  reader.join(timeout=10)
  try:
    assert not reader.is_alive(), "read_records blocked on the FIFO"
  finally:  # a reader blocked in open() gets end of file
    try:
      os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting: nothing to release
      pass
  assert errors == [f"--path {tmp_path}: {fifo} is a FIFO (named pipe), not a PRMBench JSONL file"]
