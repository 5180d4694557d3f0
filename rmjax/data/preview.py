"""Preview CLI: print the canonical examples a reader makes from a dataset file.

Why: the fastest way to trust (or distrust) a reader is to look at what it produces from the
real file before training on it. Prints one JSON object per example on stdout (keys source,
id, problem, steps, targets) in file order, then the skipped-record counts on stderr.

  python -m rmjax.data.preview --source prm800k --path DIR --split train --phase 2 --limit 5
  python -m rmjax.data.preview --source reveal --path reveal_eval.csv --set label=both
  python -m rmjax.data.preview --source processbench --path hf://datasets/Qwen/ProcessBench --split gsm8k

The printed JSONL is itself a dataset: `--source rmjax` (and a spec source with reader "rmjax")
reads it back into the same examples, so any source can be converted once.

Errors (missing path, unknown split, bad option, strict-mode bad record) are one line on
stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from rmjax import cli
from rmjax.data.example import BadRecord, SkipCounter
from rmjax.data.jsonl_index import MISSING, path_kind
from rmjax.data.sources import READER_KEYS, READERS, build_source
from rmjax.spec_io import parse_set_item


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m rmjax.data.preview", description=__doc__.split("\n\n")[0])
  p.add_argument("--source", required=True, choices=READERS)
  p.add_argument("--path", required=True, help="a dataset file, or a directory plus --split")
  p.add_argument("--split", default=None)
  p.add_argument("--phase", type=int, default=None, choices=(1, 2), help="PRM800K phase (1 or 2) with a directory")
  p.add_argument("--limit", type=int, default=None, help="print at most N examples")
  p.add_argument("--strict", action="store_true", help="stop at the first bad record")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a reader option, e.g. neutral_target=0.0 or label=both (value as JSON or a Python literal if it parses)")
  return p


# Source keys the command line sets by a flag: a --set of them would silently override it.
_FLAG_KEYS = {"reader": "--source", "path": "--path", "split": "--split", "phase": "--phase"}


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Refuses (parser.error: one line, exit 2) what would otherwise be ignored or print nothing."""
  if args.limit is not None and args.limit < 0:
    parser.error(f"argument --limit: expected 0 or more examples, got {args.limit}")
  if args.phase is not None and args.source != "prm800k":
    parser.error(f"argument --phase: only --source prm800k has phases, not {args.source}")
  kind = path_kind(args.path)
  if args.phase is not None and kind not in ("a directory", MISSING):
    parser.error(f"argument --phase: it picks phase<N>_<split>.jsonl in a directory, and {args.path} is {kind} "
                 f"(a file is read as it is: leave --phase out)")


_FORMATS = {"prm800k": "JSON Lines, one labelled solution per line", "eqasc": "one JSON array of questions",
            "reveal": "CSV with a header row",
            "processbench": "records with problem, steps and label (index of the first wrong step)",
            "math_shepherd": "records with input (steps ending in a step tag) and label",
            "stepwise": "records with prompt, completions and labels (TRL stepwise supervision)",
            "rmjax": "records with problem, steps and targets, as this command prints them"}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  _check_flags(parser, args)
  skips = SkipCounter()
  shown = 0
  try:
    cfg = dict(parse_set_item(item) for item in args.set)
    flagged = [k for k in _FLAG_KEYS if k in cfg]
    if flagged:
      raise ValueError(f"--set {flagged[0]}: {_FLAG_KEYS[flagged[0]]} sets it here, not --set")
    cfg["path"] = args.path
    unknown = sorted(set(cfg) - set(READER_KEYS[args.source]))
    if unknown:
      known = [k for k in READER_KEYS[args.source] if k not in _FLAG_KEYS]
      raise ValueError(f"unknown --set option(s) {', '.join(unknown)} for {args.source}; "
                       f"known: {', '.join(known) or 'none'}")
    if args.phase is not None:
      cfg["phase"] = args.phase
    reader = build_source(args.source, cfg, split=args.split, skips=skips, strict=args.strict)
    for i in range(len(reader)):
      if args.limit is not None and shown >= args.limit:
        break
      example = reader[i]
      if example is not None:
        print(json.dumps(example.to_json(), ensure_ascii=False), )
        shown += 1
  except BrokenPipeError:  # e.g. piped into head: stop quietly (before OSError, its base class)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
    return 0
  except (FileNotFoundError, ValueError, TypeError, BadRecord, OSError) as e:
    return cli.report("rmjax.data.preview", cli.first_line(e))
  sys.stdout.flush()
  counts = skips.as_dict().get(args.source, {})
  print(f"rmjax.data.preview: {shown} examples; skipped records and noted problems by reason: "
        f"{json.dumps(counts, sort_keys=True)}", file=sys.stderr)
  if not shown and counts and args.limit != 0:
    print(f"rmjax.data.preview: nothing in {args.path} reads as {args.source} ({_FORMATS[args.source]}); is --source "
          f"right for this file? --strict stops at the first problem and names it", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
