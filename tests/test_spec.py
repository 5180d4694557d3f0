"""Spec files and rmjax.spec: loading, the key contract, validation, conversion, runtime set-up."""

import pathlib
import re

import pytest
from absl import flags
from ml_collections import config_flags

from rmjax import runtime
from rmjax import spec as spec_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
SPEC_ARGS = ["full.py", "lora.py", "demo.py", "demo.py:lora"]

# The contract in the spec layout, written out by hand (not derived from the code under test).
LAYOUT_LEAVES = """
experiment_name output_dir seed mode lr max_steps batch_size grad_accum_steps warmup_steps schedule
weight_decay max_grad_norm opt_state_dtype loss logging_steps eval_steps save_steps max_eval_batches init_from nan_policy
stop_exit_code perf_metrics
model.path model.param_dtype model.compute_dtype model.frozen_dtype model.remat model.auto_time model.attention_impl
model.scan_unroll model.attention_query_block model.cpu_dot_library model.segment_attention model.trust_remote_code model.demo.hidden_size model.demo.num_layers model.demo.num_heads
model.demo.num_kv_heads model.demo.head_dim model.demo.intermediate_size model.demo.vocab_size
head.hidden_dims head.activation head.dropout lora.rank lora.alpha lora.targets
data.max_length data.max_steps_per_example data.length_buckets data.template data.neutral_target
data.pack data.pack_lookahead data.max_segments_per_row data.eval_batch_size data.num_workers data.prefetch data.allow_reveal_training
data.synthetic.train_records data.synthetic.test_records data.synthetic.max_ops
data.synthetic.max_operand data.synthetic.max_value data.synthetic.max_offset data.synthetic.error_rate data.synthetic.step_padding
data.prm800k.use data.prm800k.weight data.prm800k.path data.prm800k.phase data.prm800k.train_split
data.prm800k.eval_split data.prm800k.drop_quality_control data.prm800k.drop_screening
data.eqasc.use data.eqasc.weight data.eqasc.path data.eqasc.train_split data.eqasc.eval_split
data.eqasc.label_all_steps data.reveal.use data.reveal.weight data.reveal.path data.reveal.eval_split
data.reveal.label mesh.data mesh.fsdp mesh.tensor checkpoint.max_to_keep checkpoint.keep_best
checkpoint.async_save checkpoint.fallback_to_previous distributed.coordinator_address distributed.num_processes distributed.process_id
""".split()


