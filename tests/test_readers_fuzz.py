"""Thousands of broken records through every reader: nothing escapes but strict-mode BadRecord.

Inputs are mutations of the real PRM800K records, of the real eQASC chains (arranged as
questions) and of the SYNTHETIC REVEAL CSV: truncated lines, deleted keys, values of the wrong
type, random and non-UTF-8 bytes, absurd nesting; plus hypothesis-generated JSON values. Each
test prints and checks how many inputs it tried and how many records were skipped.
"""

import copy
import json
import pathlib
import random

import pytest
from hypothesis import given, settings, strategies as st

from rmjax.data.eqasc import EqascReader
from rmjax.data.example import BadRecord, Example
from rmjax.data.prm800k import Prm800kOptions, Prm800kReader, parse_line, trajectory
from rmjax.data.reader_base import Skip
from rmjax.data.reveal import RevealOptions, RevealReader
from test_readers_eqasc import real_questions

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "SYNTHETIC_reveal_eval.csv"
ODD_VALUES = [None, 0, -1, 1, 2, 7, 1.5, float("nan"), True, False, "", "x", "yes", "\ud800", [], {}, [None], {"text": 3}]


def _paths(node, prefix=()):
  yield prefix
  if isinstance(node, dict):
    for k, v in node.items():
      yield from _paths(v, prefix + (k,))
  elif isinstance(node, list):
    for i, v in enumerate(node):
      yield from _paths(v, prefix + (i,))


def mutate_tree(obj, rng: random.Random):
  """A deep copy of obj with one node deleted or replaced by an odd value."""
  obj = copy.deepcopy(obj)
  paths = [p for p in _paths(obj) if p]
  path = rng.choice(paths)
  parent = obj
  for k in path[:-1]:
    parent = parent[k]
  if rng.random() < 0.4:
    del parent[path[-1]]
  else:
    parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
  return obj


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
  op = rng.randrange(5)
  if op == 0:
    return data[: rng.randrange(len(data) + 1)]
  if op == 1:  # non-UTF-8 bytes
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]) + data[i:]
  if op == 2:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
      b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)
  if op == 3:
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
  return data.replace(b'"', b"", rng.randint(1, 3))


def _prm_broken_lines(shared_data, n: int, rng: random.Random) -> list[bytes]:
  with open(shared_data / "prm800k" / "prm800k_unique_records.jsonl", "rb") as f:
    real = [line.rstrip(b"\n") for line in f]
  records = [json.loads(x) for x in real]
  lines = [b"", b"   ", b"[" * 100_000 + b"]" * 100_000, b"null", b"[]", b'"a string"', b"{}"]
  while len(lines) < n:
    if rng.random() < 0.6:
      lines.append(json.dumps(mutate_tree(rng.choice(records), rng)).encode())
    else:
      lines.append(mutate_bytes(rng.choice(real), rng).replace(b"\n", b" "))
  return lines


def _check_example(ex: Example):
  assert ex.steps and len(ex.steps) == len(ex.targets)
  assert any(t is not None for t in ex.targets)
  zeros = [k for k, t in enumerate(ex.targets) if t == 0.0]
  assert zeros in ([], [len(ex.targets) - 1])  # a PRM800K trajectory ends after its first -1


def test_prm800k_fuzz(shared_data, tmp_path):
  rng = random.Random(1234)
  lines = _prm_broken_lines(shared_data, 3000, rng)
  path = tmp_path / "fuzz.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  reader = Prm800kReader(str(path))
  assert len(reader) == len(lines)
  results = [reader[i] for i in range(len(reader))]
  good = [r for r in results if r is not None]
  for ex in good:
    _check_example(ex)
  counts = reader.skips.as_dict()["prm800k"]
  print(f"\nprm800k fuzz: {len(lines)} lines tried, {len(good)} examples, {sum(counts.values())} skipped: {counts}")
  assert sum(counts.values()) == len(lines) - len(good)
  assert sum(counts.values()) > len(lines) // 3 and len(good) > 100
  for reason in ("bad_json", "not_utf8", "empty_line", "bad_rating", "not_an_object"):
    assert counts.get(reason, 0) > 0, reason
  strict = Prm800kReader(str(path), strict=True)
  raised = 0
  for i in range(len(strict)):
    try:
      ex = strict[i]
      assert ex is not None and ex.targets == results[i].targets
    except BadRecord as e:
      assert f"fuzz.jsonl:{i + 1}:" in str(e)
      raised += 1
  assert raised == sum(counts.values())


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2, 3) | st.floats() | st.text(max_size=5),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                        st.sampled_from(["question", "problem", "label", "steps", "finish_reason", "completions",
                                         "chosen_completion", "human_completion", "text", "rating", "x"]),
                        kids, max_size=5), max_leaves=30))
def test_prm800k_trajectory_on_arbitrary_json(value):
  try:
    problem, steps, targets = trajectory(value, Prm800kOptions())
  except Skip:
    return
  assert isinstance(problem, str) and len(steps) == len(targets) > 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_prm800k_parse_line_on_arbitrary_bytes(data):
  try:
    parse_line(data)
  except Skip:
    pass


