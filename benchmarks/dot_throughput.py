"""`python -m benchmarks.dot_throughput`: fp32 GEMM GFLOP/s of XLA's CPU dot and of torch.matmul.

Why it exists: on a CPU the training step is mostly dots, so rmjax's speed against torch starts
with whose GEMM is faster on that CPU: XLA's CPU dots run in YNNPACK, torch's in MKL, and each
picks kernels by the instruction set (under `python -m benchmarks.as_avx2` both are capped to
AVX2). For each M,K,N this times one jitted `a @ b` and `torch.matmul(a, b)` on the same
random matrices, in one process, in blocks of `--repeats` calls of one library at a time, XLA's
first block before torch has run at all, and prints one JSON line with both medians' GFLOP/s,
their ratio `xla_over_torch` and the products' largest difference.

Blocks, not alternating calls: torch's OpenMP threads keep spinning for a while after each call,
and a dot timed in that while shares the cores with them (alternating calls measured XLA at
0.75 to 0.87x torch on a 2-core Xeon where each library timed alone gives 0.80 to 0.97x). A
pause of `--settle` seconds before each block lets the other library's threads go to sleep.

`--eigen` also times XLA's dot compiled with YNNPACK off (`xla_cpu_experimental_ynn_fusion_type`
empty, as a compile option): Eigen's GEMM, which XLA runs for the dots YNNPACK does not take,
such as autodiff's weight gradients (both operands contracted on their first axis; rmjax's
projections lay theirs out for YNNPACK instead, model/projection.py).
The record then adds `xla_eigen_gflops` and `eigen_over_ynn`: whether, on that CPU, handing every
dot to Eigen would be faster.
`--onednn` also times XLA's dot compiled as `model.cpu_dot_library="onednn"` compiles the step's
(model/cpu_dots.py): oneDNN's GEMM. The record then adds `xla_onednn_gflops` and `onednn_over_ynn`.

  python -m benchmarks.dot_throughput --shapes 2048,2048,2048 2048,768,2048 [--eigen] [--onednn]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np

from rmjax import cli
from rmjax.model import cpu_dots


def _shape(text: str) -> tuple[int, int, int]:
  dims = tuple(int(x) for x in text.split(","))
  if len(dims) != 3 or min(dims) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: want M,K,N (positive)")
  return dims


def _seconds(run: Callable[[], object]) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}  # XLA compile option: no dot goes to YNNPACK
# A YNNPACK fusion instruction in compiled HLO text (the text's stack-frame table also holds the
# caller's function names, so a bare "ynn" could match a name there)
YNN_INSTRUCTION = re.compile(r"%ynn_fusion[.\d]* = ")
ONEDNN_INSTRUCTION = re.compile(r"%onednn_fusion[.\d]* = ")


def compiled_dot(xa, xb, options: dict | None = None):
  """`xa @ xb` compiled by XLA (with `options` as compile options) and the compiled HLO text."""
  import jax
  lowered = jax.jit(lambda x, y: x @ y).lower(xa, xb)
  compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  return compiled, compiled.as_text()


def measure(m: int, k: int, n: int, repeats: int, rounds: int = 2, settle: float = 0.5,
            eigen: bool = False, onednn: bool = False) -> dict[str, object]:
  import jax
  import torch
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
  xa, xb = jax.device_put(a), jax.device_put(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  # XLA's dot as compiled by default, then as each library asked for compiles it (name -> options)
  variants = {"": None} | ({"eigen": YNN_OFF} if eigen else {}) | (
    {"onednn": cpu_dots.compiler_options("cpu", "onednn")} if onednn else {})
  runs, hlo = {}, {}
  for variant, options in variants.items():
    dot, hlo[variant] = compiled_dot(xa, xb, options)
    runs["_".join(filter(None, ["xla", variant]))] = lambda dot=dot: dot(xa, xb).block_until_ready()
  runs["torch"] = lambda: torch.matmul(ta, tb)
  times: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():  # xla's first: they run before torch's threads exist
      time.sleep(settle)
      run()  # compiles, or wakes the library's threads
      times[name].extend(_seconds(run) for _ in range(repeats))
  torch_product = runs["torch"]().numpy()
  max_diff = lambda name: float(np.max(np.abs(np.asarray(runs[name]()) - torch_product)))
  flop = 2.0 * m * k * n
  gflops = {name: flop / statistics.median(ts) / 1e9 for name, ts in times.items()}
  sig = lambda x: float(f"{x:.4g}")  # four significant digits: never 0 for a positive rate
  record = {"M": m, "K": k, "N": n, "xla_gflops": sig(gflops["xla"]), "torch_gflops": sig(gflops["torch"]),
            "xla_over_torch": sig(gflops["xla"] / gflops["torch"]), "max_abs_diff": max_diff("xla"),
            "torch_threads": torch.get_num_threads()}
  for variant in filter(None, variants):
    name = f"xla_{variant}"
    record |= {f"{name}_gflops": sig(gflops[name]), f"{variant}_over_ynn": sig(gflops[name] / gflops["xla"]),
               f"{variant}_max_abs_diff": max_diff(name)}
  if eigen:
    record["eigen_uses_ynn"] = bool(YNN_INSTRUCTION.search(hlo["eigen"]))
  if onednn:
    record["onednn_fusions"] = len(ONEDNN_INSTRUCTION.findall(hlo["onednn"]))
  return record


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(prog="python -m benchmarks.dot_throughput", description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", type=_shape, default=[(2048, 2048, 2048), (2048, 768, 2048)],
                 metavar="M,K,N")
  p.add_argument("--repeats", type=int, default=10, help="timed calls in each block")
  p.add_argument("--rounds", type=int, default=2, help="blocks of each library, taking turns")
  p.add_argument("--settle", type=float, default=0.5, help="seconds of pause before each block")
  p.add_argument("--eigen", action="store_true", help="also time XLA's dot with YNNPACK off (Eigen's GEMM)")
  p.add_argument("--onednn", action="store_true", help="also time XLA's dot in oneDNN (model/cpu_dots.py)")
  args = p.parse_args(argv)
  for m, k, n in args.shapes:
    print(json.dumps(measure(m, k, n, args.repeats, args.rounds, args.settle, args.eigen, args.onednn)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
