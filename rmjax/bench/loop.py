"""`python -m rmjax.bench --loop`: the training loop's tokens/s against its bare step's, one process.

Why it exists: the step benchmark times `train_step` dispatched back to back; a user gets the
training loop (data pipeline, prefetch thread, metric reads, logging, the progress bar). This
runs both on the same shapes and the same batches, so their ratio `loop_over_step` is what the
loop costs and nothing else.

How: a real run is built through `rmjax.train.loop.Trainer` from `specs/demo.py`, with the
preset's model shape in `model.demo.*` (the demo's random backbone and tokenizer, synthetic
PRM800K-format data, the spec's defaults for packing, workers, prefetch and logging_steps) and
one length bucket (`data.max_length`), so every step has one shape and compiles once.
- loop: `Trainer.run()` for `(warmup + windows + 1) * logging_steps` steps. Its figure is the
  loop's own logged `train/tokens_per_s` (metrics.jsonl) over the `windows` logging windows
  after the warm-up: each window runs from reading one logged step's metrics to reading the
  next's, so the windows together cover the timed steps exactly. The loop reads a window's
  metrics once the next step is queued; the run's last window has no step queued behind it,
  so where a dispatch holds the host its end would be seen sooner than the others': it is
  left out of the timing. `seconds_per_step_median` (between step completions, seen by a
  watcher thread) checks both rates without relying on when the host reads.
- step: the same batches, read beforehand from a fresh iterator of the run's own training
  dataset (its first batches are the loop's), placed on the devices beforehand, then the same
  jitted `steps.train_step`: warm-up steps, a block, the timed steps, a block. Two ways: back
  to back (every step queued at once) and paced as the loop paces it (one step in flight, its
  metrics read once the next is queued); the faster is the step's figure. Each runs once before
  the loop and once after it (from the run's final state), averaged, so a drift of the
  machine's speed (~5% over a minute on a shared 2-core VM) biases neither side. No retrace
  after the first pass (`step_retraced` says so).
Tokens are counted alike on both sides: real tokens, the nonzero `segment_ids`. `mfu` counts
the model FLOPs of those tokens (each packed example's attention over its own length; GPUs
with a known peak only); `fill` is real tokens over the rows' slots.

`--spec specs/full.py` (or lora.py) measures a shipped spec as a user runs it: every key of
that spec (batch, micro-batches, mode, "auto" remat and layer loop, optimizer dtype, head,
rows) on the demo's random backbone at the preset's shape, the preset's vocabulary included
(embedding and optimizer memory as the real model's, so "auto" meets the same limit), and the
demo's synthetic data; flags and `--set` apply on top. Evaluation and checkpoints are skipped
(they would fall after the timed windows; a 4B-shaped full run would write ~48 GB); GPU
memory and the compilation cache are set up as the launcher sets them up.

Defaults: the 75m preset's width (768, 12 heads, MLP 2048) at 2 layers, the demo's rows
(16 of 128 tokens, 2 micro-batches) in full fine-tuning: a step of about a second on 2 CPU
cores, against a few milliseconds of data work per batch. A real run's step (a 4B model on a
GPU) dwarfs its data work in the same way; the demo's own 64-wide model does not (its step is
shorter than reading its batch), so there the ratio would measure the data pipeline, not the
loop. About 1-2 minutes on 2 CPU cores, compilation included.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import queue
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from rmjax.bench import common

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO_SPEC = ROOT / "specs" / "demo.py"
# The model.demo keys a preset's shape fills.
PACING = {False: "back_to_back", True: "paced"}  # step_rate(paced=...) by name
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m rmjax.bench --loop", description=__doc__.split("\n\n")[0])
  p.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--spec", default="", metavar="FILE",
                 help="a shipped spec's settings (e.g. specs/full.py) on the demo backbone and data")
  p.add_argument("--preset", default="75m", choices=sorted(common.PRESETS), help="model shape (model.demo.*)")
  p.add_argument("--layers", type=int, default=2, help="decoder layers (0 = the preset's)")
  p.add_argument("--mode", default="", choices=("", *common.MODES), help="default: the --spec's mode, else full")
  p.add_argument("--seq-len", type=int, default=0, help="tokens per row: data.max_length, one bucket (0 = the demo's)")
  p.add_argument("--batch", type=int, default=0, help="global rows per step: batch_size (0 = the demo's)")
  p.add_argument("--grad-accum", type=int, default=0, help="micro-batches per step (0 = the demo's)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="compute dtype; auto = bfloat16 on a GPU, float32 on CPU")
  p.add_argument("--windows", type=int, default=3, help="timed logging windows (logging_steps steps each)")
  p.add_argument("--warmup-windows", type=int, default=1, help="logging windows before timing (compilation)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="any other spec key, e.g. --set data.pack=true --set model.remat=full")
  p.add_argument("--keep", default="", metavar="DIR", help="write the run directory here (default: a temporary one)")
  args = p.parse_args(argv)
  if args.windows < 1 or args.warmup_windows < 1 or args.layers < 0:
    p.error("need --windows >= 1, --warmup-windows >= 1, --layers >= 0")
  return args


def base_spec(args: argparse.Namespace) -> Any:
  """specs/demo.py in the mode asked for, or the --spec file on the demo's backbone and data."""
  from rmjax import spec as spec_lib
  if not args.spec:
    return spec_lib.load_spec_file(f"{DEMO_SPEC}:{args.mode or 'full'}")
  spec = spec_lib.load_spec_file(args.spec)
  if args.mode:
    spec.mode = args.mode
  demo = spec_lib.load_spec_file(f"{DEMO_SPEC}:{spec.mode}")
  spec.model.path = demo.model.path
  spec.data.synthetic = demo.data.synthetic
  for source in ("prm800k", "eqasc", "reveal"):
    spec.data[source] = demo.data[source]
  return spec


