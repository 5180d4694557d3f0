"""The training loop end to end, in this process, on the demo spec with tiny settings: run
directory, logs and TensorBoard, trace count, checkpoint retention, NaN stop and skip, resume and
init_from. The loop as a process: SIGTERM in test_loop_processes.py, SIGKILL in
test_reliability.py, two processes in test_multihost.py; its parts without a run: test_train_parts.py. The launch helpers here are shared with those."""

import json
import os
import pathlib
import shutil
import sys
import time
import types

import numpy as np
import pytest

from _xla_env import subprocess_flags
from rmjax import checkpoint as ckpt_lib
from rmjax import spec as spec_lib
from rmjax.run_logging import read_tensorboard_scalars
from rmjax.train import evaluation, loop, perf

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "specs" / "demo.py"

# Small enough for 8 fake CPU devices on 2 cores: micro-batch 8 = one row per device.
TINY = {
  "max_steps": 6, "warmup_steps": 1, "logging_steps": 1, "eval_steps": 3, "save_steps": 2,
  "batch_size": 16, "grad_accum_steps": 2, "max_eval_batches": 2,
  "data.eval_batch_size": 8, "data.length_buckets": (128,), "data.num_workers": 0,
}
# Wall-clock metrics: they differ between runs, so resume checks leave them out. All but
# tokens/s are logged only with perf_metrics.
PERF_KEYS = {"train/data_wait_frac", "train/data_read_ms", "train/data_place_ms",
             "train/device_idle_frac", "train/device_idle_max_frac", "train/dispatch_ms"}
TIMING_KEYS = {"train/tokens_per_s"} | PERF_KEYS
TRAIN_KEYS = {"step", "timestamp", "train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s"}


def tiny_spec(out: pathlib.Path, **overrides):
  spec = spec_lib.load_spec_file(str(DEMO))
  for key, value in {**TINY, "output_dir": str(out), **overrides}.items():
    *parents, leaf = key.split(".")
    node = spec
    for p in parents:
      node = node[p]
    node[leaf] = value
  return spec


def read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def checkpoint_steps(run_dir):
  names = os.listdir(run_dir / "checkpoints")
  return sorted(int(n.rsplit("_", 1)[1]) for n in names if n.startswith("checkpoint_step_") and "tmp" not in n)


def test_throughput_window_leaves_out_evaluation_time_and_perf_metrics_log_where_time_goes(tmp_path, monkeypatch):
  """An evaluation (or checkpoint) stalls training on purpose; the logging window that spans it
  must not count its time as training time. The meters' clock jumps 1000 s during each evaluation:
  counted, the window after it would report under 16 rows * 128 tokens / 1000 s ~ 2 tokens/s.
  With perf_metrics the timing keys are logged too, each within its bounds."""
  offset = [0.0]
  clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
  clock.perf_counter = lambda: time.perf_counter() + offset[0]
  monkeypatch.setattr(perf, "time", clock)
  evaluate = loop.Trainer.evaluate

  def slow_evaluate(self, step):
    offset[0] += 1000.0
    return evaluate(self, step)
  monkeypatch.setattr(loop.Trainer, "evaluate", slow_evaluate)
  loop.train_and_evaluate(tiny_spec(tmp_path, max_steps=4, save_steps=0, perf_metrics=True))
  rows = {r["step"]: r for r in read_jsonl(tmp_path / "demo-full" / "logs" / "metrics.jsonl") if "train/loss" in r}
  assert offset[0] == 2000.0  # evaluated at steps 3 and 4
  assert rows[4]["train/tokens_per_s"] > 16 * 128 / 100.0, rows[4]
  for r in rows.values():
    assert set(r) == TRAIN_KEYS | PERF_KEYS
    assert 0.0 <= r["train/data_wait_frac"] <= 1.0 and r["train/data_read_ms"] > 0 and r["train/data_place_ms"] > 0
    assert 0.0 <= r["train/device_idle_frac"] <= r["train/device_idle_max_frac"] <= 1.0 and r["train/dispatch_ms"] > 0


