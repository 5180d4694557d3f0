"""Best-of-N reranking: rmjax.bon's exact counting against a brute force over every subset, and
`python -m rmjax.rerank` on candidates that carry their own step scores (no model)."""

import itertools
import json
import random
from collections import Counter

import numpy as np
import pytest

from rmjax import bon, rerank
from rmjax.solutions import aggregate, split_steps

AGG = {"min": min, "prod": lambda s: float(np.prod(s)), "mean": lambda s: float(np.mean(s)), "last": lambda s: s[-1]}


def brute_top(scores, correct, n):
  """Mean over subsets of the correct share among the subset's top-scored (None lowest, and a
  subset of None only picks nothing)."""
  key = [float("-inf") if s is None else s for s in scores]
  total = 0.0
  subsets = list(itertools.combinations(range(len(scores)), n))
  for sub in subsets:
    best = max(key[i] for i in sub)
    top = [i for i in sub if key[i] == best]
    total += 0 if best == float("-inf") else sum(correct[i] for i in top) / len(top)
  return total / len(subsets)


def brute_oracle(correct, n):
  subsets = list(itertools.combinations(range(len(correct)), n))
  return sum(any(correct[i] for i in sub) for sub in subsets) / len(subsets)


def brute_majority(answers, correct, n):
  """A random candidate among the subset's ones holding a most-voted answer; 0 if none answered."""
  subsets = list(itertools.combinations(range(len(answers)), n))
  total = 0.0
  for sub in subsets:
    votes = Counter(answers[i] for i in sub if answers[i] is not None)
    if not votes:
      continue
    most = max(votes.values())
    picked = [i for i in sub if answers[i] is not None and votes[answers[i]] == most]
    total += sum(correct[i] for i in picked) / len(picked)
  return total / len(subsets)


def random_problem(rng, num):
  """Scores on a coarse grid (many ties, across solutions and aggregations), a few unscored
  steps, answers shared by several candidates with mixed correctness, some abstentions."""
  cands = []
  for _ in range(num):
    k = rng.randint(1, 3)
    scores = [rng.choice([0.25, 0.5, 0.5, 1.0]) for _ in range(k)]
    if rng.random() < 0.1:
      scores[rng.randrange(k)] = None
    cands.append({"steps": [f"s{i}" for i in range(k)], "step_scores": scores, "correct": rng.random() < 0.4,
                  "answer": rng.choice(["7", "8", "9", None])})
  return cands


def test_exact_counting_equals_brute_force_over_all_subsets_with_ties():
  rng = random.Random(0)
  for num in (1, 2, 3, 5, 7, 9):
    for _ in range(6):
      cands = random_problem(rng, num)
      correct = [c["correct"] for c in cands]
      answers = [c["answer"] for c in cands]
      for n in range(1, num + 1):
        for how, fn in AGG.items():
          scores = [None if None in c["step_scores"] else fn(c["step_scores"]) for c in cands]
          assert bon.top_pick_accuracy(scores, correct, n) == pytest.approx(brute_top(scores, correct, n), abs=1e-12)
        assert bon.oracle(correct, n) == pytest.approx(brute_oracle(correct, n), abs=1e-12)
        assert bon.majority(answers, correct, n) == pytest.approx(brute_majority(answers, correct, n), abs=1e-12)


def test_a_tie_on_top_shares_the_pick_and_n_values():
  # two candidates tie on 0.9 (one correct): half a pick; n=2 of {0.9 ok, 0.9 bad, 0.1 ok}
  assert bon.top_pick_accuracy([0.9, 0.9, 0.1], [True, False, True], 1) == pytest.approx(2 / 3)
  assert bon.top_pick_accuracy([0.9, 0.9, 0.1], [True, False, True], 2) == pytest.approx((0.5 + 1 + 0) / 3)
  # unscored (a step did not fit) is never picked: a correct one alone counted as a right pick
  assert bon.top_pick_accuracy([None, None], [True, False], 1) == 0.0
  assert bon.top_pick_accuracy([None, 0.2, None], [True, False, True], 2) == 0.0  # 0.2 is in every pair with a None
  assert bon.top_pick_accuracy([None, 0.2], [True, True], 1) == 0.5
  assert bon.n_values(8) == [1, 2, 4, 8] and bon.n_values(6) == [1, 2, 4, 6] and bon.n_values(1) == [1]
  with pytest.raises(ValueError, match="n=3"):
    bon.oracle([True, False], 3)