def make_spec(args: argparse.Namespace, output_dir: str, on_accelerator: bool) -> Any:
  """The base spec with the preset's shape and the flags; the run's steps and windows."""
  from rmjax import spec as spec_lib
  spec = base_spec(args)
  shape = common.PRESETS[args.preset]()
  for key in SHAPE_KEYS:
    setattr(spec.model.demo, key, int(getattr(shape, key)))
  if args.spec:
    spec.model.demo.vocab_size = int(shape.vocab_size)
  if args.layers:
    spec.model.demo.num_layers = args.layers
  if args.dtype != "auto" or not args.spec:  # a --spec keeps its own dtypes unless asked
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_accelerator else "float32")
    spec.model.compute_dtype = dtype
    spec.model.frozen_dtype = dtype
  if args.seq_len:
    spec.data.max_length = args.seq_len
  if args.batch:
    spec.batch_size = args.batch
  if args.grad_accum:
    spec.grad_accum_steps = args.grad_accum
  spec.output_dir, spec.experiment_name = output_dir, f"bench-loop-{spec.mode}"
  spec.eval_steps, spec.save_steps = 0, 0  # evaluated and saved once, after the last (timed) step
  spec.max_eval_batches = 1
  spec_lib.apply_overrides(spec, args.overrides)
  spec.data.length_buckets = (int(spec.data.max_length),)  # one shape: compiled during the warm-up
  every = int(spec.logging_steps)
  spec.max_steps = every * (args.warmup_windows + args.windows + 1)  # + the untimed last window
  spec.warmup_steps = min(int(spec.warmup_steps), every)
  spec_lib.validate(spec, num_devices=_device_count())
  return spec


def _device_count() -> int:
  import jax
  return jax.device_count()


def _tokens(batch: dict[str, np.ndarray]) -> float:
  return float(np.count_nonzero(batch["segment_ids"]))


def loop_rate(metrics_jsonl: pathlib.Path, tokens_per_step: Sequence[float], first_step: int,
              last_step: int) -> tuple[float, int]:
  """The loop's own tokens/s over its logged windows after `first_step` up to `last_step`, and
  the steps they cover: each window's seconds are its tokens over its logged rate."""
  rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
  rows = sorted((r["step"], r["train/tokens_per_s"]) for r in rows if "train/tokens_per_s" in r)
  tokens = seconds = 0.0
  previous, covered = first_step, 0
  for step, rate in rows:
    if step <= first_step or step > last_step:
      continue
    window = sum(tokens_per_step[previous:step])  # steps previous+1 .. step (0-based batches)
    tokens, seconds, covered, previous = tokens + window, seconds + window / rate, covered + step - previous, step
  if not covered:
    raise RuntimeError(f"no logged window after step {first_step} in {metrics_jsonl}")
  return tokens / seconds, covered


def model_flops(cfg: Any, batch: dict[str, np.ndarray], mode: str, head_dims: Sequence[int]) -> float:
  """Model FLOPs of one batch's real tokens: each packed example (segment) attends over its own
  length only (common.analytic_model_flops per segment), plus the head at supervised markers."""
  segments = np.asarray(batch["segment_ids"])
  lengths = [int(n) for row in segments for n in np.bincount(row[row > 0])[1:] if n]
  flops = sum(common.analytic_model_flops(cfg, n, n, mode) for n in lengths)
  markers = int(np.asarray(batch["target_mask"]).sum())
  return flops + 6.0 * common.head_matmul_params(cfg.hidden_size, head_dims) * markers


