"""PRM800K reader on the real records in shared/data: the trajectory rule, options, paths, scale.

Expected values in the hand-checked tests were derived by reading the raw JSON by eye, not by
running the reader.
"""

import concurrent.futures
import json
import os
import pickle
import time
import tracemalloc

import numpy as np
import pytest

from rmjax.data.example import BadRecord
from rmjax.data.jsonl_index import LineFile, scan_line_starts
from rmjax.data.prm800k import Prm800kOptions, Prm800kReader


@pytest.fixture(scope="module")
def unique_path(shared_data):
  return str(shared_data / "prm800k" / "prm800k_unique_records.jsonl")


@pytest.fixture(scope="module")
def raw(unique_path):
  with open(unique_path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reader(unique_path):
  return Prm800kReader(unique_path)


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


def test_phase2_error_step_with_null_chosen_completion_is_the_negative(reader):
  # Line 2 (cc88bf76, generation 6, found_error): 6 steps chosen 0 rated 1,0,1,1,1,1; step 7 has
  # chosen_completion null and completions rated [-1, 1, 1, 1] -> the -1 pre-generated step.
  ex = reader[1]
  assert ex.id == "prm800k_unique_records:2"
  assert ex.targets == (1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.0)
  assert ex.steps[1].startswith("I wonder how many ways I can arrange these groups")
  assert ex.steps[-1].startswith("For the Democrats, there are 5! ways to order them in a line")
  assert ex.problem.startswith("A Senate committee has 5 Democrats, 5 Republicans, and 1 Independent.")
  # Line 9: step 1 [0], step 2 null-chosen [-1, 1, 1, -1, 1] -> first -1 = completions[0].
  ex = reader[8]
  assert ex.targets == (0.5, 0.0)
  assert ex.steps[1].startswith("I notice that the subsequence $a_2$, $a_3$, $a_4$ is both geometric")
  # Line 14: [1], [1], then [-1, -1, -1, 0, -1] -> completions[0].
  ex = reader[13]
  assert ex.targets == (1.0, 1.0, 0.0)
  assert ex.steps[2].startswith("These three inequalities define a triangular region")


def test_phase1_human_completion_steps_are_correct_steps(reader):
  # Line 1 (phase 1, solution): step 2 is a human_completion object (all 5 candidates -1),
  # step 6 chose completion 4 (rated 1).
  ex = reader[0]
  assert ex.targets == (1.0,) * 6
  assert ex.steps[1] == "We have $3p+e=1.24$ and $5p+e=1.82$."
  assert ex.steps[5] == "That means a pencil costs 29 cents.\n\n# Answer\n\n29"
  # Line 5 (give_up): 7 chosen steps, a human step, then a step with completions null -> stop.
  ex = reader[4]
  assert len(ex.steps) == 8 and ex.targets == (1.0,) * 8
  assert ex.steps[7].startswith("By symmetry, we have that the intersection of the plane with the tetrahedron")
  # Line 15 (give_up, 30 labelled steps): the last step's 7 completions are all unrated -> stop.
  ex = reader[14]
  assert len(ex.steps) == 29 and all(t == 1.0 for t in ex.targets)


def test_all_19_records_follow_the_rule(reader, raw):
  examples = [reader[i] for i in range(len(reader))]
  assert len(examples) == 19 and all(e is not None for e in examples)
  assert reader.skips.total() == 0
  for ex, rec in zip(examples, raw):
    steps = rec["label"]["steps"]
    finish = rec["label"]["finish_reason"]
    assert len(ex.steps) <= len(steps)
    zeros = [k for k, t in enumerate(ex.targets) if t == 0.0]
    if finish == "found_error":
      # Ends with its first (and only) negative: the first -1 candidate of the final step.
      assert zeros == [len(ex.steps) - 1], ex.id
      assert len(ex.steps) == len(steps)
      last = steps[-1]
      assert last["chosen_completion"] is None and last["human_completion"] is None
      assert ex.steps[-1] == next(c["text"] for c in last["completions"] if c["rating"] == -1)
    else:
      assert zeros == [], ex.id
    for k, step in enumerate(steps[:len(ex.steps)]):
      if isinstance(step.get("human_completion"), dict):
        assert ex.steps[k] == step["human_completion"]["text"] and ex.targets[k] == 1.0
      elif step["chosen_completion"] is not None:
        assert ex.steps[k] == step["completions"][step["chosen_completion"]]["text"]
  negatives = sum(t == 0.0 for e in examples for t in e.targets)
  assert negatives == sum(r["label"]["finish_reason"] == "found_error" for r in raw) == 11


def test_neutral_target_zero_does_not_end_trajectories(raw, unique_path):
  """A trajectory ends at its first rating -1, not at its first target 0.0: with
  neutral_target=0.0 a neutral step maps to 0.0 too, and used to end it there (line 7 of the
  real records, 19 labelled steps with neutral ones from step 5, kept 5)."""
  default, zero = Prm800kReader(unique_path), Prm800kReader(unique_path, options=Prm800kOptions(neutral_target=0.0))
  assert len(raw[6]["label"]["steps"]) == 19 and len(zero[6].steps) == 19
  for i in range(len(default)):
    a, b = default[i], zero[i]
    assert a.steps == b.steps, a.id
    assert list(b.targets) == [0.0 if t == 0.5 else t for t in a.targets], a.id


def _with_steps(record, steps):
  out = json.loads(json.dumps(record))
  out["label"]["steps"] = steps
  return out


def _rated(*ratings):
  return [{"text": f"text {i} rated {r}", "rating": r, "flagged": None} for i, r in enumerate(ratings)]


def test_the_error_step_is_the_first_completion_rated_minus_one_wherever_it_sits(raw, tmp_path):
  """In the real records the -1 completion of a null-chosen step is always completions[0]; the rule
  is "the first -1", so it must also hold where the -1 comes later. With no -1 the first rated
  completion stands in (its own target), and a chosen completion rated -1 ends the trajectory."""
  good = {"chosen_completion": 0, "human_completion": None, "completions": _rated(1)}
  records = [
    _with_steps(raw[1], [good, {"chosen_completion": None, "human_completion": None, "completions": _rated(1, 0, -1, 1)}]),
    _with_steps(raw[1], [good, {"chosen_completion": None, "human_completion": None, "completions": _rated(None, 0, 1)}]),
    _with_steps(raw[1], [{"chosen_completion": 1, "human_completion": None, "completions": _rated(1, -1)}, good]),
  ]
  reader = Prm800kReader(_write_jsonl(tmp_path / "phase2_train.jsonl", records))
  later_minus_one, no_minus_one, chosen_minus_one = reader[0], reader[1], reader[2]
  assert later_minus_one.steps[-1] == "text 2 rated -1" and later_minus_one.targets == (1.0, 0.0)
  assert no_minus_one.steps[-1] == "text 1 rated 0" and no_minus_one.targets == (1.0, 0.5)
  assert chosen_minus_one.steps == ("text 1 rated -1",) and chosen_minus_one.targets == (0.0,)


def test_openr_samples_exact_line_format(shared_data, reader):
  openr = Prm800kReader(str(shared_data / "prm800k" / "openr_samples_prm800k.jsonl"))
  got = list(openr)
  assert len(got) == 6 and openr.skips.total() == 0
  # sources.tsv: the openr file is lines 1-6 of the unique-records file, byte for byte.
  for i, ex in enumerate(got):
    assert ex.id == f"openr_samples_prm800k:{i + 1}"
    assert (ex.problem, ex.steps, ex.targets) == (reader[i].problem, reader[i].steps, reader[i].targets)


def test_pretty_concat_records_agree(shared_data, reader, raw, tmp_path):
  decoder = json.JSONDecoder()
  records = []
  for name in ("tongyx361_prm800k-phase1-train-example.pretty-concat.json",
               "tongyx361_prm800k-phase2-train-example.pretty-concat.json"):
    text = (shared_data / "prm800k" / name).read_text()
    pos = 0
    while (pos := len(text) - len(text[pos:].lstrip())) < len(text):
      obj, pos = decoder.raw_decode(text, pos)
      records.append(obj)
  assert len(records) == 12
  extra = Prm800kReader(_write_jsonl(tmp_path / "phase_mixed.jsonl", records))
  by_key = {(r["labeler"], r["timestamp"]): i for i, r in enumerate(raw)}
  for j, rec in enumerate(records):
    ex, ref = extra[j], reader[by_key[(rec["labeler"], rec["timestamp"])]]
    assert (ex.steps, ex.targets) == (ref.steps, ref.targets)


def test_options_and_skips(raw, tmp_path):
  screening = raw[5]  # line 6: is_initial_screening_question true
  qc = json.loads(json.dumps(raw[0]))
  qc["is_quality_control_question"] = True
  bad_problem = json.loads(json.dumps(raw[1]))
  bad_problem["label"]["finish_reason"] = "bad_problem"
  empty = json.loads(json.dumps(raw[1]))
  empty["label"]["steps"] = []
  unrated = json.loads(json.dumps(raw[1]))
  unrated["label"]["steps"][0]["completions"][0]["rating"] = None
  path = _write_jsonl(tmp_path / "opts.jsonl", [screening, qc, bad_problem, empty, unrated, raw[1]])
  r = Prm800kReader(path, options=Prm800kOptions(neutral_target=0.25, drop_quality_control=True, drop_screening=True))
  got = [r[i] for i in range(len(r))]
  assert got[:4] == [None] * 4
  assert got[4].targets == (None, 0.25, 1.0, 1.0, 1.0, 1.0, 0.0)  # null rating -> shown, unsupervised
  assert got[5].targets == (1.0, 0.25, 1.0, 1.0, 1.0, 1.0, 0.0)
  [r[i] for i in range(len(r))]  # reading again must not count twice
  assert r.skips.as_dict() == {"prm800k": {"screening": 1, "quality_control": 1, "bad_problem": 1, "no_labelled_step": 1}}
  keep = Prm800kReader(path)
  assert keep[0] is not None and keep[1] is not None


def test_strict_mode_names_file_and_line(raw, tmp_path):
  path = _write_jsonl(tmp_path / "s.jsonl", [raw[0]])
  with open(path, "a") as f:
    f.write('{"labeler": "truncated\n')
  r = Prm800kReader(path, strict=True)
  assert r[0] is not None
  with pytest.raises(BadRecord, match=r"s\.jsonl:2: .*bad_json"):
    r[1]


def test_directory_phase_split_resolution(raw, tmp_path):
  (tmp_path / "data").mkdir()
  _write_jsonl(tmp_path / "data" / "phase2_test.jsonl", raw[1:3])
  _write_jsonl(tmp_path / "phase1_train.jsonl", raw[0:1])
  assert len(Prm800kReader(str(tmp_path), split="test", phase=2)) == 2
  assert Prm800kReader(str(tmp_path), split="train", phase=1)[0].id == "phase1_train:1"
  with pytest.raises(ValueError, match="unknown split 'dev'.*'train', 'test'"):
    Prm800kReader(str(tmp_path), split="dev", phase=2)
  with pytest.raises(ValueError, match="unknown phase 3"):
    Prm800kReader(str(tmp_path), split="train", phase=3)
  with pytest.raises(FileNotFoundError, match="phase2_train.jsonl") as e:
    Prm800kReader(str(tmp_path), split="train", phase=2)
  assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Prm800kReader(str(tmp_path / "nope.jsonl"))


def test_threads_pickle_and_grain(reader, unique_path):
  expected = [reader[i] for i in range(len(reader))]
  fresh = Prm800kReader(unique_path)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda i: fresh[i % 19], range(19 * 40)))
  assert got == expected * 40
  clone = pickle.loads(pickle.dumps(fresh._lines))
  assert clone.read(3) == fresh._lines.read(3)
  import grain
  ds = grain.MapDataset.source(fresh).filter(lambda e: e is not None)
  assert [e.id for e in ds] == [e.id for e in expected]