def load_with_config_flags(arg: str, overrides=()):
  """Loads a spec exactly as `python -m rmjax.launch --spec specs/<arg>` does."""
  argv = ["prog", f"--spec={SPECS / arg}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("spec", None, "spec", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.spec


def demo_spec(**changes):
  spec = spec_lib.load_spec_file(str(SPECS / "demo.py"))
  for key, value in changes.items():
    *parents, leaf = key.split("__")
    node = spec
    for p in parents:
      node = node[p]
    node[leaf] = value
  return spec


def leaves(spec):
  return sorted(k for k, v in spec_lib.dotted_items(spec) if not isinstance(v, spec_lib.ConfigDict))


@pytest.mark.parametrize("arg", SPEC_ARGS)
def test_spec_file_loads_with_config_flags_and_has_the_layout_keys(arg):
  spec = load_with_config_flags(arg)
  assert spec.is_locked
  assert leaves(spec) == sorted(LAYOUT_LEAVES)
  assert spec_lib.load_spec_file(str(SPECS / arg)).to_dict() == spec.to_dict()


def test_spec_defaults_follow_the_seed():
  full = load_with_config_flags("full.py")
  lora = load_with_config_flags("lora.py")
  assert (full.mode, full.lr, lora.mode, lora.lr) == ("full", 2e-5, "lora", 1e-4)
  assert (lora.lora.rank, lora.lora.alpha, tuple(lora.lora.targets)) == (16, 32.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
  # the seed's 16 rows: LoRA as 4 x 4, full fine-tuning in one pass (less memory; specs/full.py)
  assert (full.grad_accum_steps, lora.grad_accum_steps) == (1, 4)
  for s in (full, lora):
    assert (s.warmup_steps, s.schedule, s.max_grad_norm, s.batch_size) == (500, "cosine", 1.0, 16)
    assert (s.eval_steps, s.save_steps, s.data.max_length, s.data.max_steps_per_example) == (100, 500, 2048, 32)
    assert (s.data.prm800k.weight, s.data.eqasc.weight, s.data.reveal.weight) == (0.5, 0.25, 0.25)
    assert s.data.allow_reveal_training is False
    assert s.model.path == "Qwen/Qwen3-4B-Instruct-2507"
  demo = load_with_config_flags("demo.py")
  assert (demo.model.path, demo.data.prm800k.path, demo.data.eqasc.use, demo.data.reveal.use) == ("demo", "", False, False)
  assert demo.model.compute_dtype == "float32"
  assert load_with_config_flags("demo.py:lora").mode == "lora"


def test_every_common_field_has_a_comment():
  lines = (SPECS / "common.py").read_text().splitlines()
  missing = []
  for i, line in enumerate(lines):
    if re.match(r"\s+c(\.\w+)+(\[\"\w+\"\])? = ", line) and "ConfigDict()" not in line:
      if "#" not in line and not lines[i - 1].strip().startswith("#"):
        missing.append(line.strip())
  assert not missing


@pytest.mark.parametrize("arg", SPEC_ARGS)
@pytest.mark.parametrize("devices", [1, 8])
def test_specs_validate(arg, devices, shared_data):
  overrides = []
  if not arg.startswith("demo"):
    overrides = [f"--spec.data.prm800k.path={shared_data / 'prm800k'}",
                 f"--spec.data.eqasc.path={shared_data / 'eqasc'}", "--spec.data.reveal.use=False"]
  spec = load_with_config_flags(arg, overrides)
  if devices == 8 and arg.startswith("lora"):
    with pytest.raises(spec_lib.SpecError, match=r"= 4 is not divisible by the data-parallel size data\*fsdp = 8"):
      spec_lib.validate(spec, devices)  # 16 // 4 = 4 rows cannot split over 8 devices
    return  # (full fine-tuning's 16 rows in one pass split 2 a device)
  assert spec_lib.validate(spec, devices) is not None


def test_real_spec_without_data_lists_every_missing_path():
  spec = spec_lib.load_spec_file(str(SPECS / "lora.py"))
  with pytest.raises(spec_lib.SpecError) as e:
    spec_lib.validate(spec, 1)
  msg = str(e.value)
  assert "3 problems" in msg
  for path in ("data/prm800k/data", "data/eqasc", "data/reveal"):
    assert path in msg


@pytest.mark.parametrize("batch,accum,devices,numbers", [
  (10, 4, 1, ("10", "4")),
  (24, 4, 8, ("6", "8")),
  (16, 2, 32, ("8", "32")),
])
def test_bad_batch_is_rejected_with_both_numbers(batch, accum, devices, numbers):
  spec = demo_spec(batch_size=batch, grad_accum_steps=accum, data__eval_batch_size=devices)
  with pytest.raises(spec_lib.SpecError) as e:
    spec_lib.validate(spec, devices)
  for n in numbers:
    assert re.search(rf"\b{n}\b", str(e.value)), str(e.value)


@pytest.mark.parametrize("mesh,devices,numbers", [
  ((3, 1, 1), 8, ("3", "8")),
  ((-1, 3, 1), 8, ("3", "8")),
  ((-1, -1, 1), 8, ()),
  ((2, 0, 1), 2, ()),
])
def test_bad_mesh_is_rejected(mesh, devices, numbers):
  spec = demo_spec(mesh__data=mesh[0], mesh__fsdp=mesh[1], mesh__tensor=mesh[2])
  with pytest.raises(spec_lib.SpecError, match="mesh") as e:
    spec_lib.validate(spec, devices)
  for n in numbers:
    assert re.search(rf"\b{n}\b", str(e.value))


def test_resolve_mesh():
  assert spec_lib.resolve_mesh({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert spec_lib.resolve_mesh({"data": 1, "fsdp": -1, "tensor": 2}, 8) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert spec_lib.resolve_mesh({"data": 2, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_tensor_axis_does_not_split_the_batch():
  spec = demo_spec(mesh__data=1, mesh__fsdp=1, mesh__tensor=8, batch_size=2, grad_accum_steps=2, data__eval_batch_size=1)
  spec_lib.validate(spec, 8)  # micro-batch 1 is fine: data*fsdp = 1


def test_all_problems_are_listed_at_once():
  spec = demo_spec(mode="lorra", schedule="cosin", lr=0.0, max_steps=0, batch_size=10, grad_accum_steps=4)
  with pytest.raises(spec_lib.SpecError) as e:
    spec_lib.validate(spec, 1)
  msg = str(e.value)
  assert "5 problems" in msg
  for part in ("mode='lorra'", "schedule='cosin'", "lr must be > 0", "max_steps must be > 0", "batch_size (10)"):
    assert part in msg


@pytest.mark.parametrize("key", sorted(spec_lib.ENUMS))
def test_enum_fields_are_checked(key):
  bogus = 3 if isinstance(spec_lib.ENUMS[key][0], int) else "bogus"
  spec = demo_spec(**{key.replace(".", "__"): bogus})
  with pytest.raises(spec_lib.SpecError, match=re.escape(f"{key}={bogus!r}")):
    spec_lib.validate(spec, 1)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("changes, expected", [
  # values that passed validation and then crashed, hung or silently misbehaved in a real run
  ({"weight_decay": NAN}, "weight_decay must be a finite number, got nan"),
  ({"max_grad_norm": NAN}, "max_grad_norm must be a finite number, got nan"),  # NaN turned clipping off
  ({"lr": INF}, "lr must be a finite number, got inf"),
  ({"data__prm800k__weight": NAN}, "data.prm800k.weight must be a finite number, got nan"),
  ({"data__prm800k__weight": INF}, "data.prm800k.weight must be a finite number, got inf"),
  ({"mode": "lora", "lora__alpha": NAN}, "lora.alpha must be a finite number, got nan"),
  ({"seed": 99999999999999999999}, "seed=99999999999999999999 is too large"),
  ({"data__length_buckets": ()}, "data.length_buckets must be positive integers, strictly increasing, got ()"),
  ({"data__max_length": 1, "data__length_buckets": (1,)}, "data.max_length must be >= 2"),
  ({"data__prefetch": 10**12}, "data.prefetch must be <= 100000, got 1000000000000"),
  ({"data__synthetic__max_ops": 10**8}, "data.synthetic: max_ops must be <= 100, got 100000000"),
  ({"data__synthetic__max_operand": 10**12}, "data.synthetic: max_operand must be <= 12, got 1000000000000"),
  ({"data__synthetic__max_ops": 0}, "data.synthetic: max_ops must be >= 2, got 0"),
  ({"data__prm800k__train_split": "trainx"}, "data.prm800k.train_split='trainx'; choose from 'train', 'test'"),
  ({"data__eqasc__use": True, "data__eqasc__eval_split": "tes"}, "data.eqasc.eval_split='tes'; choose from"),
  ({"distributed__num_processes": -1}, "distributed.num_processes must be >= 0"),
  ({"distributed__num_processes": 2, "distributed__process_id": 2}, "distributed.process_id must be -1"),
  ({"data__template": "chat"}, "data.template='chat' but the tokenizer of model.path demo has no chat template"),
  ({"experiment_name": "../../etc"}, "experiment_name='../../etc' must be one folder name"),  # wrote outside output_dir
  ({"experiment_name": "a/b"}, "experiment_name='a/b' must be one folder name"),
  ({"experiment_name": ""}, "experiment_name='' must be one folder name"),
])
def test_values_a_run_cannot_use_are_refused_before_it_starts(changes, expected):
  with pytest.raises(spec_lib.SpecError, match=re.escape(expected)):
    spec_lib.validate(demo_spec(**changes), 1, check_paths=False)


def test_an_infinite_max_grad_norm_means_no_clipping_and_is_accepted():
  assert spec_lib.validate(demo_spec(max_grad_norm=INF), 1) == []


def test_scan_unroll_reaches_the_model_and_is_checked():
  from rmjax.train.build import model_overrides
  assert model_overrides(demo_spec(model__scan_unroll="0"))["scan_unroll"] == 0
  with pytest.raises(spec_lib.SpecError, match=r"model.scan_unroll must be 'auto' or an integer >= 0, got -2"):
    spec_lib.validate(demo_spec(model__scan_unroll="-2"), 1)


def test_stop_exit_code_is_an_exit_status():
  assert spec_lib.validate(demo_spec(stop_exit_code=143), 1) == []
  with pytest.raises(spec_lib.SpecError, match=r"stop_exit_code must be in \[0, 255\], got 256"):
    spec_lib.validate(demo_spec(stop_exit_code=256), 1)


def test_segment_attention_reaches_the_model_and_is_checked():
  from rmjax.train.build import model_overrides
  assert model_overrides(demo_spec())["segment_attention"] == "auto"
  assert model_overrides(demo_spec(model__segment_attention="cudnn_packed"))["segment_attention"] == "cudnn_packed"
  with pytest.raises(spec_lib.SpecError, match=r"model.segment_attention='ragged'; choose from 'auto', 'mask', 'cudnn_packed'"):
    spec_lib.validate(demo_spec(model__segment_attention="ragged"), 1)
  with pytest.raises(spec_lib.SpecError, match=r"data.max_segments_per_row must be >= 0, got -1"):
    spec_lib.validate(demo_spec(data__max_segments_per_row=-1), 1)


def test_weights_and_sources():
  with pytest.raises(spec_lib.SpecError, match="no training source"):
    spec_lib.validate(demo_spec(data__prm800k__weight=0.0), 1)
  with pytest.raises(spec_lib.SpecError, match=r"data.prm800k.weight must be >= 0, got -1.0"):
    spec_lib.validate(demo_spec(data__prm800k__weight=-1.0), 1)
  # REVEAL alone is eval-only unless allowed.
  only_reveal = dict(data__prm800k__use=False, data__reveal__use=True, data__reveal__path=str(ROOT))
  with pytest.raises(spec_lib.SpecError, match="no training source"):
    spec_lib.validate(demo_spec(**only_reveal), 1)
  warnings = spec_lib.validate(demo_spec(**only_reveal, data__allow_reveal_training=True), 1)
  assert any("REVEAL" in w for w in warnings)
  spec = demo_spec(data__eqasc__use=True, data__eqasc__weight=0.25, data__reveal__use=True,
                   data__reveal__path=str(ROOT), data__eqasc__path=str(ROOT))
  assert spec_lib.training_sources(spec) == {"prm800k": 1.0, "eqasc": 0.25}
  assert spec_lib.eval_sources(spec) == ["prm800k", "eqasc", "reveal"]


def test_enabled_source_needs_an_existing_path(tmp_path):
  missing = tmp_path / "nope"
  spec = demo_spec(data__eqasc__use=True, data__eqasc__path=str(missing))
  with pytest.raises(spec_lib.SpecError, match=re.escape(f"data.eqasc.path not found: {missing}")):
    spec_lib.validate(spec, 1)
  with pytest.raises(spec_lib.SpecError, match="data.eqasc.path is empty"):
    spec_lib.validate(demo_spec(data__eqasc__use=True), 1)
  spec_lib.validate(demo_spec(data__eqasc__use=True), 1, check_paths=False)
  with pytest.raises(spec_lib.SpecError, match="init_from"):
    spec_lib.validate(demo_spec(init_from=str(missing)), 1)


def test_lora_fields_checked_only_in_lora_mode():
  spec_lib.validate(demo_spec(lora__rank=0), 1)
  with pytest.raises(spec_lib.SpecError, match="lora.rank must be > 0"):
    spec_lib.validate(demo_spec(mode="lora", lora__rank=0), 1)


def test_buckets_must_cover_max_length():
  with pytest.raises(spec_lib.SpecError, match=r"largest bucket is below data.max_length \(256\)"):
    spec_lib.validate(demo_spec(data__max_length=256), 1)
  with pytest.raises(spec_lib.SpecError, match="strictly increasing"):
    spec_lib.validate(demo_spec(data__length_buckets=(128, 64)), 1)


@pytest.mark.parametrize("key,value", [
  ("data__length_buckets", ("abc",)), ("data__length_buckets", (64, 128.0)), ("head__hidden_dims", (64, 0)),
  ("head__hidden_dims", ("abc",)), ("lora__targets", (1,)), ("lora__targets", ()),
])
def test_tuple_elements_are_checked(key, value):
  # Tuple overrides from the command line are not element-type-checked by ml-collections.
  with pytest.raises(spec_lib.SpecError, match=key.split("__")[-1]):
    spec_lib.validate(demo_spec(mode="lora", **{key: value}), 1)


def test_warmup_longer_than_training_is_a_warning():
  warnings = spec_lib.validate(demo_spec(max_steps=10, warmup_steps=30), 1)
  assert warnings == ["warmup_steps (30) >= max_steps (10): the learning rate never reaches its peak"]


def test_packed_cudnn_layout_without_a_segment_cap_is_a_warning():
  spec = dict(data__pack=True, model__segment_attention="cudnn_packed", data__max_segments_per_row=0)
  assert spec_lib.validate(demo_spec(**spec), 1) == [
    "model.segment_attention='cudnn_packed' with data.max_segments_per_row=0 gives cuDNN 129 segment slots per "
    "row (one softmax statistic each, mostly empty); set data.max_segments_per_row (e.g. 16)"]
  assert spec_lib.validate(demo_spec(**spec | {"model__segment_attention": "auto"}), 1) == [
    "model.segment_attention='auto' with data.max_segments_per_row=0 gives cuDNN on a Hopper GPU 129 segment "
    "slots per row (one softmax statistic each, mostly empty); set data.max_segments_per_row (e.g. 16)"]
  assert spec_lib.validate(demo_spec(**spec | {"model__segment_attention": "mask"}), 1) == []
  assert spec_lib.validate(demo_spec(data__pack=True), 1) == []  # the defaults: auto, 16 a row


def test_multi_process_divisibility():
  spec = demo_spec(batch_size=6, grad_accum_steps=1, data__eval_batch_size=6)
  spec_lib.validate(spec, 6, process_count=3)
  with pytest.raises(spec_lib.SpecError, match="not divisible by the 4 processes"):
    spec_lib.validate(demo_spec(batch_size=6, grad_accum_steps=1, data__eval_batch_size=4, mesh__data=2,
                                mesh__tensor=-1), 8, process_count=4)


def test_compilation_cache_dir():
  assert runtime.compilation_cache_dir({}) == pathlib.Path("~/.cache/rmjax/jax-cache").expanduser()
  assert runtime.compilation_cache_dir({"RMJAX_COMPILATION_CACHE": "/tmp/c"}) == pathlib.Path("/tmp/c")
  assert runtime.compilation_cache_dir({"RMJAX_COMPILATION_CACHE": "off"}) is None


def test_gpu_memory_fraction_defaults_to_0_9_unless_the_environment_says():
  env = {}
  assert runtime.default_gpu_memory_fraction(env) == "0.9" and env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
  assert runtime.memory_fraction(env) == "0.9" and runtime.memory_fraction({}) == "0.75"
  for given in ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}):
    env = dict(given)
    assert runtime.default_gpu_memory_fraction(env) is None and env == given


def test_out_of_device_memory_is_one_line_naming_what_makes_the_step_smaller(monkeypatch, capsys):
  """A step that does not fit its devices: jax's RESOURCE_EXHAUSTED error (a long XLA message)
  becomes one line with the allocation that failed and what makes the run smaller for its mode."""
  import jax
  from rmjax import launch
  from rmjax.train import loop
  oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.60GiB.\n"
                                   "BufferAssignment OOM Debugging.\nBufferAssignment stats: ...")
  monkeypatch.setattr(loop, "train_and_evaluate", lambda spec: (_ for _ in ()).throw(oom))
  monkeypatch.delenv("RMJAX_DEBUG", raising=False)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  spec = demo_spec(mode="full", grad_accum_steps=4, batch_size=32, opt_state_dtype="float32")
  with pytest.raises(SystemExit) as exited:
    launch.run(spec)
  err = capsys.readouterr().err.strip()
  assert exited.value.code == 2 and len(err.splitlines()) == 1
  assert err.startswith("rmjax.launch: error: out of device memory: RESOURCE_EXHAUSTED: Out of memory while "
                        "trying to allocate 17.60GiB. (the cpu backend uses this machine's memory; to need less:")
  for hint in ("--spec.opt_state_dtype=bfloat16", "--spec.grad_accum_steps=1", "--spec.model.remat=full",
               "--spec.mesh.fsdp"):
    assert hint in err
  lora = launch.out_of_memory_message(oom, demo_spec(mode="lora"))
  assert "more --spec.grad_accum_steps" in lora and "opt_state_dtype" not in lora
  # numpy allocating a host array (a huge data.eval_batch_size) raises MemoryError: one line too
  host = MemoryError("Unable to allocate 47.7 GiB for an array with shape (100000000, 128) and data type int32")
  monkeypatch.setattr(loop, "train_and_evaluate", lambda spec: (_ for _ in ()).throw(host))
  with pytest.raises(SystemExit) as exited:
    launch.run(demo_spec())
  err = capsys.readouterr().err
  assert exited.value.code == 2 and err.count("\n") == 1 and err.startswith(
    "rmjax.launch: error: out of host memory: Unable to allocate 47.7 GiB for an array with shape (100000000, 128) "
    "and data type int32 (to need less: a smaller --spec.data.eval_batch_size"), err
  other = jax.errors.JaxRuntimeError("INTERNAL: something else")
  monkeypatch.setattr(loop, "train_and_evaluate", lambda spec: (_ for _ in ()).throw(other))
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):  # not a user's mistake: as it is
    launch.run(demo_spec())


def test_distributed_args():
  dist = spec_lib.load_spec_file(str(SPECS / "demo.py")).distributed
  assert runtime.distributed_args(dist, {}) is None
  assert runtime.distributed_args(dist, {"SLURM_NTASKS": "1"}) is None
  assert runtime.distributed_args(dist, {"SLURM_NTASKS": "4"}) == {}
  with pytest.raises(ValueError, match="^a coordinator address is set but not num_processes or process_id: set "
                                       "distributed.num_processes or JAX_NUM_PROCESSES and distributed.process_id "
                                       "or JAX_PROCESS_ID$"):
    runtime.distributed_args(dist, {"JAX_COORDINATOR_ADDRESS": "h:1"})
  assert runtime.distributed_args(dist, {"JAX_COORDINATOR_ADDRESS": "h:1", "SLURM_NTASKS": "2"}) == {
    "coordinator_address": "h:1"}  # SLURM tells jax the rest
  with pytest.raises(ValueError, match="SLURM_NTASKS='x'"):
    runtime.distributed_args(dist, {"SLURM_NTASKS": "x"})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='-1'"):
    runtime.distributed_args(dist, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "-1"})
  dist.coordinator_address, dist.num_processes, dist.process_id = "h:123", 2, 1
  assert runtime.distributed_args(dist, {}) == {"coordinator_address": "h:123", "num_processes": 2, "process_id": 1}


def test_distributed_args_merge_the_spec_and_the_environment_field_by_field():
  dist = spec_lib.load_spec_file(str(SPECS / "demo.py")).distributed
  dist.num_processes, dist.process_id = 2, 1  # the spec fixes the layout, the launcher the address
  assert runtime.distributed_args(dist, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4"}) == {
    "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  assert runtime.distributed_args(dist, {"SLURM_NTASKS": "2"}) == {"num_processes": 2, "process_id": 1}
  with pytest.raises(ValueError, match="^2 processes but no coordinator address: set distributed.coordinator_address"):
    runtime.distributed_args(dist, {})
  dist.num_processes, dist.process_id, dist.coordinator_address = 0, -1, "h:2"  # the launcher the layout
  assert runtime.distributed_args(dist, {"JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"}) == {
    "coordinator_address": "h:2", "num_processes": 3, "process_id": 2}
  dist.coordinator_address = ""
  with pytest.raises(ValueError, match="^3 processes but no coordinator address"):
    runtime.distributed_args(dist, {"JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"})


