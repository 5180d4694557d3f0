"""XLA_FLAGS for the test process and the subprocesses tests start.

Why it exists: conftest.py gives the suite 8 fake CPU devices, compiles without LLVM's
optimisations and, with RMJAX_TEST_MAX_ISA, caps the CPU instruction set XLA compiles for (so an
AVX-512 machine runs the suite as an AVX2-only CPU would), on top of any XLA_FLAGS the caller set.
Tests that start `python -m rmjax.launch` with another device count must keep the rest of those
flags, so they build their XLA_FLAGS here.

The tests' models are tiny: compiling their programs, not running them, is where the suite's time
goes. Two flags make a compile cheaper without changing the program: LLVM's optimisation level 0
(its code generation was much of a tiny train step's compile), and XLA CPU's older elemental
emitters for fused loops instead of its MLIR fusion emitters, which compile such a step several
times faster on 2 cores (the suite's time: BUILD.md, Results). XLA's HLO passes, which fusions it forms and its library
kernels are the same; values differ at most by fp32 rounding (FMA contraction, the order of a
fused reduction), as between CPU kinds. Either is overridden by setting it in XLA_FLAGS, e.g.
XLA_FLAGS="--xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true" runs the suite
as jax's defaults compile.
"""

from __future__ import annotations

import os
from typing import Mapping

DEVICE_FLAG = "--xla_force_host_platform_device_count"
ISA_FLAG = "--xla_cpu_max_isa"
ISA_ENV = "RMJAX_TEST_MAX_ISA"  # XLA's names: AVX2, AVX, SSE4_2, AVX512, ...
OPT_FLAG = "--xla_backend_optimization_level"
EMITTER_FLAG = "--xla_cpu_use_fusion_emitters"
COMPILE_SPEED_FLAGS = (f"{OPT_FLAG}=0", f"{EMITTER_FLAG}=false")


def _name(flag: str) -> str:
  return flag.split("=", 1)[0]


def with_flags(existing: str, *flags: str) -> str:
  """`existing` plus each of `flags` whose name it does not set already (what it sets wins)."""
  have = {_name(f) for f in existing.split()}
  return " ".join([existing.strip(), *(f for f in flags if _name(f) not in have)]).strip()


def suite_flags(env: Mapping[str, str] = os.environ, devices: int = 8) -> str:
  """The test process's XLA_FLAGS: the caller's, then (each unless the caller set it) `devices`
  fake CPU devices, the compile-speed flags and the instruction-set cap named by
  RMJAX_TEST_MAX_ISA."""
  isa = env.get(ISA_ENV, "").strip()
  return with_flags(env.get("XLA_FLAGS", ""), f"{DEVICE_FLAG}={devices}", *COMPILE_SPEED_FLAGS,
                    *([f"{ISA_FLAG}={isa}"] if isa else []))


def subprocess_flags(device_count: int | None, env: Mapping[str, str] = os.environ,
                     optimised: bool = False) -> str:
  """This process's XLA_FLAGS with `device_count` fake CPU devices instead of its count (None:
  jax's one CPU device, as for a user); every other flag (the instruction-set cap) is kept, but
  `optimised` drops the compile-speed flags, so XLA's defaults apply: for runs of hundreds of
  steps, whose running outweighs their compiling (the demo)."""
  dropped = {DEVICE_FLAG, *map(_name, COMPILE_SPEED_FLAGS)} if optimised else {DEVICE_FLAG}
  kept = " ".join(f for f in env.get("XLA_FLAGS", "").split() if _name(f) not in dropped)
  return with_flags(kept, *([f"{DEVICE_FLAG}={device_count}"] if device_count is not None else []))
