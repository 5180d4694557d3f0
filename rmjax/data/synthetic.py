"""SYNTHETIC PRM800K-format data: learnable arithmetic traces for tests and the CPU demo.

The real PRM800K is 456 MB behind Git LFS, and the tiny demo model must show in minutes on a
CPU that training works (AUROC well above chance). So we generate small arithmetic problems
whose wrong steps are detectable: "Compute 4 + 7 - 3." with steps "4 + 7 = 11", "11 - 3 = 8".
A wrong step carries an off-by-k result, is rated -1 and ends the labelled trajectory with
`chosen_completion: null` and `finish_reason: "found_error"`, exactly like a real phase-2 error
step; correct steps are rated +1, an occasional filler step is rated 0 (neutral).

Every record is written in the raw PRM800K phase-2 JSONL layout (same keys, same order, one
`json.dumps` per line) so the real PRM800K reader reads it unchanged. Records are clearly
marked: `labeler` is "synthetic-rmjax" and the timestamp is fixed. Output depends only on
(n_records, seed); record i depends only on (i, seed).

CLI: python -m rmjax.data.synthetic OUT_DIR [--train N] [--test N] [--seed S]
writes OUT_DIR/phase2_train.jsonl and OUT_DIR/phase2_test.jsonl, and refuses (one line, exit 2)
when either is already there: those are the real PRM800K's file names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from typing import Any, Optional

from rmjax import cli
from rmjax.data.jsonl_index import path_kind

SYNTHETIC_LABELER = "synthetic-rmjax"
_TIMESTAMP = "2000-01-01T00:00:00.000000"
_FILLER = ("I will work from left to right.", "Let me compute this one operation at a time.")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Difficulty knobs; the defaults keep every value a small integer (one BPE token)."""

  min_ops: int = 2  # operations per problem
  max_ops: int = 4
  max_operand: int = 9  # operands drawn from 1..max_operand
  max_value: int = 30  # intermediate results stay in 0..max_value
  error_rate: float = 0.5  # fraction of records that contain a wrong step
  max_offset: int = 5  # a wrong result is off by 1..max_offset
  filler_rate: float = 0.1  # chance of a neutral (rating 0) first step
  alternatives: bool = True  # the error step also lists the correct alternative (rating +1)
  step_padding: str = ""  # text appended to every step: steps of real length (gpu_checks.sh's spec loops)


DEFAULT_TRAIN_RECORDS = 4000  # data.synthetic.train_records' default (demo and tests)
DEFAULT_TEST_RECORDS = 400
TEST_SEED_OFFSET = 7919  # the test split's seed: the train seed plus this (disjoint records)
MAX_OPS = 100  # beyond these, writing the files would take hours or never end
MAX_RECORDS = 10_000_000


def settings(block: dict[str, Any]) -> tuple[SyntheticConfig, int, int, list[str]]:
  """(generator settings, train records, test records, problems) from a spec's `data.synthetic`
  block; `problems` lists the values that would make the data wrong or its writing endless (an
  operand range wider than the value range makes `_problem` redraw almost forever)."""
  block = dict(block)
  n_train, n_test = int(block.pop("train_records")), int(block.pop("test_records"))
  cfg = SyntheticConfig(**block)
  problems = [f"{name} must be >= {low}, got {value}" for name, value, low in (
    ("train_records", n_train, 1), ("test_records", n_test, 1), ("max_ops", cfg.max_ops, cfg.min_ops),
    ("max_operand", cfg.max_operand, 1), ("max_value", cfg.max_value, 1), ("max_offset", cfg.max_offset, 1))
    if not value >= low]
  problems += [f"{name} must be <= {high}, got {value}" for name, value, high in (
    ("train_records", n_train, MAX_RECORDS), ("test_records", n_test, MAX_RECORDS), ("max_ops", cfg.max_ops, MAX_OPS),
    ("max_operand", cfg.max_operand, max(cfg.max_value, 1))) if value > high]
  if not 0.0 <= cfg.error_rate <= 1.0:
    problems.append(f"error_rate must be in [0, 1], got {cfg.error_rate}")
  return cfg, n_train, n_test, problems


def _problem(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[int], list[str], list[int]]:
  """Operands, operators and the running value after each operation (left to right)."""
  n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
  values = [rng.randint(1, cfg.max_operand)]
  operands, ops = [values[0]], []
  for _ in range(n_ops):
    while True:
      op, y = rng.choice("+-"), rng.randint(1, cfg.max_operand)
      z = values[-1] + y if op == "+" else values[-1] - y
      if 0 <= z <= cfg.max_value:
        break
    operands.append(y)
    ops.append(op)
    values.append(z)
  return operands, ops, values


def _completion(text: str, rating: int, flagged: Optional[bool] = None) -> dict:
  return {"text": text, "rating": rating, "flagged": flagged}


def _step(completions: list[dict], chosen: Optional[int]) -> dict:
  return {"completions": completions, "human_completion": None, "chosen_completion": chosen}


def _wrong(rng: random.Random, z: int, cfg: SyntheticConfig) -> int:
  k = rng.randint(1, cfg.max_offset)
  return z - k if z - k >= 0 and rng.random() < 0.5 else z + k


