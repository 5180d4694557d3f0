"""The training loop: `train_and_evaluate(spec)` turns a validated spec into a finished run directory.

Why it exists: this is the one place that owns time. It wires the built pieces together (mesh,
sharded state, jitted steps, grain data, orbax checkpoints, logs) and decides WHEN things happen:
train every step, evaluate every `eval_steps`, save every `save_steps` (and on a new best
validation loss, so the best model is always on disk), stop on SIGTERM or a non-finite loss.

Rules it keeps:
* The host never waits on the device: step N is dispatched before step N-1's metrics are read.
* Resume is exact: a relaunch into an existing run directory restores the latest checkpoint
  (params, optimizer, step, rng AND the grain iterator position) and truncates metrics.jsonl /
  TensorBoard after it, so every later logged value equals the uninterrupted run's.
* Nothing non-finite is ever saved: with nan_policy "stop" the run raises `NonFiniteLoss`
  before any later save; with "skip" the step kept the old state (see rmjax.train.step).
* The train step traces once per batch shape (length bucket); final_results.json says how many
  times it traced and which shapes it saw.
* Multi-process: each process reads its own data shard, batches become global arrays with
  `device_batch` (what the processes exchange besides: multiprocess.py), and only process 0
  writes logs.
* No needless host work between dispatches: the timing meters of perf.py run only with
  `spec.perf_metrics`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np

from rmjax import checkpoint as ckpt_lib
from rmjax import sharding as shd
from rmjax import spec as spec_lib
from rmjax.data.example import SkipCounter, describe_skips
from rmjax.data.pipeline import PipelineConfig, eval_datasets, train_dataset
from rmjax.model.confidence import ConfidenceModel
from rmjax.progress import Progress
from rmjax.run_artifacts import save_run_model
from rmjax.run_logging import RunLogger
from rmjax.runtime import quiet_library_logs
from rmjax.train import auto_settings, build, evaluation, multiprocess, run_lock
from rmjax.train.evaluation import fmt, selection_loss
from rmjax.train.optim import OptimConfig, param_counts
from rmjax.train.perf import LoopMeter
from rmjax.train.prefetch import DevicePrefetcher
from rmjax.train.record import RunRecord
from rmjax.train.state import create_train_state
from rmjax.train.step import EVAL_KEYS, TRAIN_KEYS, Steps, device_batch, make_steps
from rmjax.train.stop import StopFlag
from rmjax.tokenizer import pad_id

class NonFiniteLoss(RuntimeError):
  """Training stopped (nan_policy "stop") because a step's loss or gradient norm was NaN/Inf."""


def run_dir_of(spec: Any) -> pathlib.Path:
  return pathlib.Path(spec.output_dir) / str(spec.experiment_name)