class CompletionClock:
  """When each dispatched step's metrics become ready, seen by a thread that waits on them in
  dispatch order: the seconds between consecutive completions are the device's time per step,
  however the host queued the steps (a check on the two rates, which time from the host)."""

  def __init__(self):
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self.times: list[float] = []
    self._thread = threading.Thread(target=self._watch, name="bench-completion-clock", daemon=True)
    self._thread.start()

  def _watch(self) -> None:
    import jax
    while (metrics := self._queue.get()) is not None:
      jax.block_until_ready(metrics)
      self.times.append(time.perf_counter())

  def wrap(self, step: Callable[[Any, Any], tuple[Any, Any]]) -> Callable[[Any, Any], tuple[Any, Any]]:
    def watched(state: Any, batch: Any) -> tuple[Any, Any]:
      state, metrics = step(state, batch)
      self._queue.put(metrics)
      return state, metrics
    return watched

  def intervals(self, first: int, last: int) -> list[float]:
    """Seconds of steps first+1 .. last (1-based, in dispatch order); stops the thread first."""
    self._queue.put(None)
    self._thread.join()
    return [float(t) for t in np.diff(self.times[max(first - 1, 0):last])]


def utilisation(model_cfg: Any, mode: str, batches: Sequence[dict[str, np.ndarray]], tokens: Sequence[float],
                flops: Sequence[float], process_count: int, device_kind: str, loop_tps: float,
                step_tps: float) -> dict[str, Any]:
  """MFU of both rates over the timed batches (None where the device's peak is unknown), the
  rows' fill, and the loop's MFU counted the step benchmark's way (BUILD.md's MFU rows: every
  slot of a row a token, attending causally over the whole row)."""
  import jax
  peak = common.peak_flops(device_kind)
  per_token = sum(flops) / sum(tokens)
  rows_per_token = process_count * sum(common.analytic_model_flops(model_cfg, b["input_ids"].size,
                                                                   b["input_ids"].shape[1], mode)
                                       for b in batches) / sum(tokens)
  mfu = lambda tps, per: None if peak is None else tps * per / (peak * jax.device_count())
  return {"loop_mfu": mfu(loop_tps, per_token), "step_mfu": mfu(step_tps, per_token),
          "model_flops_per_token": per_token, "loop_mfu_rows": mfu(loop_tps, rows_per_token),
          "step_mfu_rows": mfu(step_tps, rows_per_token),
          "fill": sum(tokens) / (process_count * sum(b["input_ids"].size for b in batches))}


def step_rate(trainer: Any, placed: Sequence[Any], tokens_per_step: Sequence[float], warmup: int,
              paced: bool = False, seconds: list[float] | None = None) -> float:
  """The run's jitted train_step over the pre-placed batches: tokens/s of all but the first
  `warmup`. Back to back (every step queued at once), or `paced` as the loop paces it: each
  step's metrics read once the next step is queued, one step in flight. The timed steps'
  seconds between completions are added to `seconds`."""
  import jax
  clock = CompletionClock()
  state, step = trainer.state, clock.wrap(trainer.steps.train_step)
  for batch in placed[:warmup]:
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for batch in placed[warmup:]:
    state, next_metrics = step(state, batch)
    if paced:
      jax.device_get(metrics)
    metrics = next_metrics
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  trainer.state = state
  between = clock.intervals(warmup, len(placed))
  if seconds is not None:
    seconds.extend(between)
  return sum(tokens_per_step[warmup:]) / elapsed


