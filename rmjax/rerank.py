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
Malformed lines are reported with their line number and skipped (counted in bon.json): among
them a candidate's own step_scores outside [0, 1] (they are probabilities) or not one per step,
and a line longer than 64 MiB. Every n is averaged over all problems, so n stops at the fewest
candidates of a problem, and a warning names that problem when others have more (why:
fewest_candidates). --input is a file or a pipe; the three files are written together or not at
all (rmjax.tool_files), so a failure leaves DIR as it was.
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
from rmjax.tool_files import check_input, jsonl_lines, output_files


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


def _check_step_scores(scores: Any, steps: list[str] | None) -> str | None:
  """Why a candidate's own step_scores cannot be used, or None. They are probabilities (what
  rmjax.score writes): a score outside [0, 1] is not one, and would make prod overflow to
  Infinity (invalid JSON) or rank a wrong scale first; a list whose length is not the number of
  steps (when steps are given) belongs to another solution."""
  if scores is None:
    return "no 'step_scores' (give --checkpoint to score the candidates)"
  if not isinstance(scores, list) or not all(
      s is None or (isinstance(s, (int, float)) and not isinstance(s, bool) and _finite_float(s)) for s in scores):
    return "'step_scores' must be a list of numbers (or null)"
  bad = next((s for s in scores if s is not None and not 0.0 <= s <= 1.0), None)
  if bad is not None:
    return f"'step_scores' must be probabilities in [0, 1], got {bad!r}"
  if steps is not None and len(scores) != len(steps):
    return f"{len(scores)} step_scores for {len(steps)} step{'s' * (len(steps) != 1)}"
  return None


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
    if not need_steps:
      why = _check_step_scores(c.get("step_scores"), steps if ("steps" in c or "text" in c) else None)
      if why:
        return f"candidate {i}: {why}"
    out.append(cand)
  return {"id": obj.get("id"), "problem": problem, "candidates": out}


def read_problems(path: pathlib.Path, separator: str, need_steps: bool, warn) -> list[tuple[int, dict]]:
  """(line number, problem) of each valid line; bounded lines, a BOM dropped (rmjax.tool_files)."""
  out = []
  for lineno, raw in jsonl_lines(check_input(path), warn):
    try:
      rec = parse_problem(cli.json_value(raw, finite=True), separator, need_steps)
    except ValueError as e:
      rec = f"not valid JSON ({cli.first_line(e)})"
    if isinstance(rec, str):
      warn(f"{path}:{lineno}: skipped: {rec}")
      continue
    out.append((lineno, rec))
  return out


def fewest_candidates(path: pathlib.Path, read: list[tuple[int, dict]]) -> str | None:
  """One line naming the problem that limits n, when problems have different numbers of
  candidates; else None.

  Why the table stops at the fewest candidates of any problem instead of averaging each n over
  the problems that have n: the Best-of-N curves of the literature (Cobbe et al. 2021; Lightman
  et al. 2023) average every n over the SAME problems, so a rise with n is the reward model's, not
  a change of problem set (the problems with many candidates are often the hard ones, sampled
  more). A problem with few candidates then silently shrinks the table: this says which."""
  sizes = [len(p["candidates"]) for _, p in read]
  if min(sizes) == max(sizes):
    return None
  lineno, p = next((ln, p) for ln, p in read if len(p["candidates"]) == min(sizes))
  others = sum(s == min(sizes) for s in sizes) - 1
  also = f" (and {others} more problem{'s' * (others > 1)})" if others else ""
  return (f"n stops at {min(sizes)}: {path}:{lineno} (id {p['id']!r}){also} has {min(sizes)} candidate"
          f"{'s' * (min(sizes) > 1)}, others up to {max(sizes)}; every n is averaged over the same problems, "
          f"so n is at most the fewest candidates of a problem")


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
  skipped = {"malformed": 0}

  def count_warn(msg: str) -> None:
    skipped["malformed"] += 1
    warn(msg)

  read = read_problems(input_path, separator, checkpoint is not None, count_warn)
  if not read:
    raise ValueError(f"{input_path}: no problem to rerank ({skipped['malformed']} malformed lines skipped)")
  problems = [p for _, p in read]
  limit = fewest_candidates(input_path, read)
  if limit:
    warn(limit)
  unscored = 0
  if checkpoint is not None:
    from rmjax.inference import RunScorer, with_max_length
    from rmjax.run_artifacts import load_run_model
    rm = load_run_model(checkpoint)
    cfg = with_max_length(rm.render_cfg, max_length) if max_length is not None else None
    unscored = score_candidates(RunScorer(rm, cfg, rows=batch_size), problems)
    if unscored:
      ids = [str(p.get("id")) for p in problems if any(None in c["step_scores"] for c in p["candidates"])]
      warn(f"{unscored} steps do not fit in max_length, in problems {', '.join(ids[:5])}"
           f"{f' and {len(ids) - 5} more' if len(ids) > 5 else ''} (their candidates have no solution score and "
           f"are never picked; --max-length raises it)")
  for p in problems:
    for c in p["candidates"]:
      c["solution_scores"] = {how: aggregate(c["step_scores"], how) for how in AGGREGATIONS}
  report = bon_report(problems)
  report |= {"checkpoint": checkpoint, "skipped_lines": skipped["malformed"], "unscored_steps": unscored}
  # The three files appear together or not at all (rmjax.tool_files): never a new candidates.jsonl
  # beside an old bon.json. allow_nan=False: JSON has no Infinity; better no file than an invalid one.
  with output_files() as files:
    fh = files.open(out_dir / "candidates.jsonl")
    for p in problems:
      fh.write(json.dumps(p, ensure_ascii=False, allow_nan=False) + "\n")
    files.write_text(out_dir / "bon.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    files.write(out_dir / "bon.png", lambda path: bon_plot(report, path))
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
