"""Best-of-N reranking: how often does the model's top pick among n candidates solve the problem?

  python -m rmjax.rerank [--checkpoint RUN] --input C.jsonl --output DIR [--step-separator SEP]
                         [--batch-size 8] [--max-length N]

Each input line is one problem and its N candidate solutions:
  {"id": ..., "problem": str, "candidates": [{"steps": [str] | "text": str, "correct": bool,
                                              "answer": str (optional), "step_scores": [float] (optional)}]}
A line in the layout of GSM8K's example_model_solutions.jsonl (`question`, and per generator
{"is_correct", "solution"}) is read too: each generator's solution is a candidate, its answer
the text after the last "A:" line (split its steps with --step-separator '\\n').

With --checkpoint (a run directory or checkpoint_step_<N>) every candidate is scored by the
model (rmjax.inference); without it the candidates' own `step_scores` are used. Step scores
become a solution score by each of min, prod, mean and last (rmjax.solutions), and for n = 1, 2,
4, ... up to N (the smallest N of the file, and N itself) DIR receives:
  bon.json        accuracy[<aggregation>][<n>], oracle[<n>] (pass@n), majority[<n>] (vote over
                  `answer`, compared as strings with surrounding spaces stripped, over the
                  problems with an answer; null when none has one): each the
                  EXACT mean over all n-subsets of each problem's candidates, averaged over
                  problems (ties and abstentions: rmjax.bon)
  candidates.jsonl  the problems with every candidate's step_scores and solution_scores
  bon.png         accuracy vs n (log-2 axis), one line per aggregation, oracle and majority
Malformed lines are reported with their line number and skipped (counted in bon.json).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Any, Optional

from rmjax import bon, cli
from rmjax.solutions import AGGREGATIONS, DEFAULT_SEPARATOR, add_solution_args, aggregate, parse_separator, \
  solution_steps

def _answer(value: Any) -> Optional[str]:
  return None if value is None else str(value).strip()


def _gsm8k_candidates(obj: dict) -> list[dict]:
  out = []
  for name, sol in obj.items():
    if isinstance(sol, dict) and "is_correct" in sol and isinstance(sol.get("solution"), str):
      lines = [x for x in sol["solution"].splitlines() if x.startswith("A:")]
      out.append({"name": name, "text": sol["solution"], "correct": sol["is_correct"],
                  "answer": lines[-1][2:].strip() if lines else None})
  return out


def _finite_float(x: int | float) -> bool:
  """Whether a JSON number is a finite float (an int past float's range is not)."""
  try:
    return math.isfinite(x)
  except OverflowError:
    return False


def parse_problem(obj: Any, separator: str, need_steps: bool) -> dict | str:
  """{"id", "problem", "candidates": [{..., "steps", "correct", "answer", "step_scores"}]}, or why not."""
  if not isinstance(obj, dict):
    return f"expected a JSON object, got {type(obj).__name__}"
  if "candidates" not in obj and isinstance(obj.get("question"), str):
    obj = {"id": obj.get("id"), "problem": obj["question"], "candidates": _gsm8k_candidates(obj)}
  problem, cands = obj.get("problem"), obj.get("candidates")
  if not isinstance(problem, str):
    return "'problem' must be a string"
  if not isinstance(cands, list) or not cands or not all(isinstance(c, dict) for c in cands):
    return "'candidates' must be a non-empty list of objects"
  out = []
  for i, c in enumerate(cands):
    if not isinstance(c.get("correct"), bool):
      return f"candidate {i}: 'correct' must be true or false"
    cand = dict(c, answer=_answer(c.get("answer")))
    steps = solution_steps(c, separator) if ("steps" in c or "text" in c or need_steps) else []
    if isinstance(steps, str):
      return f"candidate {i}: {steps}"
    cand["steps"] = steps
    cand.pop("text", None)
    scores = c.get("step_scores")
    if not need_steps:
      if scores is None:
        return f"candidate {i}: no 'step_scores' (give --checkpoint to score the candidates)"
      if not isinstance(scores, list) or not all(
          s is None or (isinstance(s, (int, float)) and not isinstance(s, bool) and _finite_float(s)) for s in scores):
        return f"candidate {i}: 'step_scores' must be a list of numbers (or null)"
    out.append(cand)
  return {"id": obj.get("id"), "problem": problem, "candidates": out}


def read_problems(path: pathlib.Path, separator: str, need_steps: bool, warn) -> list[tuple[int, dict]]:
  if path.is_dir():
    raise FileNotFoundError(f"--input {path} is a directory; give a JSON Lines file")
  out = []
  with open(path, "rb") as fh:
    for lineno, raw in enumerate(fh, 1):
      if not raw.strip():
        continue
      try:
        rec = parse_problem(cli.json_value(raw, finite=True), separator, need_steps)
      except ValueError as e:
        rec = f"not valid JSON ({cli.first_line(e)})"
      if isinstance(rec, str):
        warn(f"{path}:{lineno}: skipped: {rec}")
        continue
      out.append((lineno, rec))
  return out


def score_candidates(scorer: Any, problems: list[dict]) -> int:
  """Sets every candidate's step_scores with `scorer` (rmjax.inference.RunScorer); returns how
  many steps did not fit (their score is null)."""
  cands = [(p["problem"], c) for p in problems for c in p["candidates"]]
  for (_, c), done in zip(cands, scorer.score([(prob, c["steps"]) for prob, c in cands])):
    c["step_scores"] = done.scores
  return sum(s is None for _, c in cands for s in c["step_scores"])


def bon_report(problems: list[dict]) -> dict[str, Any]:
  """bon.json's statistics over problems whose candidates carry step_scores."""
  sizes = [len(p["candidates"]) for p in problems]
  ns = bon.n_values(min(sizes))
  acc = {how: {n: 0.0 for n in ns} for how in AGGREGATIONS}
  oracle, vote = {n: 0.0 for n in ns}, {n: 0.0 for n in ns}
  voting = sum(any(c["answer"] is not None for c in p["candidates"]) for p in problems)
  for p in problems:
    answers = [c["answer"] for c in p["candidates"]]
    correct = [c["correct"] for c in p["candidates"]]
    for how in AGGREGATIONS:
      scores = [c["solution_scores"][how] for c in p["candidates"]]
      for n in ns:
        acc[how][n] += bon.top_pick_accuracy(scores, correct, n) / len(problems)
    for n in ns:
      oracle[n] += bon.oracle(correct, n) / len(problems)
      if any(a is not None for a in answers):
        vote[n] += bon.majority(answers, correct, n) / voting
  keyed = lambda d: {str(n): v for n, v in d.items()}
  return {"problems": len(problems), "candidates": {"min": min(sizes), "max": max(sizes)}, "n": ns,
          "accuracy": {how: keyed(v) for how, v in acc.items()}, "oracle": keyed(oracle),
          "majority": keyed(vote) if voting else None, "majority_problems": voting}


def bon_plot(report: dict[str, Any], path: pathlib.Path, dpi: int = 110) -> pathlib.Path:
  from matplotlib.figure import Figure  # lazy: matplotlib is only needed to draw
  fig = Figure(figsize=(6.4, 4.6), dpi=dpi, layout="constrained")
  ax = fig.add_subplot()
  ns = report["n"]
  for how in AGGREGATIONS:
    ax.plot(ns, [report["accuracy"][how][str(n)] for n in ns], marker="o", linewidth=1.8, markersize=5, label=how)
  ax.plot(ns, [report["oracle"][str(n)] for n in ns], linestyle="--", color="0.45", label="oracle (pass@n)")
  if report["majority"] is not None:
    ax.plot(ns, [report["majority"][str(n)] for n in ns], linestyle=":", color="0.2", label="majority vote")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.set_ylim(-0.02, 1.02)
  ax.grid(True, alpha=0.3)
  ax.set_xlabel("n (candidates per problem)")
  ax.set_ylabel("accuracy@n")
  ax.set_title(f"Best-of-n reranking ({report['problems']:,} problems)", fontsize=11)
  ax.legend(fontsize=9, frameon=False, loc="best")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path


def rerank(input_path: str | pathlib.Path, output: str | pathlib.Path, checkpoint: str | None = None,
           separator: str = DEFAULT_SEPARATOR, batch_size: int = 8, max_length: int | None = None,
           warn=None) -> dict[str, Any]:
  warn = warn or (lambda m: print(f"rmjax.rerank: warning: {m}", file=sys.stderr))
  input_path, out_dir = pathlib.Path(input_path), pathlib.Path(output)
  if not input_path.exists():
    raise FileNotFoundError(f"input file not found: {input_path}")
  skipped = {"malformed": 0}

  def count_warn(msg: str) -> None:
    skipped["malformed"] += 1
    warn(msg)

  read = read_problems(input_path, separator, checkpoint is not None, count_warn)
  if not read:
    raise ValueError(f"{input_path}: no problem to rerank ({skipped['malformed']} malformed lines skipped)")
  problems = [p for _, p in read]
  unscored = 0
  if checkpoint is not None:
    from rmjax.inference import RunScorer, with_max_length
    from rmjax.run_artifacts import load_run_model
    rm = load_run_model(checkpoint)
    cfg = with_max_length(rm.render_cfg, max_length) if max_length is not None else None
    unscored = score_candidates(RunScorer(rm, cfg, rows=batch_size), problems)
    if unscored:
      warn(f"{unscored} steps do not fit in max_length (their candidates have no solution score and rank "
           f"last; --max-length raises it)")
  for p in problems:
    for c in p["candidates"]:
      c["solution_scores"] = {how: aggregate(c["step_scores"], how) for how in AGGREGATIONS}
  report = bon_report(problems)
  report |= {"checkpoint": checkpoint, "skipped_lines": skipped["malformed"], "unscored_steps": unscored}
  out_dir.mkdir(parents=True, exist_ok=True)
  with open(out_dir / "candidates.jsonl", "w", encoding="utf-8") as fh:
    for p in problems:
      fh.write(json.dumps(p, ensure_ascii=False) + "\n")
  (out_dir / "bon.json").write_text(json.dumps(report, indent=2) + "\n")
  bon_plot(report, out_dir / "bon.png")
  return report


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m rmjax.rerank", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", default=None, help="run dir or checkpoint_step_<N> dir (default: use "
                      "the candidates' step_scores)")
  parser.add_argument("--input", required=True, help="JSONL, one problem and its candidates per line")
  parser.add_argument("--output", required=True, help="output dir")
  parser.add_argument("--batch-size", type=int, default=8, help="rows per scoring batch")
  parser.add_argument("--max-length", type=int, default=None, help="tokens per solution (default: the run's)")
  add_solution_args(parser, with_aggregate=False)
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error("--batch-size must be >= 1")
  if args.max_length is not None and args.max_length < 2:
    parser.error("--max-length must be >= 2 (a marker and the text before it)")
  return cli.run("rerank", lambda: _rerank_command(args))


def _rerank_command(args: argparse.Namespace) -> int:
  report = rerank(args.input, args.output, args.checkpoint, parse_separator(args.step_separator), args.batch_size,
                  args.max_length)
  ns = report["n"]
  print(f"{'n':>12}" + "".join(f"{n:>8}" for n in ns))
  rows = [(how, report["accuracy"][how]) for how in AGGREGATIONS] + [("oracle", report["oracle"])]
  rows += [("majority", report["majority"])] if report["majority"] is not None else []
  for name, values in rows:
    print(f"{name:>12}" + "".join(f"{values[str(n)]:>8.4f}" for n in ns))
  print(f"{report['problems']} problems, {report['skipped_lines']} lines skipped; wrote {args.output}/bon.json, "
        f"candidates.jsonl, bon.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
