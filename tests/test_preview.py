"""The preview CLI as a user runs it: a subprocess, JSON lines on stdout, skip summary on stderr."""

import json
import pathlib
import subprocess
import sys

from test_readers_eqasc import real_questions

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "SYNTHETIC_reveal_eval.csv"


def run(*args):
  return subprocess.run([sys.executable, "-m", "rmjax.data.preview", *map(str, args)],
                        capture_output=True, text=True, timeout=120)


def test_prm800k_directory_with_phase_and_limit(shared_data, tmp_path):
  (tmp_path / "data").mkdir()
  src = (shared_data / "prm800k" / "openr_samples_prm800k.jsonl").read_text()
  (tmp_path / "data" / "phase1_train.jsonl").write_text(src + "not json\n")
  proc = run("--source", "prm800k", "--path", tmp_path, "--split", "train", "--phase", 1)
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [r["id"] for r in rows] == [f"phase1_train:{i}" for i in range(1, 7)]
  assert all(set(r) == {"source", "id", "problem", "steps", "targets"} for r in rows)
  assert rows[1]["targets"] == [1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.0]  # the cc88bf76 phase-2 record
  assert '"bad_json": 1' in proc.stderr
  limited = run("--source", "prm800k", "--path", tmp_path / "data" / "phase1_train.jsonl", "--limit", 2)
  assert len(limited.stdout.splitlines()) == 2


def test_eqasc_and_reveal(shared_data, tmp_path):
  (tmp_path / "eqasc_dev_grc.json").write_text(json.dumps(real_questions(shared_data)))
  proc = run("--source", "eqasc", "--path", tmp_path, "--split", "dev", "--set", "label_all_steps=true")
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert len(rows) == 20 and rows[0]["id"] == "3X4JMASXCM8FCX94IM0KEMYGMLZ0BD_1_1"
  assert rows[0]["targets"] == [0.0, 0.0]
  proc = run("--source", "reveal", "--path", FIXTURE, "--set", "label=both")
  assert [json.loads(line)["targets"] for line in proc.stdout.splitlines()] == [
      [1.0, 1.0, 1.0], [0.0, None], [0.0, 0.0, None, 1.0]]
  assert '"no_supervised_step": 1' in proc.stderr


def test_errors_are_one_line_exit_2(tmp_path):
  for args in (["--source", "prm800k", "--path", tmp_path / "missing"],
               ["--source", "eqasc", "--path", tmp_path, "--split", "nope"],
               ["--source", "reveal", "--path", FIXTURE, "--set", "label=wrong"],
               ["--source", "reveal", "--path", FIXTURE, "--strict"],
               ["--source", "prm800k", "--path", FIXTURE, "--set", "neutral_targt=0.0"],  # misspelt
               ["--source", "unknown", "--path", tmp_path]):
    proc = run(*args)
    assert proc.returncode == 2, (args, proc.stderr)
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("rmjax.data.preview: error:")


