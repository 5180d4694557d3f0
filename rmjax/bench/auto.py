"""`python -m rmjax.bench.auto --spec specs/full.py --preset qwen3-4b --target h100`: what
`model.remat` / `model.scan_unroll` = "auto" picks for a spec at a model shape, without weights.

Why it exists: auto decides by compiling the run's step (rmjax.train.auto_settings); this runs
the same choice for a spec's optimizer, batch and data shapes on a preset's model shape from
abstract state, here or for a described GPU (`--target`, bench/gpu_target.py: jax's CUDA plugin,
no GPU needed), and prints one JSON line: the choice, each candidate's compiled peak against the
limit, the seconds auto spent compiling, and a predicted cost of the choice next to the old
default's.

Memory limit: the target's device memory times the launcher's memory fraction
(XLA_PYTHON_CLIENT_MEM_FRACTION, else rmjax.runtime's default), or this device's limit.

Predicted cost (`--no-cost` skips it): XLA's cost analysis of the step with the layers
extrapolated from unrolled 1- and 2-layer compiles (per layer = C(2) - C(1); total = C(1) +
(L - 1) per layer), compiled for this machine's device (a compile for a described GPU reports
no cost analysis; the FLOPs are the same, the bytes follow this device's fusions) with XLA
attention (cuDNN's custom call reports no FLOPs). FLOPs include what the remat policy recomputes. Bytes accessed are XLA's
per-op operand and result bytes (an upper bound on traffic); the unrolled compiles do not
contain the layer loop, so the loop's copies of each layer's weights and saved activations out
of their stacks are NOT counted: for a candidate in the loop they are a lower bound
(benchmarks/traffic.py counts those copies from a compile's dump).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Sequence

from rmjax import cli

_USAGE = "python -m rmjax.bench.auto --spec FILE [--set KEY=VALUE ...] [--preset P] [--target h100] [--no-cost]"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  from rmjax.bench.common import PRESETS
  from rmjax.bench.gpu_target import TARGET_CONFIGS
  p = cli.ArgumentParser(prog="python -m rmjax.bench.auto", description=__doc__.split("\n\n")[0])
  p.add_argument("--spec", required=True, help="spec file (file.py[:arg]) whose settings the step takes")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override (repeatable)")
  p.add_argument("--preset", default="qwen3-4b", choices=sorted(PRESETS), help="model shape (no weights)")
  p.add_argument("--target", default="", choices=["", *TARGET_CONFIGS], help="compile for this GPU (no GPU needed)")
  p.add_argument("--no-cost", dest="cost", action="store_false", help="skip the predicted-cost compiles")
  return p.parse_args(argv)


def target_limit(name: str) -> tuple[int, str]:
  """(bytes, source): the target GPU's memory times the launcher's memory fraction."""
  from rmjax import runtime
  from rmjax.bench.gpu_target import target_config_text
  found = re.search(r"device_memory_size:\s*(\d+)", target_config_text(name))
  if found is None:
    raise ValueError(f"the {name} target config gives no device_memory_size")
  fraction = float(os.environ.get(runtime.MEMORY_FRACTION_ENV, runtime.DEFAULT_MEMORY_FRACTION))
  return int(int(found.group(1)) * fraction), f"{fraction:g} of the {name}'s memory"


def model_config(spec: Any, preset: str, target: str) -> Any:
  """The preset's decoder shape with the spec's model settings ("auto" at its fallback)."""
  from rmjax.bench.common import PRESETS
  from rmjax.model.transformer import auto_attention_impl
  from rmjax.train.build import model_overrides
  cfg = PRESETS[preset]()
  cfg = cfg.replace(**model_overrides(spec), marker_id=cfg.vocab_size - 1)
  if target and not cfg.attention_impl:  # "auto" would ask this machine's backend
    cfg = cfg.replace(attention_impl=auto_attention_impl(cfg, cfg.compute_dtype, "gpu"))
  return cfg


def predicted_cost(compile_for, cfg: Any, candidate: Any) -> dict[str, Any]:
  """FLOPs and bytes accessed of the whole step, from unrolled 1- and 2-layer compiles."""
  from rmjax.bench.jax_impl import unrolled_layers_config
  from rmjax.train.auto_settings import Candidate, cost_analysis
  counts = []
  for n in (1, 2):
    small = unrolled_layers_config(cfg.replace(**candidate.as_dict()), n)
    cost = cost_analysis(compile_for(small)(Candidate(candidate.remat, 0)))
    if "flops" not in cost or "bytes accessed" not in cost:
      return {"flops": None, "bytes_accessed": None}
    counts.append((float(cost["flops"]), float(cost["bytes accessed"])))
  extrapolate = lambda i: counts[0][i] + (cfg.num_layers - 1) * (counts[1][i] - counts[0][i])
  return {"flops": extrapolate(0), "bytes_accessed": extrapolate(1)}


def announced(compile_fn, model_cfg: Any):
  """compile_fn, saying on stderr what it compiles before each compile (at a long sequence one
  takes minutes on a CPU, and the JSON line comes only at the end)."""
  def compile_one(candidate):
    print(f"rmjax.bench.auto: compiling the {model_cfg.num_layers}-layer step, {candidate.label()}",
          file=sys.stderr, flush=True)
    return compile_fn(candidate)
  return compile_one


def ratio(a: float | None, b: float | None) -> float | None:
  return round(a / b, 4) if a is not None and b else None


def run(args: argparse.Namespace) -> dict[str, Any]:
  import contextlib

  import jax

  from rmjax import sharding as shd
  from rmjax import spec as spec_lib
  from rmjax.bench import gpu_target
  from rmjax.data.render import RenderConfig
  from rmjax.train import auto_settings as auto
  from rmjax.train.build import head_config
  from rmjax.train.optim import OptimConfig

  spec = spec_lib.apply_overrides(spec_lib.load_spec_file(args.spec), args.set)
  spec_lib.validate(spec, num_devices=1, check_paths=False)
  device = gpu_target.target_device(args.target) if args.target else jax.devices()[0]
  checks = gpu_target.cudnn_checks_for(args.target) if args.target else contextlib.nullcontext()
  cfg = model_config(spec, args.preset, args.target)
  head_cfg, optim_cfg = head_config(spec), OptimConfig.from_spec(spec)
  render_cfg = RenderConfig.from_spec(spec.data)
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), devices=[device])
  shapes = auto.run_shapes(spec, render_cfg)
  compile_for = lambda model_cfg: announced(auto.step_compiler(model_cfg, head_cfg, optim_cfg, mesh, shapes), model_cfg)
  settings = spec_lib.performance_settings(spec)
  options = auto.candidates(str(spec.mode), device.platform, settings["remat"], settings["scan_unroll"])
  limit, source = target_limit(args.target) if args.target else auto.memory_limit(device)
  with checks:
    fallback = auto.old_default(settings["remat"], settings["scan_unroll"])
    choice = auto.choose(options, compile_for(cfg), limit, source, fallback=fallback)
    trials = {t.candidate: t for t in choice.trials}
    if fallback not in trials:  # the old default's peak, for comparison (not part of auto's cost)
      trials[fallback] = auto.choose([fallback], compile_for(cfg), limit, source).trials[0]
  cost = {}
  if args.cost:  # on this machine's device: a compile for a described GPU reports no cost analysis
    start = time.perf_counter()
    local_mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), devices=[jax.devices()[0]])
    compile_here = lambda model_cfg: announced(auto.step_compiler(model_cfg, head_cfg, optim_cfg, local_mesh, shapes),
                                               model_cfg)
    chosen = predicted_cost(compile_here, cfg, choice.candidate)
    old = chosen if choice.candidate == fallback else predicted_cost(compile_here, cfg, fallback)
    cost = {"predicted": {"chosen": chosen, "old_default": old,
                          "flops_chosen_over_old": ratio(chosen["flops"], old["flops"]),
                          "bytes_chosen_over_old": ratio(chosen["bytes_accessed"], old["bytes_accessed"]),
                          "compile_s": round(time.perf_counter() - start, 1),
                          "counts": f"XLA cost analysis on {jax.devices()[0].platform}, layers extrapolated "
                                    "from unrolled 1- and 2-layer compiles with XLA attention; FLOPs include "
                                    "remat recompute; bytes leave out the layer loop's copies out of its stacks"}}
  return {"spec": args.spec, "preset": args.preset, "target": args.target or None, "device": device.device_kind,
          "mode": str(spec.mode), "rows": int(spec.batch_size), "grad_accum_steps": int(spec.grad_accum_steps),
          "seq_len": int(shapes["input_ids"].shape[1]), "marker_slots": int(shapes["targets"].shape[1]),
          "opt_state_dtype": str(spec.opt_state_dtype), "attention": cfg.attention_impl or "auto",
          "limit_mb": auto.mb(limit), "limit_source": source, "budget_mb": auto.mb(limit * (1 - auto.MARGIN)),
          "chosen": choice.candidate.as_dict(), "fitted": choice.fitted,
          "tried": [t.as_record() for t in choice.trials], "auto_compile_s": round(choice.compile_s, 1),
          "old_default": trials[fallback].as_record(), **cost}


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from rmjax.bench.gpu_target import TargetUnavailable
  from rmjax.spec import SpecError
  try:
    record = run(args)
  except (SpecError, TargetUnavailable, ValueError) as e:
    if os.environ.get("RMJAX_DEBUG"):
      raise
    raise SystemExit(cli.report("rmjax.bench.auto", f"{cli.first_line(e)}; {_USAGE}")) from None
  print(json.dumps(record))


if __name__ == "__main__":
  main()