def test_run_directory_logs_tensorboard_and_single_trace(tmp_path, monkeypatch):
  def no_meter(*a, **k):
    raise AssertionError("the device idle meter runs only with perf_metrics")
  monkeypatch.setattr(perf, "DeviceIdleMeter", no_meter)
  spec = tiny_spec(tmp_path)
  results = loop.train_and_evaluate(spec)
  run = tmp_path / "demo-full"
  logs = run / "logs"
  for name in ("train.log", "metrics.jsonl", "config.json", "final_results.json"):
    assert (logs / name).is_file(), name
  assert json.loads((logs / "config.json").read_text())["max_steps"] == 6

  rows = read_jsonl(logs / "metrics.jsonl")
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  assert all(set(r) == TRAIN_KEYS for r in train_rows)
  assert all(r["train/tokens_per_s"] > 0 for r in train_rows)
  eval_rows = [r for r in rows if "val/loss" in r]
  assert [r["step"] for r in eval_rows] == [3, 6]
  for key in ("val/loss", "val/auroc", "val/mse", "val/ece", "val/prm800k/loss", "val/prm800k/auroc"):
    assert key in eval_rows[-1], key

  final = json.loads((logs / "final_results.json").read_text())
  assert final == json.loads(json.dumps(results))
  assert final["total_steps"] == 6 and final["final_metrics"] == {k: v for k, v in eval_rows[-1].items()
                                                                  if k.startswith("val/")}
  best = min(eval_rows, key=lambda r: r["val/loss"])
  assert (final["best_step"], final["best_val_loss"]) == (best["step"], best["val/loss"])
  assert isinstance(final["skipped_records"], dict)
  # One bucket (128) -> one batch shape -> the train step traced exactly once in 6 steps.
  assert final["train_batch_shapes"] == [[16, 128]]
  assert final["train_step_traces"] == 1
  assert "New best validation loss" in (logs / "train.log").read_text()

  # Every scalar in metrics.jsonl is in TensorBoard at the same step, with the same float32 value.
  tb = read_tensorboard_scalars(run / "tensorboard")
  for row in rows:
    for tag, value in row.items():
      if tag in ("step", "timestamp") or value is None:
        continue
      assert (row["step"], float(np.float32(value))) in tb[tag], (tag, row["step"])
  assert len(tb["train/loss"]) == 6

  # Saves at 2, 4, 6 (save_steps) and 3 (a new best at an eval step); latest 3 + best kept.
  steps = checkpoint_steps(run)
  assert {4, 6} <= set(steps) and len(steps) <= 4
  assert (run / "checkpoints" / "checkpoint_step_6" / "data").is_dir()  # iterator state
  assert json.loads((run / "checkpoints" / "best.json").read_text())["step"] == final["best_step"]


def test_best_checkpoint_survives_when_older_than_latest_three(tmp_path, monkeypatch):
  # The validation loss is made to get worse after the first evaluation (honest monkeypatch:
  # the loop's retention and best tracking are what is tested, not the model).
  real = evaluation.val_loss_of
  calls = []

  def worsening(per_source, kind):
    out = real(per_source, kind)
    calls.append(1)
    return {k: (v + len(calls) if v is not None else v) for k, v in out.items()}

  monkeypatch.setattr(evaluation, "val_loss_of", worsening)
  spec = tiny_spec(tmp_path, max_steps=6, eval_steps=1, save_steps=1)
  final = loop.train_and_evaluate(spec)
  run = tmp_path / "demo-full"
  assert final["best_step"] == 1
  assert checkpoint_steps(run) == [1, 4, 5, 6]
  assert json.loads((run / "checkpoints" / "best.json").read_text())["step"] == 1
  assert (run / "logs" / "train.log").read_text().count("New best validation loss") == 1


