"""Tests for `python -m rmjax.bench`: records, ratios, batches and the analytic FLOP count."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from rmjax.bench import __main__ as bench_main
from rmjax.bench import common
from rmjax.model.config import ModelConfig

TINY_ARGS = ["--preset", "tiny", "--seq-len", "64", "--batch", "2", "--steps", "2", "--warmup", "1"]


def _lines(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _check_record(r: dict, impl: str, mode: str) -> None:
  assert (r["impl"], r["mode"], r["seq_len"], r["batch"]) == (impl, mode, 64, 2)
  for key in common.REQUIRED_KEYS:
    assert key in r, key
  assert isinstance(r["tokens_per_s"], float) and r["tokens_per_s"] > 0
  assert isinstance(r["step_time_s"], float) and r["step_time_s"] > 0
  assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["step_time_s"])
  assert len(r["step_times_s"]) == 2
  assert r["peak_mem_mb"] > 50  # a process holding jax or torch is never this small
  assert r["mfu"] is None  # CPU has no peak FLOP/s entry
  assert isinstance(r["model_flops"], float) and r["model_flops"] > 0
  if impl == "rmjax":
    for key in common.RMJAX_KEYS:
      assert isinstance(r[key], float) and r[key] > 0, key


def test_tiny_both_impls_both_modes(capsys):
  rc = bench_main.main([*TINY_ARGS, "--mode", "both", "--impl", "both", "--no-isolate"])
  records = _lines(capsys.readouterr().out)
  assert rc == 0
  runs, last = records[:-1], records[-1]
  assert [(r["impl"], r["mode"]) for r in runs] == [
    ("rmjax", "full"), ("torch", "full"), ("rmjax", "lora"), ("torch", "lora")]
  for r in runs:
    _check_record(r, r["impl"], r["mode"])
  by = {(r["impl"], r["mode"]): r for r in runs}
  hidden = common.PRESETS["tiny"]().hidden_size
  for mode in common.MODES:
    # Same model shape on both sides: the only extra trainable rmjax weight is the marker row.
    assert by["rmjax", mode]["trainable_params"] - by["torch", mode]["trainable_params"] == hidden
    assert by["rmjax", mode]["model_flops"] == by["torch", mode]["model_flops"]
    assert by["rmjax", mode]["traces"] == 1
  # peft trains exactly the adapters our FLOP count assumes, plus the head (weights + biases).
  tiny = common.BenchSettings(preset="tiny").model_config("lora")
  head = common.head_matmul_params(hidden, (1024, 256)) + 1024 + 256 + 1
  assert by["torch", "lora"]["trainable_params"] == common.lora_params(tiny) + head
  assert set(last) == {"ratios"} and set(last["ratios"]) == {"full", "lora"}
  for mode, ratio in last["ratios"].items():
    expected = by["rmjax", mode]["tokens_per_s"] / by["torch", mode]["tokens_per_s"]
    assert ratio == pytest.approx(expected)


def test_isolated_subprocess_run():
  proc = subprocess.run([sys.executable, "-m", "rmjax.bench", *TINY_ARGS, "--impl", "torch", "--mode", "lora"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = _lines(proc.stdout)
  _check_record(records[0], "torch", "lora")
  assert records[-1] == {"ratios": {"lora": None}}


def test_bad_option_is_one_line_error(capsys):
  assert bench_main.main(["--preset", "tiny", "--seq-len", "100000", "--no-isolate"]) == 2
  err = capsys.readouterr().err.strip()
  assert "max_position_embeddings" in err and len(err.splitlines()) == 1
  assert bench_main.main(["--preset", "tiny", "--grad-accum", "0", "--no-isolate"]) == 2
  assert capsys.readouterr().err.strip() == "error: grad_accum=0 must be >= 1"
  for flag in (["--analysis-only"], ["--target", "h100"]):
    assert bench_main.main(["--preset", "tiny", "--impl", "torch", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --analysis-only and --target compile rmjax's step only; use --impl rmjax"


def test_grad_accum_steps_batch_times_n_rows_through_the_training_step(capsys):
  """--grad-accum 2 --batch 2: each step takes the 4 rows of a --batch 4 step (same batches) in
  two micro-batches, training's accumulating step on the rmjax side. tokens/s, model_flops and
  compiled_flops count all 4 rows; only the activations' memory is a micro-batch's."""
  accum = ["--preset", "tiny", "--seq-len", "64", "--steps", "2", "--warmup", "1", "--mode", "full", "--no-isolate"]
  assert bench_main.main([*accum, "--batch", "2", "--grad-accum", "2", "--impl", "both"]) == 0
  jx, pt, _ = _lines(capsys.readouterr().out)
  assert bench_main.main([*accum, "--batch", "4", "--impl", "rmjax"]) == 0
  one_pass = _lines(capsys.readouterr().out)[0]
  for r in (jx, pt):
    assert (r["batch"], r["grad_accum"]) == (2, 2)
    assert r["tokens_per_s"] == pytest.approx(4 * 64 / r["step_time_s"])
    assert r["model_flops"] == one_pass["model_flops"]
  assert (one_pass["batch"], one_pass["grad_accum"]) == (4, 1)
  assert jx["traces"] == 1 and jx["compiled_flops"] == one_pass["compiled_flops"]
  assert jx["compiled_temp_mb"] < one_pass["compiled_temp_mb"]


def test_grad_accum_gives_the_one_pass_loss_and_gradient():
  """Both sides' accumulated steps compute the loss and gradient of the whole step's rows (each
  micro-batch's loss over the step's markers): rmjax through train_step's grad_accum_steps,
  torch through N backward passes into .grad."""
  import dataclasses
  import jax
  import torch
  from rmjax.bench import jax_impl, torch_ref
  accum = common.BenchSettings(preset="tiny", seq_len=32, batch=2, grad_accum=2, dtype="float32",
                               frozen_dtype="float32")
  one_pass = dataclasses.replace(accum, batch=4, grad_accum=1)
  host = common.make_batches(accum.model_config("full"), accum, 1)[0]
  assert host["input_ids"].shape == (4, 32)
  metrics = []
  for settings in (accum, one_pass):
    steps, state, mesh = jax_impl.build(settings, "full", jax.devices()[0])
    assert steps.grad_accum_steps == settings.grad_accum
    metrics.append(jax.device_get(steps.train_step(state, jax_impl.device_batch(host, mesh))[1]))
  for key in ("loss", "grad_norm"):
    assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-5), key
  grads = []
  for n in (2, 1):
    model, params = torch_ref.build(accum, "full", "cpu")
    loss = torch_ref.backward_micro_batches(model, torch_ref.to_device(host, "cpu"), n, torch.enable_grad)
    grads.append((float(loss), [p.grad.clone() for p in params]))
  assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
  for a, b in zip(grads[0][1], grads[1][1]):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_flops_against_hand_count():
  cfg = ModelConfig(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=4, lora_rank=2)
  # Per layer: q 8x8=64, k 8x4=32, v 8x4=32, o 8x8=64, MLP 3x8x16=384 -> 576; N = 2 x 576 = 1152.
  assert common.decoder_matmul_params(cfg) == 1152
  # LoRA r=2: q 2(8+8)=32, k 2(8+4)=24, v 24, o 32 -> 112 per layer, 224 in all.
  assert common.lora_params(cfg) == 224
  # Attention per token: 6 x L2 x H2 x d4 x T10 = 960. 20 tokens.
  # full: 20 x (6 x 1152 + 960) = 20 x 7872
  assert common.analytic_model_flops(cfg, 20, 10, "full") == 157440
  # lora: 20 x (4 x 1152 + 6 x 224 + 960) = 20 x 6912
  assert common.analytic_model_flops(cfg, 20, 10, "lora") == 138240
  # head 8->4->1: 36 weights, 6 x 36 x 3 markers = 648 on top.
  assert common.analytic_model_flops(cfg, 20, 10, "full", head_dims=(4,), markers=3) == 158088
  with pytest.raises(ValueError, match="mode"):
    common.analytic_model_flops(cfg, 20, 10, "half")


def test_presets_have_documented_sizes():
  assert common.decoder_matmul_params(common.PRESETS["75m"]()) == 75_497_472
  big = common.PRESETS["qwen3-4b"]()
  # Qwen3-4B: 36 x (2560 x 4096 x 2 + 2560 x 1024 x 2 + 3 x 2560 x 9728) = 3.61e9 in matmuls.
  assert common.decoder_matmul_params(big) == 36 * (2 * 2560 * 4096 + 2 * 2560 * 1024 + 3 * 2560 * 9728)


def test_batches_follow_contract_and_are_reproducible():
  settings = common.BenchSettings(preset="tiny", seq_len=256, batch=3, seed=7)
  cfg = settings.model_config("full")
  a, b = common.make_batches(cfg, settings, 2), common.make_batches(cfg, settings, 2)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  batch = a[0]
  assert batch["input_ids"].shape == (3, 256) and batch["input_ids"].dtype == np.int32
  for row in range(3):
    mask = batch["target_mask"][row] > 0
    pos = batch["marker_positions"][row][mask]
    assert np.all(batch["input_ids"][row, pos] == cfg.marker_id)
    assert np.sum(batch["input_ids"][row] == cfg.marker_id) == mask.sum()
    assert 3 <= mask.sum() <= 5  # one marker per 48..80 tokens of 256
    assert set(np.unique(batch["targets"][row][mask])) <= {0.0, 1.0}
  assert not np.array_equal(a[0]["input_ids"], a[1]["input_ids"])


def test_peak_table_and_ratios():
  assert common.peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12
  assert common.peak_flops("NVIDIA H200") == 989.5e12
  assert common.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert common.peak_flops("cpu") is None
  records = [{"impl": "rmjax", "mode": "full", "tokens_per_s": 30.0},
             {"impl": "torch", "mode": "full", "tokens_per_s": 20.0},
             {"impl": "rmjax", "mode": "lora", "error": "boom"},
             {"impl": "torch", "mode": "lora", "tokens_per_s": 10.0}]
  assert common.ratios(records) == {"full": 1.5, "lora": None}


def test_layer_extrapolated_flops_equal_a_fully_unrolled_compile():
  """compiled_flops comes from 1- and 2-layer unrolled compiles; check it against an honest
  3-layer compile with the whole layer scan unrolled (XLA then counts every layer)."""
  import jax
  from rmjax.bench import jax_impl
  settings = common.BenchSettings(preset="tiny", seq_len=32, batch=2, dtype="float32", frozen_dtype="float32")
  device = jax.devices()[0]
  host = common.make_batches(settings.model_config("full"), settings, 1)[0]
  for mode in ("full", "lora"):
    cfg3 = settings.model_config(mode).replace(num_layers=3, scan_unroll=3, attention_impl="xla")
    steps, abstract = jax_impl.build_abstract(settings, mode, device, cfg3)
    want = jax_impl._cost_flops(jax_impl.compile_step(steps, abstract, jax_impl.abstract_batch(host)))
    got = jax_impl.layer_extrapolated_flops(settings, mode, device, host, cfg=cfg3)["compiled_flops"]
    assert abs(got - want) / want < 1e-3, (mode, got, want)


def test_attention_defaults_to_cudnn_only_on_gpu_with_half_precision(monkeypatch):
  import jax
  import jax.numpy as jnp
  from rmjax.model import transformer
  cfg = common.PRESETS["qwen3-4b"]()
  assert transformer.auto_attention_impl(cfg, jnp.bfloat16) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
  monkeypatch.setattr(transformer.jax, "default_backend", lambda: "gpu")
  assert transformer.auto_attention_impl(cfg, jnp.bfloat16) == "cudnn"
  assert transformer.auto_attention_impl(cfg, jnp.float32) == "xla"  # cuDNN has no fp32 attention
  assert transformer.auto_attention_impl(cfg.replace(head_dim=256), jnp.bfloat16) == "xla"


def test_attention_auto_for_an_explicit_backend():
  import jax.numpy as jnp
  from rmjax.model import transformer
  cfg = common.PRESETS["qwen3-4b"]()
  assert transformer.auto_attention_impl(cfg, jnp.bfloat16, "gpu") == "cudnn"
  assert transformer.auto_attention_impl(cfg, jnp.bfloat16, "cpu") == "xla"


def test_compiled_peak_is_the_larger_of_init_and_step():
  from rmjax.bench import jax_impl
  step = {"compiled_arg_mb": 100.0, "compiled_temp_mb": 30.0, "compiled_out_mb": 101.0, "compiled_alias_mb": 100.0}
  assert jax_impl.compiled_peak(step | {"compiled_init_mb": 90.0}) == {"compiled_peak_mb": 131.0}
  assert jax_impl.compiled_peak(step | {"compiled_init_mb": 180.0}) == {"compiled_peak_mb": 180.0}
  assert jax_impl.compiled_peak(step | {"compiled_temp_mb": None}) == {}


def test_analysis_only_reports_init_and_peak_memory(capsys):
  rc = bench_main.main([*TINY_ARGS, "--mode", "lora", "--impl", "rmjax", "--analysis-only", "--no-flops",
                        "--no-isolate", "--dtype", "bfloat16", "--frozen-dtype", "bfloat16"])
  record = _lines(capsys.readouterr().out)[0]
  assert rc == 0 and record["analysis_only"] and record["target"] is None
  assert record["frozen_dtype"] == "bfloat16" and record["compiled_init_mb"] > 0
  step = (record["compiled_arg_mb"] + record["compiled_temp_mb"] + record["compiled_out_mb"]
          - record["compiled_alias_mb"])
  assert record["compiled_peak_mb"] == pytest.approx(max(step, record["compiled_init_mb"]), abs=0.11)


def test_gpu_target_compiles_for_an_h100_or_says_why_not_in_one_line():
  """With jax's CUDA plugin installed, --target h100 compiles the tiny step for an H100 on this
  machine; without it (CI), the run stops with one line naming what is missing."""
  import importlib.util
  import os
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-m", "rmjax.bench", *TINY_ARGS, "--mode", "lora", "--target", "h100",
                         "--no-flops", "--no-isolate", "--remat"], capture_output=True, text=True, env=env,
                        timeout=300)
  if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    assert proc.returncode == 2 and proc.stdout == ""
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: cannot compile for the h100 GPU target here")
    assert "pip install -e '.[cuda12]'" in err[0]
  else:
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = _lines(proc.stdout)[0]
    assert record["device"] == "NVIDIA H100 80GB HBM3" and record["target"] == "h100"
    assert (record["dtype"], record["frozen_dtype"], record["attention"]) == ("bfloat16", "bfloat16", "cudnn")
    assert record["compiled_peak_mb"] >= record["compiled_init_mb"] > 0


def test_profile_classifies_ops_by_kind_direction_and_component():
  from rmjax.bench import profile
  hlo = "\n".join([
    '  %dot.1 = f32[8,8]{1,0} dot(%a, %b), metadata={op_name="jit(_train_step)/decoder/layers/mlp/up_proj/dot_general"}',
    '  %copy_fusion.2 = f32[8,8]{1,0} fusion(%c), kind=kLoop, metadata={op_name="jit(_train_step)/'
    'transpose(jvp(ConfidenceModel))/decoder/layers/mlp/jit(silu)/mul"}',
    '  %add_fusion = f32[8]{0} fusion(%d), metadata={op_name="jit(_train_step)/head/add"}'])
  names = profile.op_names(hlo)
  assert names["dot.1"].endswith("up_proj/dot_general") and set(names) == {"dot.1", "copy_fusion.2", "add_fusion"}
  op = lambda name, dur: {"name": name, "dur": dur, "args": {"hlo_op": name, "hlo_module": "jit__train_step"}}
  events = [op("dot.1", 600.0), op("copy_fusion.2", 300.0), op("add_fusion", 100.0),
            op("while.7", 900.0),  # the layer loop spans the ops above: counting it would count them twice
            {"name": "ThunkExecutor::Execute", "dur": 5000.0, "args": {}}]  # not an XLA op
  s = profile.summarize(events, names)
  assert s["op_time_ms"] == 1.0
  assert s["by_kind"] == {"matmul": 0.6, "copy/transpose": 0.3, "other": 0.1}
  assert s["by_direction"] == {"fwd": 0.7, "bwd": 0.3}
  assert [(t["direction"], t["kind"], t["component"]) for t in s["top"]] == [
    ("fwd", "matmul", "layers/mlp/up_proj"), ("bwd", "copy/transpose", "layers/mlp"), ("fwd", "other", "head")]
  assert s["top_kernels"] == [{"kernel": "dot", "ms": 0.6, "count": 1}, {"kernel": "copy_fusion", "ms": 0.3, "count": 1},
                              {"kernel": "add_fusion", "ms": 0.1, "count": 1}]


def test_profile_counts_only_gpu_kernels_and_matches_them_to_hlo_by_name(tmp_path):
  """A GPU trace (event layout and kernel names as an H100 run of the bench wrote them): the host
  thread's events are not ops, a fusion kernel under a CUDA graph is found by its own name, and
  cuBLAS / cuDNN library kernels are matmul / attention with no HLO instruction to name."""
  import gzip
  from rmjax.bench import profile
  trace = {"traceEvents": [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "X", "pid": 701, "tid": 3, "name": "PjitFunction(_train_step)", "dur": 4000.0, "args": {}},
    {"ph": "X", "pid": 1, "tid": 14, "name": "loop_select_fusion_11", "dur": 200.0,
     "args": {"hlo_module": "jit__train_step", "hlo_op": "command_buffer_1"}},
    {"ph": "X", "pid": 1, "tid": 14, "name": "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT", "dur": 500.0,
     "args": {"hlo_op": "command_buffer_9"}},
    {"ph": "X", "pid": 1, "tid": 14, "name": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3",
     "dur": 250.0, "args": {"hlo_op": "command_buffer_9"}},
    {"ph": "X", "pid": 1, "tid": 14, "name": "memcpy128", "dur": 50.0, "args": {"hlo_op": "command_buffer_16"}}]}
  (tmp_path / "plugins").mkdir()
  with gzip.open(tmp_path / "plugins" / "perfetto_trace.json.gz", "wt") as fh:
    json.dump(trace, fh)
  names = profile.op_names('  %loop_select_fusion.11 = f32[8]{0} fusion(%p), metadata={op_name="jit(_train_step)/'
                           'optimizer/select_n"}')
  s = profile.summarize(profile.load_trace_events(tmp_path), names)
  assert s["op_time_ms"] == 1.0  # the host's 4 ms launch is not device time
  assert s["by_kind"] == {"matmul": 0.5, "attention": 0.25, "other": 0.2, "copy/transpose": 0.05}
  assert s["by_direction"] == {"unattributed": 0.8, "fwd": 0.2}
  assert [(k["kernel"], k["count"]) for k in s["top_kernels"]][:2] == [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT", 1), ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob", 1)]


def test_profile_option_traces_a_real_step(tmp_path, capsys):
  rc = bench_main.main([*TINY_ARGS, "--mode", "full", "--impl", "rmjax", "--no-isolate", "--no-flops",
                        "--profile", str(tmp_path)])
  record = _lines(capsys.readouterr().out)[0]
  assert rc == 0
  prof = record["profile"]
  assert prof["op_time_ms"] > 0 and list((tmp_path / "rmjax-full").rglob("perfetto_trace.json.gz"))
  assert sum(prof["by_kind"].values()) == pytest.approx(1.0, abs=1e-3)
  assert prof["by_kind"]["matmul"] > 0 and {"fwd", "bwd"} <= set(prof["by_direction"])
  assert any(t["component"].startswith("layers/") for t in prof["top"])


def test_buffers_names_the_stacked_layer_residuals_in_the_temp_block(tmp_path):
  """A remat=full step keeps one (layers, batch, seq, hidden) stack of layer inputs in its temp
  block; the dump summary must find it there (shape from the tiny preset, not from the tool)."""
  import os
  from rmjax.bench import buffers
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_dump_to={tmp_path}")
  subprocess.run([sys.executable, "-m", "rmjax.bench", *TINY_ARGS, "--mode", "lora", "--impl", "rmjax",
                  "--remat", "--analysis-only", "--no-flops", "--no-isolate"],
                 env=env, check=True, capture_output=True, timeout=300)
  summary = buffers.summarize(tmp_path)
  cfg = common.PRESETS["tiny"]()
  stack = f"f32[{cfg.num_layers},2,64,{cfg.hidden_size}]"
  assert summary["temp_mb"] > 0 and summary["largest"]
  assert any(v["shape"].startswith(stack) for v in summary["largest"]), summary["largest"][:5]
  # The same dump read by the traffic tool: the layer loops run num_layers times per step.
  from rmjax.bench import traffic
  moved = traffic.summarize(tmp_path)
  assert moved["total_gb"] > 0 and moved["xla_remat_duplicates"] == 0
  assert sum(moved["by_category_gb"].values()) == pytest.approx(moved["total_gb"], abs=0.05)
  assert {r["runs"] for r in moved["largest"]} >= {cfg.num_layers}


_HLO = """HloModule jit_f, entry_computation_layout={(f32[3,10]{1,0})->f32[3,10]{1,0}}

