"""One place that turns a spec's source config into a reader.

Why: the pipeline, the evaluator and the preview CLI all need "source name + config -> reader";
with the mapping written once, a new dataset needs one new entry here and nothing else.

Source config fields (a plain mapping or ml_collections ConfigDict; keys not listed here are
ignored, so pipeline-level keys such as weights can live in the same block; `READER_KEYS`
lists the keys each reader understands, for spec validation):

  common    path (str, required: a file, or a directory plus split), split (used when the
            `split` argument is None), reader (which reader to use; default: the source name,
            so a source called e.g. "prm800k_phase1" can say reader="prm800k")
  prm800k   phase (1 | 2, default 2; needed with a directory), neutral_target (0.5),
            drop_quality_control (False), drop_screening (False)
  eqasc     label_all_steps (False)
  reveal    label ("correctness" | "attribution" | "both"), correctness_column,
            attribution_column, final_evidence_column, correctness_values,
            attribution_values (mappings label string -> target)
  processbench, stepwise, rmjax: none
  math_shepherd  step_tag (" ки"), good_label ("+"), bad_label ("-")

Splits: prm800k "train" | "test"; eqasc "train" | "dev" | "test"; reveal "eval" | "open"; the
field readers (`FIELD_READERS`, see `field_reader`) take the split names of the files in the
directory (ProcessBench: gsm8k | math | olympiadbench | omnimath), and hf://datasets/ paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from rmjax.data.eqasc import EqascOptions, EqascReader
from rmjax.data.math_shepherd import MathShepherdReader
from rmjax.data.example import SkipCounter
from rmjax.data.processbench import ProcessbenchReader
from rmjax.data.prm800k import DEFAULT_PHASE, Prm800kOptions, Prm800kReader
from rmjax.data.reveal import RevealOptions, RevealReader
from rmjax.data.rmjax_jsonl import RmjaxReader
from rmjax.data.stepwise import StepwiseReader

# The field's stepwise formats: one `FieldReader` subclass each, built the same way.
FIELD_READERS = {cls.kind: cls for cls in (ProcessbenchReader, MathShepherdReader, StepwiseReader, RmjaxReader)}
READERS = ("prm800k", "eqasc", "reveal") + tuple(FIELD_READERS)
# Readers that parse a record when it is read (PRM800K's lazily indexed JSONL and every field
# reader), so each process counts the skips of its own shard only; the others parse the whole
# file when built, on every process, and count the same skips everywhere.
SKIPS_COUNTED_ON_ACCESS = frozenset({"prm800k", *FIELD_READERS})
_COMMON_KEYS = ("path", "split", "reader")
_OPTIONS = {"prm800k": Prm800kOptions, "eqasc": EqascOptions, "reveal": RevealOptions,
            **{name: cls.Options for name, cls in FIELD_READERS.items()}}
READER_KEYS: dict[str, tuple[str, ...]] = {
    name: _COMMON_KEYS + (("phase",) if name == "prm800k" else ()) +
    tuple(f.name for f in dataclasses.fields(opts)) for name, opts in _OPTIONS.items()}


def _as_dict(cfg: Any) -> dict:
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    return dict(cfg.to_dict())
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise TypeError(f"source config should be a mapping, got {type(cfg).__name__}")


def _options(kind: str, cfg: dict) -> Any:
  cls = _OPTIONS[kind]
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in cfg.items() if k in fields})


def option_type(kind: str) -> type:
  """The options dataclass of reader `kind` (its fields are the reader's spec keys)."""
  return _OPTIONS[kind]


def reader_kind(name: str, source_cfg: Any) -> str:
  """The reader a source uses: its config's `reader`, else the source's name."""
  return _as_dict(source_cfg).get("reader") or name


def build_source(name: str, source_cfg: Any, split: Optional[str] = None,
                 skips: Optional[SkipCounter] = None, strict: bool = False):
  """The reader for source `name` configured by `source_cfg` (see the module docstring).

  Examples carry `source=name`; skips are counted in `skips` (a new counter if None).
  Fails with a one-line ValueError / FileNotFoundError on a bad config or path.
  """
  cfg = _as_dict(source_cfg)
  kind = reader_kind(name, cfg)
  if kind not in READERS:
    raise ValueError(f"source {name!r}: unknown reader {kind!r}; expected one of {list(READERS)}")
  path = cfg.get("path")
  if not path:
    raise ValueError(f"source {name!r}: no path configured (set {name}.path)")
  split = split if split is not None else cfg.get("split")
  common = dict(skips=skips, strict=strict, source=name)
  options = _options(kind, cfg)
  if kind == "prm800k":
    phase = cfg.get("phase", DEFAULT_PHASE)  # a reader block may leave it out
    try:
      phase = int(phase) if phase is not None else None
    except (TypeError, ValueError):
      raise ValueError(f"source {name!r}: phase should be 1 or 2, got {phase!r}") from None
    return Prm800kReader(path, split=split, phase=phase, options=options, **common)
  if kind == "eqasc":
    return EqascReader(path, split=split, options=options, **common)
  if kind == "reveal":
    return RevealReader(path, split=split, options=options, **common)
  return FIELD_READERS[kind](path, split=split, options=options, **common)


__all__ = ["build_source", "option_type", "READERS", "READER_KEYS", "FIELD_READERS"]