def run(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
  import jax
  from rmjax.runtime import quiet_library_logs, reuse_host_memory
  from rmjax.train import loop as train_loop
  from rmjax.train.step import device_batch

  quiet_library_logs()
  device = jax.devices()[0]
  reuse_host_memory(device.platform)  # as the launcher does
  spec = make_spec(args, output_dir, device.platform != "cpu")
  trainer = train_loop.Trainer(spec)
  # Training is timed, nothing else: evaluation and checkpoints (due only at the last step, after
  # the timed windows) are skipped.
  trainer._evaluate_and_save = lambda step, eval_due, save_due: None
  try:
    steps, every = int(spec.max_steps), int(spec.logging_steps)
    first_timed = every * args.warmup_windows
    last_timed = first_timed + every * args.windows
    # The loop's batches, from a fresh iterator of its own dataset, read before the loop starts.
    batches = []
    for batch in iter(trainer.train_ds):
      batches.append(batch)
      if len(batches) == steps:
        break
    tokens = [_tokens(b) * trainer.process_count for b in batches]
    head_dims = tuple(int(d) for d in spec.head.hidden_dims)
    flops = [model_flops(trainer.model_cfg, b, str(spec.mode), head_dims) * trainer.process_count for b in batches]
    placed = [device_batch(b, trainer.mesh) for b in batches]
    jax.block_until_ready(placed)
    # The bare step runs before and after the loop (the mean of the two), so a drift of the
    # machine's speed during the run biases neither side. The loop continues from its state.
    warm = min(2, first_timed)
    timed = (placed[first_timed - warm:last_timed], tokens[first_timed - warm:last_timed], warm)
    between: dict[str, list[float]] = {"back_to_back": [], "paced": []}
    before = {paced: step_rate(trainer, *timed, paced=paced, seconds=between[PACING[paced]])
              for paced in (False, True)}
    traces = int(trainer.steps.traces["train"])
    clock = CompletionClock()
    unwatched, trainer.steps.train_step = trainer.steps.train_step, clock.wrap(trainer.steps.train_step)
    results = trainer.run()
    trainer.steps.train_step = unwatched
    between["loop"] = clock.intervals(first_timed, last_timed)
    trainer.train_iter.close()  # its thread and the pipeline stay quiet while the bare step runs
    loop_tps, covered = loop_rate(trainer.run_dir / "logs" / "metrics.jsonl", tokens, first_timed, last_timed)
    after = {paced: step_rate(trainer, *timed, paced=paced, seconds=between[PACING[paced]])
             for paced in (True, False)}
    # The step's figure is the faster way of queuing it.
    rates = {paced: (before[paced] + after[paced]) / 2 for paced in (False, True)}
    step_tps = max(rates.values())
    retraced = int(trainer.steps.traces["train"]) != traces
  finally:
    trainer.close()
  shape = {k: int(spec.model.demo[k]) for k in (*SHAPE_KEYS, "vocab_size")}
  window = slice(first_timed, last_timed)
  return {
    "bench": "loop", "loop_tokens_per_s": loop_tps, "step_tokens_per_s": step_tps,
    "loop_over_step": loop_tps / step_tps,
    "step_tokens_per_s_before_after": [max(before.values()), max(after.values())],
    "step_tokens_per_s_back_to_back": rates[False], "step_tokens_per_s_paced": rates[True],
    "seconds_per_step_median": {k: float(np.median(v)) for k, v in between.items()},
    **utilisation(trainer.model_cfg, str(spec.mode), batches[window], tokens[window], flops[window],
                  trainer.process_count, device.device_kind, loop_tps, step_tps),
    "timed_steps": covered, "warmup_steps": first_timed, "tokens_per_step": float(np.mean(tokens[window])),
    "chosen": dict(trainer.performance), "spec_file": args.spec or str(DEMO_SPEC),
    "batch_shape": sorted(list(s) for s in {tuple(b["input_ids"].shape) for b in batches}),
    "preset": args.preset, "mode": str(spec.mode), "model_demo": shape, "device": device.device_kind,
    "platform": device.platform, "device_count": jax.device_count(), "step_retraced": retraced,
    "train_step_traces": int(results["train_step_traces"]),
    "spec": {"batch_size": int(spec.batch_size), "grad_accum_steps": int(spec.grad_accum_steps),
             "data.max_length": int(spec.data.max_length), "data.pack": bool(spec.data.pack),
             "data.num_workers": int(spec.data.num_workers), "logging_steps": every,
             "model.compute_dtype": str(spec.model.compute_dtype), "model.remat": str(spec.model.remat),
             "model.scan_unroll": str(spec.model.scan_unroll), "opt_state_dtype": str(spec.opt_state_dtype),
             "perf_metrics": bool(spec.perf_metrics), "overrides": list(args.overrides)},
  }


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from rmjax.runtime import default_gpu_memory_fraction, enable_compilation_cache
  default_gpu_memory_fraction()  # as the launcher does: before jax starts its GPU backend
  enable_compilation_cache()  # as the launcher does: the run loads auto's compile of its choice
  from rmjax import spec as spec_lib
  try:
    if args.keep:
      record = run(args, args.keep)
    else:
      with tempfile.TemporaryDirectory(prefix="rmjax-bench-loop-") as tmp:
        record = run(args, tmp)
  except (spec_lib.SpecError, *common.RUN_ERRORS) as e:
    print(f"error: {common.error_text(e)}", file=sys.stderr)
    return 2
  common.emit(record)
  return 0
