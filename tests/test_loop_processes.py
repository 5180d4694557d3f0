"""The training loop as a process: SIGKILL then relaunch resumes exactly, SIGTERM saves and
exits with stop_exit_code, and two processes train and evaluate every row."""

import json
import signal
import subprocess
import time

import pytest

import _run_helpers as R
from test_loop import ROOT, TIMING_KEYS, _env, _launch_cmd, checkpoint_steps, read_jsonl, tiny_spec


def _run(cmd, timeout=240):
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _metric_rows(run_dir):
  return {(r["step"], k): v for r in read_jsonl(run_dir / "logs" / "metrics.jsonl")
          for k, v in r.items() if k != "timestamp"}


@pytest.mark.slow
def test_sigkill_then_relaunch_logs_exactly_the_uninterrupted_metrics(tmp_path):
  steps, extra = 40, ("--spec.eval_steps=10", "--spec.save_steps=4")
  _run(_launch_cmd(tmp_path / "a", steps, *extra))
  reference = _metric_rows(tmp_path / "a" / "demo-full")

  run_b = tmp_path / "b" / "demo-full"
  proc = subprocess.Popen(_launch_cmd(tmp_path / "b", steps, *extra), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  committed = lambda: (run_b / "checkpoints").is_dir() and any(s >= 8 for s in checkpoint_steps(run_b))
  try:
    assert R.wait_for(committed, proc), "no checkpoint before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(checkpoint_steps(run_b))
  assert killed_at < steps
  _run(_launch_cmd(tmp_path / "b", steps, *extra))
  final = json.loads((run_b / "logs" / "final_results.json").read_text())
  assert final["resumed_from_step"] is not None and final["resumed_from_step"] < steps
  resumed = _metric_rows(run_b)
  assert resumed.keys() == reference.keys()
  after = {k for k in reference if k[0] > final["resumed_from_step"] and k[1] not in TIMING_KEYS}
  assert any(k[1] == "train/loss" for k in after)
  assert {k: resumed[k] for k in after} == {k: reference[k] for k in after}  # exact, not approx


@pytest.mark.slow
@pytest.mark.parametrize("extra, code", [((), 0), (("--spec.stop_exit_code=143",), 143)])
def test_sigterm_saves_a_checkpoint_and_exits_with_stop_exit_code(tmp_path, extra, code):
  run_dir = tmp_path / "demo-full"
  proc = subprocess.Popen(_launch_cmd(tmp_path, 100000, "--spec.eval_steps=0", "--spec.save_steps=0", *extra),
                          cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = run_dir / "logs" / "metrics.jsonl"
  try:
    assert R.wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc), "training never started"
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == code, stderr[-3000:]
  assert time.monotonic() - t0 < 30
  steps = checkpoint_steps(run_dir)
  assert len(steps) == 1 and 0 < steps[0] < 100000
  final = json.loads((run_dir / "logs" / "final_results.json").read_text())
  assert final["interrupted"] is True and final["total_steps"] == steps[0]
  assert "SIGTERM" in (run_dir / "logs" / "train.log").read_text()


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_evaluate_every_row(tmp_path):
  from rmjax.data.render import Renderer
  from rmjax.data.sources import build_source
  from rmjax.tokenizer import build_demo_tokenizer
  from rmjax.train import build

  port = _free_port()
  cmd = _launch_cmd(tmp_path, 4, "--spec.eval_steps=2", "--spec.save_steps=2",
                    "--spec.data.eval_batch_size=16", f"--spec.distributed.coordinator_address=localhost:{port}",
                    "--spec.distributed.num_processes=2")
  env = _env(devices=1)
  procs = [subprocess.Popen(cmd + [f"--spec.distributed.process_id={i}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  R.finish_all(procs)
  run = tmp_path / "demo-full"
  final = json.loads((run / "logs" / "final_results.json").read_text())
  assert final["total_steps"] == 4 and checkpoint_steps(run)[-1] == 4
  # 2 eval batches of 16 global rows: processes read rows 0,2,.. and 1,3,..; together the first
  # 32 test examples, whose supervised steps are counted here straight from the reader.
  spec = tiny_spec(tmp_path)
  reader = build_source("prm800k", build.source_config(spec, "prm800k", run), split="test")
  renderer = Renderer(build_demo_tokenizer(), build.render_config(spec))
  expected = sum(int(t.target_mask.sum()) for t in (renderer(reader[i]) for i in range(32)) if t is not None)
  assert final["final_metrics"]["val/count"] == expected
