"""Which data sources a spec names, which of them train and evaluate, and their checks.

Why apart: a dataset is a spec entry, not code. Besides the built-in blocks data.prm800k,
data.eqasc and data.reveal, every other data.<name> block that names a `reader` is a source,
read by that reader (`rmjax.data.sources.READERS`) and treated exactly like the built-in ones by
training and evaluation (the train loop, the evaluator and the pipeline only see names).
Keeping the rule "what is a source" in one module keeps the spec validator, the loop and the
evaluator in agreement about it.

A reader block holds: reader, use, weight (sampling weight; 0 = evaluate only), path (a file,
a directory of split files, or hf://datasets/<owner>/<name>[/<file>]), train_split,
eval_split, test_only (evaluated and reported, never used to pick the best checkpoint), and
its reader's options. specs/common.py's `source_block` makes one with the defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from rmjax.data.sources import READER_KEYS, READERS, option_type

SOURCES = ("prm800k", "eqasc", "reveal")  # the built-in blocks every spec has
DATA_GROUPS = ("synthetic",)  # data sub-blocks that are not sources
BLOCK_KEYS = ("reader", "use", "weight", "path", "train_split", "eval_split", "test_only")


def _is_block(value: Any) -> bool:
  return hasattr(value, "items") and hasattr(value, "to_dict")


def source_names(spec: Any) -> list[str]:
  """The built-in sources, then every data.<name> reader block, in spec order."""
  extra = [k for k, v in spec.data.items() if _is_block(v) and k not in SOURCES + DATA_GROUPS]
  return list(SOURCES) + extra


def is_synthetic(spec: Any, source: str) -> bool:
  """PRM800K with an empty path means synthetic PRM800K-format data (demo and tests)."""
  return source == "prm800k" and not spec.data[source].path


def training_sources(spec: Any) -> dict[str, float]:
  """Sources that are sampled for training, with their (unnormalised) weights."""
  data = spec.data
  out = {}
  for name in source_names(spec):
    src = data[name]
    if not src.use or float(src.weight) <= 0:
      continue
    if name == "reveal" and not data.allow_reveal_training:
      continue
    out[name] = float(src.weight)
  return out


def eval_sources(spec: Any) -> list[str]:
  """Every enabled source is evaluated (REVEAL included even when it is not trained on)."""
  return [name for name in source_names(spec) if spec.data[name].use]


def test_only_sources(spec: Any) -> set[str]:
  """Evaluated sources that are test sets: reported, but never used to pick the best checkpoint
  (REVEAL's terms allow it as a test set only; once it is trained on it is held out no more;
  a reader block says so with test_only)."""
  out = {"reveal"} if spec.data.reveal.use and not spec.data.allow_reveal_training else set()
  return out | {n for n in source_names(spec)[len(SOURCES):]
                if spec.data[n].use and spec.data[n].get("test_only", False)}


def check_sources(spec: Any, problems: list[str], check_paths: bool) -> bool:
  """Appends one line per problem of any source block (built-in or reader block); False when
  a block is too broken for `training_sources` and friends to read."""
  data = spec.data
  readable = True
  for name in source_names(spec):
    src = data[name]
    if name not in SOURCES and not _check_block(name, src, problems):
      readable = False
      continue
    if not float(src.weight) >= 0:
      problems.append(f"data.{name}.weight must be >= 0, got {src.weight}")
    if not src.use or not check_paths or is_synthetic(spec, name):
      continue
    hint = f"(set --spec.data.{name}.path=DIR or --spec.data.{name}.use=False)"
    if not src.path:
      problems.append(f"data.{name}.path is empty but data.{name}.use is True {hint}")
    elif str(src.path).startswith("hf://"):
      from rmjax.data.record_files import resolve_hf
      try:
        resolve_hf(str(src.path))
      except (FileNotFoundError, ValueError) as e:
        problems.append(f"data.{name}.path: {e}")
    elif not os.path.exists(src.path):
      problems.append(f"data.{name}.path not found: {src.path} {hint}")
  return readable


def _check_block(name: str, src: Any, problems: list[str]) -> bool:
  """Checks a reader block's keys and values; False when it is too broken to check further."""
  where = f"data.{name}"
  reader = src.get("reader")
  if reader not in READERS:
    what = "names no reader" if reader is None else f"has reader={reader!r}"
    problems.append(f"{where} {what}: a source block needs reader, one of {', '.join(READERS)}"
                    + (f" (data.{name} is no built-in source)" if reader is None else ""))
    return False
  known = BLOCK_KEYS + tuple(k for k in READER_KEYS[reader] if k not in ("split", "path", "reader"))
  unknown = [k for k in src.keys() if k not in known]
  missing = [k for k in ("use", "weight", "path", "train_split", "eval_split") if k not in src]
  if unknown:
    problems.append(f"{where}: unknown key(s) {', '.join(unknown)} for reader {reader}; known: {', '.join(known)}")
  if missing:
    problems.append(f"{where}: missing key(s) {', '.join(missing)} (specs/common.py's source_block sets them all)")
  weight = src.get("weight", 0.0)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
    problems.append(f"{where}.weight must be a finite number >= 0, got {weight!r}")
    return False
  for key, kind in (("use", bool), ("test_only", bool), ("path", str), ("train_split", str), ("eval_split", str)):
    if key in src and not isinstance(src[key], kind):
      problems.append(f"{where}.{key} must be a {kind.__name__}, got {src[key]!r}")
  options = option_type(reader)
  fields = {f.name for f in dataclasses.fields(options)}
  try:
    options(**{k: v for k, v in src.items() if k in fields})
  except (TypeError, ValueError) as e:
    problems.append(f"{where}: {str(e).splitlines()[0]}")
  return not missing and isinstance(src.get("use"), bool) and isinstance(src.get("path"), str)


__all__ = ["SOURCES", "source_names", "is_synthetic", "training_sources", "eval_sources",
           "test_only_sources", "check_sources"]
