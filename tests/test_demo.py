"""The README's demo command, run as a new user would: it finishes and the model has learned."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from _xla_env import subprocess_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_spec_trains_and_learns(tmp_path):
  env = dict(os.environ, XLA_FLAGS=subprocess_flags(None, optimised=True))  # one CPU device, as for a user
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-m", "rmjax.launch", "--spec", "specs/demo.py",
                         f"--spec.output_dir={tmp_path}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "demo-full"
  final = json.loads((run / "logs" / "final_results.json").read_text())
  assert final["total_steps"] == 600
  assert final["final_metrics"]["val/auroc"] >= 0.85  # chance is 0.5; measured 0.946
  assert final["best_val_loss"] < 0.06  # predicting the mean target scores about 0.125
  assert final["train_step_traces"] == len(final["train_batch_shapes"])
  for name in ("train.log", "metrics.jsonl", "config.json"):
    assert (run / "logs" / name).is_file()
  assert any(p.name.startswith("checkpoint_step_") for p in (run / "checkpoints").iterdir())
