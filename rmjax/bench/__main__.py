"""`python -m rmjax.bench`: time rmjax's training step against the PyTorch reference.

Why it exists: the performance claims in BUILD.md must be reproducible with one command.
Each (implementation, mode) pair runs by default in its own subprocess, so peak host memory
(ru_maxrss) belongs to that run alone and neither framework's thread pools or allocator
disturb the other; `--no-isolate` runs everything in this process (faster start-up, used by
the tests; CPU peak memory is then the process's cumulative peak).

The rmjax side's layer loop (`--scan-unroll`) defaults to "auto": what the training loop's
`model.scan_unroll: auto` tries first for the device and mode with the bench's remat held (the
head of rmjax/train/auto_settings.py's cost order), so the figure is what a user gets. Unlike
training it checks no memory: the shapes are the user's choice.

Output: one JSON object per run on stdout, then a last line
`{"ratios": {"<mode>": rmjax tokens/s / torch tokens/s, ...}}`. Progress goes to stderr.
`--rounds N` repeats every run N times, the two implementations' order reversed each round so
that neither always runs first: on a shared machine whose speed drifts by several percent
within minutes one pair of runs can fall either side of 1.0. The last line then holds the
median of the rounds' ratios and, under "round_ratios", each round's.

Examples:
  python -m rmjax.bench --preset 75m --seq-len 512 --batch 4 --mode both --impl both
  python -m rmjax.bench --preset qwen3-4b --seq-len 2048 --batch 4 --mode lora --remat
  python -m rmjax.bench --preset 75m --impl rmjax --mode full --profile /tmp/rmjax-trace
  python -m rmjax.bench --preset qwen3-4b --seq-len 2048 --mode lora --remat --target h100
  python -m rmjax.bench --preset qwen3-4b --seq-len 2048 --batch 4 --grad-accum 4 --mode full --remat --target h100
  python -m rmjax.bench --loop                  # the training loop against its bare step (bench/loop.py)
  python -m rmjax.bench --loop --help           # its own options
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Sequence

from rmjax import cli, runtime
from rmjax.bench import common, gpu_target
from rmjax.model.config import CPU_DOT_LIBRARIES, REMAT_POLICIES, ModelConfig

TOOL = "rmjax.bench"  # its error lines' label


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser(prog="python -m rmjax.bench", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="75m", choices=sorted(common.PRESETS), help="model shape")
  p.add_argument("--seq-len", type=int, default=512, help="tokens per row (no padding)")
  p.add_argument("--batch", type=int, default=4, help="rows per micro-batch (per step without --grad-accum)")
  p.add_argument("--grad-accum", type=int, default=1, metavar="N",
                 help="micro-batches per optimizer step (a step takes batch x N rows): rmjax runs the "
                      "training step's gradient accumulation, torch N backward passes then one update")
  p.add_argument("--mode", default="both", choices=(*common.MODES, "both"))
  p.add_argument("--impl", default="both", choices=(*common.IMPLS, "both"))
  p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (include compilation)")
  p.add_argument("--remat", action="store_true", help="full activation checkpointing on both sides")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="compute dtype; auto = bfloat16 on a GPU, float32 on CPU")
  p.add_argument("--frozen-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="LoRA frozen-base dtype (both impls); auto = bfloat16 on a GPU, float32 on CPU")
  p.add_argument("--attention", default="", choices=("", "xla", "cudnn"),
                 help="rmjax attention implementation (default: cuDNN on a GPU when it applies, else XLA)")
  p.add_argument("--attention-mask", default="causal", choices=("causal", "segments"),
                 help="rmjax: 'causal' (no mask array, what training uses for unpacked rows such as these "
                      "synthetic ones) or 'segments' (the segment-id mask packed rows need)")
  p.add_argument("--segment-attention", default="mask", choices=("mask", "cudnn_packed"),
                 help="rmjax, with --attention-mask segments under cuDNN: the segment mask, or cuDNN's packed "
                      "layout (each example its own sequence; Hopper GPUs)")
  p.add_argument("--opt-state-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="rmjax Adam moment (mu, nu) dtype")
  p.add_argument("--remat-policy", default="", choices=("", *REMAT_POLICIES),
                 help="rmjax remat policy by name (overrides --remat on the rmjax side; torch: full if not none)")
  p.add_argument("--scan-unroll", default="auto", metavar="auto|N",
                 help="rmjax layers per iteration of the layer loop; 0 unrolls every layer (no loop: a "
                      "GPU's GEMMs read each layer's weights in place, for a longer compile); auto (default): "
                      "what training's auto tries first on the device for the mode and remat, with no memory "
                      "check (the shapes are yours); the record holds the number")
  p.add_argument("--attention-query-block", type=int, default=ModelConfig.attention_query_block,
                 help="rmjax, XLA attention: query rows per block, each attending only the keys up to it "
                      "(0 = one block: all T x T scores)")
  p.add_argument("--cpu-dot-library", choices=tuple(CPU_DOT_LIBRARIES), default=ModelConfig.cpu_dot_library,
                 help="rmjax on a CPU: the library XLA hands the step's dots to (ynnpack: XLA's default)")
  p.add_argument("--no-flops", dest="flops", action="store_false",
                 help="skip the two unrolled analysis compiles that give compiled_flops")
  p.add_argument("--analysis-only", action="store_true",
                 help="rmjax: compile the step from shapes, print flops/memory analysis, run nothing")
  p.add_argument("--target", default="", choices=("", *gpu_target.TARGET_CONFIGS),
                 help="rmjax: compile for this GPU without one attached (needs jax's CUDA plugin) and "
                      "report XLA's memory analysis; implies --analysis-only")
  p.add_argument("--profile", default="", metavar="DIR",
                 help="rmjax: trace one extra step into DIR and add a `profile` summary (time by kind, "
                      "direction and model component) to the record")
  p.add_argument("--dropout", type=float, default=0.0, help="head dropout (same on both sides)")
  p.add_argument("--seed", type=int, default=0, help="numpy seed of the batches and init seed")
  p.add_argument("--rounds", type=int, default=1, metavar="N",
                 help="repeat the runs N times, the implementations' order reversed each round; the "
                      "ratios line gives the median of the rounds' ratios and each round's")
  p.add_argument("--no-isolate", dest="isolate", action="store_false",
                 help="run every (impl, mode) in this process instead of a subprocess each")
  p.add_argument("--no-ratios", dest="ratios", action="store_false", help=argparse.SUPPRESS)
  p.add_argument("--loop", action="store_true",
                 help="time the training loop against its bare step instead (one JSON line; options: --loop --help)")
  return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> common.BenchSettings:
  return common.BenchSettings(preset=args.preset, seq_len=args.seq_len, batch=args.batch,
                              grad_accum=args.grad_accum, steps=args.steps,
                              warmup=args.warmup, remat=args.remat, dtype=args.dtype,
                              dropout=args.dropout, seed=args.seed,
                              frozen_dtype=args.frozen_dtype, attention=args.attention,
                              attention_mask=args.attention_mask, segment_attention=args.segment_attention,
                              opt_state_dtype=args.opt_state_dtype, remat_name=args.remat_policy,
                              scan_unroll=args.scan_unroll, attention_query_block=args.attention_query_block,
                              cpu_dot_library=args.cpu_dot_library, flops=args.flops,
                              analysis_only=args.analysis_only or bool(args.target),
                              profile_dir=args.profile, target=args.target)


def run_in_process(impl: str, settings: common.BenchSettings, mode: str) -> dict[str, Any]:
  if impl == "rmjax":
    from rmjax.bench import jax_impl
    return jax_impl.run(settings, mode)
  from rmjax.bench import torch_ref
  return torch_ref.run(settings, mode)


def child_argv(impl: str, settings: common.BenchSettings, mode: str) -> list[str]:
  argv = [sys.executable, "-m", "rmjax.bench", "--no-isolate", "--no-ratios", "--impl", impl, "--mode", mode,
          "--preset", settings.preset, "--seq-len", str(settings.seq_len), "--batch", str(settings.batch),
          "--grad-accum", str(settings.grad_accum),
          "--steps", str(settings.steps), "--warmup", str(settings.warmup), "--dtype", settings.dtype,
          "--dropout", str(settings.dropout), "--seed", str(settings.seed),
          "--frozen-dtype", settings.frozen_dtype, "--attention", settings.attention,
          "--attention-mask", settings.attention_mask, "--segment-attention", settings.segment_attention,
          "--opt-state-dtype", settings.opt_state_dtype, "--remat-policy", settings.remat_name,
          "--scan-unroll", str(settings.scan_unroll), "--attention-query-block", str(settings.attention_query_block),
          "--cpu-dot-library", settings.cpu_dot_library,
          "--profile", settings.profile_dir,
          "--target", settings.target]
  flags = [("--remat", settings.remat), ("--no-flops", not settings.flops),
           ("--analysis-only", settings.analysis_only)]
  return argv + [flag for flag, on in flags if on]


def run_isolated(impl: str, settings: common.BenchSettings, mode: str) -> dict[str, Any]:
  proc = subprocess.run(child_argv(impl, settings, mode), stdout=subprocess.PIPE, text=True)
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  records = [r for r in records if r.get("impl") == impl]
  if proc.returncode or not records:
    return {"impl": impl, "mode": mode, "error": f"subprocess exited with code {proc.returncode}"}
  return records[-1]


def run_one(impl: str, settings: common.BenchSettings, mode: str, isolate: bool) -> dict[str, Any]:
  if isolate:
    return run_isolated(impl, settings, mode)  # the child prints its own progress line
  print(f"[rmjax.bench] {impl} {mode} preset={settings.preset} batch={settings.batch}x{settings.seq_len} "
        f"grad_accum={settings.grad_accum}", file=sys.stderr, flush=True)
  try:
    return run_in_process(impl, settings, mode)
  except common.RUN_ERRORS as e:
    print(f"[rmjax.bench] {impl} {mode} failed: {common.error_text(e)}", file=sys.stderr, flush=True)
    return {"impl": impl, "mode": mode, "error": common.error_text(e)}


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--loop" in argv:  # its own options and defaults
    from rmjax.bench import loop
    return loop.main(argv)
  args = parse_args(argv)
  try:
    settings = settings_from(args)
    settings.on_device(False).model_config("lora")  # validate shape options before any run
  except ValueError as e:
    return cli.report(TOOL, str(e))
  if args.rounds < 1:
    return cli.report(TOOL, f"--rounds must be at least 1, got {args.rounds}")
  if settings.analysis_only and args.impl == "torch":
    return cli.report(TOOL, "--analysis-only and --target compile rmjax's step only; use --impl rmjax")
  if args.target:
    # Compile-only: the local backend is the CPU. Without this, jax would first try to start the
    # CUDA plugin on a machine without a GPU (a long warning), and the plugin would stay unusable.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
      gpu_target.target_device(args.target)
    except gpu_target.TargetUnavailable as e:
      return cli.report(TOOL, str(e))
  modes = common.MODES if args.mode == "both" else (args.mode,)
  impls = common.IMPLS if args.impl == "both" else (args.impl,)
  if settings.analysis_only:
    impls = ("rmjax",)
  if not args.isolate and len(impls) > 1:
    # Sharing one GPU with torch: jax must not grab 75% of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  rounds = []
  for index in range(args.rounds):
    order = impls if index % 2 == 0 else impls[::-1]
    records = []
    for mode in modes:
      for impl in order:
        record = run_one(impl, settings, mode, args.isolate)
        common.emit(record if args.rounds == 1 else {**record, "round": index})
        records.append(record)
    rounds.append(records)
  if args.ratios:
    per_round = [common.ratios(records) for records in rounds]
    summary = {"ratios": common.median_ratios(per_round)}
    if args.rounds > 1:
      summary["round_ratios"] = {mode: [r[mode] for r in per_round] for mode in per_round[0]}
    common.emit(summary)
  return 1 if any("error" in r for records in rounds for r in records) else 0


def runs_rmjax_alone(argv: Sequence[str]) -> bool:
  """Whether this process times rmjax's step and nothing else (the loop, or --impl rmjax in this
  process): such a process takes the launcher's huge-page malloc, a torch run keeps its own."""
  if "--loop" in argv:
    return True
  args = parse_args(argv)
  return args.impl == "rmjax" and not args.isolate and not (args.analysis_only or args.target)


if __name__ == "__main__":
  if runs_rmjax_alone(sys.argv[1:]):
    runtime.restart_with_huge_page_malloc()  # as the launcher does
  sys.exit(main())
