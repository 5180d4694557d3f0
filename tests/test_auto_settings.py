"""model.remat / model.scan_unroll = "auto": the spec keys, the candidate order, the fit logic
(fake compiles with given peaks), and a tiny run that resolves, records, trains and resumes."""

import json
import pathlib
import types

import pytest

from rmjax import spec as spec_lib
from rmjax.model.config import REMAT_POLICIES
from rmjax.train import auto_settings as auto
from rmjax.train import loop
from rmjax.train.auto_settings import Candidate
from rmjax.train.build import model_overrides
from test_loop import read_jsonl, tiny_spec
from test_spec import demo_spec, load_with_config_flags


# ---- spec keys


def test_the_demo_spec_takes_auto_and_explicit_values_from_the_command_line():
  spec = load_with_config_flags("demo.py", ["--spec.model.remat=auto", "--spec.model.scan_unroll=auto"])
  assert spec_lib.validate(spec, 1) == []
  assert spec_lib.performance_settings(spec) == {"remat": "auto", "scan_unroll": "auto"}
  spec = load_with_config_flags("demo.py", ["--spec.model.remat=full", "--spec.model.scan_unroll=0"])
  assert spec_lib.performance_settings(spec) == {"remat": "full", "scan_unroll": 0}
  assert spec_lib.performance_settings(spec_lib.apply_overrides(demo_spec(), ["model.scan_unroll=2"])) == \
      {"remat": "none", "scan_unroll": 2}


@pytest.mark.parametrize("value", ["-1", "x", "1.5", ""])
def test_a_bad_scan_unroll_is_one_line(value):
  with pytest.raises(spec_lib.SpecError, match=r"^invalid spec: model.scan_unroll must be 'auto' or an integer >= 0"):
    spec_lib.validate(demo_spec(model__scan_unroll=value), 1)


def test_auto_never_reaches_the_model_config():
  overrides = model_overrides(demo_spec(model__remat="auto", model__scan_unroll="auto"))
  assert (overrides["remat"], overrides["scan_unroll"]) == (spec_lib.AUTO_FALLBACK["remat"], spec_lib.AUTO_FALLBACK["scan_unroll"])


# ---- candidates and the choice


def test_candidates_follow_the_cost_order_with_the_old_default_last():
  gpu_full = auto.candidates("full", "gpu")
  assert gpu_full[0] == Candidate("dots_and_attention_saveable", 0) and gpu_full[-1] == auto.FALLBACK
  assert auto.candidates("lora", "cuda")[0] == Candidate("none", 0)
  for mode in ("full", "lora"):  # on a GPU, saving the MLP's outputs is the last resort before full remat
    assert auto.candidates(mode, "gpu")[-2:] == [Candidate("mlp_projections_saveable", 1), auto.FALLBACK]
  for mode in ("full", "lora"):
    for platform in ("cpu", "gpu"):
      order = auto.candidates(mode, platform)
      assert auto.FALLBACK in order and len(set(order)) == len(order)
  for mode in ("full", "lora"):  # on a CPU no remat unrolled is the fastest (the module's docstring)
    assert auto.candidates(mode, "cpu")[0] == Candidate("none", 0) and auto.candidates(mode, "cpu")[-1] == auto.FALLBACK
  # an explicit key holds in every candidate; only the auto key varies
  assert {c.remat for c in auto.candidates("full", "gpu", remat="none")} == {"none"}
  assert {c.scan_unroll for c in auto.candidates("lora", "gpu", scan_unroll=3)} == {3}


def fake_compiles(peaks: dict[Candidate, int], compiled: list[Candidate]):
  """compile_fn whose 'executable' reports the given peak (all in the arguments)."""
  def compile_fn(c):
    compiled.append(c)
    size = peaks[c]
    mem = types.SimpleNamespace(argument_size_in_bytes=size, temp_size_in_bytes=0, output_size_in_bytes=0,
                                alias_size_in_bytes=0)
    return types.SimpleNamespace(memory_analysis=lambda: mem)
  return compile_fn


OPTIONS = [Candidate("none", 0), Candidate("dots_saveable", 1), auto.FALLBACK]
PEAKS = dict(zip(OPTIONS, (300 << 20, 200 << 20, 100 << 20)))


def test_the_first_candidate_that_fits_wins_and_compiling_stops_there():
  compiled = []
  choice = auto.choose(OPTIONS, fake_compiles(PEAKS, compiled), limit_bytes=1 << 40)
  assert (choice.candidate, compiled, choice.fitted) == (OPTIONS[0], OPTIONS[:1], True)
  compiled.clear()
  only_last = int((100 << 20) / (1 - auto.MARGIN)) + 1  # fits the last, with the margin
  choice = auto.choose(OPTIONS, fake_compiles(PEAKS, compiled), limit_bytes=only_last)
  assert (choice.candidate, compiled, [t.fits for t in choice.trials]) == (auto.FALLBACK, OPTIONS, [False, False, True])
  assert "\n" not in choice.describe() and "remat=full, scan_unroll=1" in choice.describe()


