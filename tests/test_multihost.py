"""Multi-host training on one machine: 2 JAX processes (jax.distributed, local coordinator, one
CPU device each; launch/local.sh starts them for the equality test) against one process with 2
devices, every eval row scored once, and the multi-process checkpoint restored in a single
process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import _run_helpers as R
from _xla_env import subprocess_flags
from test_loop import _env, _launch_cmd, checkpoint_steps, tiny_spec

STEPS = 4
# Default demo buckets (64, 128): processes may pad to different lengths on the same step.
EXTRA = ("--spec.eval_steps=0", f"--spec.save_steps={STEPS}", "--spec.batch_size=16",
         "--spec.grad_accum_steps=2", "--spec.data.eval_batch_size=16")


def _start_two_processes(out, extra=EXTRA):
  """Two processes, the coordinator given as spec keys (launch/local.sh gives it in JAX_* variables)."""
  port = R.free_port()
  cmd = _launch_cmd(out, STEPS, *extra)
  env = dict(_env(), XLA_FLAGS=subprocess_flags(1))
  return [subprocess.Popen(cmd + [f"--spec.distributed.coordinator_address=localhost:{port}",
                                  "--spec.distributed.num_processes=2", f"--spec.distributed.process_id={i}"],
                           cwd=R.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def _eval_targets(out, records: int) -> int:
  """Supervised steps in the first `records` test examples of the demo data, straight from the reader."""
  from rmjax.data.render import Renderer
  from rmjax.data.sources import build_source
  from rmjax.tokenizer import build_demo_tokenizer
  from rmjax.train import build
  spec = tiny_spec(out)
  reader = build_source("prm800k", build.source_config(spec, "prm800k", out / "demo-full"), split="test")
  renderer = Renderer(build_demo_tokenizer(), build.render_config(spec))
  return sum(int(t.target_mask.sum()) for t in (renderer(reader[i]) for i in range(records)) if t is not None)


@pytest.mark.slow
def test_a_tensor_axis_across_processes_is_refused_in_one_line(tmp_path):
  # Each process reads rows of its own; with tensor=2 over 2 one-device processes both would hold
  # every row of the batch. Before the check this trained on mismatched rows and then crashed.
  procs = _start_two_processes(tmp_path, extra=(*EXTRA, "--spec.mesh.data=1", "--spec.mesh.tensor=2"))
  try:
    errs = [p.communicate(timeout=240)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [2, 2], errs
  for err in errs:
    assert "Traceback" not in err, err[-2000:]
    assert "does not give each of the 2 processes batch rows of its own" in err.strip().splitlines()[-1], err[-2000:]
  assert not (tmp_path / "demo-full" / "checkpoints").exists() or not any((tmp_path / "demo-full" / "checkpoints").iterdir())


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices_and_restore_in_one(tmp_path):
  env = dict(_env(), XLA_FLAGS=subprocess_flags(1), PYTHON=sys.executable)
  cmd = ["bash", str(R.ROOT / "launch" / "local.sh"), "2"] + _launch_cmd(tmp_path / "multi", STEPS, *EXTRA)[3:]
  proc = subprocess.run(cmd, cwd=R.ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  multi = tmp_path / "multi" / "demo-full"
  assert "2 process(es)" in (multi / "logs" / "train.log").read_text()
  # The reference: one process, 2 devices, fed the same global batches (process 0's rows then
  # process 1's: each process reads only its own shard, so the data order depends on the
  # process count by design; the numerics of the distributed step must not).
  ref = subprocess.run([sys.executable, str(R.ROOT / "tests" / "_run_helpers.py"), "merged",
                        str(tmp_path / "single"), str(STEPS), "warmup_steps=2", "logging_steps=1",
                        "eval_steps=0", f"save_steps={STEPS}", "batch_size=16", "grad_accum_steps=2",
                        "max_eval_batches=2", "data.eval_batch_size=16"],
                       cwd=R.ROOT, env=_env(), capture_output=True, text=True, timeout=240)
  assert ref.returncode == 0, ref.stderr[-3000:]
  single = tmp_path / "single" / "demo-full"

  got, want = R.train_losses(multi), R.train_losses(single)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=0, atol=1e-5)
  assert len(set(got.values())) == STEPS  # the loss moves: real steps were taken
  # The final evaluation: each process scores its own eval rows (process p reads records p, p+2,
  # ...) and the rows are gathered, so both runs score the same 32 records with the same weights;
  # every metric agrees only if each process's probabilities stay with its own targets.
  final = {run: json.loads((run / "logs" / "final_results.json").read_text())["final_metrics"] for run in (multi, single)}
  assert final[multi].keys() == final[single].keys() and "val/auroc" in final[multi]
  # 2 eval batches of 16 global rows: process 0 reads rows 0, 2, .., process 1 rows 1, 3, ..:
  # together the first 32 test examples, each scored once.
  assert final[multi]["val/count"] == _eval_targets(tmp_path / "multi", 32)
  for key, value in final[single].items():
    np.testing.assert_allclose(final[multi][key], value, rtol=1e-5, atol=1e-5, err_msg=key)
  # The two shards picked different buckets on some step, so agreeing on T is exercised.
  lengths = [json.loads(x) for x in (tmp_path / "single" / "shard_lengths.jsonl").read_text().splitlines()]
  assert len(lengths) >= STEPS and any(len(set(t)) > 1 for t in lengths[:STEPS]), lengths

  # The checkpoint the 2 processes wrote collectively restores here, in ONE process (8 devices),
  # and holds the same weights as the single-process run's.
  assert checkpoint_steps(multi) == [STEPS]
  a = R.flat(R.checkpoint_params(multi / "checkpoints" / f"checkpoint_step_{STEPS}"))
  b = R.flat(R.checkpoint_params(single / "checkpoints" / f"checkpoint_step_{STEPS}"))
  assert a.keys() == b.keys() and len(a) > 5
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)


def test_launch_local_sh_exits_with_the_failed_process_status_and_stops_the_others(tmp_path):
  # A stand-in for python: process 1 fails at once, process 0 blocks (as in a collective waiting
  # for process 1). local.sh must stop process 0 and exit with process 1's status.
  fake = tmp_path / "fake_python"
  # Process 0 ignores SIGTERM, as a process blocked in a collective does: SIGKILL must follow.
  fake.write_text('#!/usr/bin/env bash\nif [[ "$JAX_PROCESS_ID" == 1 ]]; then exit 3; fi\n'
                  'trap "" TERM\nexec sleep 120\n')
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake), PORT="1", RMJAX_LOG_DIR=str(tmp_path / "logs"), RMJAX_KILL_AFTER="1")
  proc = subprocess.run(["bash", str(R.ROOT / "launch" / "local.sh"), "2", "--spec", "specs/demo.py"],
                        cwd=R.ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr
  # a process count that is no positive number: one error line (it printed the script's comments)
  proc = subprocess.run(["bash", str(R.ROOT / "launch" / "local.sh"), "0", "--spec", "specs/demo.py"],
                        cwd=R.ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and proc.stderr.startswith("local.sh: error: the first argument is the number of "
                                                        "processes") and proc.stderr.count("\n") == 1, proc.stderr


def test_k8s_job_and_runtime_agree_on_process_layout():
  import yaml
  from rmjax import cli, runtime
  service, job = yaml.safe_load_all((R.ROOT / "launch" / "k8s-indexed-job.yaml").read_text())
  spec = job["spec"]
  assert (service["kind"], job["kind"], spec["completionMode"]) == ("Service", "Job", "Indexed")
  assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
  pod = spec["template"]["spec"]
  container = pod["containers"][0]
  env = {e["name"]: e["value"] for e in container["env"]}
  n = spec["completions"]
  assert spec["parallelism"] == n == int(env["JAX_NUM_PROCESSES"])
  host, port = env["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)
  assert pod["subdomain"] == service["metadata"]["name"]
  assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
  assert int(port) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
  assert 'JAX_PROCESS_ID="$JOB_COMPLETION_INDEX"' in container["args"][0]
  # A SIGTERM stop (checkpoint saved) exits with the code the failure policy ignores, so the Job
  # is neither Complete nor charged a failure for it.
  stop_code = int(container["args"][0].split("--spec.stop_exit_code=")[1].split()[0])
  assert stop_code != 0 and pod["restartPolicy"] == "Never"
  ignored = [r["onExitCodes"] for r in spec["podFailurePolicy"]["rules"]
             if r["action"] == "Ignore" and "onExitCodes" in r]
  assert ignored == [{"containerName": container["name"], "operator": "In", "values": [stop_code]}]
  # An error reported in one line (exit 2, as every rmjax tool) repeats on retry: it fails the Job.
  failed = [r["onExitCodes"] for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
  assert failed == [{"containerName": container["name"], "operator": "In", "values": [cli.EXIT_USER_ERROR]}]
  dist = type("D", (), {"coordinator_address": "", "num_processes": 0, "process_id": -1})()
  pod_env = dict(env, JAX_PROCESS_ID="1")
  assert runtime.distributed_args(dist, pod_env) == {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                                                     "num_processes": n, "process_id": 1}


@pytest.mark.parametrize("env, ids", [({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, "0,1,2,3"),
                                      ({"SLURM_GPUS_ON_NODE": "2"}, "0,1"),
                                      ({"CUDA_VISIBLE_DEVICES": "3", "JAX_LOCAL_DEVICE_IDS": "0"}, "0")])
def test_slurm_script_gives_each_task_every_gpu_it_sees(tmp_path, env, ids):
  # JAX's SLURM detection would restrict each process to the GPU numbered SLURM_LOCALID. srun and
  # python are stand-ins: srun runs its command once, "python" prints what it was given.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
  (bin_dir / "python").write_text('#!/usr/bin/env bash\necho "ids=${JAX_LOCAL_DEVICE_IDS:-unset} args=$*"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS")}
  run_env = dict(base, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="1", SLURM_NTASKS="2",
                 SLURM_JOB_NODELIST="n[1-2]", **env)
  proc = subprocess.run(["bash", str(R.ROOT / "launch" / "slurm.sbatch"), "--spec", "specs/lora.py"],
                        env=run_env, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == f"ids={ids} args=-m rmjax.launch --spec specs/lora.py"
