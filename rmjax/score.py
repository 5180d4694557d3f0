"""Score new solutions with a trained confidence model: JSONL in, JSONL with step scores out.

Why it exists: after training, users need confidences for solutions the model never saw,
without writing code:

  python -m rmjax.score --checkpoint runs/demo --input in.jsonl --output out.jsonl [--batch-size 8] [--with-tokens]
                        [--aggregate min|prod|mean|last] [--step-separator SEP]

Each input line is an object with `problem` (string) and either `steps` (list of strings) or
`text` (a whole solution, split into steps at --step-separator, default a blank line; the
steps are written back as `steps`); other keys pass through. Output lines add `step_scores`
(P(step correct) per step, in order; null for a step whose marker does not fit in max_length,
with a warning), with --aggregate min|prod|mean|last a `solution_score` (rmjax.solutions; null
when a step has no score) and, with --with-tokens, `input_ids` and `marker_positions`.
Malformed lines are reported with their line number on stderr and skipped, as is a line longer
than 64 MiB. --input is a file or a pipe (`--input <(zcat x.jsonl.gz)`); a UTF-8 byte order mark
before line 1 is dropped. --output is written whole or not at all: under a temporary name beside
it, renamed into place when every line is written, so a full disk, an error or Ctrl-C (exit
status 130) leaves an earlier --output as it was (rmjax.tool_files).

--checkpoint is a run directory (its best checkpoint), a checkpoint_step_<N> directory (both
scored in JAX by rmjax.inference, the evaluation step of training on every local device, with
several solutions packed per row), or an export directory (scored in PyTorch by
`rmjax.torch_scorer`, so it needs the [torch] extra (`pip install -e ".[torch]"`): this is the path that shows what a
torch user will get). Every step is scored, not only the first `data.max_steps_per_example`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, Iterator, Sequence

from rmjax import cli
from rmjax.export import EXPORT_FILE
from rmjax.solutions import DEFAULT_SEPARATOR, add_solution_args, aggregate, parse_separator, solution_steps
from rmjax.tool_files import check_input, jsonl_lines, output_files


@dataclasses.dataclass(frozen=True)
class Record:
  line: int  # 1-based line number in the input
  obj: dict
  problem: str
  steps: tuple[str, ...]


def parse_line(line: str, lineno: int, separator: str = DEFAULT_SEPARATOR) -> Record | str:
  """A Record, or a one-line reason why the line is malformed."""
  try:
    obj = cli.json_value(line, finite=True)
  except json.JSONDecodeError as e:
    return f"not valid JSON ({e.msg} at column {e.colno})"
  except ValueError as e:
    return f"not valid JSON ({cli.first_line(e)})"
  if not isinstance(obj, dict):
    return f"expected a JSON object, got {type(obj).__name__}"
  problem = obj.get("problem")
  if not isinstance(problem, str):
    return "'problem' must be a string"
  steps = solution_steps(obj, separator)
  if isinstance(steps, str):
    return steps
  try:  # JSON escapes can spell lone surrogates ("\ud800"), which no tokenizer accepts
    for text in (problem, *steps):
      text.encode("utf-8")
  except UnicodeEncodeError:
    return "'problem' or 'steps' contains an invalid Unicode escape (lone surrogate)"
  return Record(lineno, obj, problem, tuple(steps))


def read_records(path: pathlib.Path, warn, separator: str = DEFAULT_SEPARATOR) -> Iterator[Record]:
  # bytes, in bounded lines (rmjax.tool_files): one non-UTF-8 or overlong line is skipped, not the file
  for lineno, raw in jsonl_lines(path, warn):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      warn(f"{path}:{lineno}: skipped: not valid UTF-8 (byte {e.start})")
      continue
    rec = parse_line(line, lineno, separator)
    if isinstance(rec, str):
      warn(f"{path}:{lineno}: skipped: {rec}")
      continue
    yield rec


# -- scorers ----------------------------------------------------------------------------------------
class JaxScorer:
  """A run's checkpoint, scored by rmjax.inference.RunScorer (Steps.eval_step on every local
  device, several solutions per row)."""

  def __init__(self, checkpoint: str | pathlib.Path, rows: int = 8):
    from rmjax.inference import RunScorer
    from rmjax.run_artifacts import load_run_model
    self.scorer = RunScorer(load_run_model(checkpoint), rows=rows)

  def score_batch(self, recs: Sequence[Record]) -> list[tuple[list, Any]]:
    done = self.scorer.score([(r.problem, r.steps) for r in recs])
    return [([s for s in d.scores if s is not None],
             None if d.tokens is None else (d.tokens.input_ids, d.tokens.marker_positions)) for d in done]


class ExportScorer:
  """rmjax.torch_scorer on an export directory."""

  def __init__(self, export_dir: str | pathlib.Path):
    from rmjax.torch_scorer import TorchScorer
    self.scorer = TorchScorer.from_export(export_dir)

  def score_batch(self, recs: Sequence[Record]) -> list[tuple[list, Any]]:
    toks = [self.scorer.tokenize(r.problem, r.steps) if r.steps else None for r in recs]
    scores = iter(self.scorer.score_ids([t for t in toks if t is not None]))
    return [([], None) if t is None else (next(scores), t) for t in toks]


def make_scorer(checkpoint: str | pathlib.Path, rows: int = 8):
  path = pathlib.Path(checkpoint)
  if (path / EXPORT_FILE).is_file():
    return ExportScorer(checkpoint)
  if (path.parent / EXPORT_FILE).is_file():  # a folder inside an export, e.g. export/demo/backbone
    raise FileNotFoundError(f"{path} is a folder of the export {path.parent}: give the export directory itself")
  from rmjax.run_artifacts import RunArtifactError
  try:
    return JaxScorer(checkpoint, rows)
  except RunArtifactError as e:
    if "is neither a run directory" in str(e):
      raise RunArtifactError(f"{e}, nor an export directory ({EXPORT_FILE})") from None
    raise


# -- the command ------------------------------------------------------------------------------------
def _batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
  batch: list[Record] = []
  for r in records:
    batch.append(r)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def output_record(rec: Record, scores: list, tokens: Any, with_tokens: bool,
                  how: str | None = None) -> tuple[dict, int]:
  """The output object and how many steps got null (did not fit)."""
  missing = len(rec.steps) - len(scores)
  out = dict(rec.obj)
  if "steps" not in out:  # split from `text`
    out["steps"] = list(rec.steps)
  out["step_scores"] = list(scores) + [None] * missing
  if how:
    out["solution_score"] = aggregate(out["step_scores"], how)
  if with_tokens:
    out["input_ids"] = [] if tokens is None else [int(x) for x in tokens[0]]
    out["marker_positions"] = [] if tokens is None else [int(x) for x in tokens[1]]
  return out, missing


def score_file(checkpoint: str | pathlib.Path, input_path: str | pathlib.Path, output_path: str | pathlib.Path,
               batch_size: int = 8, with_tokens: bool = False, warn=None, progress: bool | None = None,
               aggregate_by: str | None = None, separator: str = DEFAULT_SEPARATOR) -> dict:
  """Score every valid line of `input_path` into `output_path`; returns counts."""
  from rmjax.progress import Progress
  warn = warn or (lambda m: print(f"rmjax.score: warning: {m}", file=sys.stderr))
  input_path, output_path = pathlib.Path(input_path), pathlib.Path(output_path)
  check_input(input_path)
  if batch_size < 1:
    raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
  if output_path.exists() and os.path.samefile(input_path, output_path):
    raise ValueError(f"--output {output_path} is the --input file: writing it would erase the input; give another path")
  # the progress bar's total; a pipe (--input <(zcat x.jsonl.gz)) can be read only once: none
  total_lines = sum(1 for _ in jsonl_lines(input_path, lambda _: None)) if input_path.is_file() else None
  scorer = make_scorer(checkpoint, batch_size)
  counts = {"scored": 0, "malformed": 0, "truncated_steps": 0}

  def count_warn(msg: str) -> None:
    counts["malformed"] += 1
    warn(msg)

  # Written under a temporary name beside --output and renamed into place only when every line
  # is written: a full disk, an error or Ctrl-C leaves the earlier --output as it was.
  with output_files() as files, Progress(total_lines, enabled=progress, stream=sys.stderr, desc="score") as bar:
    out = files.open(output_path)
    for batch in _batches(read_records(input_path, count_warn, separator), batch_size):
      for rec, (scores, tokens) in zip(batch, scorer.score_batch(batch)):
        obj, missing = output_record(rec, scores, tokens, with_tokens, aggregate_by)
        if missing:
          counts["truncated_steps"] += missing
          warn(f"{input_path}:{rec.line}: {missing} of {len(rec.steps)} steps do not fit in "
               f"max_length; their scores are null")
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        counts["scored"] += 1
      bar.update(counts["scored"] + counts["malformed"])
  return counts


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m rmjax.score", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="run dir, checkpoint_step_<N> dir or export dir")
  parser.add_argument("--input", required=True, help="JSONL, one {problem, steps | text} object per line")
  parser.add_argument("--output", required=True, help="JSONL to write; - or a pipe streams it")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--with-tokens", action="store_true", help="also write input_ids and marker_positions")
  add_solution_args(parser)
  args = parser.parse_args(argv)
  if args.output == "-":  # stdout, as - means to most tools (else a file named "-" appeared)
    args.output = "/dev/stdout"
  return cli.run("score", lambda: _score_command(args))


def _score_command(args: argparse.Namespace) -> int:
  counts = score_file(args.checkpoint, args.input, args.output, args.batch_size, args.with_tokens,
                      aggregate_by=args.aggregate, separator=parse_separator(args.step_separator))
  print(f"rmjax.score: scored {counts['scored']} lines, skipped {counts['malformed']} malformed, "
        f"{counts['truncated_steps']} steps did not fit (null) -> {args.output}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
