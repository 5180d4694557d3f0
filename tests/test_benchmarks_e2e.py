"""The demo spec trained for a few steps, then evaluated on the real ProcessBench records
(every split in ../shared/data/processbench) and reranking the real GSM8K candidates."""

import json

import pytest

from rmjax import evaluate, rerank
from rmjax.train import loop
from test_evaluate import check_processbench_output, processbench_dir
from test_loop import tiny_spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  loop.train_and_evaluate(tiny_spec(out, max_steps=2, eval_steps=0, save_steps=0))
  (run_dir,) = [p for p in out.iterdir() if (p / "checkpoints").is_dir()]
  return run_dir


@pytest.mark.slow
def test_demo_run_on_every_real_processbench_split(trained, tmp_path, shared_data, capsys):
  bench = processbench_dir(tmp_path / "pb", shared_data, ["gsm8k", "math", "olympiadbench", "omnimath"])
  out = tmp_path / "out"
  assert evaluate.main(["--checkpoint", str(trained), "--benchmark", "processbench", "--path", str(bench),
                        "--output", str(out), "--set", "data.max_length=2048"]) == 0
  result = json.loads((out / "processbench.json").read_text())
  assert {s: m["count"] for s, m in result["splits"].items()} == {"gsm8k": 53, "math": 57, "olympiadbench": 57,
                                                                   "omnimath": 56}
  preds = check_processbench_output(out, result, 0.5)
  assert result["skipped_records"] == {} and len(preds) == 223
  assert "omnimath" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_run_reranks_the_real_gsm8k_candidates(trained, tmp_path, shared_data):
  from test_rerank import brute_oracle
  path = shared_data / "best_of_n" / "gsm8k_example_model_solutions.subset.jsonl"
  assert rerank.main(["--checkpoint", str(trained), "--input", str(path), "--output", str(tmp_path / "bon"),
                      "--step-separator", "\\n", "--max-length", "1024"]) == 0
  report = json.loads((tmp_path / "bon" / "bon.json").read_text())
  originals = [json.loads(x) for x in path.read_text().splitlines()]
  assert report["problems"] == 40 and report["n"] == [1, 2, 4] and report["unscored_steps"] == 0
  names = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
  for n in (1, 2, 4):
    want = sum(brute_oracle([r[k]["is_correct"] for k in names], n) for r in originals) / 40
    assert abs(report["oracle"][str(n)] - want) <= 1e-9
    assert 0.0 <= report["accuracy"]["min"][str(n)] <= report["oracle"][str(n)]
  assert report["majority_problems"] == 40
