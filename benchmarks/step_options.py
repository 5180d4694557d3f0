"""`python -m benchmarks.step_options`: rmjax's train step under XLA compile options, A/B in one process.

Why it exists: an XLA flag that might speed up the CPU step (which library runs the dots, how
the step is scheduled) can only be judged on the whole step, and separate processes on a shared
CPU differ by more than such a flag gains. This compiles the bench's train step (the preset,
mode and auto settings of `python -m rmjax.bench`) once as rmjax ships it and once with
`--option NAME=VALUE` pairs as per-compile options, checks that the options changed the
compiled program, then times the two executables in alternating blocks of `--block` steps on
the same state and batches (the order reversed each round) and prints one JSON line: each
variant's median step seconds and `default_over_options` (above 1: the options are faster).
`--autodiff-projections` makes the other variant's projections plain `jnp.dot`s (autodiff's
weight gradients, which XLA's CPU backend runs on Eigen) instead of model/projection.py's,
with or without options: what that module gains, measured on the whole step.
`--every-row-last-layer` makes the other variant run the decoder's last layer at every row, as
a plain decoder does, and take the marker rows from its output: what running it at the markers
only gains (model/transformer.py's Decoder). `--indexed-layer-slices` makes the unrolled layers
of the other variant index each layer's weights out of their stacks (`a[i]`) rather than split
each stack once: what model/transformer.py's `layer_params` gains. `--autodiff-swiglu` gives the
other variant autodiff's silu(gate) * up: what model/swiglu.py gains. `--output-scaled-lora`
scales each LoRA update's output rather than x A: what model/transformer.py's `lora_update`
gains.
`--cpu-dot-library LIB` compiles the other variant's step with its dots in LIB
(model/cpu_dots.py).

  python -m benchmarks.step_options --preset 75m --mode full --option xla_cpu_experimental_ynn_fusion_type=
  python -m benchmarks.step_options --preset 75m --mode full --autodiff-projections
  python -m benchmarks.step_options --preset 75m --mode lora --every-row-last-layer
  python -m benchmarks.step_options --preset 75m --mode full --indexed-layer-slices
  python -m benchmarks.step_options --preset 75m --mode full --autodiff-swiglu
  python -m benchmarks.step_options --preset 75m --mode lora --output-scaled-lora
  python -m benchmarks.step_options --preset 75m --mode full --cpu-dot-library onednn
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from rmjax import cli, runtime
from rmjax.bench import common, jax_impl
from rmjax.model import swiglu, transformer
from rmjax.model.config import CPU_DOT_LIBRARIES, ModelConfig
from rmjax.train import auto_settings, optim
from rmjax.train.step import TRAIN_KEYS, device_batch


def parse_option(text: str) -> tuple[str, Any]:
  """NAME=VALUE, VALUE read as a bool, an int or else kept as text (empty allowed)."""
  name, sep, value = text.partition("=")
  if not sep or not name:
    raise argparse.ArgumentTypeError(f"{text!r}: want NAME=VALUE")
  lowered = value.strip().lower()
  if lowered in ("true", "false"):
    return name, lowered == "true"
  try:
    return name, int(value)
  except ValueError:
    return name, value


_METADATA = re.compile(r", metadata=\{[^}]*\}")


def program(hlo_text: str) -> list[str]:
  """The instructions of compiled HLO text without their metadata: the text also names source
  lines and the Python stack that traced it, which differ between a program loaded from the
  compilation cache and one compiled here, where the program does not."""
  return [_METADATA.sub("", line) for line in hlo_text.splitlines() if " = " in line]


def _indexed_layer_params(stacked: Any, num_layers: int) -> list[Any]:
  return [jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers)]


# What each tracing flag replaces in the other variant: flag -> (model/transformer.py's name,
# the replacement, the flag's help).
RETRACED: dict[str, tuple[str, Callable[..., Any], str]] = {
  "autodiff_projections": ("matmul", jnp.dot,
                           "the other variant's projections as plain jnp.dot (autodiff's weight gradients)"),
  "indexed_layer_slices": ("layer_params", _indexed_layer_params,
                           "the other variant's unrolled layers index their weights out of the stacks"),
  "autodiff_swiglu": ("swiglu", swiglu.plain_swiglu,
                      "the other variant's silu(gate) * up with autodiff's backward pass"),
  "output_scaled_lora": ("lora_update", lambda x, a, b, scale: scale * transformer.matmul(transformer.matmul(x, a), b),
                         "the other variant's LoRA scale applied to each projection's output, not to x A"),
}


@contextlib.contextmanager
def traced_with(flags: Sequence[str]) -> Iterator[None]:
  """While open, the decoder traces with the replacements of `flags` (RETRACED)."""
  shipped = {flag: getattr(transformer, RETRACED[flag][0]) for flag in flags}
  for flag in flags:
    setattr(transformer, RETRACED[flag][0], RETRACED[flag][1])
  try:
    yield
  finally:
    for flag, function in shipped.items():
      setattr(transformer, RETRACED[flag][0], function)


def compiled_variants(preset: str, mode: str, seq_len: int, batch: int, options: dict[str, Any],
                      retraced: Sequence[str] = (), every_row_last_layer: bool = False,
                      cpu_dot_library: str = ""):
  """The step's state, two batches and {"default": executable, "options": executable}; the
  latter with `options`, traced with the replacements of the `retraced` flags (RETRACED), with
  the decoder's last layer at every row if `every_row_last_layer` and its dots in
  `cpu_dot_library` if given (model/cpu_dots.py)."""
  settings = common.BenchSettings(preset=preset, seq_len=seq_len, batch=batch, flops=False)
  device = jax.devices()[0]
  settings = jax_impl.resolve_scan_unroll(settings.on_device(device.platform != "cpu"), mode, device.platform)
  host_batches = common.make_batches(settings.model_config(mode), settings, 2)
  steps, state, mesh = jax_impl.build(settings, mode, device)
  batches = [{k: v for k, v in device_batch(b, mesh).items() if k in TRAIN_KEYS} for b in host_batches]
  variants = {"default": auto_settings.lower_step(steps, state, batches[0]).compile()}
  shipped_cfg = settings.model_config(mode)
  other_cfg = shipped_cfg.replace(last_layer_query_rows_only=not every_row_last_layer,
                                  cpu_dot_library=cpu_dot_library or shipped_cfg.cpu_dot_library)
  with traced_with(retraced):
    retrace = bool(retraced) or other_cfg != shipped_cfg
    other_steps = jax_impl.build_abstract(settings, mode, device, other_cfg)[0] if retrace else steps
    lowered = auto_settings.lower_step(other_steps, state, batches[0])
  variants["options"] = lowered.compile(compiler_options=options)
  if program(variants["default"].as_text()) == program(variants["options"].as_text()):
    raise ValueError(f"the options {options} leave the compiled step unchanged")
  return state, batches, variants


def time_variants(state, batches, variants: dict, rounds: int, block: int) -> dict[str, float]:
  """Median seconds a step of each variant, blocks alternating, state carried through all."""
  holder = {"state": state}

  def step(name: str, batch) -> float:
    start = time.perf_counter()
    new_state, metrics = variants[name](holder["state"], batch)
    jax.block_until_ready((new_state, metrics))
    holder["state"] = new_state
    return time.perf_counter() - start

  for name in variants:  # warm: first runs allocate
    step(name, batches[0])
  times: dict[str, list[float]] = {name: [] for name in variants}
  for index in range(rounds):
    for name in (list(variants) if index % 2 == 0 else list(variants)[::-1]):
      times[name].extend(step(name, batches[i % len(batches)]) for i in range(block))
  return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(prog="python -m benchmarks.step_options", description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="75m", choices=sorted(common.PRESETS))
  p.add_argument("--mode", default="full", choices=optim.MODES)
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--option", dest="options", action="append", type=parse_option, default=[],
                 metavar="NAME=VALUE", help="an XLA compile option (repeatable), e.g. xla_cpu_experimental_ynn_fusion_type=")
  p.add_argument("--every-row-last-layer", action="store_true",
                 help="the other variant's last decoder layer at every row, not the markers only")
  p.add_argument("--cpu-dot-library", choices=tuple(CPU_DOT_LIBRARIES), default="",
                 help="the library the other variant's dots run in (the shipped one: "
                      f"{ModelConfig.cpu_dot_library})")
  for flag, (_, _, help_text) in RETRACED.items():
    p.add_argument("--" + flag.replace("_", "-"), action="store_true", help=help_text)
  p.add_argument("--rounds", type=int, default=4, help="blocks of each variant, taking turns")
  p.add_argument("--block", type=int, default=3, help="steps in each block")
  args = p.parse_args(argv)
  retraced = [flag for flag in RETRACED if getattr(args, flag)]
  if not (args.options or args.every_row_last_layer or args.cpu_dot_library or retraced):
    p.error("give --option NAME=VALUE, --every-row-last-layer, --cpu-dot-library or one of "
            + ", ".join("--" + flag.replace("_", "-") for flag in RETRACED) + ": there is nothing to compare")
  options = dict(args.options)
  runtime.reuse_host_memory(jax.devices()[0].platform)  # as the launcher and the bench do
  try:
    state, batches, variants = compiled_variants(args.preset, args.mode, args.seq_len, args.batch, options,
                                                 retraced, args.every_row_last_layer, args.cpu_dot_library)
  except (ValueError, jax.errors.JaxRuntimeError) as e:  # no-op options; an option XLA does not know
    return cli.report("benchmarks.step_options", cli.first_line(e))
  seconds = time_variants(state, batches, variants, args.rounds, args.block)
  print(json.dumps({"preset": args.preset, "mode": args.mode, "seq_len": args.seq_len, "batch": args.batch,
                    "options": options, "every_row_last_layer": args.every_row_last_layer,
                    "cpu_dot_library": args.cpu_dot_library or None,
                    **{flag: getattr(args, flag) for flag in RETRACED},
                    "default_s": seconds["default"], "options_s": seconds["options"],
                    "default_over_options": seconds["default"] / seconds["options"]}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
