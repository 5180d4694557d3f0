"""Evaluate one checkpoint on every enabled source, outside training.

Why it exists: training logs eval metrics as it goes, but a user comparing checkpoints, or
evaluating a finished run on a new split, needs the full report on demand:

  python -m rmjax.evaluate --checkpoint runs/demo-full [--spec specs/x.py] [--set KEY=VALUE ...]
                           [--output DIR] [--max-eval-batches N]
  python -m rmjax.evaluate --checkpoint runs/demo-full --benchmark processbench --path DIR
                           [--threshold 0.5] [--set data.max_length=N] [--output DIR]

The second form scores a benchmark's files instead of the spec's sources: ProcessBench
(rmjax.processbench_eval) or PRMBench (rmjax.prmbench_eval) say what they report.

Sources come from the run's own spec (<run_dir>/logs/config.json) unless --spec is given;
`--set data.prm800k.path=/data/prm800k/data --set data.eqasc.use=true` changes keys of that
spec (dotted spec keys; values as JSON or Python literals, as on the launcher), so a finished run can be
evaluated on another file or source without writing a spec file. The rendering keys
`data.max_length`, `data.length_buckets`, `data.max_steps_per_example` and `data.template`
are the run's unless a --set names them (raising data.max_length alone adds it as the largest
bucket). Every source with `use=True` is evaluated on its `eval_split` (REVEAL included). Examples are
rendered with the run's render settings (the ones the model was trained with). DIR (default
<run_dir>/eval/step_<N>) receives:
  eval_metrics.json  {"overall": {...}, "sources": {name: {...}}}: MSE, MAE, R2, ECE, Brier,
                     AUROC, MAE by target band, first-error accuracy (with / without an error)
                     and F1, AUROC of the minimum step score for "fully correct"
  predictions.jsonl  per example: source, id, targets (null = unsupervised), predictions
  reliability.png    reliability diagram per source and pooled
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from rmjax import cli
from rmjax.benchmarks import NAMES as BENCHMARKS
from rmjax.data.example import describe_skips
from rmjax.inference import with_max_length
from rmjax.metrics import EvalAccumulator
from rmjax.tool_files import output_files


def load_eval_spec(run_dir: pathlib.Path, spec_file: str | None, overrides: Sequence[str] = ()) -> Any:
  """The spec to take sources from: --spec FILE, else the run's logs/config.json, with the
  --set KEY=VALUE overrides applied."""
  from ml_collections import ConfigDict
  from rmjax.spec import apply_overrides, load_spec_file
  if spec_file:
    spec = load_spec_file(spec_file)
  else:
    path = run_dir / "logs" / "config.json"
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found; pass --spec FILE to say which sources to evaluate")
    spec = ConfigDict(cli.read_json_object(path))
  spec = apply_overrides(spec, overrides)
  _check_eval_numbers(spec, overrides)
  if overrides:
    with spec_values(spec_file or run_dir / "logs" / "config.json"):
      _validate_overridden(spec, overrides)
  return spec


# Keys evaluate reads that --set may change: (key, least value); a wrong one is named here, not by
# the grain option or loop it would reach.
_EVAL_NUMBERS = (("max_eval_batches", 0), ("data.eval_batch_size", 1), ("data.num_workers", 0),
                 ("data.prefetch", 0), ("data.max_length", 2), ("data.max_steps_per_example", 1))


# Spec keys that describe the model, which evaluate takes from the checkpoint (rmjax_model.json),
# never from the spec: a --set of one would be silently ignored.
_MODEL_KEYS = ("model", "head", "lora", "mode")


def _check_eval_numbers(spec: Any, overrides: Sequence[str]) -> None:
  from rmjax.spec import SpecError, get_dotted
  named = {item.partition("=")[0] for item in overrides}
  fixed = sorted(k for k in named if k.split(".")[0] in _MODEL_KEYS)
  if fixed:
    raise SpecError(f"--set {fixed[0]}: the model, its head, LoRA settings and mode come from the checkpoint, "
                    f"not the spec; evaluate cannot change them (--set changes data and evaluation keys)")
  synthetic = sorted(k for k in named if k.startswith("data.synthetic."))
  if synthetic:  # build.ensure_synthetic_prm800k writes them once and then reads what is there
    raise SpecError(f"--set {synthetic[0]}: the synthetic records were written once, with the run "
                    f"(<run_dir>/data/), and evaluate reads them as they are; train a run with other settings")
  for key, least in _EVAL_NUMBERS:
    if key in named and not get_dotted(spec, key) >= least:
      raise SpecError(f"--set {key}: must be >= {least}, got {get_dotted(spec, key)}")


def _validate_overridden(spec: Any, overrides: Sequence[str]) -> None:
  """The launcher's validation (rmjax.spec.validate) of a spec --set changed, every problem in one
  line: a bad render key is refused here, not by RenderConfig's assertions. The keys evaluation
  does not use are set to values that pass (mesh: evaluate uses every local device; source
  weights: a source may be evaluated only), and a raised max_length alone gets the largest bucket
  that eval_render_config gives it."""
  from rmjax.spec import SpecError, validate
  from rmjax.spec_sources import eval_sources
  named = {item.partition("=")[0] for item in overrides}
  copy = spec.copy_and_resolve_references()
  copy.mesh.update(data=-1, fsdp=1, tensor=1)
  copy.data.allow_reveal_training = True
  if not eval_sources(copy):  # validate would say "no training source", which is not evaluate's need
    raise SpecError("--set: the spec enables no data source to evaluate (set data.<source>.use=True)")
  for name in eval_sources(copy):
    if copy.data[name].weight == 0:
      copy.data[name].weight = 1.0
  if "data.max_length" in named and "data.length_buckets" not in named:
    top = copy.data.max_length
    copy.data.length_buckets = (*[b for b in copy.data.length_buckets if b < top], top)
  try:
    validate(copy, num_devices=1, check_paths=False)
  except SpecError as e:
    head, *problems = str(e).splitlines()
    raise SpecError(" ".join([f"--set: {head}", "; ".join(p.strip(" -") for p in problems)]).strip()) from None


@contextlib.contextmanager
def spec_values(origin: str | pathlib.Path) -> Iterator[None]:
  """A missing key or a value of the wrong type met while reading the spec (a hand-edited or
  damaged config.json) becomes one ValueError naming the spec."""
  try:
    yield
  except KeyError as e:
    raise ValueError(f"{origin}: spec key {e} is missing") from None
  except (AttributeError, TypeError) as e:
    raise ValueError(f"{origin}: malformed spec: {type(e).__name__}: {cli.first_line(e)}") from None


def build_eval_sources(spec: Any, run_dir: pathlib.Path, skips: Any) -> dict[str, Any]:
  """{name: reader} for every enabled source on its eval split."""
  from rmjax.data.sources import build_source
  from rmjax.spec_sources import eval_sources
  from rmjax.train.build import source_config
  names = eval_sources(spec)
  if not names:
    raise ValueError("the spec enables no data source (data.<source>.use)")
  return {n: build_source(n, source_config(spec, n, run_dir), split=str(spec.data[n].eval_split), skips=skips)
          for n in names}


RENDER_KEYS = ("template", "max_length", "max_steps_per_example", "length_buckets")


def eval_render_config(run_cfg: Any, data_spec: Any, overrides: Sequence[str]) -> Any:
  """The run's render settings, except the `data.<key>` of RENDER_KEYS that --set names, which
  come from the spec. A raised max_length with no length_buckets given becomes the largest
  bucket, so `--set data.max_length=1024` alone evaluates the long examples instead of failing."""
  import dataclasses
  named = {item.partition("=")[0] for item in overrides}
  changes = {k: data_spec[k] for k in RENDER_KEYS if f"data.{k}" in named}
  if "length_buckets" in changes:
    changes["length_buckets"] = tuple(int(b) for b in changes["length_buckets"])
  if "max_length" in changes:
    changes["max_length"] = int(changes["max_length"])
    if "length_buckets" not in changes:
      changes["length_buckets"] = with_max_length(run_cfg, changes["max_length"]).length_buckets
  if "max_steps_per_example" in changes:
    changes["max_steps_per_example"] = int(changes["max_steps_per_example"])
    changes["max_markers"] = 0  # eval rows are unpacked: one slot per kept step
  return dataclasses.replace(run_cfg, **changes)


def row_predictions(source: str, batch: dict[str, np.ndarray], probs_BM: np.ndarray) -> Iterator[dict]:
  """predictions.jsonl records of one eval batch (padding rows skipped)."""
  for b, ex_id in enumerate(batch["example_ids"]):
    if not ex_id:
      continue
    markers = batch["marker_positions"][b]
    k = 1 + int(np.count_nonzero(markers[1:] > 0))  # slot 0 is always used; later ones are > 0
    mask = batch["target_mask"][b, :k] > 0
    yield {"source": source, "id": str(ex_id),
           "targets": [float(t) if m else None for t, m in zip(batch["targets"][b, :k], mask)],
           "predictions": [float(p) for p in probs_BM[b, :k]]}


def split_metrics(flat: dict[str, Any], sources: list[str]) -> dict[str, Any]:
  """{"overall": pooled metrics, "sources": {name: metrics}} from EvalAccumulator.result()."""
  out: dict[str, Any] = {"overall": {}, "sources": {n: {} for n in sources}}
  for key, value in flat.items():
    src, sep, name = key.partition("/")
    if sep:
      out["sources"].setdefault(src, {})[name] = value
    else:
      out["overall"][key] = value
  return out


def evaluate(checkpoint: str | pathlib.Path, spec_file: str | None = None, output: str | None = None,
             max_eval_batches: int | None = None,
             overrides: Sequence[str] = ()) -> tuple[pathlib.Path, dict[str, Any]]:
  from rmjax.data.example import SkipCounter
  from rmjax.data.pipeline import PipelineConfig, eval_datasets
  from rmjax.inference import RunScorer
  from rmjax.plots import reliability_diagram
  from rmjax.run_artifacts import load_run_model
  rm = load_run_model(checkpoint)
  spec = load_eval_spec(rm.run_dir, spec_file, overrides)
  skips = SkipCounter()
  with spec_values(spec_file or rm.run_dir / "logs" / "config.json"):
    sources = build_eval_sources(spec, rm.run_dir, skips)
    limit = int(spec.get("max_eval_batches", 0)) if max_eval_batches is None else max_eval_batches
    pcfg = PipelineConfig(eval_batch_size=int(spec.data.eval_batch_size), num_threads=int(spec.data.num_workers),
                          max_eval_batches=limit)
    render_cfg = eval_render_config(rm.render_cfg, spec.data, overrides)
  datasets = eval_datasets(sources, render_cfg, rm.tokenizer, pcfg, skips=skips)
  scorer = RunScorer(rm, render_cfg)
  out_dir = pathlib.Path(output) if output else rm.run_dir / "eval" / f"step_{rm.step}"
  acc = EvalAccumulator()
  # The three files are written beside the last evaluation's and put in their place together only
  # once all of them are written (rmjax.tool_files): an evaluation that fails, a full disk
  # included, leaves the folder as it found it, never new predictions beside old or cut metrics.
  with output_files() as files:
    pred_file = files.open(out_dir / "predictions.jsonl")
    for name, ds in datasets.items():
      for batch in ds:
        probs = scorer.probs(batch)
        acc.add_batch(name, probs, batch)
        for rec in row_predictions(name, batch, probs):
          pred_file.write(json.dumps(rec) + "\n")
    if not any(len(preds) for preds, _ in acc.per_source().values()):
      skipped = f"; skipped records: {describe_skips(skips.as_dict())}" if skips.total() else ""
      raise ValueError(f"no supervised step was evaluated (empty sources, or every record skipped{skipped})")
    report = split_metrics(acc.result(), list(sources))
    report |= {"checkpoint": str(rm.checkpoint_dir), "step": rm.step, "max_eval_batches": limit,
               "skipped_records": skips.as_dict()}
    files.write_text(out_dir / "eval_metrics.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    files.write(out_dir / "reliability.png", lambda path: reliability_diagram(acc.per_source(), path))
  return out_dir, report


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fmt(v: Any) -> str:
  return "n/a" if v is None else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m rmjax.evaluate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="run dir (best checkpoint) or checkpoint_step_<N> dir")
  parser.add_argument("--spec", default=None, help="spec file[:arg] naming the sources (default: the run's)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="change a key of that spec, e.g. data.prm800k.path=/data/prm800k/data (repeatable)")
  parser.add_argument("--output", default=None, help="output dir (default <run_dir>/eval/step_<N>)")
  parser.add_argument("--max-eval-batches", type=int, default=None, help="batches per source; 0 = all "
                      "(default: the spec's max_eval_batches)")
  parser.add_argument("--benchmark", choices=BENCHMARKS, default=None,
                      help="score a benchmark's files (--path) instead of the spec's sources")
  parser.add_argument("--path", default=None, help="the benchmark's directory (with --benchmark)")
  parser.add_argument("--threshold", type=float, default=0.5,
                      help="with --benchmark: a step scored below it is a predicted error (default 0.5)")
  args = parser.parse_args(argv)
  if args.max_eval_batches is not None and args.max_eval_batches < 0:
    parser.error("--max-eval-batches must be >= 0")
  if (args.benchmark is None) != (args.path is None):
    parser.error("--benchmark and --path go together")
  if args.benchmark:
    return cli.run("evaluate", lambda: _benchmark_command(args))
  return cli.run("evaluate", lambda: _evaluate_command(args))


def _benchmark_command(args: argparse.Namespace) -> int:
  from rmjax import benchmarks
  if args.spec or args.max_eval_batches is not None:
    raise ValueError("--spec and --max-eval-batches do not apply to --benchmark")
  out_dir, result, table = benchmarks.run(args.benchmark, args.checkpoint, args.path, args.output,
                                          args.threshold, args.set)
  print(table)
  if result["skipped_records"]:
    print(f"skipped records: {describe_skips(result['skipped_records'])}")
  print(f"wrote {out_dir}/{args.benchmark}.json, predictions.jsonl")
  return 0


def _evaluate_command(args: argparse.Namespace) -> int:
  out_dir, report = evaluate(args.checkpoint, args.spec, args.output, args.max_eval_batches, args.set)
  for name, m in [("overall", report["overall"])] + sorted(report["sources"].items()):
    print(f"{name:>10}: steps {m.get('count')}  mse {_fmt(m.get('mse'))}  auroc {_fmt(m.get('auroc'))}  "
          f"ece {_fmt(m.get('ece'))}  first-error F1 {_fmt(m.get('first_error_f1'))}")
  if report["skipped_records"]:
    print(f"skipped records: {describe_skips(report['skipped_records'])}")
  print(f"wrote {out_dir}/eval_metrics.json, predictions.jsonl, reliability.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
