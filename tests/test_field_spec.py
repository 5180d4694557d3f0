"""A dataset is a spec entry: reader blocks in data.<name>, their validation, and the example
spec specs/field_mix.py training end to end on Math-Shepherd (parquet) mixed with PRM800K."""

import json
import pathlib

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rmjax import spec as spec_lib
from rmjax.data.example import SkipCounter

SPECS = pathlib.Path(__file__).resolve().parents[1] / "specs"
COMMON = spec_lib.load_sibling(str(SPECS / "demo.py"))


def field_spec(**blocks):
  spec = spec_lib.load_spec_file(str(SPECS / "demo.py"))
  for name, block in blocks.items():
    spec.data[name] = block
  return spec


def _problems(spec) -> list[str]:
  with pytest.raises(spec_lib.SpecError) as e:
    spec_lib.validate(spec, 1)
  lines = str(e.value).splitlines()
  return lines[1:] if len(lines) > 1 else [lines[0]]


def test_two_datasets_of_one_format_train_and_evaluate_beside_the_built_in_ones(shared_data):
  pb = shared_data / "processbench"
  spec = field_spec(
      pb_gsm8k=COMMON.source_block("processbench", str(pb / "processbench_gsm8k.subset.jsonl"), weight=0.3),
      pb_math=COMMON.source_block("processbench", str(pb / "processbench_math.subset.jsonl"), weight=0.2),
      pb_omni=COMMON.source_block("processbench", str(pb / "processbench_omnimath.subset.jsonl"), weight=0.0,
                                  test_only=True))
  assert spec_lib.validate(spec, 1) == []
  assert spec_lib.source_names(spec) == ["prm800k", "eqasc", "reveal", "pb_gsm8k", "pb_math", "pb_omni"]
  assert spec_lib.training_sources(spec) == {"prm800k": 1.0, "pb_gsm8k": 0.3, "pb_math": 0.2}
  assert spec_lib.eval_sources(spec) == ["prm800k", "pb_gsm8k", "pb_math", "pb_omni"]
  assert spec_lib.test_only_sources(spec) == {"pb_omni"}
  assert json.loads(json.dumps(spec_lib.spec_to_dict(spec)))["data"]["pb_math"]["reader"] == "processbench"
  spec_lib.check_overrides(spec, ["--spec.data.pb_math.weight=0.5"])  # overridable like any key


def test_the_build_step_hands_reader_blocks_to_training_and_evaluation(shared_data, tmp_path):
  from rmjax.train import build
  path = shared_data / "trl_stepwise" / "math_shepherd_to_trl.derived.jsonl"
  spec = field_spec(ms=COMMON.source_block("stepwise", str(path), weight=0.5))
  spec.data.synthetic.train_records, spec.data.synthetic.test_records = 32, 8
  skips, shard = SkipCounter(), SkipCounter()
  train, evals = build.build_sources(spec, tmp_path, skips, shard)
  assert sorted(train) == ["ms", "prm800k"] and train["ms"][1] == 0.5 and sorted(evals) == ["ms", "prm800k"]
  assert [e.source for e in train["ms"][0]] == ["ms"] * 5 and evals["ms"][4].targets == (0.0, 0.0, 0.0)


def test_bad_reader_blocks_are_one_line_each(tmp_path):
  (tmp_path / "x.jsonl").write_text("")
  ok = str(tmp_path / "x.jsonl")
  spec = field_spec(
      nameless=ml_collections.ConfigDict({"path": ok}),
      unknown=COMMON.source_block("csv", ok),
      typo=COMMON.source_block("stepwise", ok, step_tag=" ки"),
      negative=COMMON.source_block("rmjax", ok, weight=-1.0),
      tagless=COMMON.source_block("math_shepherd", ok, step_tag="  "),
      missing=COMMON.source_block("processbench", str(tmp_path / "nope.json")),
      uncached=COMMON.source_block("processbench", "hf://datasets/nobody/nothing-here"),
      stringy=ml_collections.ConfigDict(dict(COMMON.source_block("rmjax", ok).to_dict(), weight="much")))
  problems = _problems(spec)
  expected = [
      "data.nameless names no reader: a source block needs reader, one of",
      "data.unknown has reader='csv': a source block needs reader, one of",
      "data.typo: unknown key(s) step_tag for reader stepwise; known:",
      "data.stringy.weight must be a finite number >= 0, got 'much'",
      "data.negative.weight must be >= 0, got -1.0",
      "data.tagless: math_shepherd step_tag must hold more than whitespace",
      "data.missing.path not found:",
      "data.uncached.path: dataset nobody/nothing-here is not in the local Hugging Face cache",
  ]
  for start in expected:
    assert any(p.strip(" -").startswith(start) for p in problems), (start, problems)
  assert len(problems) == len(expected)
  del spec.data["typo"]  # ConfigDict deletion: the rest stays
  assert "data.typo" not in "\n".join(_problems(spec))


def test_the_built_in_blocks_are_unchanged_and_missing_keys_are_named(tmp_path):
  spec = spec_lib.load_spec_file(str(SPECS / "demo.py"))
  assert spec_lib.source_names(spec) == ["prm800k", "eqasc", "reveal"]
  assert spec_lib.validate(spec, 1) == []
  block = COMMON.source_block("rmjax", str(tmp_path))
  del block["eval_split"]
  spec.data.mine = block
  assert any("data.mine: missing key(s) eval_split" in p for p in _problems(spec))


@pytest.mark.slow
def test_field_mix_spec_trains_end_to_end_on_parquet(shared_data, tmp_path):
  """specs/field_mix.py with Math-Shepherd (TRL format) as parquet split files beside synthetic
  PRM800K: both are trained on and evaluated, with the loop's own logs."""
  from rmjax.train import loop
  rows = [json.loads(l) for l in open(shared_data / "trl_stepwise" / "math_shepherd_to_trl.derived.jsonl")]
  data = tmp_path / "math_shepherd" / "data"
  data.mkdir(parents=True)
  pq.write_table(pa.Table.from_pylist(rows[:4]), data / "train-00000-of-00001.parquet")
  pq.write_table(pa.Table.from_pylist(rows[4:]), data / "test-00000-of-00001.parquet")
  spec = spec_lib.load_spec_file(str(SPECS / "field_mix.py"))
  tiny = {"output_dir": str(tmp_path / "runs"), "max_steps": 4, "warmup_steps": 1, "logging_steps": 1,
          "eval_steps": 4, "save_steps": 4, "batch_size": 16, "grad_accum_steps": 2, "max_eval_batches": 2,
          "data.eval_batch_size": 8, "data.num_workers": 0, "data.max_length": 256,
          "data.length_buckets": (128, 256), "data.synthetic.train_records": 64,
          "data.synthetic.test_records": 16, "data.math_shepherd.path": str(tmp_path / "math_shepherd")}
  spec_lib.apply_overrides(spec, [f"{k}={json.dumps(v)}" for k, v in tiny.items()])
  assert spec_lib.validate(spec, 8) == []
  results = loop.train_and_evaluate(spec)
  assert results["total_steps"] == 4
  final = results["final_metrics"]
  for key in ("val/prm800k/loss", "val/math_shepherd/loss", "val/math_shepherd/auroc"):
    assert key in final, (key, sorted(final))
  log = (tmp_path / "runs" / "field-mix-full" / "logs" / "train.log").read_text()
  assert "math_shepherd: 4 train records (weight 0.5)" in log and "math_shepherd (1)" in log
