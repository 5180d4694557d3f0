"""The command line: rmjax.launch errors are one line with no traceback; seed flags map onto specs."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from rmjax import spec as spec_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def launch(*args, module="rmjax.launch", env=None):
  cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def one_line_error(proc):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_unknown_key_suggests_the_closest():
  line = one_line_error(launch("--spec", "specs/demo.py", "--spec.lrr=1"))
  assert "'lrr'" in line and "spec.lr" in line


def test_unknown_nested_key():
  line = one_line_error(launch("--spec=specs/lora.py", "--spec.data.max_lenght=8"))
  assert "spec.data.max_length" in line


def test_wrong_type_is_one_line():
  line = one_line_error(launch("--spec", "specs/demo.py", "--spec.lr=abc"))
  assert "'lr'" in line and "expected float" in line and "abc" in line


def test_missing_spec_flag():
  line = one_line_error(launch())
  assert "--spec FILE is required" in line


def test_missing_spec_file():
  line = one_line_error(launch("--spec", "specs/nope.py"))
  assert line.endswith("spec file not found: specs/nope.py")


def test_old_async_key_points_to_async_save():
  line = one_line_error(launch("--spec", "specs/demo.py", "--spec.checkpoint.async=False"))
  assert "unknown spec key 'checkpoint.async'" in line
  assert "spec.checkpoint.async_save" in line


def test_bad_enum_value_lists_the_choices():
  line = one_line_error(launch("--spec", "specs/demo.py", "--spec.opt_state_dtype=float16"))
  assert "opt_state_dtype" in line and "float16" in line and "bfloat16" in line


def test_malformed_process_count_in_the_environment_is_one_line():
  line = one_line_error(launch("--spec", "specs/demo.py",
                               env={"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two"}))
  assert line == "rmjax.launch: error: environment variable JAX_NUM_PROCESSES='two' must be a non-negative integer"


def test_indivisible_batch_rejected_before_training():
  proc = launch("--spec", "specs/demo.py", "--spec.batch_size=10", "--spec.grad_accum_steps=4")
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert "batch_size (10) is not divisible by grad_accum_steps (4)" in proc.stderr


def test_bad_mesh_rejected():
  # conftest gives 8 fake CPU devices, inherited by the subprocess through XLA_FLAGS.
  proc = launch("--spec", "specs/demo.py", "--spec.mesh.data=3")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "mesh (data=3, fsdp=1, tensor=1) has 3 devices but 8 are available" in proc.stderr


@pytest.mark.parametrize("override,expected", [
  ("--spec.checkpoint.max_to_keep=0", "checkpoint.max_to_keep must be > 0"),
  ("--spec.lora.targets=('qproj',)", "lora.targets must be among q_proj"),
  ("--spec.model.demo.head_dim=7", "model.demo: head_dim=7 must be even"),
  ("--spec.data.synthetic.max_ops=1", "data.synthetic: max_ops must be >= 2"),
  ("--spec.data.template=chat", "data.template='chat' but the tokenizer of model.path demo has no chat template"),
])
def test_settings_refused_by_the_configs_are_one_error_line(tmp_path, override, expected):
  """Values spec validation lets through but the model, data or checkpoint configs refuse: one
  error line naming the key (these were raw tracebacks)."""
  proc = launch("--spec", "specs/demo.py:lora", override, f"--spec.output_dir={tmp_path}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("rmjax.launch: error:")]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]


def test_dry_run_prints_the_resolved_spec():
  proc = launch("--spec", "specs/demo.py:lora", "--spec.lr=0.01", "--spec.data.length_buckets=(32,128)",
                "--dry_run")
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  assert out["spec"]["lr"] == 0.01 and out["spec"]["mode"] == "lora"
  assert out["spec"]["data"]["length_buckets"] == [32, 128]
  assert out["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert out["micro_batch_size"] == 8


# --- seed-compatible launchers ------------------------------------------------------------------

def _load_seed_launcher():
  path = ROOT / "launch" / "train.py"
  module_spec = importlib.util.spec_from_file_location("seed_train_under_test", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def seed():
  return _load_seed_launcher()


def test_seed_flags_map_onto_the_full_spec(seed):
  args = seed.build_parser("full").parse_args([
    "--experiment_name", "exp1", "--max_steps", "123", "--learning_rate", "3e-5", "--batch_size", "2",
    "--logging_steps", "7", "--eval_steps", "50", "--save_steps", "60", "--max_eval_batches", "5"])
  spec, warnings = seed.map_seed("full", args, {}, num_devices=8)
  assert warnings == []
  assert (spec.mode, spec.experiment_name, spec.max_steps, spec.lr) == ("full", "exp1", 123, 3e-5)
  assert (spec.logging_steps, spec.eval_steps, spec.save_steps, spec.max_eval_batches) == (7, 50, 60, 5)
  assert (spec.batch_size, spec.grad_accum_steps) == (2 * 4 * 8, 4)  # per-device x accumulation x devices
  assert spec.data.eval_batch_size == 16  # spec default, already a multiple of 8


def test_seed_defaults_give_the_seed_batch(seed):
  spec, _ = seed.map_seed("full", seed.build_parser("full").parse_args([]), {}, num_devices=1)
  assert (spec.batch_size, spec.grad_accum_steps) == (16, 4)  # the seed's 4 x 4 (specs/full.py runs 16 x 1)
  spec, _ = seed.map_seed("lora", seed.build_parser("lora").parse_args([]), {}, num_devices=1)
  assert (spec.batch_size, spec.grad_accum_steps, spec.lr, spec.lora.rank) == (16, 4, 1e-4, 16)
  spec, _ = seed.map_seed("lora", seed.build_parser("lora").parse_args([]), {}, num_devices=3)
  assert (spec.batch_size, spec.data.eval_batch_size) == (48, 15)


def test_seed_lora_flags_and_json_config(seed):
  config = {
    "model_name_or_path": "some/model", "learning_rate": 5e-5, "gradient_accumulation_steps": 2,
    "per_device_train_batch_size": 3, "warmup_steps": 10, "lr_scheduler_type": "linear",
    "max_seq_length": 1024, "bf16": False, "gradient_checkpointing": False, "lora_alpha": 64,
    "lora_target_modules": ["q_proj", "v_proj"], "prm800k_path": "/p", "eqasc_weight": 0.4,
    "reveal_path": "", "lora_dropout": 0.05, "report_to": "wandb",
  }
  args = seed.build_parser("lora").parse_args(["--lora_r", "8", "--learning_rate", "2e-4"])
  spec, warnings = seed.map_seed("lora", args, config, num_devices=2)
  assert spec.model.path == "some/model"
  assert spec.lr == 2e-4  # the flag beats the JSON config
  assert (spec.lora.rank, spec.lora.alpha, tuple(spec.lora.targets)) == (8, 64.0, ("q_proj", "v_proj"))
  assert (spec.grad_accum_steps, spec.batch_size) == (2, 3 * 2 * 2)
  assert (spec.warmup_steps, spec.schedule, spec.data.max_length) == (10, "linear", 1024)
  assert (spec.model.compute_dtype, spec.model.remat) == ("float32", "none")
  assert (spec.data.prm800k.path, spec.data.eqasc.weight, spec.data.reveal.use) == ("/p", 0.4, False)
  assert warnings == ["ignored seed config keys (no rmjax equivalent): lora_dropout, report_to"]


def test_seed_config_files_and_booleans_that_are_no_json_object_or_bool_are_one_line(seed, tmp_path):
  """A directory or a non-UTF-8 file as --config was a traceback; "bf16": "false" (a string, so
  truthy) trained in bfloat16 without a word."""
  (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
  (tmp_path / "list.json").write_text("[1]")
  for path, says in ((tmp_path, f"config file {tmp_path}: Is a directory"),
                     (tmp_path / "bin.json", f"config file {tmp_path / 'bin.json'} is not valid JSON"),
                     (tmp_path / "list.json", "holds a JSON list, expected an object")):
    with pytest.raises(seed.spec_lib.SpecError, match=re.escape(says)):
      seed.read_config(str(path))
  for key in ("bf16", "gradient_checkpointing"):
    with pytest.raises(seed.spec_lib.SpecError, match=f"seed config key '{key}' must be true or false, got 'false'"):
      seed.map_seed("full", seed.build_parser("full").parse_args([]), {key: "false"}, num_devices=1)


def test_seed_datasets_list(seed):
  config = {"datasets": [{"name": "eqasc", "path": "/e", "weight": 2}, {"name": "gsm8k", "path": "/g"}]}
  spec, warnings = seed.map_seed("full", seed.build_parser("full").parse_args([]), config, num_devices=1)
  assert (spec.data.eqasc.use, spec.data.eqasc.path, spec.data.eqasc.weight) == (True, "/e", 2.0)
  assert (spec.data.prm800k.use, spec.data.reveal.use) == (False, False)
  assert warnings == ["ignored seed config keys (no rmjax equivalent): datasets.gsm8k"]


def test_seed_bad_value_names_the_key(seed):
  with pytest.raises(spec_lib.SpecError, match="spec key lr"):
    seed.map_seed("full", seed.build_parser("full").parse_args([]), {"learning_rate": "fast"}, num_devices=1)


@pytest.mark.parametrize("config, message", [
  ({"per_device_train_batch_size": "4x"}, "seed config key 'per_device_train_batch_size' must be an integer, got '4x'"),
  ({"per_device_eval_batch_size": 2.5}, "seed config key 'per_device_eval_batch_size' must be an integer, got 2.5"),
  ({"datasets": ["prm800k", "eqasc"]}, "seed config key 'datasets' must be a list of objects"),
  ({"datasets": [{"name": "eqasc", "weight": "heavy"}]}, "seed config key 'weight' must be a number, got 'heavy'"),
  ({"dataset_weights": [0.5, 0.5]}, "seed config key 'dataset_weights' must map dataset names to weights"),
  ({"dataset_weights": {"eqasc": None}}, "seed config key 'eqasc' must be a number, got None"),
])
def test_seed_config_of_the_wrong_shape_is_a_spec_error(seed, config, message):
  with pytest.raises(spec_lib.SpecError, match=re.escape(message)):
    seed.map_seed("full", seed.build_parser("full").parse_args([]), config, num_devices=1)


def test_seed_launcher_bad_config_and_process_count_are_one_line(tmp_path):
  config = tmp_path / "seed.json"
  config.write_text(json.dumps({"per_device_train_batch_size": "4x"}))
  proc = launch("launch/train.py", "--config", str(config), module=None)
  assert one_line_error(proc) == ("launch/train.py: error: seed config key 'per_device_train_batch_size' "
                                  "must be an integer, got '4x'")
  proc = launch("launch/train.py", "--dry_run", module=None, env={"JAX_NUM_PROCESSES": "2"})
  assert one_line_error(proc) == ("launch/train.py: error: 2 processes but no coordinator address: set "
                                  "distributed.coordinator_address or JAX_COORDINATOR_ADDRESS (host:port of process 0)")


def test_full_launcher_has_no_lora_flags(seed):
  with pytest.raises(SystemExit):
    seed.build_parser("full").parse_args(["--lora_r", "8"])


def test_seed_lora_launcher_dry_run(tmp_path, shared_data):
  config = tmp_path / "seed.json"
  config.write_text(json.dumps({"prm800k_path": str(shared_data / "prm800k"), "eqasc_path": str(shared_data / "eqasc"),
                                "reveal_path": "", "lora_dropout": 0.1}))
  proc = launch("launch/train_lora.py", "--config", str(config), "--lora_r", "4", "--max_steps", "1000",
                "--dry_run", module=None)
  assert proc.returncode == 0, proc.stderr
  assert "ignored seed config keys (no rmjax equivalent): lora_dropout" in proc.stderr
  spec = json.loads(proc.stdout)["spec"]
  assert (spec["mode"], spec["lora"]["rank"], spec["max_steps"], spec["batch_size"]) == ("lora", 4, 1000, 4 * 4 * 8)


def test_seed_launcher_hints_name_its_config_keys_not_rmjax_flags(tmp_path):
  config = tmp_path / "seed.json"
  config.write_text(json.dumps({"prm800k_path": str(tmp_path / "nowhere")}))
  proc = launch("launch/train.py", "--config", str(config), "--dry_run", module=None)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert f"data.prm800k.path not found: {tmp_path / 'nowhere'} (set \"prm800k_path\": DIR in --config or " \
         f"\"prm800k_path\": \"\" in --config)" in proc.stderr
  assert "--spec." not in proc.stderr


def test_seed_launcher_missing_config_is_one_line():
  proc = launch("launch/train.py", "--config", "nope.json", module=None)
  assert one_line_error(proc) == "launch/train.py: error: config file not found: nope.json"


_LINGERING_CHILD = r"""
import logging, sys, threading, time
from rmjax import runtime
threading.Thread(target=time.sleep, args=(600,), name="waits-for-nothing").start()  # not a daemon
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
logging.getLogger("rmjax").info("reported before leaving")
runtime.exit_process({code!r})
"""


@pytest.mark.parametrize("code,status", [(1, 1), (0, 0), ("error: as a message", 1)])
def test_exit_process_does_not_wait_for_lingering_threads(code, status):
  """How the launchers leave: a non-daemon thread that waits for nothing (as orbax's signal
  threads do after a failed checkpoint write, for 300 s) does not hold the process, the status
  is kept and what was logged is flushed. Without such threads it is a plain SystemExit."""
  proc = subprocess.run([sys.executable, "-c", _LINGERING_CHILD.format(code=code)], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == status and "reported before leaving" in proc.stderr, proc.stderr
  assert isinstance(code, int) or proc.stderr.rstrip().endswith("error: as a message")  # as SystemExit prints it
  from rmjax import runtime
  with pytest.raises(SystemExit) as leaving:
    runtime.exit_process(3)
  assert leaving.value.code == 3


def test_tools_report_a_device_out_of_memory_in_one_line(capsys, monkeypatch):
  """evaluate, score, export and convert share cli.run: a batch too large for the device is one
  line (XLA's RESOURCE_EXHAUSTED line and the memory fraction), another runtime error keeps its
  traceback, and RMJAX_DEBUG=1 keeps it for the out-of-memory error too."""
  import jax
  from rmjax import cli
  monkeypatch.delenv("RMJAX_DEBUG", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.00GiB.\nmore")

  def fails(exc):
    def body():
      raise exc
    return body
  assert cli.run("evaluate", fails(oom)) == cli.EXIT_USER_ERROR
  assert capsys.readouterr().err == (
    "rmjax.evaluate: error: out of device memory: RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
    "2.00GiB. (the cpu backend uses this machine's memory; to need less: a smaller batch; RMJAX_DEBUG=1 shows "
    "the traceback)\n")
  assert cli.out_of_memory_line(oom, "a smaller batch", platform="gpu") == (
    "out of device memory: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.00GiB. (jax may use 0.75 "
    "of each GPU's memory, XLA_PYTHON_CLIENT_MEM_FRACTION; to need less: a smaller batch; RMJAX_DEBUG=1 shows the "
    "traceback)")
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    cli.run("evaluate", fails(jax.errors.JaxRuntimeError("INTERNAL: a bug")))
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):  # not jax's: not ours to explain
    cli.run("evaluate", fails(RuntimeError("RESOURCE_EXHAUSTED elsewhere")))
  monkeypatch.setenv("RMJAX_DEBUG", "1")
  with pytest.raises(jax.errors.JaxRuntimeError):
    cli.run("evaluate", fails(oom))
  with pytest.raises(FileNotFoundError):  # any user error, for a bug report
    cli.run("evaluate", fails(FileNotFoundError("no such file: x")))
  monkeypatch.delenv("RMJAX_DEBUG")
  assert cli.run("evaluate", fails(MemoryError("Unable to allocate 47.7 GiB for an array"))) == cli.EXIT_USER_ERROR
  assert capsys.readouterr().err == ("rmjax.evaluate: error: out of host memory: Unable to allocate 47.7 GiB for an "
                                     "array (to need less: a smaller batch; RMJAX_DEBUG=1 shows the traceback)\n")


@pytest.mark.parametrize("module", ["rmjax.score", "rmjax.export", "rmjax.evaluate", "rmjax.convert", "rmjax.rerank",
                                    "rmjax.data.preview", "rmjax.data.synthetic", "rmjax.bench", "rmjax.bench.loop",
                                    "rmjax.bench.auto", "rmjax.bench.score"])
def test_a_mistyped_command_line_is_one_line_naming_the_tool(capsys, module):
  """argparse prints its usage block before the error; every tool's parser (cli.ArgumentParser)
  prints only the error, named as its other errors are, and exits 2."""
  import importlib
  main = importlib.import_module(module if module != "rmjax.bench" else "rmjax.bench.__main__").main
  with pytest.raises(SystemExit) as leaving:
    main(["--no-such-flag"])
  err = capsys.readouterr().err
  assert leaving.value.code == 2, err
  assert err.startswith(f"{module.removesuffix('.loop')}: error: ") and err.count("\n") == 1, err
  assert "--no-such-flag" in err or "required" in err, err
