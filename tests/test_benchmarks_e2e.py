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
                        "--output", str(out), "--set", "data.max_length=4096"]) == 0
  result = json.loads((out / "processbench.json").read_text())
  assert {s: m["count"] for s, m in result["splits"].items()} == {"gsm8k": 53, "math": 57, "olympiadbench": 57,
                                                                   "omnimath": 56}
  preds = check_processbench_output(out, result, 0.5)
  assert result["skipped_records"] == {} and len(preds) == 223
  assert "omnimath" in capsys.readouterr().out
