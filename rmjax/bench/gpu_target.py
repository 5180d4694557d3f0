"""A GPU device to compile for when none is attached: XLA's deviceless GPU compiler.

Why it exists: what a training step needs in GPU memory is decided by XLA's GPU compiler
(its fusions, buffer assignment and cuDNN attention), not by the CPU compiler, and most
sessions of this project have no GPU. With jax's CUDA plugin installed
(`pip install -e ".[cuda12]"`; no driver or GPU needed), jax can compile for a GPU described by
a target config (XLA's GpuTargetConfigProto: compute capability, SM count, memory...) and
report XLA's memory analysis of the executable. `python -m rmjax.bench --target h100
--analysis-only` uses it. Checked against the measured H100 figures in BUILD.md: the full
step's temp bytes within 1.2% for three remat policies, and step and init peaks within 0.5%.
Timings still need a real GPU, and so do GEMM choices: with no device to autotune on, XLA picks
its GEMM kernels (Triton fusion or cuBLAS, tile sizes) by heuristics, so matmul fusions in the
compiled HLO may differ from a real GPU's.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from rmjax.cli import first_line

TARGET_CONFIGS = {"h100": "h100_sxm.txtpb"}  # name -> file in rmjax/bench/targets/


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
