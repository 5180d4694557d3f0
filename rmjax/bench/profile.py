"""Where the compiled training step spends its time: a jax.profiler trace, summarised.

Why it exists: the performance issue asks where XLA's time goes, not only how long a step
takes. `python -m rmjax.bench --profile DIR` traces one extra step of the rmjax side with
`jax.profiler.trace(DIR, create_perfetto_trace=True)` and adds a `profile` object to its JSON
record. The summary joins the trace's op events (one per executed HLO instruction: fusions,
dots, copies) with the compiled HLO's `op_name` metadata, so each microsecond is attributed to

  kind       matmul (dots, YNNPACK / oneDNN / cuBLAS / Triton GEMM kernels), attention (cuDNN's fused
             attention kernels), copy/transpose (layout changes, memcpy), other (elementwise and
             reduction fusions, slices, scan bookkeeping);
  direction  bwd when jax's transpose of the forward produced the op, fwd otherwise (optimizer
             updates count as fwd: they are not under transpose(jvp(...))), unattributed when
             the kernel names no HLO instruction (cuBLAS and cuDNN library kernels on a GPU);
  component  the innermost model scope (layers/mlp/up_proj, layers/attn, head, ...).

On a GPU the trace also holds the host's threads; only the device's kernels are counted, and
a kernel is matched to its HLO instruction by name (XLA names a fusion's kernel after the
fusion, "." written "_"), since under CUDA graphs every kernel's hlo_op is the command buffer.

The raw trace stays in DIR for TensorBoard's profile plugin or Perfetto.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
from typing import Any, Mapping

# HLO ops that span the ops they run (counting them would count their bodies twice).
_CONTROL_FLOW = ("while", "conditional", "call")
_INSTRUCTION = re.compile(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"")
_COMPONENT = re.compile(r"(layers/(?:attn|mlp)(?:/[a-z_]+_proj)?|head|embed|marker|loss)")
_MATMUL = ("dot", "ynn_fusion", "onednn_fusion", "gemm", "cublas", "custom-call", "nvjet", "cutlass")
_ATTENTION = ("sdpa", "fmha", "flash", "dot_product_attention", "cudnn")


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the jax op_name it came from, for every instruction with metadata."""
  names: dict[str, str] = {}
  for match in _INSTRUCTION.finditer(hlo_text):
    names.setdefault(match.group(1), match.group(2))
  return names


def classify(instruction: str, op_name: str) -> tuple[str, str, str]:
  """(kind, direction, component) of one executed instruction."""
  lowered = instruction.lower()
  if any(m in lowered for m in _ATTENTION):
    kind = "attention"
  elif lowered.startswith(_MATMUL) or any(m in lowered for m in ("gemm", "cublas", "nvjet", "xmma")):
    kind = "matmul"
  elif any(m in lowered for m in ("copy", "transpose", "memcpy", "memset")):
    kind = "copy/transpose"
  else:
    kind = "other"
  direction = "bwd" if "transpose(jvp" in op_name else ("fwd" if op_name else "unattributed")
  scopes = _COMPONENT.findall(op_name)
  return kind, direction, scopes[-1] if scopes else "other"


def load_trace_events(trace_dir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Complete ("X") events of the newest perfetto trace under `trace_dir`: the accelerator's
  kernels where the trace has an accelerator (a "/device:GPU:0"-like process), else all."""
  files = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(files[-1], "rt") as fh:
    data = json.load(fh)
  events = data["traceEvents"] if isinstance(data, dict) else data
  devices = {e.get("pid") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and str((e.get("args") or {}).get("name", "")).startswith("/device:")
             and "CPU" not in str(e["args"]["name"])}
  return [e for e in events if e.get("ph") == "X" and "dur" in e and (not devices or e.get("pid") in devices)]


def instruction_of(event: Mapping[str, Any], names: Mapping[str, str]) -> str:
  """The HLO instruction an op event ran: its hlo_op, or (GPU kernels under CUDA graphs, whose
  hlo_op is the command buffer) the kernel's own name, "fusion_12" being "fusion.12"."""
  hlo_op = str((event.get("args") or {}).get("hlo_op", ""))
  if hlo_op and not hlo_op.startswith("command_buffer"):
    return hlo_op
  name = str(event["name"])
  dotted = re.sub(r"_(\d+)$", r".\1", name)
  return dotted if dotted in names else name


def summarize(events: list[Mapping[str, Any]], names: Mapping[str, str], top: int = 12) -> dict[str, Any]:
  """Op time by kind, by direction, the `top` (direction, kind, component) groups, and the `top`
  kernels by name (a fusion's trailing number dropped, so one row sums it over the layers; on a
  GPU these name library kernels too, which no HLO instruction does). Only events of XLA ops
  count: they carry an `hlo_op` argument; loops around other ops do not count."""
  by_kind: collections.Counter = collections.Counter()
  by_direction: collections.Counter = collections.Counter()
  groups: collections.Counter = collections.Counter()
  total = 0.0
  kernels: collections.Counter = collections.Counter()
  launches: collections.Counter = collections.Counter()
  for event in events:
    hlo_op = str((event.get("args") or {}).get("hlo_op", ""))
    if not hlo_op or hlo_op.split(".")[0] in _CONTROL_FLOW:
      continue  # not an XLA op (Python, dispatch, executor events), or a loop around ops
    instruction = instruction_of(event, names)
    kind, direction, component = classify(instruction, names.get(instruction, ""))
    dur = float(event["dur"])
    by_kind[kind] += dur
    by_direction[direction] += dur
    groups[(direction, kind, component)] += dur
    kernel = re.sub(r"[_.]\d+$", "", str(event["name"]))  # one row for every layer's copy
    kernels[kernel] += dur
    launches[kernel] += 1
    total += dur
  share = lambda us: round(us / total, 4) if total else None
  return {
    "op_time_ms": round(total / 1e3, 3),
    "by_kind": {k: share(v) for k, v in by_kind.most_common()},
    "by_direction": {k: share(v) for k, v in by_direction.most_common()},
    "top": [{"direction": d, "kind": k, "component": c, "ms": round(v / 1e3, 3), "share": share(v)}
            for (d, k, c), v in groups.most_common(top)],
    "top_kernels": [{"kernel": k[:80], "ms": round(v / 1e3, 3), "count": launches[k]}
                    for k, v in kernels.most_common(top)],
  }


def profile_step(step_fn, trace_dir: str | pathlib.Path, hlo_text: str) -> dict[str, Any]:
  """Runs `step_fn()` (one blocking step) under the profiler and summarises its trace."""
  import jax
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    step_fn()
  return summarize(load_trace_events(trace_dir), op_names(hlo_text)) | {"trace_dir": str(trace_dir)}
