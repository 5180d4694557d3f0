"""The SYNTHETIC PRM800K generator: deterministic, real raw layout, labels that match arithmetic."""

import json
import pathlib
import re

import numpy as np
import pytest

from rmjax.data.render import RenderConfig, Renderer
from rmjax.data.synthetic import (SYNTHETIC_LABELER, make_record, write_synthetic_prm800k,
                                  write_synthetic_prm800k_dir)
from rmjax.tokenizer import build_demo_tokenizer

_STEP = re.compile(r"^(\d+) ([+-]) (\d+) = (-?\d+)$")


def _is_correct(text: str) -> bool:
  """Our own check of a step, independent of the generator: does the arithmetic hold?"""
  if text.startswith("# Answer") or not _STEP.match(text):
    return True  # answer / filler steps
  a, op, b, c = _STEP.match(text).groups()
  return (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)


def _chosen_trajectory(rec):
  """Minimal phase-2 parse: (text, rating) per labelled step, the error step's -1 completion."""
  out = []
  for step in rec["label"]["steps"]:
    if step["chosen_completion"] is None:
      comp = next(c for c in step["completions"] if c["rating"] == -1)
    else:
      comp = step["completions"][step["chosen_completion"]]
    out.append((comp["text"], comp["rating"]))
  return out


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
  a = write_synthetic_prm800k(str(tmp_path / "a.jsonl"), 50, seed=3)
  b = write_synthetic_prm800k(str(tmp_path / "b.jsonl"), 50, seed=3)
  c = write_synthetic_prm800k(str(tmp_path / "c.jsonl"), 50, seed=4)
  assert open(a, "rb").read() == open(b, "rb").read() != open(c, "rb").read()
  assert make_record(7, 3) == json.loads(open(a).read().splitlines()[7])  # record i depends on (i, seed)


def test_layout_matches_a_real_phase2_record(shared_data):
  real = [json.loads(line) for line in open(shared_data / "prm800k" / "openr_samples_prm800k.jsonl")]
  real2 = next(r for r in real if r["generation"] is not None)
  ours = make_record(0, 0)
  assert list(ours) == list(real2)
  assert list(ours["question"]) == list(real2["question"])
  assert list(ours["label"]) == list(real2["label"])
  assert list(ours["label"]["steps"][0]) == list(real2["label"]["steps"][0])
  assert list(ours["label"]["steps"][0]["completions"][0]) == list(real2["label"]["steps"][0]["completions"][0])
  assert ours["labeler"] == SYNTHETIC_LABELER == "synthetic-rmjax"
  line = json.dumps(ours)
  assert json.dumps(json.loads(line)) == line


def test_labels_match_the_arithmetic_and_phase2_error_conventions():
  n_err = n_neg = n_pos = n_neutral = 0
  for i in range(400):
    rec = make_record(i, seed=11)
    traj = _chosen_trajectory(rec)
    finish = rec["label"]["finish_reason"]
    for text, rating in traj:
      if rating == 0:
        n_neutral += 1
        continue
      assert (rating == 1) == _is_correct(text), text
      n_pos += rating == 1
      n_neg += rating == -1
    last = rec["label"]["steps"][-1]
    if finish == "found_error":
      n_err += 1
      assert last["chosen_completion"] is None and traj[-1][1] == -1
      assert all(r != -1 for _, r in traj[:-1])
    else:
      assert finish == "solution" and traj[-1][0].startswith("# Answer")
      assert all(r != -1 for _, r in traj)
  assert 150 < n_err < 250 and n_neg == n_err and n_pos > 2 * n_neg and n_neutral > 10


