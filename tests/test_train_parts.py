"""The training loop's parts, without a training run: the SIGTERM flag, the validation loss,
the multi-process skip counts, and the sources a spec builds."""

import json
import os
import pathlib

import numpy as np

from rmjax.train import evaluation, multiprocess, stop
from test_loop import tiny_spec


def test_a_sigterm_during_start_up_stops_the_loop_at_its_first_step_boundary():
  """jax.distributed's own SIGTERM catcher only notes the signal: rmjax's start-up handler keeps
  it for the loop, which would otherwise train on after a preemption notice."""
  import signal
  from rmjax import runtime
  previous = signal.getsignal(signal.SIGTERM)
  try:
    runtime.catch_sigterm_from_start()
    assert not stop.StopFlag(1).should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    flag = stop.StopFlag(1)
    assert flag.should_stop() and flag.signum == signal.SIGTERM
  finally:
    signal.signal(signal.SIGTERM, previous)
    runtime._startup_sigterm.clear()


def test_ctrl_c_in_the_loop_stops_it_with_a_checkpoint_and_again_at_once(capsys, monkeypatch):
  """Ctrl-C was a 49-line traceback that lost the steps since the last save. The first one in the
  loop now stops it as SIGTERM does (a checkpoint at the next step boundary); a second raises
  KeyboardInterrupt; the previous handlers come back after the loop. The launcher exits 130 for
  either, with one line for the second."""
  import signal
  import pytest
  from rmjax import cli, launch
  from rmjax.train import loop
  before = signal.getsignal(signal.SIGINT)
  flag = stop.StopFlag(1)
  with flag.installed():
    os.kill(os.getpid(), signal.SIGINT)
    assert flag.should_stop() and flag.name() == "SIGINT"
    assert "saving a checkpoint after this step" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before
  spec = tiny_spec("/nonexistent")
  monkeypatch.delenv("RMJAX_DEBUG", raising=False)
  monkeypatch.setattr(loop, "train_and_evaluate", lambda spec: {"interrupted": True, "stopped_by": "SIGINT"})
  with pytest.raises(SystemExit) as leaving:
    launch.run(spec)
  assert leaving.value.code == cli.EXIT_INTERRUPTED == 130

  def interrupted(spec):
    raise KeyboardInterrupt
  monkeypatch.setattr(loop, "train_and_evaluate", interrupted)
  with pytest.raises(SystemExit) as leaving:
    launch.run(spec)
  err = capsys.readouterr().err
  assert leaving.value.code == 130 and err.count("\n") == 1
  assert err.startswith("rmjax.launch: error: interrupted (Ctrl-C) before a checkpoint was saved")


def test_val_loss_is_the_training_loss_pooled_over_every_step():
  """val/loss picks the best checkpoint: per source and pooled step by step (not a mean of the
  sources), with the training loss's formula (hand-computed values)."""
  per = {"a": (np.array([0.9, 0.2]), np.array([1.0, 0.0])), "b": (np.array([0.5]), np.array([1.0]))}
  mse = evaluation.val_loss_of(per, "mse")
  np.testing.assert_allclose([mse["a/loss"], mse["b/loss"], mse["loss"]], [0.025, 0.25, 0.1], rtol=1e-12)
  bce = evaluation.val_loss_of(per, "bce")
  a, b = (-np.log(0.9) - np.log(0.8)) / 2, np.log(2.0)
  np.testing.assert_allclose([bce["a/loss"], bce["b/loss"], bce["loss"]], [a, b, (2 * a + b) / 3], rtol=1e-9)
  import optax  # the train step's BCE on the same predictions, as logits
  p, y = np.array([0.9, 0.2, 0.5]), np.array([1.0, 0.0, 1.0])
  logits = np.log(p / (1 - p)).astype(np.float32)
  np.testing.assert_allclose(bce["loss"], float(optax.sigmoid_binary_cross_entropy(logits, y.astype(np.float32)).mean()),
                             rtol=1e-6)