def test_when_none_fits_the_old_default_is_taken_and_said():
  choice = auto.choose(OPTIONS, fake_compiles(PEAKS, []), limit_bytes=100 << 20)  # margin: 100 MB does not fit
  assert (choice.candidate, choice.fitted) == (auto.FALLBACK, False)
  first = [auto.FALLBACK, *OPTIONS[:2]]  # the old default need not be last (the CPU order)
  choice = auto.choose(first, fake_compiles(PEAKS, []), limit_bytes=100 << 20, fallback=auto.old_default())
  assert (choice.candidate, choice.fitted) == (auto.FALLBACK, False)
  assert "none fits" in choice.describe()


def test_timing_compiles_every_candidate_and_takes_the_fastest_that_fits():
  compiled = []
  step_s = {OPTIONS[0]: 0.1, OPTIONS[1]: 0.3, OPTIONS[2]: 0.2}
  choice = auto.choose(OPTIONS, fake_compiles(PEAKS, compiled), limit_bytes=250 << 20,
                       time_fn=lambda c, _: step_s[c])
  assert compiled == OPTIONS and choice.candidate == auto.FALLBACK  # the fastest (0.1 s) does not fit
  assert [t.step_s for t in choice.trials] == [None, 0.3, 0.2]
  # the record says what the untimed cost order would have taken (the first that fits: slower
  # here than the old default, so this order would not hold on this device) next to the old default
  record = choice.as_record()
  assert (record["chosen"], record["order_pick"], record["old_default"], record["timed"]) == (
    auto.FALLBACK.as_dict(), OPTIONS[1].as_dict(), auto.FALLBACK.as_dict(), True)
  assert [(t["remat"], t["fits"], t.get("step_s")) for t in record["trials"]] == [
    ("none", False, None), ("dots_saveable", True, 0.3), ("full", True, 0.2)]
  assert [t["compiled_peak_mb"] for t in record["trials"]] == [300.0, 200.0, 100.0]


def test_a_resumed_run_reuses_the_recorded_choice(tmp_path):
  spec = demo_spec(model__remat="auto", model__scan_unroll="auto")
  assert auto.explicit_or_recorded(spec, None) is None
  assert auto.explicit_or_recorded(spec, tmp_path) is None  # no config.json yet
  (tmp_path / "logs").mkdir()
  config = auto.in_config(spec_lib.spec_to_dict(spec), {"remat": "dots_saveable", "scan_unroll": 0})
  (tmp_path / "logs" / "config.json").write_text(json.dumps(config))
  assert auto.explicit_or_recorded(spec, tmp_path) == {"remat": "dots_saveable", "scan_unroll": 0}
  spec.model.remat = "full"  # an explicit key wins over the record
  assert auto.explicit_or_recorded(spec, tmp_path) == {"remat": "full", "scan_unroll": 0}


# ---- a run


def test_auto_resolves_records_its_choice_trains_and_a_resume_reuses_it(tmp_path, monkeypatch):
  overrides = dict(save_steps=2, eval_steps=2, **{"model.remat": "auto", "model.scan_unroll": "auto"})
  loop.train_and_evaluate(tiny_spec(tmp_path, max_steps=2, **overrides))
  run_dir = pathlib.Path(tmp_path) / "demo-full"
  model = json.loads((run_dir / "logs" / "config.json").read_text())["model"]
  assert model["remat"] in REMAT_POLICIES and isinstance(model["scan_unroll"], int)
  log = (run_dir / "logs" / "train.log").read_text()
  assert log.count("Auto settings: remat=") == 1
  losses = [r["train/loss"] for r in read_jsonl(run_dir / "logs" / "metrics.jsonl") if "train/loss" in r]
  assert losses and all(0 <= x < 1e3 for x in losses)

  def no_compiling(*args, **kwargs):
    raise AssertionError("a resumed run compiled candidates")
  monkeypatch.setattr(auto, "choose", no_compiling)
  loop.train_and_evaluate(tiny_spec(tmp_path, max_steps=3, **overrides))
  log = (run_dir / "logs" / "train.log").read_text()
  changes = [line for line in log.splitlines() if "differs from this run's config.json" in line]
  assert len(changes) == 1 and "max_steps" in changes[0] and "model." not in changes[0]
  assert "Auto settings: {'remat'" in log
  assert json.loads((run_dir / "logs" / "config.json").read_text())["model"] == model