def test_rerank_command_matches_brute_force_and_writes_its_files(tmp_path, capsys):
  rng = random.Random(1)
  problems = [{"id": f"p{i}", "problem": f"Problem {i}", "candidates": random_problem(rng, num)}
              for i, num in enumerate([4, 5, 4, 6])]
  lines = [json.dumps(p) for p in problems]
  lines += ["{oops", json.dumps({"problem": "p", "candidates": [{"steps": ["a"], "correct": 1}]}),
            json.dumps({"problem": "p", "candidates": [{"steps": ["a"], "correct": True}]})]  # no step_scores
  inp = tmp_path / "c.jsonl"
  inp.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  assert rerank.main(["--input", str(inp), "--output", str(out)]) == 0
  captured = capsys.readouterr()
  assert "c.jsonl:5: skipped: not valid JSON" in captured.err
  assert "c.jsonl:6: skipped: candidate 0: 'correct' must be true or false" in captured.err
  assert "c.jsonl:7: skipped: candidate 0: no 'step_scores'" in captured.err
  report = json.loads((out / "bon.json").read_text())
  assert report["n"] == [1, 2, 4] and report["problems"] == 4 and report["skipped_lines"] == 3
  for n in (1, 2, 4):
    for how, fn in AGG.items():
      want = np.mean([brute_top([None if None in c["step_scores"] else fn(c["step_scores"]) for c in p["candidates"]],
                                [c["correct"] for c in p["candidates"]], n) for p in problems])
      assert abs(report["accuracy"][how][str(n)] - want) <= 1e-9
    assert abs(report["oracle"][str(n)] - np.mean([brute_oracle([c["correct"] for c in p["candidates"]], n)
                                                    for p in problems])) <= 1e-9
    voting = [p for p in problems if any(c["answer"] for c in p["candidates"])]
    assert abs(report["majority"][str(n)] - np.mean([brute_majority([c["answer"] for c in p["candidates"]],
                                                                    [c["correct"] for c in p["candidates"]], n)
                                                     for p in voting])) <= 1e-9
  scored = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
  assert [p["id"] for p in scored] == ["p0", "p1", "p2", "p3"]
  c0 = problems[0]["candidates"][0]
  assert scored[0]["candidates"][0]["solution_scores"]["min"] == (None if None in c0["step_scores"]
                                                                  else min(c0["step_scores"]))
  assert (out / "bon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "oracle" in captured.out and "majority" in captured.out


def test_without_answers_majority_is_null_and_nothing_readable_is_one_line(tmp_path, capsys):
  inp = tmp_path / "c.jsonl"
  inp.write_text(json.dumps({"problem": "p", "candidates": [{"step_scores": [0.2], "correct": True},
                                                            {"step_scores": [0.7], "correct": False}]}) + "\n")
  report = rerank.rerank(inp, tmp_path / "o")
  assert report["majority"] is None and report["accuracy"]["last"] == {"1": 0.5, "2": 0.0}
  inp.write_text("[1]\n")
  assert rerank.main(["--input", str(inp), "--output", str(tmp_path / "o2")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("rmjax.rerank: error:") and "no problem to rerank" in err[-1]


def test_splitting_and_aggregation():
  assert split_steps("a\n\n b \n\n\n\nc\n") == ["a", "b", "c"]
  assert split_steps("x1\nx2", "\n") == ["x1", "x2"]
  assert aggregate([0.5, 0.25, 1.0], "prod") == 0.125 and aggregate([0.5, 0.25], "last") == 0.25
  assert aggregate([0.5, None], "min") is None and aggregate([], "mean") is None


def test_gsm8k_example_solutions_are_read_as_four_candidates(shared_data):
  path = shared_data / "best_of_n" / "gsm8k_example_model_solutions.subset.jsonl"
  raw = json.loads(path.read_text().splitlines()[0])
  got = rerank.parse_problem(raw, "\n", need_steps=True)
  names = ["6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"]
  assert [c["name"] for c in got["candidates"]] == names
  assert [c["correct"] for c in got["candidates"]] == [raw[k]["is_correct"] for k in names]
  assert got["candidates"][0]["answer"] == "26" and got["candidates"][0]["steps"][-1] == "A: 26"


def test_candidates_python_cannot_decode_are_skipped_lines(tmp_path):
  """A line nested past Python's recursion limit, one with an integer past its digit limit, step
  scores too large for a float, and a NaN are skipped and named, as any malformed line is."""
  path = tmp_path / "c.jsonl"
  good = {"id": "g", "problem": "p", "candidates": [{"steps": ["a"], "step_scores": [0.5], "correct": True}]}
  huge = {"id": "h", "problem": "p", "candidates": [{"steps": ["a"], "step_scores": [10 ** 400], "correct": True}]}
  nan_id = json.dumps(dict(good, id=float("nan")))  # Python writes NaN; JSON has none: the output could not hold it
  path.write_text("\n".join(["[" * 5000 + "]" * 5000, '{"id": ' + "9" * 5000 + "}", json.dumps(huge), nan_id,
                             json.dumps(good)]) + "\n")
  warnings = []
  got = rerank.read_problems(path, "\n", need_steps=False, warn=warnings.append)
  assert [rec["id"] for _, rec in got] == ["g"]
  assert [w.split(": skipped: ")[0] for w in warnings] == [f"{path}:{i}" for i in (1, 2, 3, 4)], warnings
  assert "step_scores" in warnings[2] and "NaN is not a JSON value" in warnings[3]


def test_step_scores_out_of_range_or_per_other_steps_are_skipped_lines(tmp_path, capsys):
  """1e300 and -5 were accepted as step scores (prod wrote `Infinity`, invalid JSON), and a list
  of step_scores of another length than the steps was taken as is; a BOM made line 1 invalid."""
  def problem(pid, *cands):
    return json.dumps({"id": pid, "problem": "p", "candidates": [
      {"steps": steps, "step_scores": scores, "correct": ok} for steps, scores, ok in cands]})
  inp = tmp_path / "c.jsonl"
  lines = [problem("big", (["a"], [1e300], True), (["a"], [0.5], False)),
           problem("neg", (["a"], [0.5], True), (["a"], [-5], False)),
           problem("short", (["a", "b", "c"], [0.1], True), (["a"], [0.9], False)),
           problem("long", (["a"], [0.9, 0.9], True), (["a"], [0.9], False)),
           problem("ok", (["a", "b"], [0.25, None], True), (["a"], [1e-320], False))]
  inp.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
  assert rerank.main(["--input", str(inp), "--output", str(tmp_path / "o")]) == 0
  err = capsys.readouterr().err
  for lineno, why in [(1, "candidate 0: 'step_scores' must be probabilities in [0, 1], got 1e+300"),
                      (2, "candidate 1: 'step_scores' must be probabilities in [0, 1], got -5"),
                      (3, "candidate 0: 1 step_scores for 3 steps"), (4, "candidate 0: 2 step_scores for 1 step")]:
    assert f"c.jsonl:{lineno}: skipped: {why}" in err, err
  report = json.loads((tmp_path / "o" / "bon.json").read_text())
  assert report["problems"] == 1 and report["skipped_lines"] == 4
  json.loads((tmp_path / "o" / "candidates.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_a_problem_with_fewer_candidates_is_named_as_the_limit_of_n(tmp_path, capsys):
  """One problem with 1 candidate beside one with 8 silently cut the table to n = 1."""
  cands = lambda k: [{"steps": ["a"], "step_scores": [i / 8], "correct": i % 2 == 0} for i in range(k)]
  inp = tmp_path / "c.jsonl"
  inp.write_text("\n".join(json.dumps({"id": i, "problem": "p", "candidates": cands(k)})
                           for i, k in [("big", 8), ("small", 1), ("big2", 8)]) + "\n")
  assert rerank.main(["--input", str(inp), "--output", str(tmp_path / "o")]) == 0
  err = capsys.readouterr().err.splitlines()
  assert err == [f"rmjax.rerank: warning: n stops at 1: {inp}:2 (id 'small') has 1 candidate, others up to 8; "
                 "every n is averaged over the same problems, so n is at most the fewest candidates of a problem"]
  assert json.loads((tmp_path / "o" / "bon.json").read_text())["n"] == [1]


def test_a_failed_write_leaves_the_earlier_result_whole(tmp_path, capsys, monkeypatch):
  """A full disk while writing bon.png used to leave a new candidates.jsonl and bon.json beside
  the old plot (and, earlier in the order, a cut candidates.jsonl beside an old bon.json)."""
  import errno
  out = tmp_path / "o"
  out.mkdir()
  for name in ("bon.json", "candidates.jsonl", "bon.png"):
    (out / name).write_text(f"old {name}\n")
  inp = tmp_path / "c.jsonl"
  inp.write_text(json.dumps({"problem": "p", "candidates": [{"step_scores": [0.2], "correct": True}]}) + "\n")

  def full(report, path):
    path.write_bytes(b"\x89PNG")
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(rerank, "bon_plot", full)
  assert rerank.main(["--input", str(inp), "--output", str(out)]) == 2
  assert capsys.readouterr().err == f"rmjax.rerank: error: cannot write {out / 'bon.png'}: No space left on device\n"
  assert sorted((p.name, p.read_text()) for p in out.iterdir()) == [
    ("bon.json", "old bon.json\n"), ("bon.png", "old bon.png\n"), ("candidates.jsonl", "old candidates.jsonl\n")]


def test_crlf_and_whitespace_only_lines_separate_steps():
  """"a\\r\\n\\r\\nb" (Windows line endings) was one step, and so was "a\\n  \\nb" (a blank line with
  spaces on it)."""
  assert split_steps("a\r\n\r\nb\r\n\r\nc") == ["a", "b", "c"]
  assert split_steps("a\n  \nb\n\t\n\nc") == ["a", "b", "c"]
  assert split_steps("a\r\nb\rc", "\n") == ["a", "b", "c"] and split_steps("a\nb", "\r\n") == ["a", "b"]
  assert split_steps("x\n  y\n\nz") == ["x\n  y", "z"]  # indentation inside a step stays