def test_skipped_records_sum_every_process_shard_skips_and_count_whole_file_skips_once(monkeypatch):
  """Readers that parse whole files count the same skips on every process; rendering and readers
  that parse on access (PRM800K) count only their own shard. The run's count is the first kind
  once plus the second kind of every process (gathered as JSON: any source, any reason)."""
  from rmjax.data.example import SkipCounter
  whole_file, mine, theirs = SkipCounter(), SkipCounter(), SkipCounter()
  whole_file.add("eqasc", "no_correct_choice", 2)
  mine.add("prm800k", "first_marker_truncated", 3)
  theirs.add("prm800k", "first_marker_truncated", 4)
  theirs.add("prm800k", "bad_json")
  other = np.frombuffer(json.dumps(theirs.as_dict()).encode(), np.uint8)

  def allgather(x):  # process 0 is this one, process 1 the other
    x = np.asarray(x)
    if x.dtype == np.int32:
      return np.stack([x, np.asarray([other.size], np.int32)])
    return np.stack([x, np.pad(other, (0, x.size - other.size))])
  monkeypatch.setattr(multiprocess.multihost_utils, "process_allgather", allgather)
  assert multiprocess.skipped_records(whole_file, mine, 2) == {
    "eqasc": {"no_correct_choice": 2}, "prm800k": {"bad_json": 1, "first_marker_truncated": 7}}
  assert multiprocess.skipped_records(whole_file, mine, 1) == {
    "eqasc": {"no_correct_choice": 2}, "prm800k": {"first_marker_truncated": 3}}


def test_only_readers_that_parse_on_access_count_per_shard(tmp_path):
  from rmjax.data.example import SkipCounter
  from rmjax.data.sources import SKIPS_COUNTED_ON_ACCESS
  from rmjax.train import build
  assert "prm800k" in SKIPS_COUNTED_ON_ACCESS and not {"eqasc", "reveal"} & SKIPS_COUNTED_ON_ACCESS
  spec = tiny_spec(tmp_path)
  whole_file, shard = SkipCounter(), SkipCounter()
  train, evals = build.build_sources(spec, tmp_path, whole_file, shard)
  reader = train["prm800k"][0]
  assert reader.skips is shard and evals["prm800k"].skips is shard


def test_a_source_path_that_is_one_file_warns_that_evaluation_reads_the_training_data(tmp_path, caplog, shared_data):
  """A file path serves every split (a documented form), so training and evaluation read the
  same records; that is said once, at start-up. A directory of split files says nothing."""
  from rmjax.data.example import SkipCounter
  from rmjax.train import build
  single = shared_data / "prm800k" / "prm800k_unique_records.jsonl"
  for path, warned in ((single, True), ("", False)):  # "": the synthetic phase2_{train,test} files
    spec = tiny_spec(tmp_path, **{"data.prm800k.path": str(path)})
    caplog.clear()
    with caplog.at_level("WARNING", logger="rmjax.train.build"):
      build.build_sources(spec, tmp_path, SkipCounter(), SkipCounter())
    said = [r.getMessage() for r in caplog.records if "not held out" in r.getMessage()]
    assert said == ([f"data.prm800k.path is the file {single}: a file serves every split, so training and "
                     f"evaluation both read it and its val numbers are not held out; give the directory "
                     f"holding its split files instead"] if warned else []), said


