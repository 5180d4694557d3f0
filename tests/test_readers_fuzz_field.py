"""The fuzz of test_readers_fuzz.py for the field's stepwise readers: mutated real records as
JSONL lines, as a JSON array and as parquet rows; nothing escapes but strict-mode BadRecord,
and every bad record is counted once by reason."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from rmjax.data.example import BadRecord, Example
from rmjax.data.reader_base import Skip
from rmjax.data.sources import FIELD_READERS, build_source
from test_readers_fuzz import mutate_bytes, mutate_tree

REAL = {
    "processbench": "processbench/processbench_gsm8k.subset.jsonl",
    "math_shepherd": "math_shepherd/openr_samples_math-shepherd.subset.jsonl",
    "stepwise": "trl_stepwise/prm800k_phase1_to_trl.derived.jsonl",
    "rmjax": None,  # the processbench records as preview prints them
}
# Reasons each reader must have counted among the mutants (beyond the byte-level ones).
EXPECTED = {"processbench": ("bad_label", "bad_steps", "bad_problem"),
            "math_shepherd": ("label_mismatch", "bad_input", "bad_label"),
            "stepwise": ("bad_labels", "bad_completions", "bad_prompt"),
            "rmjax": ("bad_targets", "bad_steps", "bad_problem", "bad_meta")}


def _real_records(shared_data, reader):
  if reader != "rmjax":
    return [json.loads(line) for line in open(shared_data / REAL[reader], encoding="utf-8")]
  return [e.to_json() for e in build_source("processbench", {"path": str(shared_data / REAL["processbench"])})]


def _check(ex: Example):
  assert ex.steps and len(ex.steps) == len(ex.targets)
  assert any(t is not None for t in ex.targets)
  assert all(isinstance(s, str) and s.strip() for s in ex.steps)


@pytest.mark.parametrize("reader", sorted(FIELD_READERS))
def test_field_reader_fuzz(shared_data, tmp_path, reader):
  rng = random.Random(sum(map(ord, reader)))  # stable across runs (str hash is salted)
  records = _real_records(shared_data, reader)
  raw = [json.dumps(r).encode() for r in records]
  lines = [b"", b"  ", b"[" * 100_000 + b"]" * 100_000, b"null", b"[]", b'"text"', b"{}"]
  mutants = [mutate_tree(rng.choice(records), rng) for _ in range(800)]
  lines += [json.dumps(m).encode() for m in mutants]
  lines += [mutate_bytes(rng.choice(raw), rng).replace(b"\n", b" ") for _ in range(300)]
  path = tmp_path / "fuzz.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  r = build_source(reader, {"path": str(path)})
  results = [r[i] for i in range(len(r))]
  assert len(results) == len(lines)
  good = [x for x in results if x is not None]
  for ex in good:
    _check(ex)
  counts = r.skips.as_dict()[reader]
  print(f"\n{reader} fuzz: {len(lines)} lines, {len(good)} examples, {sum(counts.values())} skipped: {counts}")
  assert sum(counts.values()) == len(lines) - len(good)
  assert len(good) > 50 and sum(counts.values()) > 200
  for reason in ("bad_json", "empty_line", "not_an_object") + EXPECTED[reader]:
    assert counts.get(reason, 0) > 0, reason
  again = [r[i] for i in range(len(r))]  # read twice (two epochs): still counted once
  assert again == results and r.skips.as_dict()[reader] == counts
  strict = build_source(reader, {"path": str(path)}, strict=True)
  raised = 0
  for i in range(len(strict)):
    try:
      assert strict[i] == results[i]
    except BadRecord as e:
      assert f"fuzz.jsonl:{i + 1}:" in str(e) and "\n" not in str(e)
      raised += 1
  assert raised == sum(counts.values())
  # The same mutants as a JSON array: the same examples and skips (ids follow the file).
  (tmp_path / "arr.json").write_text(json.dumps(mutants))
  as_array = build_source(reader, {"path": str(tmp_path / "arr.json")})
  strip = lambda x: x and (x.problem, x.steps, x.targets, x.meta)  # noqa: E731
  assert [strip(as_array[i]) for i in range(len(as_array))] == [strip(x) for x in results[7:7 + len(mutants)]]
  # Parquet holds one type per column: its mutants are nulls and missing values.
  nulled = []
  for rec in records * 20:
    rec = dict(rec)
    for key in rng.sample(sorted(rec), rng.randint(0, 2)):
      rec[key] = None
    nulled.append(rec)
  pq.write_table(pa.Table.from_pylist(nulled), tmp_path / "rows.parquet")
  from_parquet = build_source(reader, {"path": str(tmp_path / "rows.parquet")})
  kept = [x for x in (from_parquet[i] for i in range(len(from_parquet))) if x is not None]
  for ex in kept:
    _check(ex)
  assert len(kept) + from_parquet.skips.total() == len(nulled) and from_parquet.skips.total() > 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(FIELD_READERS)),
       st.dictionaries(st.sampled_from(["problem", "steps", "label", "input", "prompt", "completions", "labels",
                                        "targets", "meta", "id", "index"]),
                       st.recursive(st.none() | st.booleans() | st.integers(-2, 3) | st.floats() | st.text(max_size=8),
                                    lambda kids: st.lists(kids, max_size=4), max_leaves=12), max_size=6))
def test_field_convert_on_arbitrary_records(reader, record):
  r = FIELD_READERS[reader].__new__(FIELD_READERS[reader])
  r.options, r.source = FIELD_READERS[reader].Options(), reader
  try:
    ex = r.convert(record, "x")
  except Skip:
    return
  _check(ex)
