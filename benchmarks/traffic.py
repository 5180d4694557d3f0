"""`python -m benchmarks.traffic DUMP_DIR`: bytes the compiled train step moves, op by op.

Why it exists: without a GPU to time on, the optimized HLO still says what the step does. With
`XLA_FLAGS=--xla_dump_to=DUMP_DIR` a compile (also `--target h100`, rmjax/bench/gpu_target.py) writes
`*after_optimizations.txt`; this sums, for every op the step executes, the bytes of its
operands and results, multiplying ops inside the layer loops by their trip counts. The total is
an upper bound on the device memory traffic (caches can serve some reads), so comparing two
settings shows which moves less (BUILD.md): inside the layer loop a step stores and reloads
values in layer stacks, copied out of them per layer; unrolled (`--scan-unroll 0`) nothing is
copied out of a stack. It also counts
what is easy to miss in a profile: cuDNN attention forwards run again in the backward loop,
and ops XLA itself duplicated under memory pressure (".remat" in their names).

Accounting: a fusion's operand that its fused computation only (dynamic-)slices moves the
slices (a layer's weights out of the stacked layers), one it only updates in place moves
nothing, and a result built by dynamic-update-slices moves the updates; a bare (dynamic-)slice
moves its result twice (read, write), a bare dynamic-update-slice its update twice; tuples,
parameters, bitcasts and control flow move nothing themselves. For example:

  XLA_FLAGS=--xla_dump_to=/tmp/dump python -m rmjax.bench --preset qwen3-4b --seq-len 2048 \\
      --batch 4 --mode lora --remat-policy dots_and_attention_saveable --target h100 --no-flops --no-isolate
  python -m benchmarks.traffic /tmp/dump
"""

from __future__ import annotations

import collections
import pathlib
import re
import sys
from typing import Any, Iterator, Sequence

from benchmarks.buffers import dump_summary_cli, step_dump

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT )?%?([\w.\-]+) = (.*)$")
_OP = re.compile(r"^(\(.*?\)|\S+) ([a-z][\w\-]*)\(")
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "iota"}


def shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def _operands(rest: str, start: int) -> str:
  """The text between the op's parentheses (operands with their shapes), balanced."""
  depth = 0
  for i in range(start, len(rest)):
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    if depth == 0:
      return rest[start + 1:i]
  return rest[start + 1:]


Instruction = tuple[str, str, bool]  # (name, text after " = ", is the computation's ROOT)


def parse(text: str) -> tuple[str, dict[str, list[Instruction]]]:
  """(entry computation name, {computation: [instructions]}); fused computations included."""
  computations, current, entry = {}, None, ""
  for line in text.splitlines():
    head = _COMPUTATION.match(line) if not line.startswith(" ") else None
    if head:
      current = head.group(1)
      computations[current] = []
      entry = current if line.startswith("ENTRY") else entry
      continue
    inst = _INSTRUCTION.match(line) if current else None
    if inst:
      computations[current].append((inst.group(2), inst.group(3), bool(inst.group(1))))
  return entry, computations


def executions(entry: str, computations: dict[str, list[Instruction]]) -> dict[str, int]:
  """How many times each executed computation runs per step (entry once; while bodies times
  their known trip count, nested loops multiplied; call and conditional targets as often as
  their caller)."""
  runs: dict[str, int] = collections.Counter()

  def visit(name: str, times: int) -> None:
    runs[name] += times
    for _, rest, _ in computations.get(name, ()):
      if " while(" in rest:
        body = re.search(r"body=%?([\w.\-]+)", rest)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        if body:
          visit(body.group(1), times * (int(trips.group(1)) if trips else 1))
      elif " call(" in rest:
        target = re.search(r"to_apply=%?([\w.\-]+)", rest)
        if target:
          visit(target.group(1), times)
      elif " conditional(" in rest:  # every branch counted: an upper bound
        branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
        for target in re.findall(r"%?([\w.\-]+)", branches.group(1) if branches else ""):
          visit(target, times)

  visit(entry, 1)
  return dict(runs)


def category(name: str, op: str, rest: str) -> str:
  if op == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    target = target.group(1) if target else ""
    if target.startswith("__cudnn$fmha"):
      return "attention_backward" if "Backward" in target else "attention_forward"
    return "matmul" if "gemm" in target or "matmul" in target else "custom_call"
  if op == "fusion":
    if name.startswith(("gemm_fusion", "cublas")) or "__triton_gemm" in rest:
      return "matmul"
    kind = re.search(r"kind=k(\w+)", rest)
    return "fusion_" + (kind.group(1).lower() if kind else "other")
  return "dot" if op in ("dot", "convolution") else op


def _decode(instructions: list[Instruction]) -> dict[str, tuple[str, str, list[str], bool]]:
  """{name: (result shape, op, operand names, is root)} of one computation."""
  out = {}
  for name, rest, root in instructions:
    match = _OP.match(rest)
    if match:
      out[name] = (match.group(1), match.group(2), re.findall(r"%([\w.\-]+)", _operands(rest, match.end() - 1)),
                   root)
  return out


