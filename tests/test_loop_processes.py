"""The training loop as a process: SIGTERM saves and exits with stop_exit_code. SIGKILL and
relaunch: tests/test_reliability.py; two processes: tests/test_multihost.py."""

import json
import signal
import subprocess
import time

import pytest

import _run_helpers as R
from test_loop import ONE_BUCKET, ROOT, _env, _launch_cmd, checkpoint_steps


@pytest.mark.slow
@pytest.mark.parametrize("extra, code", [((), 0), (("--spec.stop_exit_code=143",), 143)])
def test_sigterm_saves_a_checkpoint_and_exits_with_stop_exit_code(tmp_path, extra, code):
  run_dir = tmp_path / "demo-full"
  cmd = _launch_cmd(tmp_path, 100000, "--spec.eval_steps=0", "--spec.save_steps=0", ONE_BUCKET, *extra)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