def test_the_real_prm800k_reader_reads_it(tmp_path):
  prm800k = pytest.importorskip("rmjax.data.prm800k")
  from rmjax.data.example import SkipCounter
  write_synthetic_prm800k_dir(str(tmp_path), 200, 20, seed=5)
  skips = SkipCounter()
  reader = prm800k.Prm800kReader(str(tmp_path), split="train", phase=2, skips=skips)
  examples = [reader[i] for i in range(len(reader))]
  assert len(examples) == 200 and skips.total() == 0
  for ex, line in zip(examples, open(tmp_path / "phase2_train.jsonl")):
    traj = _chosen_trajectory(json.loads(line))
    assert list(ex.steps) == [t for t, _ in traj]
    assert list(ex.targets) == [{1: 1.0, -1: 0.0, 0: 0.5}[r] for _, r in traj]
  assert len(prm800k.Prm800kReader(str(tmp_path), split="test", phase=2)) == 20


def test_sequences_are_short_for_the_demo_tokenizer():
  render = Renderer(build_demo_tokenizer(), RenderConfig(max_length=256, length_buckets=(256,)))
  from rmjax.data.example import Example
  lengths = []
  for i in range(200):
    traj = _chosen_trajectory(make_record(i, 0))
    ex = Example("s", str(i), make_record(i, 0)["question"]["problem"], tuple(t for t, _ in traj),
                 tuple(1.0 for _ in traj))
    lengths.append(len(render(ex)))
  assert 15 <= np.min(lengths) and np.max(lengths) <= 110 and 25 <= np.mean(lengths) <= 80


def test_build_source_and_the_pipeline_take_the_synthetic_directory(tmp_path):
  sources = pytest.importorskip("rmjax.data.sources")
  from rmjax.data.pipeline import PipelineConfig, eval_datasets, train_dataset
  write_synthetic_prm800k_dir(str(tmp_path), 40, 9, seed=2)
  tok = build_demo_tokenizer()
  render = RenderConfig(max_length=128, max_steps_per_example=6, length_buckets=(64, 128))
  train = sources.build_source("prm800k", {"path": str(tmp_path), "phase": 2}, split="train")
  test = sources.build_source("prm800k", {"path": str(tmp_path), "phase": 2}, split="test")
  batch = next(iter(train_dataset({"prm800k": (train, 1.0)}, render, tok, PipelineConfig(),
                                  seed=0, global_batch=8)))
  assert batch["input_ids"].shape == (8, 64) and batch["target_mask"].sum() >= 8
  ev = list(eval_datasets({"prm800k": test}, render, tok, PipelineConfig(eval_batch_size=4))["prm800k"])
  ids = [i for b in ev for i in b["example_ids"].tolist() if i]
  assert ids == [f"phase2_test:{k}" for k in range(1, 10)]


def test_step_padding_from_the_spec_reaches_every_arithmetic_step():
  """data.synthetic.step_padding (what gpu_checks.sh's spec loops set for real-length steps)
  goes from the spec to the generator, and each arithmetic step, wrong or right, ends with it."""
  from rmjax import spec as spec_lib
  from rmjax.train import build
  spec = spec_lib.load_spec_file(str(pathlib.Path(__file__).resolve().parents[1] / "specs" / "demo.py"))
  spec.data.synthetic.step_padding = ", so this is the running total."
  cfg, _, _ = build.synthetic_config(spec)
  texts = [c["text"] for i in range(40) for s in make_record(i, 0, cfg)["label"]["steps"] for c in s["completions"]]
  arithmetic = [t for t in texts if _STEP.match(t.removesuffix(cfg.step_padding))]
  assert len(arithmetic) > 40 and all(t.endswith(", so this is the running total.") for t in arithmetic)


