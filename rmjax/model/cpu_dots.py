"""Which library runs the dots of a step compiled for a CPU: `model.cpu_dot_library`.

Why it exists: on a CPU the training step is mostly dots (BUILD.md, Results: the 75m profile), so
the GEMM library XLA hands them to sets most of its speed, and which library is fastest depends
on the CPU. "ynnpack" (the default) is XLA's own choice: YNNPACK runs the dots and the
reductions it fuses. "onednn" hands each dot to oneDNN and leaves YNNPACK the reductions (a dot
whose only user is a reduction stays with YNNPACK, fused with it). oneDNN is the GEMM library of
Intel's CPUs, where YNNPACK's dots ran below MKL's (torch's); the 75m step under each, per CPU:
BUILD.md, Results. Each dot is its own oneDNN fusion: the larger fusions oneDNN's integration
forms (two dots summed, an elementwise product feeding a dot) fail to compile in this jaxlib
("partition compile failed").

Either library computes the same float32 products up to the order of their sums. The options are
compile options of the steps' jitted functions (rmjax/train/step.py), so they apply to rmjax's
steps only and leave any other jax program of the process as XLA compiles it; a GPU ignores them.
What "onednn" costs, and why it is not the default: this jaxlib cannot serialise a program
holding oneDNN fusions, so its steps never reach jax's persistent compilation cache and every
process compiles them anew (the test suite and the demo lean on that cache); its gain has
been measured on one AMD CPU only, where it is small (BUILD.md, Results).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

# XLA CPU compile options of each library (names as XLA's DebugOptions spell them)
CPU_DOT_LIBRARIES: Mapping[str, Mapping[str, Any]] = {
  "ynnpack": {},  # XLA's own choice
  "onednn": {"xla_cpu_use_onednn": True,
             "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
             "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
}
DEFAULT_CPU_DOT_LIBRARY = "ynnpack"
# jax's warning for each program it cannot write to its persistent cache, as oneDNN's thunks give it
_UNCACHEABLE = r"Error writing persistent compilation cache entry .*onednn-fusion"


def compiler_options(platform: str, library: str) -> dict[str, Any]:
  """The compile options of a step for a device of `platform` ("cpu", "gpu", ...); `library` is
  a key of CPU_DOT_LIBRARIES (ModelConfig checks it). For oneDNN on a CPU it also silences jax's
  warning that such a program cannot be cached (module docstring): expected, not the user's to fix."""
  options = dict(CPU_DOT_LIBRARIES[library]) if platform == "cpu" else {}
  if options.get("xla_cpu_use_onednn"):
    warnings.filterwarnings("ignore", message=_UNCACHEABLE, category=UserWarning)
  return options