def make_record(i: int, seed: int, cfg: SyntheticConfig = SyntheticConfig()) -> dict:
  """One SYNTHETIC phase-2 PRM800K record (key order as on disk)."""
  rng = random.Random(seed * 1_000_003 + i)
  operands, ops, values = _problem(rng, cfg)
  expr = " ".join([str(operands[0])] + [f"{o} {y}" for o, y in zip(ops, operands[1:])])
  problem = f"Compute {expr}."
  pad = cfg.step_padding
  right = [f"{values[j]} {ops[j]} {operands[j + 1]} = {values[j + 1]}{pad}" for j in range(len(ops))]
  answer = values[-1]
  pre_steps = right + [f"# Answer\n\n{answer}"]
  steps = []
  if rng.random() < cfg.filler_rate:
    steps.append(_step([_completion(rng.choice(_FILLER), 0)], 0))
  error_at = rng.randrange(len(ops)) if rng.random() < cfg.error_rate else None
  for j, text in enumerate(right):
    if j == error_at:
      bad = f"{values[j]} {ops[j]} {operands[j + 1]} = {_wrong(rng, values[j + 1], cfg)}{pad}"
      pre_steps[j] = bad
      comps = [_completion(bad, -1)] + ([_completion(text, 1, False)] if cfg.alternatives else [])
      steps.append(_step(comps, None))
      break
    steps.append(_step([_completion(text, 1)], 0))
  else:
    steps.append(_step([_completion(pre_steps[-1], 1)], 0))
  return {
    "labeler": SYNTHETIC_LABELER,
    "timestamp": _TIMESTAMP,
    "generation": 0,
    "is_quality_control_question": False,
    "is_initial_screening_question": False,
    "question": {
      "problem": problem,
      "ground_truth_solution": "Working left to right: " + ", ".join(right) + f". The answer is {answer}.",
      "ground_truth_answer": str(answer),
      "pre_generated_steps": pre_steps,
      "pre_generated_answer": str(answer) if error_at is None else "",
      "pre_generated_verifier_score": 0.5,
    },
    "label": {
      "steps": steps,
      "total_time": 1000 * len(steps),
      "finish_reason": "solution" if error_at is None else "found_error",
    },
  }


def write_synthetic_prm800k(path: str, n_records: int, seed: int,
                            cfg: SyntheticConfig = SyntheticConfig(), overwrite: bool = True) -> str:
  """Write `n_records` SYNTHETIC records as PRM800K raw JSONL to `path`; returns `path`.
  `overwrite=False` raises FileExistsError instead of replacing a file already there."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w" if overwrite else "x") as f:
    for i in range(n_records):
      f.write(json.dumps(make_record(i, seed, cfg)) + "\n")
  return path


def write_synthetic_prm800k_dir(out_dir: str, n_train: int, n_test: int, seed: int,
                                cfg: SyntheticConfig = SyntheticConfig(), overwrite: bool = True) -> str:
  """Write phase2_train.jsonl and phase2_test.jsonl (disjoint seeds) under `out_dir`."""
  write_synthetic_prm800k(os.path.join(out_dir, "phase2_train.jsonl"), n_train, seed, cfg, overwrite)
  write_synthetic_prm800k(os.path.join(out_dir, "phase2_test.jsonl"), n_test, seed + TEST_SEED_OFFSET, cfg, overwrite)
  return out_dir


def _count(text: str) -> int:
  try:
    n = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number of records, got {text!r}") from None
  if not 0 <= n <= MAX_RECORDS:
    raise argparse.ArgumentTypeError(f"expected 0 to {MAX_RECORDS} records, got {n}")
  return n


def _write_new(out_dir: str, n_train: int, n_test: int, seed: int) -> int:
  """The command writes only files that are not there yet: its file names are the real
  PRM800K's, so a folder of real data given by mistake must not be overwritten. (The launcher's
  demo data is its own and is regenerated through `write_synthetic_prm800k`, not through this.)"""
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"{out_dir} is {path_kind(out_dir)}, not a directory to write into")
  for name in ("phase2_train.jsonl", "phase2_test.jsonl"):
    if os.path.lexists(os.path.join(out_dir, name)):
      raise ValueError(f"{os.path.join(out_dir, name)} already exists (PRM800K's own file name); "
                       f"this command writes only new files: remove it or choose another folder")
  write_synthetic_prm800k_dir(out_dir, n_train, n_test, seed, overwrite=False)
  print(f"wrote SYNTHETIC PRM800K data to {out_dir}")
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  p = cli.ArgumentParser(prog="python -m rmjax.data.synthetic", description="Write SYNTHETIC PRM800K-format arithmetic data.")
  p.add_argument("out_dir", help="a folder without phase2_{train,test}.jsonl (made if missing)")
  p.add_argument("--train", type=_count, default=4000)
  p.add_argument("--test", type=_count, default=500)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  return cli.run("data.synthetic", lambda: _write_new(a.out_dir, a.train, a.test, a.seed))


if __name__ == "__main__":
  sys.exit(main())