%fused_slice_mul (param_0.1: f32[3,10], param_1.1: s32[]) -> f32[1,10] {
  %param_0.1 = f32[3,10]{1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  %dynamic-slice.1 = f32[1,10]{1,0} dynamic-slice(%param_0.1, %param_1.1, %constant.1), dynamic_slice_sizes={1,10}
  ROOT %multiply.1 = f32[1,10]{1,0} multiply(%dynamic-slice.1, %dynamic-slice.1)
}

%fused_update (param_0.2: f32[3,10], param_1.2: f32[1,10], param_2.2: s32[]) -> f32[3,10] {
  %param_0.2 = f32[3,10]{1,0} parameter(0)
  %param_1.2 = f32[1,10]{1,0} parameter(1)
  %param_2.2 = s32[] parameter(2)
  %constant.2 = s32[] constant(0)
  %negate.2 = f32[1,10]{1,0} negate(%param_1.2)
  ROOT %dynamic-update-slice.2 = f32[3,10]{1,0} dynamic-update-slice(%param_0.2, %negate.2, %param_2.2, %constant.2)
}

%body (p: (s32[], f32[3,10], f32[3,10])) -> (s32[], f32[3,10], f32[3,10]) {
  %p = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %xs = f32[3,10]{1,0} get-tuple-element(%p), index=1
  %ys = f32[3,10]{1,0} get-tuple-element(%p), index=2
  %sq = f32[1,10]{1,0} fusion(%xs, %i), kind=kLoop, calls=%fused_slice_mul
  %upd = f32[3,10]{1,0} fusion(%ys, %sq, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) tuple(%next, %xs, %upd)
}

%cond (q: (s32[], f32[3,10], f32[3,10])) -> pred[] {
  %q = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

ENTRY %main (x: f32[3,10]) -> f32[3,10] {
  %x = f32[3,10]{1,0} parameter(0)
  %zero = f32[] constant(0)
  %init = f32[3,10]{1,0} broadcast(%zero), dimensions={}
  %c0 = s32[] constant(0)
  %t0 = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) tuple(%c0, %x, %init)
  %w = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[3,10]{1,0} get-tuple-element(%w), index=2
}
"""


def test_traffic_counts_slices_in_place_updates_and_loop_trips(tmp_path):
  """Hand count: the entry's broadcast moves 120 + 4 bytes. Each of the 3 loop trips: the first
  fusion reads one 40-byte row of the stack (not all 120) and the index (4), writes 40; the
  second reads the 40-byte row and the index, updates the stack in place (its buffer moves
  nothing) and writes the 40-byte row; the add moves 3 x 4. (124 + 3 x (84 + 84 + 12)) = 664."""
  from rmjax.bench import traffic
  (tmp_path / "module_0001.jit__train_step.gpu_after_optimizations.txt").write_text(_HLO)
  rows = {r["name"]: r for r in traffic.ops(_HLO)}
  assert set(rows) == {"init", "sq", "upd", "next"}
  assert (rows["init"]["bytes"], rows["sq"]["bytes"], rows["upd"]["bytes"], rows["next"]["bytes"]) == (124, 252, 252, 36)
  assert {rows[n]["runs"] for n in ("sq", "upd", "next")} == {3}
  assert sum(r["bytes"] for r in rows.values()) == 664
  summary = traffic.summarize(tmp_path)
  assert summary["by_computation_gb"].keys() == {"main", "body"} and summary["xla_remat_duplicates"] == 0
  assert traffic.main([str(tmp_path / "missing")]) == 2


_HLO_STATIC_SLICES = """HloModule jit_g, entry_computation_layout={(f32[3,10]{1,0})->f32[1,10]{1,0}}

%fused_static (param_0.3: f32[3,10]) -> f32[1,10] {
  %param_0.3 = f32[3,10]{1,0} parameter(0)
  %slice.3 = f32[1,10]{1,0} slice(%param_0.3), slice={[1:2], [0:10]}
  ROOT %exponential.3 = f32[1,10]{1,0} exponential(%slice.3)
}

ENTRY %main (x: f32[3,10]) -> f32[1,10] {
  %x = f32[3,10]{1,0} parameter(0)
  %a = f32[1,10]{1,0} fusion(%x), kind=kLoop, calls=%fused_static
  %b = f32[1,10]{1,0} slice(%x), slice={[2:3], [0:10]}
  ROOT %c = f32[1,10]{1,0} add(%a, %b)
}
"""


def test_traffic_counts_static_slices_as_the_rows_they_read():
  """An unrolled layer reads its weights as a static slice of the stack, inside a GEMM fusion or
  bare. Hand count: the fusion reads one 40-byte row (not the 120-byte stack) and writes 40; the
  bare slice reads and writes 40 each; the add reads 2 x 40 and writes 40."""
  from rmjax.bench import traffic
  rows = {r["name"]: r["bytes"] for r in traffic.ops(_HLO_STATIC_SLICES)}
  assert rows == {"a": 80, "b": 80, "c": 120}


def test_packing_bench_steps_the_same_examples_in_both_layouts(capsys):
  from rmjax.bench import packing
  rc = packing.main(["--preset", "tiny", "--row", "64", "--examples", "24", "--batch", "2", "--median", "20",
                     "--min-length", "8", "--buckets", "16,32,64"])
  unpacked, packed, ratio = _lines(capsys.readouterr().out)
  assert rc == 0 and (unpacked["layout"], packed["layout"]) == ("unpacked", "packed")
  assert unpacked["steps"] == 12 and packed["steps"] < unpacked["steps"]  # 24 examples, 2 per padded step
  assert unpacked["markers"] == packed["markers"] and unpacked["real_tokens"] == packed["real_tokens"]
  assert packed["token_fill"] > unpacked["token_fill"]
  assert ratio["packed_over_unpacked_markers_per_s"] == pytest.approx(
    packed["markers_per_s"] / unpacked["markers_per_s"])
  with pytest.raises(SystemExit):
    packing.main(["--preset", "tiny", "--row", "64", "--buckets", "16,32"])


def test_packing_bench_steps_the_packed_rows_with_each_segment_attention(capsys):
  """`--segment-attention both`: the same packed batches once with the segment mask and once with
  cuDNN's packed layout (on a CPU both run XLA's masked attention, and the records say so)."""
  from rmjax.bench import packing
  assert packing.main(["--preset", "tiny", "--row", "64", "--examples", "12", "--batch", "2", "--median", "20",
                       "--min-length", "8", "--buckets", "32,64", "--segment-attention", "both"]) == 0
  unpacked, mask, mask_ratio, cudnn_packed, cudnn_packed_ratio = _lines(capsys.readouterr().out)
  assert [r["layout"] for r in (unpacked, mask, cudnn_packed)] == ["unpacked", "packed", "packed_cudnn_packed"]
  assert (mask["segment_attention"], cudnn_packed["segment_attention"]) == ("mask", "cudnn_packed")
  assert mask["attention"] == cudnn_packed["attention"] == "xla"
  assert mask["steps"] == cudnn_packed["steps"] and mask["markers"] == cudnn_packed["markers"] == unpacked["markers"]
  assert unpacked["most_examples_per_row"] == 1 and mask["most_examples_per_row"] > 1
  for ratio, (name, r) in ((mask_ratio, ("packed", mask)), (cudnn_packed_ratio, ("packed_cudnn_packed", cudnn_packed))):
    assert ratio == {f"{name}_over_unpacked_markers_per_s": pytest.approx(r["markers_per_s"] / unpacked["markers_per_s"])}


def test_packing_bench_reports_a_failed_run_and_goes_on(capsys, monkeypatch):
  """One layout's run fails after its step took (donated) the train state: an error line, and the
  next layout still runs, from a fresh state, and gets its ratio line."""
  import jax
  from rmjax.bench import packing
  real, calls = packing.time_layout, []

  def second_run_fails(steps, state, batches, mesh):
    calls.append(len(batches))
    if len(calls) == 2:
      jax.tree.map(lambda x: x.delete(), state)
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmore detail")
    return real(steps, state, batches, mesh)
  monkeypatch.setattr(packing, "time_layout", second_run_fails)
  assert packing.main(["--preset", "tiny", "--row", "64", "--examples", "12", "--batch", "2", "--median", "20",
                       "--min-length", "8", "--buckets", "32,64", "--segment-attention", "both"]) == 1
  unpacked, failed, cudnn_packed, ratio = _lines(capsys.readouterr().out)
  assert (unpacked["layout"], cudnn_packed["layout"]) == ("unpacked", "packed_cudnn_packed")
  assert failed == {"layout": "packed", "lookahead": failed["lookahead"], "max_segments": 0,
                    "attention_mask": "segments", "segment_attention": "mask",
                    "error": "RuntimeError: RESOURCE_EXHAUSTED: out of memory"}
  assert ratio == {"packed_cudnn_packed_over_unpacked_markers_per_s": pytest.approx(
    cudnn_packed["markers_per_s"] / unpacked["markers_per_s"])}


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _gpu_checks_env(tmp_path: pathlib.Path) -> dict[str, str]:
  import os
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
    "SMOKE": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}


def test_gpu_checks_refuses_a_work_folder_it_did_not_make(tmp_path):
  """gpu_checks.sh empties $WORK before its checks; a folder holding files it did not write (no
  mark of an earlier run) is refused in one line, untouched, before any check runs."""
  (tmp_path / "work").mkdir()
  (tmp_path / "work" / "notes.txt").write_text("mine")
  proc = subprocess.run(["bash", str(ROOT / "rmjax" / "bench" / "gpu_checks.sh"), "full_dots"], cwd=ROOT,
                        env=_gpu_checks_env(tmp_path), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "holds files this script did not write" in proc.stderr
  assert (tmp_path / "work" / "notes.txt").read_text() == "mine" and not (tmp_path / "out" / "gpu_checks.tgz").exists()


@pytest.mark.slow
def test_prepared_gpu_checks_run_end_to_end_on_tiny_shapes(tmp_path):
  """gpu_checks.sh is what a short GPU loan runs; a check that breaks here would waste one.
  SMOKE=1 runs every check of "all" on tiny shapes: each must leave its JSON records (the loop
  its data_wait.json) in the one tarball a lent command brings back, and nothing of an earlier
  run in its work folder (a stale record, a loop run to resume) may reach it."""
  import tarfile
  env = _gpu_checks_env(tmp_path)
  work = tmp_path / "work"
  (work / "run" / "demo-lora" / "logs").mkdir(parents=True)
  (work / "run" / "demo-lora" / "logs" / "metrics.jsonl").write_text('{"step": 40, "train/data_wait_frac": 0.5}\n')
  (work / "stale_check.jsonl").write_text('{"impl": "rmjax", "tokens_per_s": 1.0}\n')
  (work / ".gpu-checks-work").touch()  # an earlier run's folder, as the script marks it
  proc = subprocess.run(["bash", str(ROOT / "rmjax" / "bench" / "gpu_checks.sh"), "all"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  started = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("== ") and "(at " in line]
  assert started == ["loop", "full_spec", "full_unrolled", "lora_unrolled", "packing", "full_remat", "torch_full",
                     "lora_remat", "full_dots", "lora_dots_attn", "attention", "lora_proj_attn", "full_dots_cublas"]
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_checks.tgz"]  # no .partial left
  with tarfile.open(tmp_path / "out" / "gpu_checks.tgz") as tar:
    names = set(tar.getnames())
    assert "./stale_check.jsonl" not in names and "./.gpu-checks-work" not in names
    checks = ("full_dots", "lora_dots_attn", "full_remat", "full_unrolled", "lora_unrolled", "attention",
              "lora_proj_attn", "lora_remat", "packing", "torch_full", "full_dots_cublas", "full_spec")
    for check in checks:
      assert f"./{check}.jsonl" in names, check
      records = [json.loads(line) for line in tar.extractfile(f"./{check}.jsonl").read().decode().splitlines()
                 if line.startswith("{")]
      assert records and not any("error" in r for r in records), (check, records)
      if check.endswith("_unrolled"):
        assert all(r["scan_unroll"] == 0 for r in records if "impl" in r), records
    waits = json.loads(tar.extractfile("./data_wait.json").read())
  assert waits["steps"] and len(waits["device_idle_frac"]) == len(waits["steps"]) and waits["skipped_lines"] == 0
  assert all(x is not None for x in waits["device_idle_max_frac"] + waits["dispatch_ms"])  # the meter's both ends
  assert 40 not in waits["steps"]  # the stale run's metrics were not appended to
  assert "skipped" not in proc.stderr
  # the summary of the next GPU session reads this tarball's real records (on a CPU: no MFU)
  from rmjax.bench import gpu_summary
  rows = {r["target"]: r for r in gpu_summary.summarise(gpu_summary.read_tarball(str(tmp_path / "out" / "gpu_checks.tgz")))}
  assert rows["full_mfu"]["check"] in gpu_summary.FULL_CHECKS and all(r["held"] is None for r in rows.values())
  assert rows["full_over_torch"]["rmjax"] == {"remat_policy": "full", "opt_state_dtype": "float32"}
  assert rows["full_over_torch"]["value"] > 0 and rows["full_fastest_over_torch"]["value"] > 0
  assert rows["lora_over_full"]["value"] > 0 and rows["device_idle"]["windows"] == len([x for x in waits["device_idle_frac"] if x is not None])
  assert {"packing:packed", "packing:packed_cudnn_packed"} <= set(rows)
  assert rows["full_spec_fits"]["value"] > 0 and rows["data_wait"]["windows"] == len(waits["steps"])


def test_isolated_child_gets_every_setting():
  """The child process of an isolated run rebuilds its settings from argv: every field that is
  not the default must survive the trip (a forgotten flag silently benchmarks the default)."""
  import dataclasses
  from rmjax.bench import __main__ as bench_main
  changed = common.BenchSettings(preset="qwen3-4b", seq_len=64, batch=3, grad_accum=2, steps=2, warmup=1, remat=True, dtype="bfloat16",
                                 dropout=0.1, seed=7, frozen_dtype="float32", attention_mask="segments",
                                 segment_attention="cudnn_packed",
                                 attention="xla", opt_state_dtype="bfloat16", remat_name="dots_saveable",
                                 scan_unroll=0, attention_query_block=64, flops=False, analysis_only=True, profile_dir="/tmp/p",
                                 target="h100")
  defaults = common.BenchSettings()
  untouched = {f.name for f in dataclasses.fields(common.BenchSettings)
               if getattr(changed, f.name) == getattr(defaults, f.name)}
  # Not command-line options: the model's head, LoRA shape and optimizer are fixed for both impls.
  assert untouched == {"head_dims", "lora_rank", "lora_alpha", "lr_full", "lr_lora", "weight_decay",
                       "max_grad_norm"}, untouched
  argv = bench_main.child_argv("rmjax", changed, "lora")[3:]  # after `python -m rmjax.bench`
  assert bench_main.settings_from(bench_main.parse_args(argv)) == changed


def test_attention_probe_compares_the_packed_variants(capsys):
  """On a CPU the two public variants run XLA's attention: causal-only attention differs from the
  segment mask's on rows holding several examples, in values and gradients; the cuDNN-only
  variant says it is unavailable, and so does the H100 compile without jax's CUDA plugin."""
  from rmjax.bench import attention
  assert attention.main(["--seq-len", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                         "--median", "20", "--steps", "1"]) == 0
  rows = {r["variant"]: r for r in _lines(capsys.readouterr().out)}
  assert list(rows) == ["segments", "causal", "segments_no_mask_grad", "segments_cudnn_packed",
                        "segments_cudnn_packed_tight"]
  assert rows["segments"]["segments_per_row"] > 1 and rows["segments"]["ms"] > 0
  assert "max_abs_diff_out" not in rows["segments"]  # the reference
  assert all(rows["causal"][f"max_abs_diff_{part}"] > 0.1 for part in ("out", "dq", "dk", "dv"))
  assert all("unavailable" in rows[v] for v in list(rows)[2:])
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
  except ImportError:
    assert attention.main(["--target", "h100"]) == 2
  segments = attention.packed_segment_ids(3, 64, 20.0, np.random.default_rng(0))
  for row in segments:  # ids 1..k from the left, each a contiguous run, padding (0) only at the end
    ids = row[row > 0]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(np.unique(ids)) == 1)
    assert np.all(row[len(ids):] == 0)