def test_output_piped_into_a_reader_that_stops_early_exits_quietly(shared_data, tmp_path):
  """`preview ... | head -1`: a closed pipe ends the preview with status 0 and no error."""
  big = tmp_path / "many.jsonl"
  big.write_text((shared_data / "prm800k" / "prm800k_unique_records.jsonl").read_text() * 100)
  proc = subprocess.Popen([sys.executable, "-m", "rmjax.data.preview", "--source", "prm800k", "--path", str(big)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert json.loads(proc.stdout.readline())["id"] == "many:1"
  proc.stdout.close()
  assert proc.wait(timeout=120) == 0
  assert proc.stderr.read() == ""


def test_build_source_from_configdict(shared_data, tmp_path):
  import ml_collections
  import pytest
  from rmjax.data.example import SkipCounter
  from rmjax.data.sources import READER_KEYS, build_source
  (tmp_path / "phase2_test.jsonl").write_text((shared_data / "prm800k" / "openr_samples_prm800k.jsonl").read_text())
  cfg = ml_collections.ConfigDict({"reader": "prm800k", "path": str(tmp_path), "phase": 2,
                                   "neutral_target": 0.0, "weight": 3.0})
  skips = SkipCounter()
  src = build_source("prm_p2", cfg, split="test", skips=skips)
  assert src.skips is skips and src[1].source == "prm_p2" and src[1].targets[1] == 0.0
  assert "neutral_target" in READER_KEYS["prm800k"] and "label" in READER_KEYS["reveal"]
  with pytest.raises(ValueError, match="unknown reader 'csv'"):
    build_source("x", {"reader": "csv", "path": str(tmp_path)})
  with pytest.raises(ValueError, match="no path configured"):
    build_source("eqasc", {})
  with pytest.raises(ValueError, match="phase should be 1 or 2"):
    build_source("prm800k", {"path": str(tmp_path), "phase": "two"}, split="test")


def test_a_directory_without_a_split_and_a_file_of_another_format_say_what_to_do(shared_data, tmp_path):
  proc = run("--source", "eqasc", "--path", tmp_path)
  assert proc.returncode == 2 and proc.stderr == (
    f"rmjax.data.preview: error: eqasc: {str(tmp_path)!r} is a directory; name the split to read (one of ['train', 'dev', "
    f"'test']), or give the file itself\n")
  (tmp_path / "labels.json").write_text('{"chain": 1}')  # valid JSON, but no array of questions
  proc = run("--source", "eqasc", "--path", tmp_path / "labels.json")
  assert proc.returncode == 0 and proc.stdout == ""
  assert '"not_a_json_array": 1' in proc.stderr
  assert "reads as eqasc (one JSON array of questions); is --source right for this file?" in proc.stderr
  proc = run("--source", "prm800k", "--path", FIXTURE)  # a CSV read as JSON Lines
  assert "reads as prm800k (JSON Lines, one labelled solution per line)" in proc.stderr
  proc = run("--source", "reveal", "--path", FIXTURE)  # the right source: no hint
  assert proc.stdout and "is --source right" not in proc.stderr


def _in_process(capsys, *args):
  """preview.main in this process (fast): (exit code, stderr); argparse's exits are caught."""
  from rmjax.data import preview
  try:
    code = preview.main([str(a) for a in args])
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


def test_paths_that_are_no_file_say_what_they_are(tmp_path, capsys):
  """/dev/zero, a FIFO and a symlink loop exist: the error names what each is (never "does not
  exist") and nothing is read from them (a FIFO would block, /dev/zero never end)."""
  import os
  os.mkfifo(tmp_path / "fifo.jsonl")
  os.symlink(tmp_path / "loop2", tmp_path / "loop1")
  os.symlink(tmp_path / "loop1", tmp_path / "loop2")
  for source in ("stepwise", "prm800k", "eqasc", "reveal"):  # field readers, and the built-in three
    for path, kind in (("/dev/zero", "a character device"), (tmp_path / "fifo.jsonl", "a FIFO"),
                       (tmp_path / "loop1", "a symlink loop")):
      code, err = _in_process(capsys, "--source", source, "--path", path)
      assert code == 2 and err.startswith(f"rmjax.data.preview: error: {source}: path {str(path)!r} is {kind}") \
        and err.count("\n") == 1, err
    code, err = _in_process(capsys, "--source", source, "--path", tmp_path / "missing.jsonl")
    assert code == 2 and "does not exist" in err
  (tmp_path / "prm" / "phase2_train.jsonl").mkdir(parents=True)  # a folder named like the split's file
  code, err = _in_process(capsys, "--source", "prm800k", "--path", tmp_path / "prm", "--split", "train")
  assert code == 2 and err.endswith("phase2_train.jsonl' is a directory, not a data file\n"), err


def test_flags_that_would_be_ignored_or_overridden_are_refused(tmp_path, capsys):
  """--set reader (or path, split, phase) would silently replace what the flag says; --phase is
  for a PRM800K directory (ignored with a file), 1 or 2; --limit below 0 printed nothing."""
  rows = tmp_path / "rows.jsonl"  # SYNTHETIC stepwise rows
  rows.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "labels": [True, False]}) + "\n")
  assert _in_process(capsys, "--source", "stepwise", "--path", rows)[0] == 0
  for args, words in ((["--set", "reader=prm800k"], "--set reader: --source sets it here"),
                      (["--set", "path=/elsewhere"], "--set path: --path sets it here"),
                      (["--limit", "-1"], "argument --limit: expected 0 or more"),
                      (["--phase", "2"], "only --source prm800k has phases"),
                      (["--source", "prm800k", "--phase", "1"], f"{rows} is a regular file (a file is read as it is"),
                      (["--source", "prm800k", "--phase", "3"], "argument --phase: invalid choice: 3")):
    source = [] if "--source" in args else ["--source", "stepwise"]
    code, err = _in_process(capsys, *source, "--path", rows, *args)
    assert code == 2 and err.startswith("rmjax.data.preview: error: ") and err.count("\n") == 1, (args, err)
    assert words in err, (args, err)