def test_the_runs_step_is_the_program_auto_compiled_for_its_choice(tmp_path):
  """Under the launcher's compilation cache the run loads auto's compile of its choice rather
  than compiling again: the run's own step, lowered from its real state and a placed batch of
  the largest shape, must be the very program auto lowered from abstract state."""
  import jax
  import numpy as np
  from rmjax.train.step import device_batch
  spec = tiny_spec(tmp_path, **{"model.remat": "auto", "model.scan_unroll": "auto"})
  trainer = loop.Trainer(spec)
  try:
    shapes = auto.run_shapes(spec, trainer.render_cfg)
    chosen = Candidate(**trainer.performance)
    base_cfg = trainer.model_cfg.replace(**auto.FALLBACK.as_dict())  # auto swaps the candidate in itself
    lowered = auto.step_lowerer(base_cfg, trainer.head_cfg, trainer.optim_cfg, trainer.mesh, shapes)(chosen)
    batch = device_batch({k: np.zeros(s.shape, s.dtype) for k, s in shapes.items()}, trainer.mesh)
    run_text = auto.lower_step(trainer.steps, trainer.state, batch).as_text()
    assert run_text == lowered.as_text()
    other = next(c for c in auto.candidates(str(spec.mode), jax.devices()[0].platform) if c != chosen)
    assert run_text != auto.step_lowerer(base_cfg, trainer.head_cfg, trainer.optim_cfg, trainer.mesh,
                                         shapes)(other).as_text()  # the check tells programs apart
  finally:
    trainer.train_iter.close()
    trainer.close()


def test_the_run_steps_with_autos_trace_and_compile_of_the_largest_shape(tmp_path):
  """The run takes auto's Steps for its choice: its first step on the largest shape neither traces
  nor compiles (nor reads the compilation cache), and that trace is not counted as the run's."""
  import jax
  import numpy as np
  from rmjax.train.step import device_batch
  spec = tiny_spec(tmp_path, **{"model.remat": "auto", "model.scan_unroll": "auto"})
  trainer = loop.Trainer(spec)
  events = []
  listener = lambda name, *args, **kwargs: events.append(name)
  try:
    shapes = auto.run_shapes(spec, trainer.render_cfg)
    assert trainer.steps.traces["train"] == 1  # auto's, of the largest shape
    batch = device_batch({k: np.zeros(s.shape, s.dtype) for k, s in shapes.items()}, trainer.mesh)
    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.monitoring.register_event_listener(listener)
    _, metrics = trainer.steps.train_step(trainer.state, batch)
    jax.block_until_ready(metrics)
    assert trainer.steps.traces["train"] == 1
    assert not [e for e in events if "compil" in e], events
    assert trainer.steps.train_traces([shapes["input_ids"].shape]) == 1
    assert trainer.steps.train_traces([(8, 7)]) == 0  # a length never traced
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.monitoring.unregister_event_listener(listener)
    trainer.train_iter.close()
    trainer.close()


def test_bench_auto_prints_the_choice_each_peak_and_the_old_default(capsys):
  """`python -m rmjax.bench.auto` (the tool BUILD.md's compiled-for-H100 rows come from), here for
  this CPU: the cost order's first candidate fits a tiny step and is chosen after one compile;
  the old default is compiled beside it for comparison; each compile is announced on stderr."""
  from rmjax.bench import auto as bench_auto
  spec_file = pathlib.Path(__file__).resolve().parents[1] / "specs" / "demo.py"
  bench_auto.main(["--spec", str(spec_file), "--preset", "tiny", "--no-cost", "--set", "batch_size=4",
                   "--set", "grad_accum_steps=1"])
  out, err = capsys.readouterr()
  record = json.loads(out)
  settings = spec_lib.performance_settings(spec_lib.load_spec_file(str(spec_file)))
  first, old = auto.candidates("full", "cpu", **settings)[0], auto.old_default(**settings)
  assert first != old and record["chosen"] == first.as_dict() and record["fitted"] is True
  assert [{k: t[k] for k in ("remat", "scan_unroll", "fits")} for t in record["tried"]] == [{**first.as_dict(), "fits": True}]
  assert 0 < record["tried"][0]["compiled_peak_mb"] < record["budget_mb"] < record["limit_mb"]
  assert {k: record["old_default"][k] for k in ("remat", "scan_unroll")} == old.as_dict()
  assert record["old_default"]["compiled_peak_mb"] > 0 and "predicted" not in record
  assert (record["rows"], record["seq_len"], record["device"]) == (4, 128, "cpu")
  assert err.splitlines() == [f"rmjax.bench.auto: compiling the 2-layer step, {c.label()}" for c in (first, old)]