class _Poisoned:
  """Wraps the training iterator: targets of batch `at` (1-based) become NaN."""

  def __init__(self, it, at):
    self._it, self._at, self._n = it, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._n += 1
    if self._n == self._at:
      batch = dict(batch, targets=np.full_like(batch["targets"], np.nan))
    return batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


class _PoisonedDataset:
  def __init__(self, ds, at):
    self._ds, self._at = ds, at

  def __iter__(self):
    return _Poisoned(iter(self._ds), self._at)


def _poison_step(monkeypatch, at):
  real = loop.train_dataset
  monkeypatch.setattr(loop, "train_dataset", lambda *a, **k: _PoisonedDataset(real(*a, **k), at))


def test_nan_loss_stops_with_clear_message_and_no_bad_checkpoint(tmp_path, monkeypatch):
  _poison_step(monkeypatch, at=3)
  spec = tiny_spec(tmp_path, max_steps=6, eval_steps=2, save_steps=2)
  with pytest.raises(loop.NonFiniteLoss, match=r"Non-finite loss at step 3 .*the update was not applied \(lr 0.001\)"):
    loop.train_and_evaluate(spec)
  run = tmp_path / "demo-full"
  assert checkpoint_steps(run) == [2]
  assert json.loads((run / "checkpoints" / "best.json").read_text())["step"] == 2
  log_text = (run / "logs" / "train.log").read_text()
  assert "Non-finite loss at step 3" in log_text and "Stopping (nan_policy='stop')" in log_text
  assert max(r["step"] for r in read_jsonl(run / "logs" / "metrics.jsonl")) == 2
  assert not (run / "logs" / "final_results.json").exists()


def test_nan_policy_skip_keeps_training(tmp_path, monkeypatch):
  _poison_step(monkeypatch, at=2)
  spec = tiny_spec(tmp_path, max_steps=4, eval_steps=0, save_steps=0, nan_policy="skip")
  final = loop.train_and_evaluate(spec)
  assert final["nonfinite_steps_skipped"] == 1 and final["total_steps"] == 4
  rows = read_jsonl(tmp_path / "demo-full" / "logs" / "metrics.jsonl")
  losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert losses[2] is None and all(np.isfinite(losses[s]) for s in (1, 3, 4))
  assert np.isfinite(final["best_val_loss"])


def test_resume_continues_the_run_counters_and_a_rerun_logs_nothing_twice(tmp_path, monkeypatch):
  """A resumed run ends with the uninterrupted run's final_results.json: the best validation loss
  (also with checkpoint.keep_best=False, where there is no best.json) and the count of skipped
  non-finite steps come back with the checkpoint. A finished run relaunched after losing
  final_results.json recomputes it without logging its last evaluation twice."""
  _poison_step(monkeypatch, at=2)
  settings = dict(max_steps=6, eval_steps=2, save_steps=2, nan_policy="skip", **{"checkpoint.keep_best": False})
  whole = loop.train_and_evaluate(tiny_spec(tmp_path / "a", **settings))
  assert whole["nonfinite_steps_skipped"] == 1 and whole["best_step"] is not None
  run = tmp_path / "b" / "demo-full"
  shutil.copytree(tmp_path / "a" / "demo-full", run)
  shutil.rmtree(run / "checkpoints" / "checkpoint_step_6")
  (run / "logs" / "final_results.json").unlink()
  monkeypatch.undo()  # the poisoned batch lies before the step resumed from
  resumed = loop.train_and_evaluate(tiny_spec(tmp_path / "b", **settings))
  assert resumed["resumed_from_step"] == 4
  for key in ("best_val_loss", "best_step", "nonfinite_steps_skipped"):
    assert resumed[key] == whole[key], key
  (run / "logs" / "final_results.json").unlink()
  again = loop.train_and_evaluate(tiny_spec(tmp_path / "b", **settings))
  assert again["final_metrics"] == resumed["final_metrics"]
  val_steps = [r["step"] for r in read_jsonl(run / "logs" / "metrics.jsonl") if "val/loss" in r]
  assert val_steps == [2, 4, 6]