def test_records_kept_with_their_settings_and_other_settings_stop_in_one_line(tmp_path):
  """A run's synthetic records are written once; a resume whose spec asks for other records
  (generator settings, counts or seed) stops naming what differs, and nothing is rewritten."""
  from rmjax.data.synthetic import SyntheticConfig
  from rmjax.spec import SpecError
  from rmjax.train import build
  data = tmp_path / "data"
  build.ensure_synthetic_prm800k(data, 0, SyntheticConfig(max_ops=4), 30, 5)
  written = {p.name: p.read_bytes() for p in data.iterdir()}
  assert set(written) == {"phase2_train.jsonl", "phase2_test.jsonl", build.SYNTHETIC_SETTINGS}
  build.ensure_synthetic_prm800k(data, 0, SyntheticConfig(max_ops=4), 30, 5)  # the same: read as they are
  for args, named in (((0, SyntheticConfig(max_ops=6), 30, 5), "data.synthetic.max_ops 4 (this spec: 6)"),
                      ((1, SyntheticConfig(max_ops=4), 30, 5), "seed 0 (this spec: 1)"),
                      ((0, SyntheticConfig(max_ops=4), 40, 5), "data.synthetic.train_records 30 (this spec: 40)")):
    with pytest.raises(SpecError) as e:
      build.ensure_synthetic_prm800k(data, *args)
    assert named in str(e.value) and "\n" not in str(e.value)
  assert {p.name: p.read_bytes() for p in data.iterdir()} == written
  # records from before the settings were kept are read as they are, and stay unstamped
  (data / build.SYNTHETIC_SETTINGS).unlink()
  build.ensure_synthetic_prm800k(data, 0, SyntheticConfig(max_ops=6), 30, 5)
  assert not (data / build.SYNTHETIC_SETTINGS).exists()
  # records deleted, their settings left behind: written afresh, with the new settings kept
  for name in ("phase2_train.jsonl", "phase2_test.jsonl"):
    (data / name).unlink()
  build.ensure_synthetic_prm800k(data, 0, SyntheticConfig(max_ops=4), 30, 5)
  for name in ("phase2_train.jsonl", "phase2_test.jsonl"):
    (data / name).unlink()
  build.ensure_synthetic_prm800k(data, 0, SyntheticConfig(max_ops=6), 30, 5)
  with pytest.raises(SpecError, match=r"data.synthetic.max_ops 6 \(this spec: 4\)"):
    build.ensure_synthetic_prm800k(data, 0, SyntheticConfig(max_ops=4), 30, 5)


def test_the_command_writes_only_new_files_and_refuses_bad_input_in_one_line(tmp_path, capsys):
  """`python -m rmjax.data.synthetic DIR` writes PRM800K's own file names: a folder already
  holding one (a stand-in for the real data here, SYNTHETIC) is refused and left as it was; so
  are a file given as DIR and a negative count. The launcher's writers still replace files."""
  from rmjax.data import synthetic

  def fails(*argv):
    try:
      code = synthetic.main([str(a) for a in argv])
    except SystemExit as e:
      code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rmjax.data.synthetic: error: ") and err.count("\n") == 1, err
    return err

  real = tmp_path / "real"
  real.mkdir()
  (real / "phase2_test.jsonl").write_text('{"SYNTHETIC": "stands in for a real PRM800K record"}\n')
  assert f"{real / 'phase2_test.jsonl'} already exists" in fails(real, "--train", 3, "--test", 3)
  assert [p.name for p in real.iterdir()] == ["phase2_test.jsonl"]  # nothing written, nothing lost
  assert "SYNTHETIC" in (real / "phase2_test.jsonl").read_text()
  assert synthetic.main([str(tmp_path / "new"), "--train", "3", "--test", "2"]) == 0
  assert [len((tmp_path / "new" / f"phase2_{s}.jsonl").read_text().splitlines()) for s in ("train", "test")] == [3, 2]
  assert "already exists" in fails(tmp_path / "new", "--train", 3)  # a second run too
  (tmp_path / "afile").write_text("SYNTHETIC\n")
  assert "afile is a regular file, not a directory" in fails(tmp_path / "afile", "--train", 3)
  assert "argument --train: expected 0 to" in fails(tmp_path / "neg", "--train", -5)
  assert "argument --test: expected a whole number" in fails(tmp_path / "neg", "--test", "many")
  assert not (tmp_path / "neg").exists()
  write_synthetic_prm800k_dir(str(tmp_path / "new"), 1, 1, seed=0)  # the library call replaces files
  assert len((tmp_path / "new" / "phase2_train.jsonl").read_text().splitlines()) == 1