def test_line_index_edge_cases(tmp_path):
  p = tmp_path / "crlf.jsonl"
  p.write_bytes(b'{"a": 1}\r\n\r\n{"b": 2}')  # CRLF, an empty line, no trailing newline
  lf = LineFile(str(p), chunk_bytes=3)
  assert len(lf) == 3 and [lf.read(i) for i in range(3)] == [b'{"a": 1}', b"", b'{"b": 2}']
  empty = tmp_path / "empty.jsonl"
  empty.write_bytes(b"")
  assert len(LineFile(str(empty))) == 0


def test_scan_is_memory_bounded(raw, tmp_path):
  """Scales to the 456 MB phase-2 file: a ~24 MB file, 1 MB chunks, peak memory well under the file
  (its speed is printed, not asserted: timings belong to benchmarks)."""
  line = (json.dumps(raw[12]) + "\n").encode()
  n = 24_000_000 // len(line) + 1
  path = tmp_path / "big.jsonl"
  with open(path, "wb") as f:
    for _ in range(0, n, 500):
      f.write(line * min(500, n - _))
  size = os.path.getsize(path)
  tracemalloc.start()
  t0 = time.perf_counter()
  starts, total = scan_line_starts(str(path), chunk_bytes=1 << 20)
  seconds = time.perf_counter() - t0
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  print(f"scanned {size / 1e6:.1f} MB ({n} lines) in {seconds:.3f}s = {size / 1e6 / seconds:.0f} MB/s, "
        f"peak traced memory {peak / 1e6:.1f} MB")
  assert total == size and len(starts) == n
  assert np.array_equal(starts[:3], np.arange(3) * len(line))
  assert peak < 8e6  # 1 MB chunk + its compare mask + 8 bytes per line; the file is 24 MB
  r = Prm800kReader(str(path), chunk_bytes=1 << 20)
  assert r[n - 1].targets == r[0].targets and r[n - 1].id == f"big:{n}"
