"""A GPU device to compile for when none is attached: XLA's deviceless GPU compiler.

Why it exists: what a training step needs in GPU memory is decided by XLA's GPU compiler
(its fusions, buffer assignment and cuDNN attention), not by the CPU compiler, and a GPU is
often not at hand. With jax's CUDA plugin installed (`pip install -e ".[cuda12]"`; no driver or
GPU needed), jax can compile for a GPU described by a target config (XLA's GpuTargetConfigProto:
compute capability, SM count, memory...) and report XLA's memory analysis of the executable.
`python -m rmjax.bench --target h100 --analysis-only` uses it; its peaks track the measured ones
closely (BUILD.md). Timings still need a real GPU, and so do GEMM choices: with no device to
autotune on, XLA picks its GEMM kernels (Triton fusion or cuBLAS, tile sizes) by heuristics,
so matmul fusions in the compiled HLO may differ from a real GPU's.
"""

from __future__ import annotations

import contextlib
import re
from importlib import resources
from typing import Any, Iterator

from rmjax.cli import first_line

TARGET_CONFIGS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}  # name -> file in rmjax/bench/targets/


class TargetUnavailable(RuntimeError):
  """The described GPU cannot be compiled for here (no CUDA plugin, or it refused the config)."""


def target_config_text(name: str) -> str:
  if name not in TARGET_CONFIGS:
    raise ValueError(f"unknown GPU target {name!r}; choose from {', '.join(TARGET_CONFIGS)}")
  return resources.files("rmjax.bench").joinpath("targets", TARGET_CONFIGS[name]).read_text()


def target_device(name: str) -> Any:
  """One jax device of the described GPU, for meshes to lower and compile on (not to run on)."""
  text = target_config_text(name)
  from jax.experimental import topologies  # jax only here: the CLI validates names without it
  try:
    topology = topologies.get_topology_desc(name, "cuda", target_config=text, topology="1x1x1")
  except Exception as e:  # jax raises RuntimeError / JaxRuntimeError / ValueError variously
    raise TargetUnavailable(f"cannot compile for the {name} GPU target here ({first_line(e)}); it needs jax's "
                            "CUDA plugin: pip install -e '.[cuda12]'") from None
  return topology.devices[0]


def compute_capability(name: str) -> tuple[int, int]:
  """The target's CUDA compute capability, from its config."""
  found = re.search(r"cuda_compute_capability\s*\{\s*major:\s*(\d+)\s+minor:\s*(\d+)", target_config_text(name))
  if found is None:
    raise ValueError(f"the {name} target config gives no cuda_compute_capability")
  return int(found.group(1)), int(found.group(2))


@contextlib.contextmanager
def cudnn_checks_for(name: str) -> Iterator[None]:
  """jax's cuDNN attention checks the compute capability of the default backend's GPU (the
  packed layout needs Hopper or later); in a deviceless compile that backend is the CPU, which
  has none, so the checks fail whatever the target. Inside this block they answer for the
  target instead (jax's private module; left alone if it is not there)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
  except ImportError:
    yield
    return
  target = compute_capability(name)
  as_tuple = lambda capability: tuple(int(x) for x in capability.split("."))
  saved = fa.check_compute_capability, fa.is_cuda_compute_capability_equal
  fa.check_compute_capability = lambda capability: target >= as_tuple(capability)
  fa.is_cuda_compute_capability_equal = lambda capability: target == as_tuple(capability)
  try:
    yield
  finally:
    fa.check_compute_capability, fa.is_cuda_compute_capability_equal = saved
