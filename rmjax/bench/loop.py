"""`python -m rmjax.bench --loop`: the training loop's tokens/s against its bare step's, one process.

Why it exists: the step benchmark times `train_step` dispatched back to back; a user gets the
training loop (data pipeline, prefetch thread, metric reads, logging, the progress bar). This
runs both on the same shapes and the same batches, so their ratio `loop_over_step` is what the
loop costs and nothing else.

How: a real run is built through `rmjax.train.loop.Trainer` from `specs/demo.py`, with the
preset's model shape in `model.demo.*` (the demo's random backbone and tokenizer, synthetic
PRM800K-format data, the spec's defaults for packing, workers, prefetch and logging_steps) and
one length bucket (`data.max_length`), so every step has one shape and compiles once.
- loop: `Trainer.run()` for `(warmup + windows + 1) * logging_steps` steps, its prefetch
  thread, metric reads, logging and progress bar as a user runs them. A watcher thread sees
  each step's metrics become ready; the loop's seconds are the intervals between completions,
  which include any time the host kept the device waiting.
- step: the same jitted `steps.train_step` on the same batches (read beforehand from a fresh
  iterator of the run's own dataset, placed on the devices beforehand), dispatched back to
  back. It runs inside the loop (`Interleaved`): the timed windows are cut into segments of
  `--segment` loop steps, and before each a block of `--block` bare steps runs on the batches of
  the segment's timed loop steps, in turn, from the loop's state, with the loop waiting: with
  the defaults (a block as long as the timed steps) both sides count the same tokens. The two
  figures alternate every few seconds, so a drift of the machine's speed (more than half within
  a minute on some shared 2-core VMs) falls on both alike. Each segment's first 3 loop intervals
  are left out: the first spans the bare block, and the prefetcher refilled its 2 batches
  meanwhile. `segments` lists each segment's tokens and seconds on both sides; the rates are
  their sums' ratios. No retrace after the first pass (`step_retraced` says so).
Tokens are counted alike on both sides: real tokens, the nonzero `segment_ids`. `loop_mfu` and
`step_mfu` count the model FLOPs of those tokens (each packed example's attention over its own
length; GPUs with a known peak only); `fill` is real tokens over the rows' slots.

`--spec specs/full.py` (or lora.py) measures a shipped spec as a user runs it: every key of
that spec (batch, micro-batches, mode, "auto" remat and layer loop, optimizer dtype, head,
rows) on the demo's random backbone at the preset's shape, the preset's vocabulary included
(embedding and optimizer memory as the real model's, so "auto" meets the same limit), and the
demo's synthetic data; flags and `--set` apply on top. Evaluation and checkpoints are skipped
(they would fall after the timed windows; a 4B-shaped full run would write ~48 GB); GPU
memory and the compilation cache are set up as the launcher sets them up. Where the spec
leaves remat or the layer loop "auto", `auto` records what it compiled in its cost order, each
candidate's compiled peak, and what it took (`chosen`; `order_pick`, the first that fits, is
what a run without `model.auto_time` takes); with `--set model.auto_time=true` every candidate
that fits has its `step_s`, so the cost order's pick is timed against the old default.

Defaults: the 75m preset's width (768, 12 heads, MLP 2048) at 2 layers, the demo's rows
(16 of 128 tokens, 2 micro-batches) in full fine-tuning: a step of about a second on 2 CPU
cores, against a few milliseconds of data work per batch. A real run's step (a 4B model on a
GPU) dwarfs its data work in the same way; the demo's own 64-wide model does not (its step is
shorter than reading its batch), so there the ratio would measure the data pipeline, not the
loop. About 1-2 minutes on 2 CPU cores, compilation included.
"""

from __future__ import annotations

