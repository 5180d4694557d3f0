"""`python -m rmjax.score`: input validation, pass-through keys, truncation nulls, batching."""

import json
import pathlib

import numpy as np
import pytest

import _tiny_run as R
from rmjax import score


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  d = tmp_path_factory.mktemp("score")
  R.make_run(d / "run", R.make_base(d / "base"), mode="lora")
  return d / "run"


def _score(run, tmp_path, lines, *extra):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  inp.write_text("\n".join(lines) + "\n")
  rc = score.main(["--checkpoint", str(run), "--input", str(inp), "--output", str(out), *extra])
  return rc, [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else None


def test_malformed_lines_are_reported_with_line_numbers_and_skipped(run, tmp_path, capsys):
  good = {"problem": "Compute 1 + 2.", "steps": ["1 + 2 = 3", "The answer is 3."], "id": 7, "extra": [1, {"a": 2}]}
  lines = [json.dumps(good), "{not json", "[1, 2]", json.dumps({"steps": ["x"]}),
           json.dumps({"problem": "p", "steps": "one step"}), "", json.dumps({"problem": "p", "steps": ["a", 3]}),
           json.dumps({"problem": "Compute 2 * 2.", "steps": []})]
  rc, rows = _score(run, tmp_path, lines)
  err = capsys.readouterr().err
  assert rc == 0
  for lineno, reason in [(2, "not valid JSON"), (3, "expected a JSON object"), (4, "'problem' must be a string"),
                         (5, "'steps' must be a list"), (7, "'steps' must be a list")]:
    assert f"in.jsonl:{lineno}: skipped: {reason}" in err
  assert "in.jsonl:1:" not in err and "skipped 5 malformed" in err
  assert len(rows) == 2
  assert {k: rows[0][k] for k in good} == good  # other keys pass through unchanged
  assert len(rows[0]["step_scores"]) == 2 and all(0.0 <= s <= 1.0 for s in rows[0]["step_scores"])
  assert rows[1]["step_scores"] == []
  assert "input_ids" not in rows[0] and "marker_positions" not in rows[0]


def test_steps_that_do_not_fit_get_null_and_a_warning(run, tmp_path, capsys):
  long_step = "We subtract the second number from the first and check each step carefully. " * 4
  rec = {"problem": "Compute the value of the expression.", "steps": [long_step] * 8}
  first_too_long = {"problem": "Problem " * 400, "steps": ["a", "b"]}
  rc, rows = _score(run, tmp_path, [json.dumps(rec), json.dumps(first_too_long)], "--with-tokens")
  err = capsys.readouterr().err
  assert rc == 0
  scores = rows[0]["step_scores"]
  kept = sum(s is not None for s in scores)
  assert 0 < kept < 8 and scores[kept:] == [None] * (8 - kept) and None not in scores[:kept]
  assert len(rows[0]["input_ids"]) <= R.RENDER.max_length and len(rows[0]["marker_positions"]) == kept
  assert rows[1]["step_scores"] == [None, None] and rows[1]["input_ids"] == []
  assert f"in.jsonl:1: {8 - kept} of 8 steps do not fit" in err and "in.jsonl:2: 2 of 2 steps" in err


def test_with_tokens_and_batch_size_do_not_change_scores(run, tmp_path):
  recs = [{"problem": f"Compute {a} + {b}.", "steps": [f"{a} + {b} = {a + b}", "The answer is."][: 1 + a % 2]}
          for a, b in [(1, 2), (13, 40), (7, 7), (99, 1), (5, 60)]]
  lines = [json.dumps(r) for r in recs]
  _, one = _score(run, tmp_path, lines, "--batch-size", "1", "--with-tokens")
  _, three = _score(run, tmp_path, lines, "--batch-size", "3")
  marker = R.build_demo_tokenizer(vocab_size=R.VOCAB - 16).convert_tokens_to_ids("<CONFIDENCE>")
  for a, b, r in zip(one, three, recs):
    assert len(a["step_scores"]) == len(r["steps"])
    np.testing.assert_allclose(a["step_scores"], b["step_scores"], atol=1e-5)
    ids = np.asarray(a["input_ids"])
    assert ids[a["marker_positions"]].tolist() == [marker] * len(r["steps"])
    assert int(np.sum(ids == marker)) == len(r["steps"])


def test_a_pipe_is_scored_like_the_file_it_carries(run, tmp_path):
  """`--input <(zcat x.jsonl.gz)` names a pipe, which can be read once: it was refused as "not
  found" (not a regular file). /dev/null, a character device, is accepted as an empty input
  (the null device only: other character devices, such as /dev/zero, are refused)."""
  import os
  import threading
  lines = [json.dumps({"problem": f"Compute {a} + 1.", "steps": [f"{a} + 1 = {a + 1}"]}) for a in range(3)]
  _, from_file = _score(run, tmp_path, lines)
  fifo, out = tmp_path / "pipe", tmp_path / "from_pipe.jsonl"
  os.mkfifo(fifo)
  writer = threading.Thread(target=lambda: fifo.write_text("\n".join(lines) + "\n"))
  writer.start()
  try:
    assert score.main(["--checkpoint", str(run), "--input", str(fifo), "--output", str(out)]) == 0
  finally:
    writer.join(timeout=60)
  assert [json.loads(x) for x in out.read_text().splitlines()] == from_file
  assert score.main(["--checkpoint", str(run), "--input", os.devnull, "--output", str(out)]) == 0
  assert out.read_text() == ""



def test_output_to_a_pipe_or_stdout_is_streamed(run, tmp_path, capfd):
  """`--output >(gzip > x.gz)` names /dev/fd/N, which resolves to no path: the write failed with
  "No such file or directory". `--output -` wrote a file named "-"; it is stdout."""
  import os
  import threading
  lines = [json.dumps({"problem": f"Compute {a} + 1.", "steps": [f"{a} + 1 = {a + 1}"]}) for a in range(3)]
  _, from_file = _score(run, tmp_path, lines)
  fifo, got = tmp_path / "out_pipe", []
  os.mkfifo(fifo)
  reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
  reader.start()
  try:
    assert score.main(["--checkpoint", str(run), "--input", str(tmp_path / "in.jsonl"), "--output", str(fifo)]) == 0
  finally:
    reader.join(timeout=60)
  assert [json.loads(x) for x in got[0].splitlines()] == from_file
  capfd.readouterr()
  assert score.main(["--checkpoint", str(run), "--input", str(tmp_path / "in.jsonl"), "--output", "-"]) == 0
  assert [json.loads(x) for x in capfd.readouterr().out.splitlines()] == from_file
  assert not (pathlib.Path.cwd() / "-").exists()


def test_bad_arguments_are_one_line_errors(run, tmp_path, capsys):
  assert score.main(["--checkpoint", str(tmp_path / "none"), "--input", str(tmp_path / "x"),
                     "--output", str(tmp_path / "o")]) == 2
  assert capsys.readouterr().err.count("\n") == 1
  (tmp_path / "in.jsonl").write_text("{}\n")
  assert score.main(["--checkpoint", str(run), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "o"), "--batch-size", "0"]) == 2
  assert "--batch-size must be >= 1" in capsys.readouterr().err
  # a directory as --input, a run dir without checkpoints, a folder inside an export
  assert score.main(["--checkpoint", str(run), "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
  assert capsys.readouterr().err == f"rmjax.score: error: --input {tmp_path} is a directory; give a JSON Lines file\n"
  (tmp_path / "empty").mkdir()
  assert score.main(["--checkpoint", str(tmp_path / "empty"), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.strip().endswith("nor a checkpoint_step_<N> directory, nor an export "
                                                       "directory (rmjax_export.json)"), err
  (tmp_path / "export" / "backbone").mkdir(parents=True)
  (tmp_path / "export" / "rmjax_export.json").write_text("{}")
  assert score.main(["--checkpoint", str(tmp_path / "export" / "backbone"), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "o")]) == 2
  assert "is a folder of the export" in capsys.readouterr().err
  # --output naming the --input file (however spelled) is refused before anything is written
  text = (tmp_path / "in.jsonl").read_text()
  for same in (tmp_path / "in.jsonl", tmp_path / "export" / ".." / "in.jsonl"):
    assert score.main(["--checkpoint", str(run), "--input", str(tmp_path / "in.jsonl"), "--output", str(same)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the --input file" in err
  assert (tmp_path / "in.jsonl").read_text() == text


def test_lines_python_cannot_decode_are_reasons_not_tracebacks(tmp_path):
  """JSON nested past Python's recursion limit, and an integer past its digit limit, are
  malformed lines like any other (json.loads raises RecursionError / ValueError for them), as are
  NaN, Infinity and 1e999, which Python reads but JSON cannot write (an "id": NaN passed through
  made the output invalid JSON); a run's or export's JSON file nested so deep is a ValueError
  naming the file."""
  from rmjax import cli
  record = '{"problem": "p", "steps": ["a"], "x": %s}'
  for line in ("[" * 5000 + "]" * 5000, record % ("9" * 5000), record % "NaN", record % "-Infinity",
               record % "1e999", record % "[0.5, 2e400]"):
    reason = score.parse_line(line, 1)
    assert isinstance(reason, str) and reason.startswith("not valid JSON"), reason
  assert score.parse_line(record % "[0.5, 1e-400, 1e308]", 1).obj["x"] == [0.5, 0.0, 1e308]
  (tmp_path / "deep.json").write_text("[" * 5000 + "]" * 5000)
  with pytest.raises(ValueError, match="deep.json is not valid JSON: .*nested too deeply"):
    cli.read_json_object(tmp_path / "deep.json")


def test_text_is_split_into_steps_and_aggregated_like_the_same_steps(run, tmp_path):
  steps = ["2 + 3 = 5", "5 - 1 = 4", "The answer is 4."]
  as_steps = {"problem": "Compute 2 + 3 - 1.", "steps": steps}
  as_text = {"problem": "Compute 2 + 3 - 1.", "text": "\n\n".join(steps) + "\n\n\n", "id": "t"}
  as_lines = {"problem": "Compute 2 + 3 - 1.", "text": "\n".join(steps)}
  _, rows = _score(run, tmp_path, [json.dumps(as_steps), json.dumps(as_text)], "--aggregate", "min")
  _, lines = _score(run, tmp_path, [json.dumps(as_lines)], "--aggregate", "prod", "--step-separator", "\\n")
  assert rows[1]["steps"] == steps and lines[0]["steps"] == steps and rows[1]["id"] == "t"
  np.testing.assert_allclose(rows[1]["step_scores"], rows[0]["step_scores"], atol=1e-6)
  np.testing.assert_allclose(lines[0]["step_scores"], rows[0]["step_scores"], atol=1e-6)
  assert rows[0]["solution_score"] == min(rows[0]["step_scores"])
  assert lines[0]["solution_score"] == pytest.approx(float(np.prod(lines[0]["step_scores"])), rel=1e-12)


def test_rerank_scores_real_gsm8k_candidates_with_the_checkpoint(run, tmp_path, shared_data):
  from rmjax import rerank
  from test_rerank import brute_oracle, brute_top
  src = (shared_data / "best_of_n" / "gsm8k_example_model_solutions.subset.jsonl").read_text().splitlines()[:3]
  (tmp_path / "c.jsonl").write_text("\n".join(src) + "\n")
  assert rerank.main(["--checkpoint", str(run), "--input", str(tmp_path / "c.jsonl"), "--output",
                      str(tmp_path / "o"), "--step-separator", "\\n", "--max-length", "1024"]) == 0
  report = json.loads((tmp_path / "o" / "bon.json").read_text())
  scored = [json.loads(x) for x in (tmp_path / "o" / "candidates.jsonl").read_text().splitlines()]
  originals = [json.loads(x) for x in src]
  for p, raw in zip(scored, originals):
    correct = [c["correct"] for c in p["candidates"]]
    assert correct == [raw[c["name"]]["is_correct"] for c in p["candidates"]]
    for c in p["candidates"]:
      assert len(c["step_scores"]) == len(raw[c["name"]]["solution"].splitlines())
  assert report["unscored_steps"] == 0
  for n in (1, 2, 4):
    mins = [[min(c["step_scores"]) for c in p["candidates"]] for p in scored]
    want = np.mean([brute_top(m, [c["correct"] for c in p["candidates"]], n) for m, p in zip(mins, scored)])
    assert abs(report["accuracy"]["min"][str(n)] - want) <= 1e-9
    want = np.mean([brute_oracle([r[k]["is_correct"] for k in ("6b_finetuning", "6b_verification", "175b_finetuning",
                                                               "175b_verification")], n) for r in originals])
    assert abs(report["oracle"][str(n)] - want) <= 1e-9


def test_rerank_names_the_problems_whose_steps_do_not_fit_and_never_picks_them(run, tmp_path, capsys):
  """README: a step that does not fit "is reported by count and sample id and never counts as
  correct". The warning gave the count only, and a problem whose candidates were all unscored
  shared the pick among them, counting a correct one half right. SYNTHETIC candidates."""
  from rmjax import rerank
  long = "Problem " * 200  # past the run's max_length with any step
  problems = [{"id": "long", "problem": long, "candidates": [{"steps": ["1 + 1 = 2"], "answer": "2", "correct": True},
                                                              {"steps": ["1 + 1 = 3"], "answer": "3", "correct": False}]},
              {"id": "short", "problem": "Compute 1 + 1.",
               "candidates": [{"steps": ["1 + 1 = 2"], "answer": "2", "correct": True},
                              {"steps": ["1 + 1 = 2"], "answer": "2", "correct": True}]}]
  (tmp_path / "c.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
  assert rerank.main(["--checkpoint", str(run), "--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "o")]) == 0
  err = capsys.readouterr().err
  assert "2 steps do not fit in max_length, in problems long (their candidates" in err, err
  report = json.loads((tmp_path / "o" / "bon.json").read_text())
  assert report["unscored_steps"] == 2 and report["accuracy"]["min"]["1"] == 0.5  # "short" right, "long" no pick


def test_bench_score_times_both_paths_on_the_same_solutions(run, tmp_path, capsys):
  from rmjax import export
  from rmjax.bench import score as bench_score
  assert export.main(["--checkpoint", str(run), "--output", str(tmp_path / "export")]) == 0
  recs = [{"problem": f"Compute {a} * 3.", "steps": [f"{a} * 3 = {3 * a}", "So it is that."][: 1 + a % 2]}
          for a in range(7)]
  (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
  capsys.readouterr()
  assert bench_score.main(["--checkpoint", str(run), "--export", str(tmp_path / "export"), "--input",
                           str(tmp_path / "in.jsonl"), "--batch-size", "4", "--repeat", "1"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["solutions"] == 7 and result["scored_steps_compared"] == result["steps"] == 10
  assert result["scored_by_one_path_only"] == 0
  assert result["max_abs_score_diff"] < 1e-4  # the two paths give the same scores
  for impl in ("rmjax", "torch"):
    assert result[impl]["solutions_per_s"] > 0
  assert result["ratio"] == pytest.approx(result["rmjax"]["solutions_per_s"] / result["torch"]["solutions_per_s"])


def _failing_open(monkeypatch, fail_on: str, after: int = 1):
  """tool_files' open, whose files named `fail_on` raise ENOSPC on the write after `after` writes:
  a disk that fills while the output is written."""
  import builtins
  import errno
  from rmjax import tool_files

  class Full:
    def __init__(self, fh):
      self.fh, self.writes = fh, 0

    def write(self, text):
      self.writes += 1
      if self.writes > after:
        raise OSError(errno.ENOSPC, "No space left on device")
      return self.fh.write(text)

    def close(self):
      self.fh.close()

  def fake_open(path, *args, **kwargs):
    fh = builtins.open(path, *args, **kwargs)
    return Full(fh) if fail_on in str(path) else fh
  monkeypatch.setattr(tool_files, "open", fake_open, raising=False)


def test_a_failed_or_interrupted_score_leaves_the_earlier_output_and_names_it(run, tmp_path, capsys, monkeypatch):
  """A full disk half-way used to leave --output cut mid-line ("[Errno 28] ..." naming no path),
  and Ctrl-C a 41-line traceback and a partial file that looked complete: now one line naming
  --output, which keeps what it held, and no temporary file is left."""
  lines = [json.dumps({"problem": f"Compute {a} + 1.", "steps": [f"{a} + 1 = {a + 1}"]}) for a in range(3)]
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  inp.write_text("\n".join(lines) + "\n")
  out.write_text("earlier\n")
  args = ["--checkpoint", str(run), "--input", str(inp), "--output", str(out)]
  with monkeypatch.context() as m:
    _failing_open(m, "out.jsonl")
    assert score.main(args) == 2
  err = capsys.readouterr().err
  assert err.endswith(f"rmjax.score: error: cannot write {out}: No space left on device\n"), err
  assert out.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
  calls = []

  def interrupt(*a, **k):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*a, **k)
  real = score.output_record
  monkeypatch.setattr(score, "output_record", interrupt)
  assert score.main(args) == 130
  assert capsys.readouterr().err == ("rmjax.score: interrupted (Ctrl-C); its results were not written, earlier ones "
                                     "are as they were\n")
  assert out.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_only_files_and_pipes_are_read_and_lines_are_bounded(run, tmp_path, capsys, monkeypatch):
  """/dev/zero was read forever (one endless line in memory), a symlink loop was "not found",
  a line longer than the limit was read whole, and a byte order mark made line 1 invalid JSON."""
  import os
  from rmjax import tool_files
  out = tmp_path / "o.jsonl"
  assert score.main(["--checkpoint", str(run), "--input", "/dev/zero", "--output", str(out)]) == 2
  assert capsys.readouterr().err == ("rmjax.score: error: --input /dev/zero is a character device, "
                                     "not a file or a pipe\n")
  os.symlink("loop1", tmp_path / "loop1")
  assert score.main(["--checkpoint", str(run), "--input", str(tmp_path / "loop1"), "--output", str(out)]) == 2
  assert "loop1 is a symlink loop" in capsys.readouterr().err and not out.exists()
  monkeypatch.setattr(tool_files, "MAX_LINE_BYTES", 200)
  good = json.dumps({"problem": "Compute 1 + 2.", "steps": ["1 + 2 = 3"]})
  long = json.dumps({"problem": "x" * 300, "steps": ["a"]})
  inp = tmp_path / "in.jsonl"
  inp.write_bytes(b"\xef\xbb\xbf" + f"{good}\n{long}\n{good}\n".encode())
  assert score.main(["--checkpoint", str(run), "--input", str(inp), "--output", str(out)]) == 0
  err = capsys.readouterr().err
  assert f"{inp}:2: skipped: line longer than 200 bytes" in err and "in.jsonl:1" not in err
  assert "skipped 1 malformed" in err and len(out.read_text().splitlines()) == 2
