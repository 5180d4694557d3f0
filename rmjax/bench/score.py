"""`python -m rmjax.bench.score`: solutions scored per second, rmjax's scoring path vs PyTorch.

  python -m rmjax.bench.score --checkpoint RUN --export EXPORT_DIR --input solutions.jsonl
                              [--batch-size 8] [--repeat 3] [--torch-threads N]

Why it exists: a user choosing between scoring in JAX (`rmjax.score` on the run) and in PyTorch
(`rmjax.torch_scorer` on its export) needs both measured on the same solutions. The input is
`rmjax.score`'s (one {problem, steps | text} object a line). rmjax scores them all through
rmjax.inference.RunScorer (every local device, packed rows of --batch-size); PyTorch scores
them --batch-size solutions at a time with TorchScorer.score_many. Each runs one warm-up pass
(JAX compiles there) and then --repeat timed passes. One JSON object on stdout: solutions and
steps, per implementation the warm-up seconds and the best pass's solutions/s, their ratio
(rmjax / torch), and the largest difference between the two's step scores. The warm-up is
reported apart, so solutions/s is warm throughput. --torch-threads sets torch's intra-op threads
(default: torch's own choice, one per core): on a small model and a loaded machine its threads
wait on each other and one thread can be faster.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

from rmjax import cli


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
  """(warm-up seconds, best of `repeat` seconds, the last result)."""
  start = time.perf_counter()
  out = fn()
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeat):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return first, best, out


def read_solutions(path: str | pathlib.Path) -> list[tuple[str, tuple[str, ...]]]:
  from rmjax.score import read_records
  warnings: list[str] = []
  items = [(r.problem, r.steps) for r in read_records(pathlib.Path(path), warnings.append) if r.steps]
  if not items:
    raise ValueError(f"{path}: no solution with steps to score ({len(warnings)} lines skipped)")
  return items


def measure(checkpoint: str, export: str, input_path: str, batch_size: int = 8, repeat: int = 3,
            torch_threads: int | None = None) -> dict[str, Any]:
  from rmjax.inference import RunScorer
  from rmjax.run_artifacts import load_run_model
  from rmjax.torch_scorer import TorchScorer
  if batch_size < 1 or repeat < 1 or (torch_threads is not None and torch_threads < 1):
    raise ValueError("--batch-size, --repeat and --torch-threads must be >= 1")
  items = read_solutions(input_path)
  jax_scorer = RunScorer(load_run_model(checkpoint), rows=batch_size)
  torch_scorer = TorchScorer.from_export(export)
  import torch
  if torch_threads:
    torch.set_num_threads(torch_threads)
  batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
  jax_first, jax_best, jax_out = timed(lambda: [d.scores for d in jax_scorer.score(items)], repeat)
  torch_first, torch_best, torch_out = timed(lambda: [s for b in batches for s in torch_scorer.score_many(b)], repeat)
  pairs = [(a, b) for x, y in zip(jax_out, torch_out) for a, b in zip(x, y)]
  diffs = [abs(a - b) for a, b in pairs if a is not None and b is not None]
  one_path_only = sum((a is None) != (b is None) for a, b in pairs)  # steps past max_length must agree too
  per_s = lambda seconds: len(items) / seconds
  return {"solutions": len(items), "steps": sum(len(s) for _, s in items), "batch_size": batch_size,
          "repeat": repeat,
          "rmjax": {"warmup_s": jax_first, "solutions_per_s": per_s(jax_best)},
          "torch": {"warmup_s": torch_first, "solutions_per_s": per_s(torch_best), "threads": torch.get_num_threads()},
          "ratio": torch_best / jax_best, "max_abs_score_diff": max(diffs, default=None),
          "scored_steps_compared": len(diffs), "scored_by_one_path_only": one_path_only}


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m rmjax.bench.score", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="run dir or checkpoint_step_<N> dir (scored in JAX)")
  parser.add_argument("--export", required=True, help="the same run's export dir (scored in PyTorch)")
  parser.add_argument("--input", required=True, help="JSONL of {problem, steps | text}, as for rmjax.score")
  parser.add_argument("--batch-size", type=int, default=8, help="rows (rmjax) / solutions (torch) per batch")
  parser.add_argument("--repeat", type=int, default=3, help="timed passes after the warm-up")
  parser.add_argument("--torch-threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
  args = parser.parse_args(argv)
  return cli.run("bench.score", lambda: _print(measure(args.checkpoint, args.export, args.input, args.batch_size,
                                                       args.repeat, args.torch_threads)))


def _print(result: dict[str, Any]) -> int:
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
