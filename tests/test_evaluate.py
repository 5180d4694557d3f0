"""`python -m rmjax.evaluate` on a tiny run with three sources: synthetic PRM800K, the real eQASC
dev chains (shared data) and the SYNTHETIC REVEAL fixture."""

import json
import pathlib

import numpy as np
import pytest

import _tiny_run as R
from rmjax import evaluate
from rmjax.spec import load_spec_file, spec_to_dict
from test_readers_eqasc import real_questions

ROOT = pathlib.Path(__file__).resolve().parents[1]
REVEAL = ROOT / "tests" / "fixtures" / "SYNTHETIC_reveal_eval.csv"
METRICS = ("mse", "mae", "r2", "ece", "brier", "auroc", "mae_low", "mae_medium", "mae_high",
           "first_error_acc_error", "first_error_acc_correct", "first_error_f1", "min_score_auroc")


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
  d = tmp_path_factory.mktemp("evaluate")
  run_dir = d / "run"
  R.make_run(run_dir, R.make_base(d / "base"), mode="lora")
  eqasc = d / "eqasc"
  eqasc.mkdir()
  (eqasc / "eqasc_dev_grc.json").write_text(json.dumps(real_questions(shared_data)))
  spec = load_spec_file(str(ROOT / "specs" / "demo.py"))
  spec.data.eqasc.use, spec.data.eqasc.path = True, str(eqasc)
  spec.data.reveal.use, spec.data.reveal.path = True, str(REVEAL)
  spec.data.eval_batch_size = 8
  (run_dir / "logs").mkdir()
  (run_dir / "logs" / "config.json").write_text(json.dumps(spec_to_dict(spec)))
  return run_dir


def test_three_sources_give_three_blocks_consistent_with_predictions(run, tmp_path, capsys):
  out = tmp_path / "ev"
  assert evaluate.main(["--checkpoint", str(run), "--output", str(out), "--max-eval-batches", "2"]) == 0
  report = json.loads((out / "eval_metrics.json").read_text())
  assert sorted(report["sources"]) == ["eqasc", "prm800k", "reveal"]
  for block in [report["overall"], *report["sources"].values()]:
    assert block["count"] > 0 and set(METRICS) <= set(block)
  preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
  assert {p["source"] for p in preds} == {"eqasc", "prm800k", "reveal"}
  for name, block in report["sources"].items():
    p, y = zip(*[(q, t) for r in preds if r["source"] == name
                 for q, t in zip(r["predictions"], r["targets"]) if t is not None])
    assert block["count"] == len(p)
    assert block["mse"] == pytest.approx(np.mean((np.asarray(p) - np.asarray(y)) ** 2), rel=1e-6)
  assert len([r for r in preds if r["source"] == "prm800k"]) == 16  # 2 batches of 8
  assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "reveal" in capsys.readouterr().out


def test_spec_flag_overrides_the_run_spec_and_default_output(run):
  out_dir, report = evaluate.evaluate(run, spec_file=str(ROOT / "specs" / "demo.py"), max_eval_batches=1)
  assert sorted(report["sources"]) == ["prm800k"]  # the demo spec enables only synthetic PRM800K
  assert out_dir == run / "eval" / "step_7" and (out_dir / "eval_metrics.json").is_file()


def test_missing_run_spec_is_a_one_line_error(tmp_path, run, capsys):
  step_dir = run / "checkpoints" / "checkpoint_step_7"
  (run / "logs" / "config.json").rename(run / "logs" / "config.bak")
  try:
    assert evaluate.main(["--checkpoint", str(step_dir), "--output", str(tmp_path / "x")]) == 2
  finally:
    (run / "logs" / "config.bak").rename(run / "logs" / "config.json")
  err = capsys.readouterr().err
  assert err.startswith("rmjax.evaluate: error:") and "--spec" in err and err.count("\n") == 1