def test_a_source_directory_of_split_files_does_not_warn_of_one_file(tmp_path, caplog):
  """A field source's path that is a directory (train.jsonl and test.jsonl) is no single file:
  the warning above said it was, for readers that keep the directory as their path."""
  from rmjax import spec as spec_lib
  from rmjax.data.example import SkipCounter
  from rmjax.train import build
  folder = tmp_path / "stepwise"
  folder.mkdir()
  for split in ("train", "test"):  # SYNTHETIC records in TRL's stepwise format
    (folder / f"{split}.jsonl").write_text(json.dumps(
      {"prompt": f"Compute 1 + 1 ({split}).", "completions": ["1 + 1 = 2"], "labels": [True]}) + "\n")
  spec = spec_lib.apply_overrides(spec_lib.load_spec_file(str(pathlib.Path(__file__).parents[1] / "specs" / "field_mix.py")),
                                  [f"data.math_shepherd.path={folder}", f"output_dir={tmp_path}"])
  with caplog.at_level("WARNING", logger="rmjax.train.build"):
    train, evals = build.build_sources(spec, tmp_path, SkipCounter(), SkipCounter())
  assert len(train["math_shepherd"][0]) == len(evals["math_shepherd"]) == 1
  assert not [r for r in caplog.records if "not held out" in r.getMessage()]


def test_demo_vocab_size_pads_the_embedding_and_refuses_fewer_rows_than_the_tokenizer(tmp_path):
  """model.demo.vocab_size gives the demo backbone a real model's embedding rows (benchmarks);
  0 keeps the tokenizer's size, fewer rows than tokens is one line, a negative value invalid."""
  import pytest
  from rmjax import spec as spec_lib
  from rmjax.tokenizer import build_demo_tokenizer
  from rmjax.train import build
  tokenizer = build_demo_tokenizer()
  spec = tiny_spec(tmp_path)
  assert build.demo_model_config(spec, tokenizer).vocab_size == len(tokenizer)
  spec.model.demo.vocab_size = 4096
  assert len(tokenizer) < 4096 and build.demo_model_config(spec, tokenizer).vocab_size == 4096
  spec.model.demo.vocab_size = len(tokenizer) - 1
  with pytest.raises(spec_lib.SpecError, match=f"below the demo tokenizer's {len(tokenizer)} tokens"):
    build.demo_model_config(spec, tokenizer)
  spec.model.demo.vocab_size = -1
  with pytest.raises(spec_lib.SpecError, match="model.demo.vocab_size must be >= 0"):
    spec_lib.validate(spec, num_devices=1)


def test_a_second_run_into_a_run_folder_in_use_stops_before_writing(tmp_path):
  """Two launches into one <output_dir>/<experiment_name> at once: the second overwrote the
  first's checkpoints, best.json and config.json without a word. The run folder's lock (flock:
  the kernel drops it when its holder ends, however it ends) stops the second at once, naming
  the holder; once released, the folder is free again. A folder that cannot be made is one line."""
  import pytest
  from rmjax.train import loop, run_lock
  spec = tiny_spec(tmp_path)
  run_dir = loop.run_dir_of(spec)
  held = run_lock.lock_run_directory(run_dir)
  try:
    with pytest.raises(run_lock.RunDirectoryBusy, match=f"another run is writing {run_dir} \\(process {os.getpid()} on "):
      loop.train_and_evaluate(spec)
    assert sorted(p.name for p in run_dir.iterdir()) == [run_lock.LOCK_FILE]  # nothing else written
  finally:
    run_lock.unlock(held)
  run_lock.unlock(run_lock.lock_run_directory(run_dir))
  (tmp_path / "a_file").write_text("")
  with pytest.raises(run_lock.RunDirectoryUnusable, match="cannot write the run folder .*a_file/x: Not a directory"):
    run_lock.lock_run_directory(tmp_path / "a_file" / "x")


def test_a_full_disk_writing_the_demo_data_names_the_folder(tmp_path, monkeypatch):
  """A write error names no file ("[Errno 28] No space left on device"): the demo data's folder
  is named, and no temporary file is left behind."""
  import errno
  import pytest
  from rmjax.train import build

  def full(path, *_):
    pathlib.Path(path).write_text("{}\n")  # some bytes, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(build, "write_synthetic_prm800k", full)
  with pytest.raises(OSError, match=f"No space left on device \\(writing the synthetic demo data\\): '{tmp_path}'"):
    build.ensure_synthetic_prm800k(tmp_path, seed=0)
  assert list(tmp_path.iterdir()) == []