def test_eqasc_fuzz(shared_data, tmp_path):
  rng = random.Random(99)
  base = real_questions(shared_data)
  questions = [mutate_tree(rng.choice(base), rng) for _ in range(1000)]
  path = tmp_path / "eqasc_dev_grc.json"
  path.write_text(json.dumps(questions))
  reader = EqascReader(str(path))
  counts = reader.skips.as_dict().get("eqasc", {})
  print(f"\neqasc fuzz: 1000 mutated questions ({1000 * 20} chains in answer + wrong choices), "
        f"{len(reader)} examples, {sum(counts.values())} skipped: {counts}")
  assert 0 < len(reader) < 10_000 and sum(counts.values()) > 50
  assert all(e.targets[0] is None and e.targets[1] in (0.0, 1.0) for e in reader)
  try:
    EqascReader(str(path), strict=True)
    raise AssertionError("strict mode accepted broken questions")
  except BadRecord as e:
    assert "eqasc_dev_grc.json:question" in str(e)
  text = json.dumps(base).encode()
  tried = skipped = 0
  for k in range(300):
    path = tmp_path / f"eqasc_{k}.json"
    path.write_bytes(mutate_bytes(text, rng))
    r = EqascReader(str(path))
    tried += 1
    skipped += r.skips.total()
    try:
      EqascReader(str(path), strict=True)
    except BadRecord:
      pass
  print(f"eqasc fuzz: {tried} byte-corrupted files, {skipped} records skipped")
  assert skipped >= tried // 2


def _reveal_big_csv(rng: random.Random, answers: int) -> str:
  import csv
  import io
  rows = list(csv.reader(io.StringIO(FIXTURE.read_text(), newline="")))
  header, body = rows[0], rows[1:]
  aid = header.index("answer_id")
  out = io.StringIO()
  w = csv.writer(out)
  w.writerow(header)
  for a in range(answers):
    for row in body:
      row = list(row)
      row[aid] = f"{row[aid]}-{a}"
      if rng.random() < 0.3:
        j = rng.randrange(len(row))
        row[j] = rng.choice(["", "x", "-1", "1.5", "ten", "Correct", "INCORRECT", "fully", "\n", '"', "\udcff", "9" * 40])
      if rng.random() < 0.05:
        row = row[: rng.randrange(len(row))]
      w.writerow(row)
  return out.getvalue()


def test_reveal_fuzz(tmp_path):
  rng = random.Random(7)
  text = _reveal_big_csv(rng, 300)
  path = tmp_path / "reveal_eval.csv"
  path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
  tried = 300 * 4
  for label in ("correctness", "attribution", "both"):
    r = RevealReader(str(path), options=RevealOptions(label=label))
    counts = r.skips.as_dict().get("reveal", {})
    print(f"\nreveal fuzz ({label}): {tried} answers tried, {len(r)} examples, {sum(counts.values())} skipped/noted: {counts}")
    assert 0 < len(r) < tried and sum(counts.values()) > 100
    assert all(any(t is not None for t in e.targets) for e in r)
  header, _, rest = text.encode("utf-8", errors="surrogateescape").partition(b"\n")
  files = 0
  for k in range(200):
    p = tmp_path / f"reveal_{k}.csv"
    p.write_bytes(header + b"\n" + mutate_bytes(rest, rng))
    RevealReader(str(p))
    try:
      RevealReader(str(p), strict=True)
    except BadRecord:
      pass
    files += 1
  huge = tmp_path / "huge.csv"
  huge.write_text(FIXTURE.read_text() + "SYNTHETIC,q,question," + "x" * 200_000 + ",m\r\n")
  r = RevealReader(str(huge))
  print(f"reveal fuzz: {files} byte-corrupted files read; oversized field -> {r.skips.as_dict()}")
  assert r.skips.as_dict()["reveal"].get("bad_csv_row") == 1 and len(r) == 3


def test_json_python_cannot_decode_and_text_after_an_array_are_counted_skips():
  """A line nested past Python's recursion limit or holding an integer past its digit limit is a
  bad_json skip; text after a JSON array's closing bracket (a second array, stray text) is one
  too, after the array's own elements, so nothing is dropped unseen. A label too large for a
  float is a bad label, not an OverflowError."""
  from rmjax.data.field_reader import probability
  from rmjax.data.record_files import iter_json_array, parse_json_line
  for line in (b"[" * 5000 + b"]" * 5000, b'{"x": ' + b"9" * 5000 + b"}"):
    with pytest.raises(Skip) as skip:
      parse_json_line(line)
    assert skip.value.reason == "bad_json"
  got = []
  with pytest.raises(Skip) as skip:
    for index, value in iter_json_array('[{"a": 1}, {"a": 2}]\n[{"a": 3}]\n'):
      got.append(value)
  assert got == [{"a": 1}, {"a": 2}] and skip.value.reason == "bad_json" and "after the array" in str(skip.value)
  assert [v for _, v in iter_json_array('[1, 2]\n  \n')] == [1, 2]
  with pytest.raises(Skip):
    probability(10 ** 400, "bad_label")
  assert probability(1, "bad_label") == 1.0