def test_set_overrides_choose_sources_and_render_settings(run):
  _, base = evaluate.evaluate(run, max_eval_batches=1, overrides=["data.eqasc.use=false", "data.reveal.use=false"])
  assert sorted(base["sources"]) == ["prm800k"] and base["skipped_records"] == {}
  # max_length 24 cuts the synthetic problems before their first marker: the override reaches
  # the renderer (the run's own 384 keeps every example)
  with pytest.raises(ValueError, match=r"every record skipped; skipped records: prm800k: first_marker_truncated"):
    evaluate.evaluate(run, max_eval_batches=1, overrides=["data.eqasc.use=false", "data.reveal.use=false",
                                                          "data.max_length=24"])


def test_an_evaluation_of_nothing_is_an_error_that_says_why(run, tmp_path, capsys):
  # max_length 5 skips every record: before, this printed "steps 0" and exited 0. An earlier
  # evaluation's predictions in the same folder survive it (before, they were truncated first).
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "predictions.jsonl").write_text('{"source": "earlier"}\n')
  assert evaluate.main(["--checkpoint", str(run), "--output", str(tmp_path / "x"), "--max-eval-batches", "1",
                        "--set", "data.eqasc.use=false", "--set", "data.reveal.use=false",
                        "--set", "data.max_length=5"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(
    "rmjax.evaluate: error: no supervised step was evaluated (empty sources, or every record skipped; "
    "skipped records: prm800k: first_marker_truncated "), err
  assert err.strip().endswith("(first_marker_truncated -> raise data.max_length))")
  assert not (tmp_path / "x" / "eval_metrics.json").exists()
  assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["predictions.jsonl"]  # no .partial left
  assert (tmp_path / "x" / "predictions.jsonl").read_text() == '{"source": "earlier"}\n'


def test_raising_max_length_alone_adds_it_as_the_largest_bucket():
  from rmjax.data.render import RenderConfig
  from ml_collections import ConfigDict
  run_cfg = RenderConfig(max_length=128, length_buckets=(64, 128))
  data = ConfigDict({"template": "default", "max_length": 1024, "max_steps_per_example": 32,
                     "length_buckets": [64, 128]})
  cfg = evaluate.eval_render_config(run_cfg, data, ["data.max_length=1024"])
  assert (cfg.max_length, cfg.length_buckets) == (1024, (64, 128, 1024))
  assert evaluate.eval_render_config(run_cfg, data, ["data.prm800k.path=/x"]) == run_cfg


@pytest.mark.parametrize("item, words", [("data.prm800k.pat=/x", "did you mean data.prm800k.path"),
                                         ("data.eval_batch_size=many", "holds int values"),
                                         ("max_eval_batches=-1", "--set max_eval_batches: must be >= 0, got -1"),
                                         ("data.num_workers=-1", "--set data.num_workers: must be >= 0, got -1"),
                                         ("data.synthetic.test_records=5", "the synthetic records were written once"),
                                         ("data.template=foo", "--set: invalid spec: data.template='foo'; choose from"),
                                         ("data.length_buckets=(16, 32)", "the largest bucket is below data.max_length"),
                                         ("data", "KEY=VALUE")])
def test_bad_set_is_a_one_line_error(run, tmp_path, capsys, item, words):
  assert evaluate.main(["--checkpoint", str(run), "--output", str(tmp_path / "x"), "--set", item]) == 2
  err = capsys.readouterr().err
  assert err.startswith("rmjax.evaluate: error:") and words in err and err.count("\n") == 1


def test_set_is_validated_as_the_launcher_validates_but_not_for_training(run):
  # the launcher's spec validation, every problem on one line; rmjax.evaluate --benchmark takes
  # the same path (benchmarks.load_scorer)
  with pytest.raises(ValueError) as e:
    evaluate.load_eval_spec(run, None, ["data.template=foo", "data.length_buckets=(16, 32)"])
  assert str(e.value).startswith("--set: invalid spec (2 problems): data.template='foo'") and "\n" not in str(e.value)
  # what only training needs is not asked for: a source evaluated only, another mesh, max_length alone
  for overrides in (["data.prm800k.use=false", "data.eqasc.use=false"], ["data.prm800k.weight=0"],
                    ["mesh.fsdp=64"], ["data.max_length=1024"]):
    evaluate.load_eval_spec(run, None, overrides)


def official_processbench(preds, threshold):
  """QwenLM/ProcessBench's metric, computed here from predictions.jsonl: the predicted index is
  the first step scored below the threshold (-1 if none; unknown if an unscored step comes
  first); accuracy on erroneous and on correct samples; F1 their harmonic mean."""
  def first_error(scores):
    for i, s in enumerate(scores):
      if s is None:
        return "unknown"
      if s < threshold:
        return i
    return -1
  out = {}
  for split in sorted({p["split"] for p in preds}):
    own = [p for p in preds if p["split"] == split]
    err = [first_error(p["step_scores"]) == p["label"] for p in own if p["label"] != -1]
    ok = [first_error(p["step_scores"]) == -1 for p in own if p["label"] == -1]
    a, b = np.mean(err), np.mean(ok)
    out[split] = {"error_acc": a, "correct_acc": b, "f1": 0.0 if a + b == 0 else 2 * a * b / (a + b),
                  "count": len(own)}
  return out, np.mean([m["f1"] for m in out.values()])


def processbench_dir(root, shared_data, splits, per_kind=None):
  """The real ProcessBench records under the hub's file names (links; with `per_kind`, the first
  that many records with an error and without one)."""
  root.mkdir()
  for split in splits:
    src = shared_data / "processbench" / f"processbench_{split}.subset.jsonl"
    if per_kind is None:
      (root / f"{split}.jsonl").symlink_to(src)
      continue
    records = src.read_text().splitlines(keepends=True)
    kinds = [[r for r in records if (json.loads(r)["label"] == -1) == ok][:per_kind] for ok in (True, False)]
    (root / f"{split}.jsonl").write_text("".join(kinds[0] + kinds[1]))
  return root


def check_processbench_output(out, result, threshold):
  preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
  assert json.loads((out / "processbench.json").read_text()) == result
  splits, average = official_processbench(preds, threshold)
  assert result["splits"] == splits and result["average_f1"] == pytest.approx(average, abs=1e-15)
  unscored = [p["id"] for p in preds if None in p["step_scores"]]
  assert result["unscored"] == {"count": len(unscored), "ids": unscored}
  best = result["best_threshold"]  # no threshold (every step score, 0 and 1 tried) does better
  tried = {s for p in preds for s in p["step_scores"] if s is not None} | {0.0, 1.0}
  assert max(official_processbench(preds, t)[1] for t in tried) == pytest.approx(best["average_f1"], abs=1e-12)
  assert official_processbench(preds, best["threshold"])[1] == pytest.approx(best["average_f1"], abs=1e-12)
  assert "tuned on the samples it is reported on" in best["note"]
  return preds


def test_processbench_matches_the_benchmark_definition_from_predictions(run, tmp_path, shared_data, capsys):
  bench = processbench_dir(tmp_path / "pb", shared_data, ["gsm8k", "math"], per_kind=6)
  out = tmp_path / "out"
  assert evaluate.main(["--checkpoint", str(run), "--benchmark", "processbench", "--path", str(bench),
                        "--output", str(out), "--threshold", "0.45", "--set", "data.max_length=1024"]) == 0
  result = json.loads((out / "processbench.json").read_text())
  assert result["threshold"] == 0.45 and sorted(result["splits"]) == ["gsm8k", "math"]
  assert [result["splits"][s]["count"] for s in ("gsm8k", "math")] == [12, 12]
  preds = check_processbench_output(out, result, 0.45)
  assert 0 < result["unscored"]["count"] < len(preds)  # long solutions do not fit 1024 tokens
  printed = capsys.readouterr().out
  assert "average_f1" in printed and "best threshold" in printed and "past max_length 1024" in printed


def test_processbench_bad_input_is_one_line(run, tmp_path, capsys):
  for extra in (["--path", str(tmp_path)], ["--path", str(tmp_path / "none")],
                ["--path", str(tmp_path), "--threshold", "2"]):
    assert evaluate.main(["--checkpoint", str(run), "--benchmark", "processbench", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rmjax.evaluate: error:") and err.count("\n") == 1, err


def test_prmbench_command_writes_what_its_predictions_give(run, tmp_path, shared_data, capsys):
  from test_prmbench_eval import independent_scores
  lines = (shared_data / "prmbench" / "prmbench_classified.subset.jsonl").read_text().splitlines()
  picked = [x for x in lines if json.loads(x)["classification"] in ("redundency", "circular")][:6]
  (tmp_path / "pb").mkdir()
  (tmp_path / "pb" / "part.jsonl").write_text("\n".join(picked) + "\n")
  out = tmp_path / "out"
  assert evaluate.main(["--checkpoint", str(run), "--benchmark", "prmbench", "--path", str(tmp_path / "pb"),
                        "--output", str(out), "--set", "data.max_length=1024"]) == 0
  result = json.loads((out / "prmbench.json").read_text())
  preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
  assert len(preds) == 6 + sum('"redundency"' in x for x in picked)
  assert sorted(result["classes"]) == sorted({p["classification"] for p in preds}) and "correct" in result["classes"]
  for name, m in result["classes"].items():
    assert (m["f1"], m["negative_f1"], m["prm_score"]) == pytest.approx(independent_scores(preds, 0.5, {name}), abs=1e-12)
  assert result["unscored_ids"] == [p["id"] for p in preds if None in p["step_scores"]]
  assert "PRMScore" in capsys.readouterr().out


def test_processbench_metric_at_ties_unscored_steps_and_the_best_threshold():
  from rmjax import processbench_eval as pe
  assert pe.predicted_error([0.9, 0.5, 0.2], 0.5) == 2  # a score AT the threshold is no error
  assert pe.predicted_error([0.9, 0.4, None], 0.5) == 1  # decided before the unscored step
  assert pe.predicted_error([0.9, None, 0.1], 0.5) is None and pe.predicted_error([0.7, 0.8], 0.5) == -1
  rng = np.random.default_rng(0)
  grid = [0.1, 0.3, 0.5, 0.7, 0.9]  # coarse: many ties, thresholds landing on scores
  samples = []
  for i in range(60):
    n = int(rng.integers(1, 6))
    scores = [float(rng.choice(grid)) for _ in range(n)]
    if rng.random() < 0.1:
      scores[int(rng.integers(n))] = None
    samples.append({"id": str(i), "split": ["gsm8k", "math"][i % 2], "label": int(rng.integers(-1, n)),
                    "step_scores": scores})
  for t in (0.3, 0.5, 0.55):
    got = pe.report(samples, t)
    want, average = official_processbench(samples, t)
    assert got["splits"] == want and got["average_f1"] == pytest.approx(average, abs=1e-15)
  best = pe.best_threshold(samples)
  fine = np.linspace(0.0, 1.0, 2001)  # every gap between grid scores holds several of these
  assert max(official_processbench(samples, t)[1] for t in fine) == pytest.approx(best["average_f1"], abs=1e-12)
  assert official_processbench(samples, best["threshold"])[1] == pytest.approx(best["average_f1"], abs=1e-12)


def test_processbench_split_file_that_is_a_directory_is_an_error_not_a_missing_split(tmp_path):
  """`gsm8k.json` a directory beside a real math.json (SYNTHETIC records): scoring math alone,
  as if gsm8k were not there, would report a partial benchmark as the whole; it is refused."""
  from rmjax import processbench_eval
  from rmjax.data.example import SkipCounter
  (tmp_path / "gsm8k.json").mkdir()
  (tmp_path / "math.json").write_text(json.dumps([{"id": "math-0", "problem": "p", "steps": ["s"], "label": -1}]))
  with pytest.raises(ValueError, match=r"'.*/gsm8k.json' is a directory, not a data file"):
    processbench_eval.read_splits(tmp_path, SkipCounter())
  (tmp_path / "gsm8k.json").rmdir()
  assert list(processbench_eval.read_splits(tmp_path, SkipCounter())) == ["math"]


def test_a_failed_write_leaves_the_earlier_evaluation_whole(run, tmp_path, capsys, monkeypatch):
  """A full disk could leave eval_metrics.json 0 bytes (or cut at 4096) beside a complete new
  predictions.jsonl; a benchmark's <name>.json likewise. Now nothing changes, and the error names
  the file."""
  import errno
  import types
  from rmjax import benchmarks, plots, tool_files
  out = tmp_path / "ev"
  out.mkdir()
  for name in ("eval_metrics.json", "predictions.jsonl", "reliability.png"):
    (out / name).write_text(f"old {name}\n")
  before = sorted((p.name, p.read_text()) for p in out.iterdir())

  def full(per_source, path):
    pathlib.Path(path).write_bytes(b"\x89PNG")
    raise OSError(errno.ENOSPC, "No space left on device")
  with monkeypatch.context() as m:
    m.setattr(plots, "reliability_diagram", full)
    assert evaluate.main(["--checkpoint", str(run), "--output", str(out), "--max-eval-batches", "1"]) == 2
  err = capsys.readouterr().err
  assert err.endswith(f"rmjax.evaluate: error: cannot write {out / 'reliability.png'}: No space left on device\n")
  assert sorted((p.name, p.read_text()) for p in out.iterdir()) == before
  # benchmarks.write_results: <name>.json fails after predictions.jsonl was written
  (out / "processbench.json").write_text("old processbench.json\n")
  before = sorted((p.name, p.read_text()) for p in out.iterdir())
  real_open = open

  def fake_open(path, *a, **k):
    if "processbench.json" in str(path):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_open(path, *a, **k)
  monkeypatch.setattr(tool_files, "open", fake_open, raising=False)
  scorer = types.SimpleNamespace(run=types.SimpleNamespace(checkpoint_dir=run, step=1, run_dir=run),
                                 render_cfg=types.SimpleNamespace(max_length=64))
  with pytest.raises(OSError, match=f"cannot write {out / 'processbench.json'}: No space left on device"):
    benchmarks.write_results(scorer, str(out), "processbench", {"f1": 0.5}, [{"id": "new"}])
  assert sorted((p.name, p.read_text()) for p in out.iterdir()) == before


@pytest.mark.parametrize("item", ["model.path=/x", "mode=lora", "head.hidden_dims=(8,)", "lora.rank=4"])
def test_set_of_what_the_checkpoint_fixes_is_refused(run, tmp_path, capsys, item):
  """The model, its head, LoRA and mode come from the checkpoint: a --set of them was ignored."""
  assert evaluate.main(["--checkpoint", str(run), "--output", str(tmp_path / "x"), "--set", item]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"rmjax.evaluate: error: --set {item.partition('=')[0]}: the model, its head, LoRA "
                        "settings and mode come from the checkpoint") and err.count("\n") == 1


def test_set_turning_every_source_off_says_so_not_no_training_source(run, tmp_path, capsys):
  args = ["--checkpoint", str(run), "--output", str(tmp_path / "x")]
  for name in ("prm800k", "eqasc", "reveal"):
    args += ["--set", f"data.{name}.use=False"]
  assert evaluate.main(args) == 2
  err = capsys.readouterr().err
  assert err == "rmjax.evaluate: error: --set: the spec enables no data source to evaluate (set data.<source>.use=True)\n"
