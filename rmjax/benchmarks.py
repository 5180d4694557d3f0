"""What the field's benchmark evaluations share: the scorer, the output folder, the files written.

Why it exists: `python -m rmjax.evaluate --benchmark NAME` runs ProcessBench
(rmjax.processbench_eval) and PRMBench (rmjax.prmbench_eval); both score a checkpoint's step
scores for a benchmark's samples and write <name>.json beside predictions.jsonl, the same way.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

from rmjax.tool_files import output_files

NAMES = ("processbench", "prmbench")


def load_scorer(checkpoint: str | os.PathLike, overrides: Sequence[str] = (), rows: int = 8) -> Any:
  """A RunScorer of the checkpoint; `--set data.max_length=N` (and the other render keys of
  rmjax.evaluate) change the run's render settings."""
  from rmjax.evaluate import eval_render_config, load_eval_spec
  from rmjax.inference import RunScorer
  from rmjax.run_artifacts import load_run_model
  rm = load_run_model(checkpoint)
  render_cfg = rm.render_cfg
  if overrides:
    render_cfg = eval_render_config(rm.render_cfg, load_eval_spec(rm.run_dir, None, overrides).data, overrides)
  return RunScorer(rm, render_cfg, rows=rows)


def check_threshold(threshold: float) -> float:
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
  return threshold


def write_results(scorer: Any, output: str | None, name: str, result: dict[str, Any],
                  samples: Sequence[dict]) -> pathlib.Path:
  """<output or <run_dir>/eval/step_<N>>/<name>.json and predictions.jsonl, written beside the old
  ones and put in their place together once both are whole (rmjax.tool_files): a full disk
  leaves neither a cut <name>.json nor new predictions beside old results."""
  rm = scorer.run
  result |= {"checkpoint": str(rm.checkpoint_dir), "step": rm.step, "max_length": scorer.render_cfg.max_length}
  out_dir = pathlib.Path(output) if output else rm.run_dir / "eval" / f"step_{rm.step}"
  with output_files() as files:
    fh = files.open(out_dir / "predictions.jsonl")
    for s in samples:
      fh.write(json.dumps(s) + "\n")
    files.write_text(out_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
  return out_dir


def run(name: str, checkpoint: str, path: str, output: str | None, threshold: float,
        overrides: Sequence[str]) -> tuple[pathlib.Path, dict[str, Any], str]:
  """(output dir, result, printed table) of benchmark `name`."""
  if name == "processbench":
    from rmjax import processbench_eval as bench
  else:
    from rmjax import prmbench_eval as bench
  out_dir, result = bench.evaluate(checkpoint, path, output, threshold, overrides)
  return out_dir, result, bench.table(result)