def _update_bytes(decoded: dict, name: str) -> int:
  """A dynamic-update-slice moves its update (operand 1) into place, not the whole buffer."""
  operands = decoded[name][2]
  return shape_bytes(decoded[operands[1]][0]) if len(operands) > 1 and operands[1] in decoded else 0


def fused_io(instructions: list[Instruction]) -> tuple[dict[int, int], int | None]:
  """What a fusion really moves, from its fused computation: {operand index: bytes} for operands
  used only through (dynamic-)slices (the slices' bytes: an unrolled layer's weights out of the
  stack) or only as a dynamic-update-slice's
  buffer (0: updated in place), and the result bytes when the root is (a tuple of)
  dynamic-update-slices (the updates' bytes). Other operands and results move whole."""
  decoded = _decode(instructions)
  users = collections.defaultdict(list)
  for name, (_, op, operands, _) in decoded.items():
    for position, operand in enumerate(operands):
      users[operand].append((name, op, position))
  params = {}
  for name, (_, op, _, _) in decoded.items():
    index = re.search(r"parameter\((\d+)\)", next(r for n, r, _ in instructions if n == name)) if op == "parameter" else None
    if index:
      uses = users.get(name, [])
      if uses and all(op_ in ("slice", "dynamic-slice") and pos == 0 for _, op_, pos in uses):
        params[int(index.group(1))] = sum(shape_bytes(decoded[u][0]) for u, _, _ in uses)
      elif uses and all(op_ == "dynamic-update-slice" and pos == 0 for _, op_, pos in uses):
        params[int(index.group(1))] = 0
  root = next((n for n, v in decoded.items() if v[3]), None)
  if root is None:
    return params, None
  parts = decoded[root][2] if decoded[root][1] == "tuple" else [root]
  if not any(decoded.get(p, ("", ""))[1] == "dynamic-update-slice" for p in parts):
    return params, None
  return params, sum(_update_bytes(decoded, p) if decoded[p][1] == "dynamic-update-slice" else shape_bytes(decoded[p][0])
                     for p in parts if p in decoded)


def op_bytes(op: str, rest: str, out_shape: str, operand_shapes: list[str],
             computations: dict[str, list[Instruction]]) -> int:
  sizes = [shape_bytes(s) for s in operand_shapes]
  if op == "dynamic-update-slice":
    return 2 * (sizes[1] if len(sizes) > 1 else 0)
  if op in ("slice", "dynamic-slice"):
    return 2 * shape_bytes(out_shape)
  out = shape_bytes(out_shape)
  called = re.search(r"calls=%?([\w.\-]+)", rest) if op == "fusion" else None
  if called and called.group(1) in computations:
    params, fused_out = fused_io(computations[called.group(1)])
    sizes = [params.get(i, size) for i, size in enumerate(sizes)]
    out = out if fused_out is None else fused_out
  return out + sum(sizes)


def ops(text: str) -> Iterator[dict[str, Any]]:
  """Every executed op with its per-step bytes (already multiplied by its computation's runs)."""
  entry, computations = parse(text)
  for comp, times in executions(entry, computations).items():
    decoded = _decode(computations.get(comp, []))
    for name, rest, _ in computations.get(comp, ()):
      if name not in decoded or decoded[name][1] in _FREE:
        continue
      out_shape, op, operands, _ = decoded[name]
      shapes = [decoded[o][0] if o in decoded else "" for o in operands]
      yield {"name": name, "computation": comp, "runs": times, "op": op, "shape": out_shape,
             "category": category(name, op, rest),
             "bytes": times * op_bytes(op, rest, out_shape, shapes, computations)}


def summarize(dump_dir: str | pathlib.Path, top: int = 15) -> dict[str, Any]:
  path = step_dump(dump_dir, suffix="after_optimizations.txt")
  rows = list(ops(path.read_text()))
  by_category, by_computation, calls = collections.Counter(), collections.Counter(), collections.Counter()
  for r in rows:
    by_category[r["category"]] += r["bytes"]
    by_computation[r["computation"]] += r["bytes"]
    if r["category"].startswith("attention_"):
      calls[r["category"]] += r["runs"]
  gb = lambda b: round(b / 1e9, 2)
  return {
    "file": str(path), "total_gb": gb(sum(by_category.values())),
    "by_category_gb": {k: gb(v) for k, v in by_category.most_common()},
    "by_computation_gb": {k: gb(v) for k, v in by_computation.most_common()},
    "cudnn_attention_calls": dict(calls),
    "xla_remat_duplicates": sum(".remat" in r["name"] for r in rows),
    "largest": [{"name": r["name"], "computation": r["computation"], "runs": r["runs"], "category": r["category"],
                 "gb": gb(r["bytes"]), "shape": r["shape"][:120]}
                for r in sorted(rows, key=lambda r: -r["bytes"])[:top]],
  }


def main(argv: Sequence[str] | None = None) -> int:
  return dump_summary_cli("traffic", summarize, argv)


if __name__ == "__main__":
  sys.exit(main())
