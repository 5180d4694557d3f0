"""`python -m benchmarks.buffers DUMP_DIR`: what fills the train step's temp memory.

Why it exists: XLA's memory analysis gives one number (`compiled_temp_mb`); to lower it one has
to know which values share that block. With `XLA_FLAGS=--xla_dump_to=DUMP_DIR` a compile writes
`*buffer-assignment.txt`; this reads the train step's file, finds its preallocated temp
allocation and prints the largest values in it (name, shape, size, offset) as one JSON object.
Values at overlapping offsets are never live together, so the offsets show what coexists.
For example:

  XLA_FLAGS=--xla_dump_to=/tmp/dump python -m rmjax.bench --preset qwen3-4b --seq-len 2048 \\
      --batch 4 --mode lora --remat --analysis-only --no-flops --no-isolate
  python -m benchmarks.buffers /tmp/dump

On CPU the bf16 runs also show the f32 copies XLA makes of bf16 weights (the CPU has no bf16
matmul), so bf16 memory is only meaningful from a GPU dump.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any, Callable, Sequence

from rmjax import cli

_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
_VALUE = re.compile(r"^\s*value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")


def step_dump(dump_dir: str | pathlib.Path, module: str = "jit__train_step",
              suffix: str = "buffer-assignment.txt") -> pathlib.Path:
  """The newest `*{module}*{suffix}` file in `dump_dir` (XLA's dump of that compiled module)."""
  files = sorted(pathlib.Path(dump_dir).glob(f"*{module}*{suffix}"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no {module} {suffix} file in {dump_dir} "
                            "(compile with XLA_FLAGS=--xla_dump_to=DIR)")
  return files[-1]


def temp_values(text: str) -> tuple[int, list[dict[str, Any]]]:
  """(size of the preallocated temp allocation, its values largest first)."""
  size, values, inside = 0, [], False
  for line in text.splitlines():
    alloc = _ALLOCATION.match(line)
    if alloc:
      inside = "preallocated-temp" in alloc.group(3)
      if inside:
        size = int(alloc.group(2))
      continue
    value = _VALUE.match(line) if inside else None
    if value:
      values.append({"name": value.group(1), "shape": value.group(4), "mb": int(value.group(2)) / 2**20,
                     "offset_mb": int(value.group(3)) / 2**20})
  return size, sorted(values, key=lambda v: -v["mb"])


def summarize(dump_dir: str | pathlib.Path, top: int = 20) -> dict[str, Any]:
  path = step_dump(dump_dir)
  size, values = temp_values(path.read_text())
  return {"file": str(path), "temp_mb": round(size / 2**20, 1),
          "largest": [{**v, "mb": round(v["mb"], 1), "offset_mb": round(v["offset_mb"], 1)} for v in values[:top]]}


def dump_summary_cli(tool: str, summarize_dump: Callable[[str], dict[str, Any]],
                     argv: Sequence[str] | None) -> int:
  """`python -m benchmarks.<tool> DUMP_DIR`: the summary as one JSON line, or a one-line error."""
  args = list(sys.argv[1:] if argv is None else argv)
  if len(args) != 1:
    print(f"usage: python -m benchmarks.{tool} DUMP_DIR", file=sys.stderr)
    return 2

  def body() -> int:
    print(json.dumps(summarize_dump(args[0])))
    return 0
  return cli.run(f"bench.{tool}", body)


def main(argv: Sequence[str] | None = None) -> int:
  return dump_summary_cli("buffers", summarize, argv)


if __name__ == "__main__":
  sys.exit(main())
