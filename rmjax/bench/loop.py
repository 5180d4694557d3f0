"""`python -m rmjax.bench --loop`: the training loop's tokens/s against its bare step's, one process.

Why it exists: the step benchmark times `train_step` dispatched back to back; a user gets the
training loop (data pipeline, prefetch thread, metric reads, logging, the progress bar). This
runs both on the same shapes and the same batches, so their ratio `loop_over_step` is what the
loop costs and nothing else.

How: a real run is built through `rmjax.train.loop.Trainer` from `specs/demo.py`, with the
preset's model shape in `model.demo.*` (the demo's random backbone and tokenizer, synthetic
PRM800K-format data, the spec's defaults for packing, workers, prefetch and logging_steps) and
one length bucket (`data.max_length`), so every step has one shape and compiles once.
- loop: `Trainer.run()` for `warmup + windows * logging_steps` steps, warmup a multiple of
  logging_steps. Its figure is the loop's own logged `train/tokens_per_s` (metrics.jsonl), over
  the logging windows after the warm-up: each window runs from reading one logged step's
  metrics to reading the next's, so the windows together cover the timed steps exactly, and
  the final evaluation and checkpoint fall outside them.
- step: the same batches, read beforehand from a fresh iterator of the run's own training
  dataset (its first batches are the loop's), placed on the devices beforehand, then the same
  jitted `steps.train_step` dispatched back to back: warm-up steps, a block, the timed steps, a
  block; once before the loop and once after it (from the run's final state), averaged, so a
  drift of the machine's speed (~5% over a minute on a shared 2-core VM) biases neither side.
  No retrace after the first pass (`step_retraced` says so).
Tokens are counted alike on both sides: real tokens, the nonzero `segment_ids`.

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
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from rmjax.bench import common

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO_SPEC = ROOT / "specs" / "demo.py"
# The model.demo keys a preset's shape fills.
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m rmjax.bench --loop", description=__doc__.split("\n\n")[0])
  p.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--preset", default="75m", choices=sorted(common.PRESETS), help="model shape (model.demo.*)")
  p.add_argument("--layers", type=int, default=2, help="decoder layers (0 = the preset's)")
  p.add_argument("--mode", default="full", choices=common.MODES)
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


def make_spec(args: argparse.Namespace, output_dir: str, on_accelerator: bool) -> Any:
  """specs/demo.py with the preset's shape and the flags; the run's steps and windows."""
  from rmjax import spec as spec_lib
  spec = spec_lib.load_spec_file(f"{DEMO_SPEC}:{args.mode}")
  shape = common.PRESETS[args.preset]()
  for key in SHAPE_KEYS:
    setattr(spec.model.demo, key, int(getattr(shape, key)))
  if args.layers:
    spec.model.demo.num_layers = args.layers
  dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_accelerator else "float32")
  spec.model.compute_dtype = dtype
  spec.model.frozen_dtype = dtype
  if args.seq_len:
    spec.data.max_length = args.seq_len
  if args.batch:
    spec.batch_size = args.batch
  if args.grad_accum:
    spec.grad_accum_steps = args.grad_accum
  spec.output_dir, spec.experiment_name = output_dir, f"bench-loop-{args.mode}"
  spec.eval_steps, spec.save_steps = 0, 0  # evaluated and saved once, after the last (timed) step
  spec.max_eval_batches = 1
  spec_lib.apply_overrides(spec, args.overrides)
  spec.data.length_buckets = (int(spec.data.max_length),)  # one shape: compiled during the warm-up
  every = int(spec.logging_steps)
  spec.max_steps = every * (args.warmup_windows + args.windows)
  spec.warmup_steps = min(int(spec.warmup_steps), every)
  spec_lib.validate(spec, num_devices=_device_count())
  return spec


def _device_count() -> int:
  import jax
  return jax.device_count()


def _tokens(batch: dict[str, np.ndarray]) -> float:
  return float(np.count_nonzero(batch["segment_ids"]))


def loop_rate(metrics_jsonl: pathlib.Path, tokens_per_step: Sequence[float], first_step: int) -> tuple[float, int]:
  """The loop's own tokens/s over its logged windows ending after `first_step`, and the steps
  they cover: each window's seconds are its tokens over its logged rate."""
  rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
  rows = sorted((r["step"], r["train/tokens_per_s"]) for r in rows if "train/tokens_per_s" in r)
  tokens = seconds = 0.0
  previous, covered = first_step, 0
  for step, rate in rows:
    if step <= first_step:
      continue
    window = sum(tokens_per_step[previous:step])  # steps previous+1 .. step (0-based batches)
    tokens, seconds, covered, previous = tokens + window, seconds + window / rate, covered + step - previous, step
  if not covered:
    raise RuntimeError(f"no logged window after step {first_step} in {metrics_jsonl}")
  return tokens / seconds, covered