def test_attention_probe_reports_a_failed_variant_and_goes_on(capsys, monkeypatch):
  """The reference variant fails: an error line, the next variant still runs, and with no
  reference it gives no differences (not differences from itself or another variant)."""
  from rmjax.bench import attention
  real, calls = attention.time_grads, []

  def first_fails(attend, args, steps):
    calls.append(steps)
    if len(calls) == 1:
      raise RuntimeError("cuDNN: no plan\nmore detail")
    return real(attend, args, steps)
  monkeypatch.setattr(attention, "time_grads", first_fails)
  assert attention.main(["--seq-len", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                         "--median", "20", "--steps", "1"]) == 1
  rows = {r["variant"]: r for r in _lines(capsys.readouterr().out)}
  assert rows["segments"]["error"] == "RuntimeError: cuDNN: no plan" and "ms" not in rows["segments"]
  assert rows["causal"]["ms"] > 0 and not any(k.startswith("max_abs_diff_") for k in rows["causal"])
  assert len(rows) == 5

def test_private_cudnn_attention_is_used_only_with_the_expected_parameters(monkeypatch):
  from rmjax.model import cudnn_attention
  module = cudnn_attention._private_module()
  if module is None:
    pytest.skip("this jax has no jax._src.cudnn")
  import inspect

  def taking(names):
    def fake(*args):
      raise AssertionError("not to be called")
    fake.__signature__ = inspect.Signature(
      [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return fake
  expected = cudnn_attention._EXPECTED_PARAMETERS
  monkeypatch.setattr(module, "_dot_product_attention", taking(expected), raising=False)
  assert cudnn_attention.available()
  monkeypatch.setattr(module, "_dot_product_attention", taking(expected[:-1]))  # a jax that changed it
  assert not cudnn_attention.available()
  with pytest.raises(RuntimeError, match="expected parameters"):
    cudnn_attention.causal_attention_constant_mask(None, None, None, None, 1.0)


def _write_tarball(path: pathlib.Path, files: dict[str, str]) -> str:
  """A gpu_checks.sh-like tarball ("./NAME" members) holding these texts."""
  import io
  import tarfile
  with tarfile.open(path, "w:gz") as tar:
    for name, text in files.items():
      data = text.encode()
      info = tarfile.TarInfo(f"./{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def _summary_files(device: str) -> dict[str, str]:
  """Hand-written records of the checks (numbers chosen here, not measured), as JSON lines."""
  full = {"impl": "rmjax", "mode": "full", "batch": 4, "device": device, "opt_state_dtype": "bfloat16"}
  records = {
    "full_dots": [full | {"tokens_per_s": 15000.0, "mfu": 0.44, "peak_mem_mb": 62000.0}],
    "full_unrolled": [full | {"tokens_per_s": 16000.0, "mfu": 0.47, "peak_mem_mb": 60000.0}],
    "full_remat": [full | {"tokens_per_s": 12000.0, "mfu": 0.35, "opt_state_dtype": "float32",
                           "remat_policy": "full"}],
    "full_dots_cublas": [{"impl": "rmjax", "mode": "full", "error": "RuntimeError: out of memory"}],
    "lora_dots_attn": [{"impl": "rmjax", "mode": "lora", "batch": 4, "tokens_per_s": 21000.0}],
    "lora_unrolled": [{"impl": "rmjax", "mode": "lora", "batch": 4, "tokens_per_s": 23000.0}],
    "lora_remat": [{"impl": "rmjax", "mode": "lora", "batch": 4, "tokens_per_s": 17000.0, "peak_mem_mb": 10659.0}],
    "torch_full": [{"impl": "torch", "mode": "full", "batch": 4, "tokens_per_s": 8000.0}, {"ratios": {}}],
    "full_spec": [full | {"batch": 16, "tokens_per_s": 11000.0, "peak_mem_mb": 69000.0, "opt_state_dtype": "float32"}],
    "packing": [{"layout": "unpacked"}, {"packed_over_unpacked_markers_per_s": 2.1,
                                         "packed_cudnn_packed_over_unpacked_markers_per_s": 1.9}],
    "attention": [{"variant": "segments", "ms": 3.0},
                  {"variant": "segments_cudnn_packed", "ms": 1.5, "max_abs_diff_out": 0.0078}],
  }
  return ({f"{name}.jsonl": "\n".join(map(json.dumps, rs)) for name, rs in records.items()}
          | {"data_wait.json": json.dumps({"data_wait_frac": [0.001, 0.003, None], "device_idle_frac": [0.01, 0.03, None],
                                           "device_idle_max_frac": [0.02, 0.3, None], "dispatch_ms": [5.0, 7.0, None]})})


def test_gpu_summary_reads_the_targets_from_one_tarball(tmp_path, capsys):
  """The best full and LoRA checks are picked by tokens/s, failed checks are left out, rmjax is
  compared with torch at torch's settings (full_remat), and each target says what it was computed
  from and whether it holds. A line cut short (a killed run) is skipped and counted, and the
  loop's run/ folder is not read (its metrics.jsonl is no check's records)."""
  from rmjax.bench import gpu_summary
  files = _summary_files("NVIDIA H100 80GB HBM3")
  files["lora_unrolled.jsonl"] += '\n{"impl": "rmjax", "mode": "lo'
  files["run/demo-lora/logs/metrics.jsonl"] = '{"step": 2, "train/loss": 0.2}\n{"step": 4, "tra'
  assert gpu_summary.main([_write_tarball(tmp_path / "gpu_checks.tgz", files)]) == 0
  out, err = capsys.readouterr()
  rows = {r["target"]: r for r in _lines(out)}
  assert "lora_unrolled.jsonl: 1 record line(s) that are not JSON skipped" in err and "not judged" not in err
  assert (rows["full_mfu"]["value"], rows["full_mfu"]["held"], rows["full_mfu"]["check"]) == (0.47, True, "full_unrolled")
  like = rows["full_over_torch"]
  assert like["value"] == pytest.approx(1.5) and like["held"] and like["checks"] == ["full_remat", "torch_full"]
  assert like["rmjax"] == {"remat_policy": "full", "opt_state_dtype": "float32"}
  fastest = rows["full_fastest_over_torch"]
  assert fastest["value"] == pytest.approx(2.0) and fastest["held"] is None
  assert fastest["checks"] == ["full_unrolled", "torch_full"]
  assert rows["lora_over_full"]["value"] == pytest.approx(23000 / 16000) and rows["lora_over_full"]["held"]
  assert rows["lora_over_full"]["checks"] == ["lora_unrolled", "full_unrolled"]
  assert (rows["lora_peak_mb"]["value"], rows["lora_peak_mb"]["held"]) == (10659.0, True)
  assert [f["check"] for f in rows["full_fits"]["value"]] == ["full_dots", "full_unrolled", "full_remat"]
  assert (rows["packing:packed"]["held"], rows["packing:packed_cudnn_packed"]["held"]) == (True, False)
  assert (rows["full_spec_fits"]["value"], rows["full_spec_fits"]["held"]) == (69000.0, True)
  assert (rows["data_wait"]["value"], rows["data_wait"]["held"]) == (pytest.approx(0.002), True)
  idle = rows["device_idle"]  # idle for certain under 5%, at most over it: not settled
  assert (idle["value"], idle["max"], idle["dispatch_ms"], idle["held"], idle["windows"]) == (
    pytest.approx(0.02), pytest.approx(0.16), pytest.approx(6.0), None, 2)
  packed = rows["packed_attention:segments_cudnn_packed"]
  assert (packed["value"], packed["ms_masked"], packed["faster_than_mask"], packed["max_abs_diff_out"]) == (
    1.5, 3.0, True, 0.0078)
  assert {r["device"] for r in rows.values()} == {"NVIDIA H100 80GB HBM3"}
  assert all(r["skipped_lines"] == {"lora_unrolled.jsonl": 1} and "not_judged" not in r for r in rows.values())
  assert gpu_summary.main([str(tmp_path / "missing.tgz")]) == 2


@pytest.mark.parametrize("device", ["NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "cpu"])
def test_gpu_summary_judges_the_targets_on_an_h100_sxm_only(tmp_path, capsys, device):
  """The targets are an H100 SXM's: the same records from another device give the figures with
  no verdict, and say why."""
  from rmjax.bench import gpu_summary
  assert gpu_summary.judged_device("NVIDIA H100 80GB HBM3") and not gpu_summary.judged_device(None)
  assert gpu_summary.main([_write_tarball(tmp_path / "gpu_checks.tgz", _summary_files(device))]) == 0
  out, err = capsys.readouterr()
  rows = {r["target"]: r for r in _lines(out)}
  assert rows["full_mfu"]["value"] == 0.47 and rows["full_over_torch"]["value"] == pytest.approx(1.5)
  assert all(r["held"] is None and device in r["not_judged"] for r in rows.values())
  assert err.startswith("note: not judged: the targets are an H100 SXM's") and len(err.splitlines()) == 1


@pytest.mark.parametrize("loop, held", [
  ({"device_idle_frac": [0.01, 0.02], "device_idle_max_frac": [0.03, 0.04]}, True),  # at most under 5%
  ({"device_idle_frac": [0.06, 0.08], "device_idle_max_frac": [0.2, 0.3]}, False),  # for certain over it
])
def test_gpu_summary_judges_device_idle_by_its_bounds(tmp_path, loop, held):
  assert _loop_summary(tmp_path, loop)["device_idle"]["held"] is held


def _loop_summary(tmp_path: pathlib.Path, loop: dict) -> dict[str, dict]:
  """gpu_summary's rows for a tarball of this data_wait.json and one H100 record (the device)."""
  from rmjax.bench import gpu_summary
  files = {"data_wait.json": json.dumps(loop),
           "full_dots.jsonl": json.dumps({"impl": "rmjax", "mode": "full", "device": "NVIDIA H100 80GB HBM3"})}
  rows = gpu_summary.summarise(gpu_summary.read_tarball(_write_tarball(tmp_path / "gpu_checks.tgz", files)))
  return {r["target"]: r for r in rows}


def test_gpu_summary_full_spec_out_of_memory_is_not_held(tmp_path):
  from rmjax.bench import gpu_summary
  oom = {"impl": "rmjax", "mode": "full", "device": "NVIDIA H100 80GB HBM3",
         "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.60GiB."}
  rows = gpu_summary.summarise(gpu_summary.read_tarball(_write_tarball(
    tmp_path / "gpu_checks.tgz", {"full_spec.jsonl": json.dumps(oom)})))
  spec = next(r for r in rows if r["target"] == "full_spec_fits")
  assert (spec["value"], spec["held"]) == (None, False)


def test_gpu_summary_reads_an_older_loop_s_idle_as_the_upper_end(tmp_path):
  """Before session 9 the loop logged only the return end of a dispatch, as device_idle_frac:
  such a tarball gives it as `max`, with no certain figure and no verdict above 5%."""
  rows = _loop_summary(tmp_path, {"data_wait_frac": [0.0001, 0.0002], "device_idle_frac": [0.28, 0.30]})
  idle = rows["device_idle"]
  assert (idle["value"], idle["max"], idle["held"]) == (None, pytest.approx(0.29), None)
  assert rows["data_wait"]["held"] is True


def test_gpu_summary_packing_ratios_from_the_layout_lines_when_the_ratio_line_is_missing(tmp_path):
  """A packing run cut off (or failing) after some layouts still gives the ratios it measured."""
  from rmjax.bench import gpu_summary
  lines = [{"layout": "unpacked", "markers_per_s": 100.0}, {"layout": "packed", "markers_per_s": 230.0},
           {"layout": "packed_cudnn_packed", "error": "RuntimeError: cuDNN refused"}]
  files = {"packing.jsonl": "\n".join(map(json.dumps, lines))}
  rows = gpu_summary.summarise(gpu_summary.read_tarball(_write_tarball(tmp_path / "gpu_checks.tgz", files)))
  packing = [r for r in rows if r["target"].startswith("packing")]
  assert [(r["target"], r["value"]) for r in packing] == [("packing:packed", pytest.approx(2.3))]


def test_data_wait_skips_lines_that_are_not_json(tmp_path):
  """gpu_checks.sh loop reads the loop's metrics.jsonl through gpu_summary.data_wait: a line cut
  short by a killed run is skipped and counted, the first window (compilation) dropped."""
  from rmjax.bench import gpu_summary
  rows = [{"step": s, "train/data_wait_frac": 0.01 * s, "train/device_idle_frac": 0.02} for s in (2, 4, 6)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(map(json.dumps, [{"step": 1, "eval/mse": 0.3}, *rows])) + '\n{"step": 8, "train/da')
  waits = gpu_summary.data_wait(path)
  assert waits["steps"] == [4, 6] and waits["data_wait_frac"] == [0.04, 0.06] and waits["skipped_lines"] == 1
  assert gpu_summary.data_wait(tmp_path / "missing.jsonl")["steps"] == []


def test_torch_lora_base_is_frozen_in_the_frozen_dtype():
  """rmjax's LoRA base is bf16 wherever --frozen-dtype says so (the default on a GPU); the torch
  reference must hold its base the same way, with peft's adapters and the head float32, and step."""
  import torch
  from rmjax.bench import torch_ref
  settings = common.BenchSettings(preset="tiny", seq_len=32, batch=2, dtype="float32", frozen_dtype="bfloat16")
  model, params = torch_ref.build(settings, "lora", "cpu")
  frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
  assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
  assert params and {p.dtype for p in params} == {torch.float32}
  host = common.make_batches(settings.model_config("lora"), settings, 1)[0]
  torch_ref.make_step(model, params, settings, "lora", "cpu")(torch_ref.to_device(host, "cpu"))
  full, _ = torch_ref.build(settings, "full", "cpu")  # full fine-tuning trains (so keeps float32) every weight
  assert {p.dtype for p in full.backbone.parameters()} == {torch.float32}