def test_a_relaunch_that_trains_nothing_leaves_the_run_records_as_they_were(tmp_path):
  """Relaunching a finished run with another lr, or with another model shape (a mismatch, not a
  corrupt checkpoint), changes neither logs/config.json nor model/: export and scoring read them."""
  loop.train_and_evaluate(tiny_spec(tmp_path, max_steps=2, eval_steps=0, save_steps=0))
  run = tmp_path / "demo-full"
  records = {p: p.read_bytes() for p in [run / "logs" / "config.json", *sorted((run / "model").rglob("*.json"))]}
  assert len(records) >= 2
  again = loop.train_and_evaluate(tiny_spec(tmp_path, max_steps=2, eval_steps=0, save_steps=0, lr=5e-4))
  assert again["total_steps"] == 2
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"checkpoint_step_2 does not fit the model this spec "
                                                         r"builds \(params/decoder/embed/embedding: stored"):
    loop.train_and_evaluate(tiny_spec(tmp_path, max_steps=4, eval_steps=0, save_steps=0,
                                      **{"model.demo.hidden_size": 32, "checkpoint.fallback_to_previous": True}))
  assert {p: p.read_bytes() for p in records} == records
  assert checkpoint_steps(run) == [2] and not (run / "checkpoints" / ckpt_lib.CORRUPT_DIR).exists()
  log = (run / "logs" / "train.log").read_text()
  assert "Training steps 3..2" not in log and "model.demo.hidden_size: 64 -> 32" in log


def test_init_from_loads_weights_with_a_fresh_optimizer(tmp_path):
  first = tiny_spec(tmp_path, max_steps=2, eval_steps=0, save_steps=0)
  loop.train_and_evaluate(first)
  source = tmp_path / "demo-full" / "checkpoints" / "checkpoint_step_2"
  second = tiny_spec(tmp_path, experiment_name="progressive", max_steps=2, init_from=str(source))
  trainer = loop.Trainer(second)
  try:
    import jax
    fresh_params = jax.device_get(trainer.state.params)
    assert trainer._restore() == 0
    loaded = jax.device_get(trainer.state.params)
    assert int(trainer.state.step) == 0
    assert all(float(np.abs(m).max()) == 0.0 for m in jax.tree.leaves(jax.device_get(trainer.state.opt_state))
               if np.ndim(m) > 0)
  finally:
    trainer.close()
  saved = loop.ckpt_lib.Checkpointer(source.parent, loop.ckpt_lib.CheckpointConfig(read_only=True))
  try:
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), loaded)}
    expect = loop.ckpt_lib.restore_subtree(source, target)["params"]
  finally:
    saved.close()
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expect)))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(fresh_params)))


# ------------------------------------------------------------------------- subprocess runs

# For launches whose rows' lengths do not matter: one step program to trace and compile instead
# of the demo's two (two-process runs keep both: their processes must agree on a length).
ONE_BUCKET = "--spec.data.length_buckets=(128,)"


def _launch_cmd(out: pathlib.Path, max_steps: int, *extra: str) -> list[str]:
  return [sys.executable, "-m", "rmjax.launch", f"--spec={DEMO}", f"--spec.output_dir={out}",
          f"--spec.max_steps={max_steps}", "--spec.warmup_steps=2", "--spec.logging_steps=1",
          "--spec.max_eval_batches=2", "--spec.data.eval_batch_size=8", "--spec.batch_size=8",
          "--spec.grad_accum_steps=1", *extra]