class Trainer:
  """One run: built from the spec in __init__, executed by `run()`."""

  def __init__(self, spec: Any):
    self.spec = spec
    self.run_dir = run_dir_of(spec)
    self.is_main = jax.process_index() == 0
    self.process_count = jax.process_count()
    self._lock = run_lock.lock_run_directory(self.run_dir) if self.is_main else None
    self.checkpointer = ckpt_lib.Checkpointer(self.run_dir / "checkpoints",
                                              ckpt_lib.CheckpointConfig.from_spec(spec))
    self.resume_step = self.checkpointer.latest_step()
    self.logger = RunLogger(self.run_dir, self.is_main, resume_step=self.resume_step)
    try:
      # Said now, written once the run restores and trains: a relaunch that fails to restore, or
      # finds the run complete, leaves the run's config.json and model/ as they were.
      self.config = spec_lib.spec_to_dict(spec)
      # remat / scan_unroll as the model runs them: explicit, or "auto"'s choice recorded by the
      # run being resumed; None = "auto" resolves in _build_model. config.json holds them.
      self.performance = auto_settings.explicit_or_recorded(
        spec, self.run_dir if self.resume_step is not None else None)
      if self.performance is not None:
        self.config = auto_settings.in_config(self.config, self.performance)
      self.logger.warn_of_changes(self.config)
      # Skips every process counts alike (readers that parse whole files when built), and skips of
      # this process's shard only (rendering; readers that parse on access), summed at the end.
      self.file_skips, self.shard_skips = SkipCounter(), SkipCounter()
      self.optim_cfg = OptimConfig.from_spec(spec)
      self.mesh = shd.make_mesh(shd.MeshConfig.from_spec(spec))
      try:  # which block of each global batch this process reads (its rows' place on the mesh)
        self.batch_block = shd.process_batch_block(self.mesh)
      except ValueError as e:
        raise spec_lib.SpecError(str(e)) from None
      self._build_model()
      self._build_data()
    except BaseException:
      self.close(quiet=True)
      raise
    self.record = RunRecord()

  # ---- building --------------------------------------------------------------------------

  def _build_model(self) -> None:
    parts = build.build_model_parts(self.spec)
    self.tokenizer, self.model_cfg, self.head_cfg = parts.tokenizer, parts.model_cfg, parts.head_cfg
    self.render_cfg = build.render_config(self.spec)
    choice = None
    if self.performance is None:
      choice = auto_settings.resolve(self.spec, self.model_cfg, self.head_cfg, self.optim_cfg, self.mesh,
                                     self.render_cfg)
      self.logger.log(choice.describe(), logging.INFO if choice.fitted else logging.WARNING)
      self.performance = choice.candidate.as_dict()
      self.config = auto_settings.in_config(self.config, self.performance)
    elif spec_lib.AUTO in spec_lib.performance_settings(self.spec).values():
      self.logger.log(f"Auto settings: {self.performance} as this run chose them (logs/config.json)")
    self.auto_choice: auto_settings.Choice | None = choice  # what "auto" compiled and chose (None: not resolved)
    self.model_cfg = self.model_cfg.replace(**self.performance)
    self.model = ConfidenceModel(self.model_cfg, self.head_cfg)
    key = jax.random.key(int(self.spec.seed))
    init_params = None
    if parts.backbone is not None:
      init_params = build.complete_params(self.model, parts.backbone, jax.random.fold_in(key, 1))
    self.state, self.shardings = create_train_state(self.model, self.optim_cfg, self.mesh, key,
                                                    init_params=init_params)
    # auto's Steps for its choice hold the step traced and compiled for the largest shape: reused
    reusable = choice is not None and choice.steps is not None and choice.steps.state_shardings == self.shardings
    self.steps: Steps = choice.steps if reusable else make_steps(self.model, self.optim_cfg, self.mesh, self.shardings)
    counts = param_counts(self.state.params, self.state.frozen)
    self.logger.log(f"Model {self.model_cfg.architecture} ({self.spec.model.path}), mode {self.spec.mode}: "
                    f"{counts['trainable']:,} trainable / {counts['total']:,} parameters "
                    f"({100 * counts['trainable_fraction']:.2f}%); mesh {dict(self.mesh.shape)} on "
                    f"{jax.device_count()} {jax.devices()[0].platform} device(s), {self.process_count} process(es)")

  def _save_run_model(self) -> None:
    """<run_dir>/model/ (tokenizer + model json) so export/score can rebuild from a run dir."""
    if not self.is_main:
      return
    # A local base is recorded by absolute path: export and scoring may run from another
    # directory, where a relative "models/qwen3" would read as a hub id.
    path = str(self.spec.model.path)
    local = pathlib.Path(path).expanduser()
    base = str(local.resolve()) if path != spec_lib.DEMO_MODEL and local.exists() else path
    save_run_model(self.run_dir, self.model_cfg, self.head_cfg, self.render_cfg, self.tokenizer, base,
                   str(self.spec.mode))

  def _build_data(self) -> None:
    train_sources, eval_sources = build.build_sources(self.spec, self.run_dir, self.file_skips, self.shard_skips)
    self.pipeline_cfg = PipelineConfig.from_spec(self.spec)
    common = dict(process_index=self.batch_block, process_count=self.process_count, skips=self.shard_skips)
    self.train_ds = train_dataset(train_sources, self.render_cfg, self.tokenizer, self.pipeline_cfg,
                                  seed=int(self.spec.seed), global_batch=int(self.spec.batch_size), **common)
    self.eval_ds = eval_datasets(eval_sources, self.render_cfg, self.tokenizer, self.pipeline_cfg, **common)
    # The pipeline runs 2 batches ahead in a thread (get_state() stays the consumed position).
    # One process: batches are also placed on the mesh there. Several: the length agreement
    # (multiprocess.pad_to_longest) is a collective, so it and the placement stay on this thread.
    place = (lambda b: device_batch(b, self.mesh)) if self.process_count == 1 else (lambda b: None)
    self.train_iter = DevicePrefetcher(iter(self.train_ds), place)
    sizes = ", ".join(f"{n}: {len(r)} train records (weight {w:g})" for n, (r, w) in train_sources.items())
    self.logger.log(f"Data: {sizes}; evaluating on {', '.join(f'{n} ({len(r)})' for n, r in eval_sources.items())}")

  # ---- start: resume or init_from ---------------------------------------------------------

  def _restore(self) -> int:
    """Step to continue from: the latest checkpoint's (state + iterator restored), else 0."""
    if self.resume_step is not None:
      fallback = bool(self.spec.checkpoint.fallback_to_previous)
      try:
        restored = self.checkpointer.restore_latest(ckpt_lib.abstract_like(self.state), iterator=self.train_iter,
                                                    fallback_to_previous=fallback)
      except ckpt_lib.CheckpointCorrupt as e:
        older = [s for s in self.checkpointer.all_steps() if s < self.resume_step]
        if fallback or not older:
          raise
        raise ckpt_lib.CheckpointCorrupt(e.path, f"{e.reason}; --spec.checkpoint.fallback_to_previous=True "
                                                 f"resumes from the newest readable older step ({older[-1]} or "
                                                 f"before)") from e
      if restored.step != self.resume_step:  # the newer step(s) were corrupt (logged by restore_latest)
        self.logger.log(f"Checkpoint {self.checkpointer.step_path(self.resume_step)} is corrupt; fell back to "
                        f"step {restored.step} (checkpoint.fallback_to_previous); the unreadable steps are "
                        f"now in {self.checkpointer.directory / ckpt_lib.CORRUPT_DIR}", logging.WARNING)
        self.resume_step = restored.step
        self.logger.rewind_to(restored.step)  # the logs as they were at that step
      self.state = restored.state
      self.record.restore(restored.metadata)
      self.logger.log(f"Resumed from {self.checkpointer.step_path(restored.step)} (step {restored.step})")
      return restored.step
    if self.spec.init_from:
      target = {"params": ckpt_lib.abstract_like(self.state.params),
                "frozen": ckpt_lib.abstract_like(self.state.frozen)}
      weights = ckpt_lib.restore_subtree(self.spec.init_from, target)
      self.state = self.state.replace(params=weights["params"], frozen=weights["frozen"])
      self.logger.log(f"Initialised weights from {self.spec.init_from} (fresh optimizer, step 0)")
    return 0

  def _placed(self, batch: dict[str, np.ndarray], keys: tuple[str, ...] = TRAIN_KEYS) -> dict[str, jax.Array]:
    """A batch of this process's rows as global arrays (lengths agreed across processes)."""
    batch = multiprocess.pad_to_longest(batch, pad_id(self.tokenizer), self.process_count)
    return device_batch(batch, self.mesh, keys)

  # ---- evaluation -------------------------------------------------------------------------

  def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    probs = self.steps.eval_step(self.state.params, self.state.frozen, self._placed(batch, EVAL_KEYS))
    return multiprocess.host_rows(batch, probs, self.mesh, self.batch_block, self.process_count)

  def evaluate(self, step: int, log_scalars: bool = True) -> dict[str, Any]:
    test_only = spec_lib.test_only_sources(self.spec)
    metrics = evaluation.evaluate_sources(self.eval_ds, self._predict, self.optim_cfg.loss, test_only)
    if log_scalars:
      self.logger.log_scalars(step, metrics)
    self.logger.log(evaluation.describe(step, metrics, self.eval_ds, test_only))
    if self.record.note_eval(step, metrics):
      self.logger.best(self.record.best_val_loss, step)
    return metrics

  # ---- saving -----------------------------------------------------------------------------

  def save(self, step: int, val_loss: float | None) -> None:
    saved = self.checkpointer.save(step, self.state, iterator=self.train_iter, val_loss=val_loss,
                                   metadata={"config_hash": ckpt_lib.config_hash(spec_lib.spec_to_dict(self.spec)),
                                             **self.record.checkpoint_metadata()})
    if saved:
      verb = "Saving checkpoint (asynchronously)" if self.checkpointer.config.async_save else "Saved checkpoint"
      self.logger.log(f"{verb} {self.checkpointer.step_path(step)}"
                      + (f" (val loss {val_loss:.6f})" if val_loss is not None else ""))

  # ---- the loop ---------------------------------------------------------------------------

  def _log_train(self, step: int, metrics: dict[str, Any], tokens: float, times: dict[str, float],
                 meter: LoopMeter) -> float:
    """Reads one step's device metrics (blocks on that step only), logs them when due; the loss."""
    host = jax.device_get(metrics)
    meter.count(tokens, times)
    if not bool(host["finite"]):
      message = (f"Non-finite loss at step {step} (loss {float(host['loss'])}, grad norm "
                 f"{float(host['grad_norm'])}); the update was not applied (lr {self.spec.lr:g}"
                 + (f", lora.alpha {self.spec.lora.alpha:g}" if self.spec.mode == "lora" else "") + ")")
      if self.optim_cfg.nan_policy == "stop":
        self.logger.log(message + ". Stopping (nan_policy='stop'); no checkpoint is written for this "
                        "or any later step", logging.ERROR)
        raise NonFiniteLoss(message)
      self.record.nonfinite_skipped += 1
      self.logger.log(message + " (nan_policy='skip')", logging.WARNING)
    if step % int(self.spec.logging_steps) == 0 or step == int(self.spec.max_steps):
      self.logger.log_scalars(step, {
        "train/loss": float(host["loss"]), "train/learning_rate": float(host["learning_rate"]),
        "train/grad_norm": float(host["grad_norm"]), **meter.scalars()})
    return float(host["loss"])

  def _evaluate_and_save(self, step: int, eval_due: bool, save_due: bool) -> None:
    """Evaluates when due, then saves when due or when keep_best has a new best."""
    val_loss = None
    if eval_due:
      best_before = self.record.best_step
      val_loss = selection_loss(self.evaluate(step))
      save_due = save_due or (self.checkpointer.config.keep_best and self.record.best_step != best_before)
    if save_due:
      self.save(step, val_loss)

  def run(self) -> dict[str, Any]:
    start = self._restore()
    max_steps = int(self.spec.max_steps)
    eval_every, save_every = int(self.spec.eval_steps), int(self.spec.save_steps)
    stop = StopFlag(self.process_count)
    pending: list[tuple[int, Any, float, dict]] = []  # dispatched, not read: step, device metrics, tokens, timings
    log_every = int(self.spec.logging_steps)
    step = start
    if start < max_steps:
      self.logger.write_config(self.config)
      self._save_run_model()
      self.logger.log(f"Training steps {start + 1}..{max_steps} in {self.run_dir}")
    with (stop.installed(), Progress(max_steps, initial=start, is_main_process=self.is_main) as bar,
          LoopMeter(bool(self.spec.perf_metrics)) as meter):

      def read_pending() -> None:
        host = jax.device_get([p[1] for p in pending])
        loss = None
        for (s, _, tok, times), h in zip(pending, host):
          loss = self._log_train(s, h, tok, times, meter)
        bar.update(pending[-1][0], loss=loss)
        pending.clear()

      interrupted = False
      while step < max_steps and not (interrupted := stop.should_stop()):
        item = meter.next_batch(self.train_iter)
        placed = item.device if item.device is not None else self._placed(item.host)
        self.state, metrics = meter.dispatch(self.steps.train_step, self.state, placed)
        step += 1
        batch = item.host
        self.record.train_shapes.add(tuple(batch["input_ids"].shape))
        tokens = float(np.count_nonzero(batch["segment_ids"])) * self.process_count
        if pending and (pending[-1][0] % log_every == 0 or len(pending) >= 64):
          read_pending()
        pending.append((step, metrics, tokens, meter.step_times()))
        is_last = step == max_steps
        eval_due = is_last or (eval_every > 0 and step % eval_every == 0)
        save_due = is_last or (save_every > 0 and step % save_every == 0)
        if eval_due or save_due:
          read_pending()
          with meter.paused():
            self._evaluate_and_save(step, eval_due, save_due)
      if pending:
        read_pending()
    if interrupted and step == start:  # stopped during start-up: nothing trained since the last save
      self.logger.log(f"Received {stop.name()} before step {start + 1}: stopped; "
                      "relaunch the same command to go on")
    elif interrupted:
      self.save(step, None)
      self.logger.log(f"Received {stop.name()}: saved step {step} and stopped; "
                      "relaunch the same command to resume")
    elif start >= max_steps:
      self.logger.log(f"Run already complete at step {start}")
      previous = self.run_dir / "logs" / "final_results.json"
      if previous.is_file():
        return json.loads(previous.read_text())
      # Stopped between the last checkpoint and final_results.json: the last evaluation is
      # recomputed for the results, and logged again only if metrics.jsonl lacks it.
      self.evaluate(start, log_scalars=not self.logger.has_scalar(start, "val/loss"))
    return self._final_results(step, interrupted=interrupted, stopped_by=stop.name())

  def _final_results(self, step: int, interrupted: bool, stopped_by: str | None) -> dict[str, Any]:
    self.checkpointer.wait_until_finished()
    results = {
      **self.record.final_results(), "total_steps": step, "max_steps": int(self.spec.max_steps),
      "interrupted": interrupted, "stopped_by": stopped_by, "resumed_from_step": self.resume_step,
      "skipped_records": multiprocess.skipped_records(self.file_skips, self.shard_skips, self.process_count),
      "train_step_traces": self.steps.train_traces(self.record.train_shapes), "eval_step_traces": int(self.steps.traces["eval"]),
      "checkpoints": self.checkpointer.all_steps(),
    }
    self.logger.write_final(results)
    self.logger.log(f"Done at step {step}: best val loss {fmt(results['best_val_loss'])} at step "
                    f"{results['best_step']}; final val auroc {fmt(self.record.last_eval.get('val/auroc'))}")
    if results["skipped_records"]:
      self.logger.log("Skipped records (training and evaluation; final_results.json): "
                      + describe_skips(results["skipped_records"]), logging.WARNING)
    return results

  def close(self, quiet: bool = False) -> None:
    """Closes the checkpointer, the logs and the run folder's lock. `quiet` (closing after an
    error): a failure to close (a full disk) is logged, not raised over the error being reported."""
    lock, self._lock = self._lock, None
    try:
      with contextlib.ExitStack() as closing:  # each runs even when an earlier one fails
        closing.callback(run_lock.unlock, lock)
        closing.callback(self.logger.close)
        self.checkpointer.close()
    except Exception as e:  # noqa: BLE001  only when quiet: the caller is raising its own error
      if not quiet:
        raise
      logging.getLogger("rmjax.train").warning("closing the run after its error failed too: %s", e)


def train_and_evaluate(spec: Any) -> dict[str, Any]:
  """Trains and evaluates as `spec` says, in <output_dir>/<experiment_name>; returns final results.

  Raises NonFiniteLoss (after logging it) when a loss is NaN/Inf and nan_policy is "stop".
  """
  quiet_library_logs()
  trainer = Trainer(spec)
  try:
    results = trainer.run()
  except BaseException:
    trainer.close(quiet=True)  # the run's own error is the one to report, not a close's after it
    raise
  trainer.close()
  return results