import argparse
import pathlib
import queue
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from rmjax import cli
from rmjax.bench import common
from rmjax.train import prefetch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO_SPEC = ROOT / "specs" / "demo.py"
# The model.demo keys a preset's shape fills.
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser(prog="python -m rmjax.bench --loop", description=__doc__.split("\n\n")[0])
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
  p.add_argument("--segment", type=int, default=6, help="loop steps between bare blocks (the first 3 untimed)")
  p.add_argument("--block", type=int, default=3, help="bare steps per block")
  p.add_argument("--warmup-windows", type=int, default=1, help="logging windows before timing (compilation)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="any other spec key, e.g. --set data.pack=true --set model.remat=full")
  p.add_argument("--keep", default="", metavar="DIR", help="write the run directory here (default: a temporary one)")
  args = p.parse_args(argv)
  if args.windows < 1 or args.warmup_windows < 1 or args.layers < 0:
    p.error("need --windows >= 1, --warmup-windows >= 1, --layers >= 0")
  if args.segment <= Interleaved.SETTLE or args.block < 2:
    p.error(f"need --segment > {Interleaved.SETTLE} (its first {Interleaved.SETTLE} loop steps are untimed) and "
            "--block >= 2 (a block's median interval needs two steps)")
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


def model_flops(cfg: Any, batch: dict[str, np.ndarray], mode: str, head_dims: Sequence[int]) -> float:
  """Model FLOPs of one batch's real tokens: each packed example (segment) attends over its own
  length only (common.analytic_model_flops per segment; the last layer at its supervised
  markers where the model runs it there), plus the head at supervised markers."""
  from rmjax.model.transformer import last_layer_at_queries
  at_markers = last_layer_at_queries(cfg)
  flops = 0.0
  for row, positions, mask in zip(batch["segment_ids"], batch["marker_positions"], batch["target_mask"]):
    row = np.asarray(row)
    marker_segments = row[np.asarray(positions)[np.asarray(mask) > 0]]
    for segment, length in enumerate(np.bincount(row[row > 0])):
      if segment and length:
        segment_markers = int(np.count_nonzero(marker_segments == segment))
        flops += common.analytic_model_flops(cfg, int(length), int(length), mode,
                                             last_layer_rows=segment_markers if at_markers else None)
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

  def stop(self) -> list[float]:
    """Each watched step's completion time (perf_counter seconds), in dispatch order."""
    self._queue.put(None)
    self._thread.join()
    return list(self.times)


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


class Interleaved:
  """The loop's train_step, with blocks of bare steps between segments of the loop's steps.

  Called by the loop as its `train_step`. Before the loop dispatches the first step of a
  segment, it waits for the loop's state, runs `block` steps of the batches whose loop steps the
  segment times (pre-placed, in turn) through the same jitted step back to back, waits for them,
  and hands the resulting state to the loop's step. The two figures alternate every few seconds,
  so a drift of the machine's speed falls on both alike. The loop's seconds are the intervals
  between its steps' completions, less each segment's first `SETTLE`: the first spans the bare
  block, and during the block the prefetcher refilled (`prefetch.DEPTH` batches), which would
  hide a pipeline slower than the step. The bare step's seconds are each block's wall time."""

  SETTLE = 1 + prefetch.DEPTH

  def __init__(self, step: Callable[[Any, Any], tuple[Any, Any]], placed: Sequence[Any],
               tokens: Sequence[float], starts: Sequence[int], segment: int, block: int):
    if not starts:
      raise ValueError(f"no segment of {segment} loop steps fits the timed windows")
    self._step, self._placed, self._tokens = step, placed, tokens
    self.starts, self.segment, self.block = tuple(starts), segment, block  # starts: 1-based loop steps
    self.loop_clock, self.bare_clock = CompletionClock(), CompletionClock()
    self._loop_step, self._bare_step = self.loop_clock.wrap(step), self.bare_clock.wrap(step)
    self.dispatched = 0
    self.blocks: list[tuple[float, float]] = []  # (tokens, seconds) per bare block

  def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
    import jax
    self.dispatched += 1
    if self.dispatched in self.starts:
      timed = [k - 1 for k in self._timed(self.dispatched)]  # 0-based: loop step k runs batch k - 1
      indices = [timed[i % len(timed)] for i in range(self.block)]
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      for index in indices:
        state, metrics = self._bare_step(state, self._placed[index])
      jax.block_until_ready((state, metrics))
      self.blocks.append((sum(self._tokens[i] for i in indices), time.perf_counter() - t0))
    return self._loop_step(state, batch)

  def _timed(self, start: int) -> range:
    """The 1-based loop steps of the segment opened at `start` whose intervals count."""
    return range(start + self.SETTLE, start + self.segment)

  def timed_loop_steps(self) -> list[int]:
    return [k for start in self.starts for k in self._timed(start)]

  def segments(self) -> list[dict[str, float]]:
    """Per segment: both sides' tokens and seconds, and their median seconds per step."""
    loop_times, bare_times = self.loop_clock.stop(), self.bare_clock.stop()
    out = []
    for i, (start, (bare_tokens, bare_seconds)) in enumerate(zip(self.starts, self.blocks)):
      steps = self._timed(start)
      seconds = [loop_times[k - 1] - loop_times[k - 2] for k in steps]
      out.append({"loop_tokens": sum(self._tokens[k - 1] for k in steps), "loop_seconds": sum(seconds),
                  "step_tokens": bare_tokens, "step_seconds": bare_seconds,
                  "loop_seconds_per_step_median": float(np.median(seconds)),
                  "step_seconds_per_step_median":
                    float(np.median(np.diff(bare_times[i * self.block:(i + 1) * self.block])))})
    return out


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
    starts = list(range(first_timed + 1, first_timed + every * args.windows - args.segment + 2, args.segment))
    interleaved = Interleaved(trainer.steps.train_step, placed, tokens, starts, args.segment, args.block)
    unwatched, trainer.steps.train_step = trainer.steps.train_step, interleaved
    results = trainer.run()
    trainer.steps.train_step = unwatched
    segments, timed = interleaved.segments(), [k - 1 for k in interleaved.timed_loop_steps()]
    shapes = {tuple(b["input_ids"].shape) for b in batches}
    retraced = trainer.steps.train_traces(shapes) > len(shapes)  # one trace a shape serves both sides
  finally:
    trainer.close()
  rate = lambda side: sum(w[f"{side}_tokens"] for w in segments) / sum(w[f"{side}_seconds"] for w in segments)
  loop_tps, step_tps = rate("loop"), rate("step")
  shape = {k: int(spec.model.demo[k]) for k in (*SHAPE_KEYS, "vocab_size")}
  auto_record = None if trainer.auto_choice is None else trainer.auto_choice.as_record()
  return {
    "bench": "loop", "loop_tokens_per_s": loop_tps, "step_tokens_per_s": step_tps,
    "loop_over_step": loop_tps / step_tps,
    "segments": segments, "bare_steps": len(segments) * args.block,
    **utilisation(trainer.model_cfg, str(spec.mode), [batches[i] for i in timed], [tokens[i] for i in timed],
                  [flops[i] for i in timed], trainer.process_count, device.device_kind, loop_tps, step_tps),
    "timed_steps": len(timed), "warmup_steps": first_timed,
    "tokens_per_step": float(np.mean([tokens[i] for i in timed])),
    "chosen": dict(trainer.performance), "auto": auto_record, "spec_file": args.spec or str(DEMO_SPEC),
    "batch_shape": sorted(list(s) for s in shapes),
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
  enable_compilation_cache()  # as the launcher does
  from rmjax import spec as spec_lib
  try:
    if args.keep:
      record = run(args, args.keep)
    else:
      with tempfile.TemporaryDirectory(prefix="rmjax-bench-loop-") as tmp:
        record = run(args, tmp)
  except (spec_lib.SpecError, *common.RUN_ERRORS) as e:
    return cli.report("rmjax.bench", common.error_text(e))
  common.emit(record)
  return 0