def _env(devices: int = 2):
  """The subprocess's environment: `devices` fake CPU devices, the suite's other XLA flags."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=subprocess_flags(devices))


def test_hf_backbone_in_lora_mode(tmp_path, monkeypatch):
  import jax
  import _tiny_run
  from rmjax.convert import load_backbone

  base = _tiny_run.make_base(tmp_path / "base")
  monkeypatch.chdir(tmp_path)  # model.path relative, as users write it
  spec = tiny_spec(tmp_path / "runs", max_steps=2, eval_steps=0, save_steps=0, mode="lora",
                   **{"model.path": "base", "model.frozen_dtype": "float32"})
  final = loop.train_and_evaluate(spec)
  assert final["total_steps"] == 2 and np.isfinite(final["best_val_loss"])
  # the run records the base by absolute path: export and scoring may run from elsewhere
  monkeypatch.chdir("/")
  from rmjax.run_artifacts import load_run_model
  assert load_run_model(tmp_path / "runs" / "demo-full").base_model_path == str(base.resolve())
  monkeypatch.chdir(tmp_path)
  assert "Model qwen3" in (tmp_path / "runs" / "demo-full" / "logs" / "train.log").read_text()
  trainer = loop.Trainer(spec)  # resumes the finished run: its checkpoint holds the frozen base
  try:
    trainer._restore()
    frozen = jax.device_get(trainer.state.frozen)
  finally:
    trainer.close()
  hf, _ = load_backbone(str(base))
  assert np.array_equal(frozen["decoder"]["layers"]["attn"]["q_proj"]["kernel"],
                        hf["layers"]["attn"]["q_proj"]["kernel"])
  assert "lora_a" in jax.device_get(trainer.state.params)["decoder"]["layers"]["attn"]["q_proj"]


def test_skipped_records_are_said_in_train_log_not_only_in_final_results(tmp_path, shared_data):
  """Real PRM800K solutions overflow the demo's 128 tokens: most records are skipped, which a user
  must see at the end of the run, with the key that keeps them."""
  spec = tiny_spec(tmp_path, max_steps=1, eval_steps=0, save_steps=0,
                   **{"data.prm800k.path": str(shared_data / "prm800k" / "prm800k_unique_records.jsonl")})
  final = loop.train_and_evaluate(spec)
  truncated = final["skipped_records"]["prm800k"]["first_marker_truncated"]
  assert truncated > 0
  line = [x for x in (tmp_path / "demo-full" / "logs" / "train.log").read_text().splitlines() if "Skipped records" in x]
  assert len(line) == 1 and line[0].endswith(
    f"WARNING rmjax: Skipped records (training and evaluation; final_results.json): prm800k: first_marker_truncated "
    f"{truncated} (first_marker_truncated -> raise data.max_length)"), line


def test_the_reveal_test_set_is_reported_but_never_picks_the_best_checkpoint(tmp_path):
  """REVEAL's terms make it a test set: its metrics are logged (in val/loss too), while the best
  checkpoint is picked on the validation splits alone, val/selection_loss."""
  fixture = ROOT / "tests" / "fixtures" / "SYNTHETIC_reveal_eval.csv"
  spec = tiny_spec(tmp_path, max_steps=4, eval_steps=2, save_steps=2,
                   **{"data.reveal.use": True, "data.reveal.path": str(fixture)})
  final = loop.train_and_evaluate(spec)
  run = tmp_path / "demo-full"
  evals = [r for r in read_jsonl(run / "logs" / "metrics.jsonl") if "val/loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:
    assert r["val/reveal/loss"] is not None and r["val/selection_loss"] != r["val/loss"]
  best = min(evals, key=lambda r: r["val/selection_loss"])
  assert (final["best_step"], final["best_val_loss"]) == (best["step"], best["val/selection_loss"])
  assert json.loads((run / "checkpoints" / "best.json").read_text())["val_loss"] == pytest.approx(best["val/selection_loss"])
  # without REVEAL there is nothing to leave out: val/loss picks, as before
  plain = tiny_spec(tmp_path / "plain", max_steps=2, eval_steps=2, save_steps=2)
  loop.train_and_evaluate(plain)
  rows = [r for r in read_jsonl(tmp_path / "plain" / "demo-full" / "logs" / "metrics.jsonl") if "val/loss" in r]
  assert rows and all("val/selection_loss" not in r for r in rows)