def step_rate(trainer: Any, placed: Sequence[Any], tokens_per_step: Sequence[float], warmup: int) -> float:
  """The run's jitted train_step over the pre-placed batches, back to back: tokens/s of all but
  the first `warmup`."""
  import jax
  state, step = trainer.state, trainer.steps.train_step
  for batch in placed[:warmup]:
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for batch in placed[warmup:]:
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - t0
  trainer.state = state
  return sum(tokens_per_step[warmup:]) / seconds


def run(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
  import jax
  from rmjax.runtime import quiet_library_logs
  from rmjax.train import loop as train_loop
  from rmjax.train.step import device_batch

  quiet_library_logs()
  device = jax.devices()[0]
  spec = make_spec(args, output_dir, device.platform != "cpu")
  trainer = train_loop.Trainer(spec)
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
    placed = [device_batch(b, trainer.mesh) for b in batches]
    jax.block_until_ready(placed)
    # The bare step runs before and after the loop (the mean of the two), so a drift of the
    # machine's speed during the run biases neither side. The loop continues from its state.
    warm = min(2, first_timed)
    before = step_rate(trainer, placed[first_timed - warm:], tokens[first_timed - warm:], warm)
    traces = int(trainer.steps.traces["train"])
    results = trainer.run()
    trainer.train_iter.close()  # its thread and the pipeline stay quiet while the bare step runs
    loop_tps, covered = loop_rate(trainer.run_dir / "logs" / "metrics.jsonl", tokens, first_timed)
    after = step_rate(trainer, placed[first_timed - warm:], tokens[first_timed - warm:], warm)
    step_tps = (before + after) / 2
    retraced = int(trainer.steps.traces["train"]) != traces
  finally:
    trainer.close()
  shape = {k: int(spec.model.demo[k]) for k in SHAPE_KEYS}
  return {
    "bench": "loop", "loop_tokens_per_s": loop_tps, "step_tokens_per_s": step_tps,
    "loop_over_step": loop_tps / step_tps, "step_tokens_per_s_before_after": [before, after],
    "timed_steps": covered, "warmup_steps": first_timed, "tokens_per_step": float(np.mean(tokens[first_timed:])),
    "batch_shape": sorted(list(s) for s in {tuple(b["input_ids"].shape) for b in batches}),
    "preset": args.preset, "mode": str(spec.mode), "model_demo": shape, "device": device.device_kind,
    "platform": device.platform, "device_count": jax.device_count(), "step_retraced": retraced,
    "train_step_traces": int(results["train_step_traces"]),
    "spec": {"batch_size": int(spec.batch_size), "grad_accum_steps": int(spec.grad_accum_steps),
             "data.max_length": int(spec.data.max_length), "data.pack": bool(spec.data.pack),
             "data.num_workers": int(spec.data.num_workers), "logging_steps": every,
             "model.compute_dtype": str(spec.model.compute_dtype), "model.remat": str(spec.model.remat),
             "perf_metrics": bool(spec.perf_metrics), "overrides": list(args.overrides)},
  }


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
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
