"""`python -m benchmarks.as_avx2 MODULE [ARGS]`: run a Python module as an AVX2-only x86 CPU would.

Why it exists: BUILD.md's CPU rows must name the CPU kind, and users and CI run on AVX2-only
AMD EPYCs that a developer's AVX-512 machine is not. Each library picks its kernels in its own
way, so capping the instruction set takes one switch per library:

- XLA's own code generation: `--xla_cpu_max_isa=AVX2`.
- torch: `ATEN_CPU_CAPABILITY=avx2` (ATen's kernels), `MKL_ENABLE_INSTRUCTIONS=AVX2` (MKL's
  GEMMs) and `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's).
- YNNPACK, which runs XLA's CPU dots: it has no switch. It reads the CPU's features once, into
  a function-local static (`ynn::get_supported_arch_flags`), and picks every kernel from that
  value. This tool computes that value, then clears every bit above FMA3 (the AVX-512 and AMX
  bits; `ynnpack/base/arch.h`), before any program is compiled. It finds the static through
  the library's symbol table (binutils' `nm`) and its load address in /proc/self/maps.

What remains different from an AVX2-only CPU is the core itself: its clock, caches and number
of FMA units. Use it for ratios between implementations, not for absolute speeds.

The module runs in this process. Python processes it starts run capped too: they inherit the
switches, and a sitecustomize put on their PYTHONPATH (`benchmarks/as_avx2_site/`) caps their
YNNPACK as they start. So `rmjax.bench` can keep each run in a process of its own:

  python -m benchmarks.as_avx2 rmjax.bench --preset 75m --seq-len 512 --batch 4 --mode both \\
      --impl both --steps 5 --warmup 1 --no-flops
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import runpy
import shutil
import subprocess
import sys
from typing import MutableMapping

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
XLA_ISA_FLAG = "--xla_cpu_max_isa=AVX2"
YNN_FLAGS_GETTER = "_ZN3ynn24get_supported_arch_flagsEv"
YNN_FLAGS_STATIC = "_ZZN3ynn24get_supported_arch_flagsEvE5flags"
YNN_UP_TO_FMA3 = (1 << 7) - 1  # sse2, ssse3, sse41, avx, f16c, avx2, fma3
SITE_DIR = pathlib.Path(__file__).resolve().parent / "as_avx2_site"


class EmulationUnavailable(RuntimeError):
  """This machine or jaxlib cannot be capped (the message says why, in one line)."""


def set_environment(env: MutableMapping[str, str]) -> None:
  """The switches read at import or start-up: XLA's code generation and torch's libraries."""
  for name, value in AVX2_ENV.items():
    env[name] = value
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_max_isa=")]
  env["XLA_FLAGS"] = " ".join([*flags, XLA_ISA_FLAG])


def symbol_offsets(library: str, names: tuple[str, ...]) -> dict[str, int]:
  """Each name's address in `library`'s symbol table (relative to where it is loaded)."""
  if shutil.which("nm") is None:
    raise EmulationUnavailable("binutils' nm is needed to find YNNPACK's CPU features (apt install binutils)")
  listing = subprocess.run(["nm", library], capture_output=True, text=True, check=False).stdout
  found = {}
  for line in listing.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[2] in names:
      found[parts[2]] = int(parts[0], 16)
  missing = [n for n in names if n not in found]
  if missing:
    raise EmulationUnavailable(f"{os.path.basename(library)} has no symbol {missing[0]}: this jaxlib "
                               "does not run its dots through YNNPACK, or was stripped")
  return found


def load_address(library: str, maps: str = "/proc/self/maps") -> int:
  """Where this process mapped `library`'s first byte."""
  real = os.path.realpath(library)
  with open(maps) as f:
    for line in f:
      fields = line.split()
      if len(fields) >= 6 and int(fields[2], 16) == 0 and os.path.realpath(fields[5]) == real:
        return int(fields[0].split("-")[0], 16)
  raise EmulationUnavailable(f"{library} is not loaded in this process")


def _ynnpack_flags() -> tuple[ctypes.c_uint64, "ctypes._CFuncPtr"]:
  """YNNPACK's CPU-features static in this process and its getter."""
  import jaxlib
  import jax  # noqa: F401  (loads jaxlib's shared library; starts no backend)

  library = os.path.join(os.path.dirname(jaxlib.__file__), "libjax_common.so")
  offsets = symbol_offsets(library, (YNN_FLAGS_GETTER, YNN_FLAGS_STATIC))
  base = load_address(library)
  getter = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + offsets[YNN_FLAGS_GETTER])
  return ctypes.c_uint64.from_address(base + offsets[YNN_FLAGS_STATIC]), getter


def ynnpack_features() -> int:
  """The CPU features YNNPACK picks its kernels from in this process."""
  return _ynnpack_flags()[1]()


def cap_ynnpack() -> tuple[int, int]:
  """Leave YNNPACK's CPU features at AVX2 + FMA3; returns (features before, after)."""
  static, getter = _ynnpack_flags()
  before = getter()  # fills the static (and its guard) the first time
  static.value = before & YNN_UP_TO_FMA3
  after = getter()
  if after != before & YNN_UP_TO_FMA3:
    raise EmulationUnavailable(f"YNNPACK's CPU features read {after:#x} after capping, not "
                               f"{before & YNN_UP_TO_FMA3:#x}")
  return before, after


def cap_children(env: MutableMapping[str, str]) -> None:
  """Child Pythons started with `env` cap their YNNPACK too, on start-up (`as_avx2_site`'s
  sitecustomize); the other switches they inherit with the environment."""
  paths = [str(SITE_DIR), str(SITE_DIR.parents[1]), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
  env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def main(argv: list[str]) -> int:
  if not argv or argv[0].startswith("-"):
    print("usage: python -m benchmarks.as_avx2 MODULE [ARGS]", file=sys.stderr)
    return 2
  if "torch" in sys.modules or "jax" in sys.modules:
    print("error: benchmarks.as_avx2 must run before torch or jax is imported", file=sys.stderr)
    return 2
  set_environment(os.environ)
  cap_children(os.environ)
  try:
    before, after = cap_ynnpack()
  except EmulationUnavailable as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"[as_avx2] YNNPACK features {before:#x} -> {after:#x}; XLA_FLAGS={os.environ['XLA_FLAGS']}; "
        + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()), file=sys.stderr, flush=True)
  sys.argv = [argv[0], *argv[1:]]
  try:
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
