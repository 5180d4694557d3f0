"""Tests for `python -m rmjax.bench`: records, ratios, batches and the analytic FLOP count."""

import json
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


def _check_record(r: dict, impl: str, mode: str, flops: bool = True) -> None:
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
    for key in common.RMJAX_KEYS if flops else ("compiled_temp_mb", "compiled_arg_mb"):
      assert isinstance(r[key], float) and r[key] > 0, key


def test_tiny_both_impls_both_modes(capsys):
  """Both sides, both modes, one record each and the ratios; without the layer-extrapolated FLOP
  count (its extra compiles are checked by the grad-accum and extrapolation tests)."""
  rc = bench_main.main([*TINY_ARGS, "--mode", "both", "--impl", "both", "--no-isolate", "--no-flops"])
  records = _lines(capsys.readouterr().out)
  assert rc == 0
  runs, last = records[:-1], records[-1]
  assert [(r["impl"], r["mode"]) for r in runs] == [
    ("rmjax", "full"), ("torch", "full"), ("rmjax", "lora"), ("torch", "lora")]
  for r in runs:
    _check_record(r, r["impl"], r["mode"], flops=False)
  by = {(r["impl"], r["mode"]): r for r in runs}
  hidden = common.PRESETS["tiny"]().hidden_size
  for mode in common.MODES:
    # Same model shape on both sides: the only extra trainable rmjax weight is the marker row.
    assert by["rmjax", mode]["trainable_params"] - by["torch", mode]["trainable_params"] == hidden
    # rmjax runs its unrolled last layer at the markers only (its FLOP count: test_flops_against_hand_count)
    assert by["rmjax", mode]["model_flops"] < by["torch", mode]["model_flops"]
    assert by["rmjax", mode]["traces"] == 1
    assert by["rmjax", mode]["scan_unroll"] == 0  # "auto" on a CPU without remat: unrolled, recorded as the number
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
  assert capsys.readouterr().err.strip() == "rmjax.bench: error: grad_accum=0 must be >= 1"
  for flag in (["--analysis-only"], ["--target", "h100"]):
    assert bench_main.main(["--preset", "tiny", "--impl", "torch", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rmjax.bench: error: --analysis-only and --target compile rmjax's step only; use --impl rmjax"


def test_scan_unroll_auto_is_trainings_first_pick_and_a_number_is_kept():
  """--scan-unroll auto (the default) resolves on the device to the head of training's auto cost
  order with the bench's remat held; a number stays as given (its text made an int)."""
  import dataclasses
  from rmjax.bench import jax_impl
  auto = bench_main.settings_from(bench_main.parse_args(["--preset", "tiny"]))
  assert auto.scan_unroll == "auto" and auto.remat_policy == "none"
  for mode in common.MODES:
    assert jax_impl.resolve_scan_unroll(auto, mode, "cpu").scan_unroll == 0
  full_remat = dataclasses.replace(auto, remat_name="full")
  assert jax_impl.resolve_scan_unroll(full_remat, "full", "gpu").scan_unroll == 1
  assert jax_impl.resolve_scan_unroll(auto, "lora", "gpu").scan_unroll == 0
  given = bench_main.settings_from(bench_main.parse_args(["--preset", "tiny", "--scan-unroll", "2"]))
  assert given.scan_unroll == 2
  for platform in ("cpu", "gpu"):
    assert jax_impl.resolve_scan_unroll(given, "full", platform) == given
  assert common.BenchSettings(scan_unroll=3).model_config("full").scan_unroll == 3


def test_bad_scan_unroll_is_one_line_error(capsys):
  for value in ("-1", "x", "1.5"):
    assert bench_main.main(["--preset", "tiny", "--scan-unroll", value, "--no-isolate"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"rmjax.bench: error: scan_unroll='{value}' must be 'auto' or an integer >= 0"
  for value in (-1, True, None):
    with pytest.raises(ValueError, match="scan_unroll"):
      common.BenchSettings(scan_unroll=value)


def test_grad_accum_steps_batch_times_n_rows_through_the_training_step(capsys):
  """--grad-accum 2 --batch 2: each step takes the 4 rows of a --batch 4 step (same batches) in
  two micro-batches, training's accumulating step on the rmjax side. tokens/s, model_flops and
  compiled_flops count all 4 rows; only the activations' memory is a micro-batch's (rows of 128,
  so that the activations outweigh the accumulated gradient)."""
  accum = ["--preset", "tiny", "--seq-len", "128", "--steps", "2", "--warmup", "1", "--mode", "full", "--no-isolate"]
  assert bench_main.main([*accum, "--batch", "2", "--grad-accum", "2", "--impl", "both"]) == 0
  jx, pt, _ = _lines(capsys.readouterr().out)
  assert bench_main.main([*accum, "--batch", "4", "--impl", "rmjax"]) == 0
  one_pass = _lines(capsys.readouterr().out)[0]
  for r in (jx, pt):
    assert (r["batch"], r["grad_accum"]) == (2, 2)
    assert r["tokens_per_s"] == pytest.approx(4 * 128 / r["step_time_s"])
  # torch runs its last layer at every row, rmjax's unrolled one at the markers only
  assert pt["model_flops"] > jx["model_flops"] == one_pass["model_flops"]
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
  # The last layer's q, o and MLP (64 + 64 + 384 = 512 weights) and its attention (6 x H2 x d4 x
  # T10 = 480) at 3 rows, not 20: full skips 17 x (6 x 512 + 480); LoRA 17 x (4 x 512 + 6 x
  # (32 + 32) + 480), its q and o adapters.
  assert common.analytic_model_flops(cfg, 20, 10, "full", last_layer_rows=3) == 157440 - 17 * 3552
  assert common.analytic_model_flops(cfg, 20, 10, "lora", last_layer_rows=3) == 138240 - 17 * 2912
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


def test_rounds_alternate_the_order_and_report_the_median_ratio(monkeypatch, capsys):
  """Each round reverses which implementation runs first; the ratios line is the median of the
  rounds' ratios, with each round's beside it. The speeds are scripted: round r's rmjax run is
  (10, 30, 20)[r] tokens/s against torch's 10, so the rounds' ratios are 1, 3 and 2."""
  calls = []

  def fake_run(impl, settings, mode, isolate):
    calls.append((impl, mode))
    index = sum(1 for c in calls if c == (impl, mode)) - 1
    return {"impl": impl, "mode": mode, "tokens_per_s": (10.0, 30.0, 20.0)[index] if impl == "rmjax" else 10.0}

  monkeypatch.setattr(bench_main, "run_one", fake_run)
  assert bench_main.main(["--mode", "full", "--rounds", "3"]) == 0
  assert calls == [("rmjax", "full"), ("torch", "full"), ("torch", "full"), ("rmjax", "full"),
                   ("rmjax", "full"), ("torch", "full")]
  lines = _lines(capsys.readouterr().out)
  assert [line["round"] for line in lines[:-1]] == [0, 0, 1, 1, 2, 2]
  assert lines[-1] == {"ratios": {"full": 2.0}, "round_ratios": {"full": [1.0, 3.0, 2.0]}}
  assert common.median_ratios([{"lora": None}, {"lora": None}]) == {"lora": None}


def test_rounds_below_one_is_a_one_line_error(capsys):
  assert bench_main.main(["--rounds", "0"]) == 2
  err = capsys.readouterr().err
  assert err.strip() == "rmjax.bench: error: --rounds must be at least 1, got 0"


def test_layer_extrapolated_flops_equal_a_fully_unrolled_compile():
  """compiled_flops comes from 1- and 2-layer unrolled compiles; check it against an honest
  3-layer compile with the whole layer scan unrolled (XLA then counts every layer), for an
  unrolled and a looped run. One mode: the extrapolation does not depend on which weights train."""
  import jax
  from rmjax.bench import jax_impl
  settings = common.BenchSettings(preset="tiny", seq_len=32, batch=2, dtype="float32", frozen_dtype="float32")
  device = jax.devices()[0]
  host = common.make_batches(settings.model_config("full"), settings, 1)[0]
  mode = "full"
  cfg3 = settings.model_config(mode).replace(num_layers=3, scan_unroll=3, attention_impl="xla")
  # Unrolled, the last layer runs at the markers; in a loop (scan_unroll=1) at every row, which an
  # unrolled compile of the every-row layer counts.
  for run_cfg, counted in ((cfg3, cfg3), (cfg3.replace(scan_unroll=1),
                                                      cfg3.replace(last_layer_query_rows_only=False))):
    steps, abstract = jax_impl.build_abstract(settings, mode, device, counted)
    want = jax_impl._cost_flops(jax_impl.compile_step(steps, abstract, jax_impl.abstract_batch(host)))
    got = jax_impl.layer_extrapolated_flops(settings, mode, device, host, cfg=run_cfg)["compiled_flops"]
    assert abs(got - want) / want < 1e-3, (run_cfg.scan_unroll, got, want)


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
  assert record["scan_unroll"] == 0  # "auto" resolved for the CPU, no remat
  step = (record["compiled_arg_mb"] + record["compiled_temp_mb"] + record["compiled_out_mb"]
          - record["compiled_alias_mb"])
  assert record["compiled_peak_mb"] == pytest.approx(max(step, record["compiled_init_mb"]), abs=0.11)


@pytest.mark.parametrize("target, device", [("h100", "NVIDIA H100 80GB HBM3"), ("h200", "NVIDIA H200")])
def test_gpu_target_compiles_for_the_gpu_or_says_why_not_in_one_line(target, device):
  """With jax's CUDA plugin installed, --target compiles the tiny step for that GPU on this
  machine; without it (CI), the run stops with one line naming what is missing."""
  import importlib.util
  import os
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-m", "rmjax.bench", *TINY_ARGS, "--mode", "lora", "--target", target,
                         "--no-flops", "--no-isolate", "--remat"], capture_output=True, text=True, env=env,
                        timeout=300)
  if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    assert proc.returncode == 2 and proc.stdout == ""
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"rmjax.bench: error: cannot compile for the {target} GPU target here")
    assert "pip install -e '.[cuda12]'" in err[0]
  else:
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = _lines(proc.stdout)[0]
    assert record["device"] == device and record["target"] == target
    assert (record["dtype"], record["frozen_dtype"], record["attention"]) == ("bfloat16", "bfloat16", "cudnn")
    assert record["scan_unroll"] == 1  # auto for a GPU's LoRA step under full remat: the layer loop
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


def test_profile_counts_a_cpu_librarys_dot_fusions_as_matmuls():
  """XLA's CPU dot fusions, YNNPACK's or oneDNN's (model.cpu_dot_library), are the step's GEMMs."""
  from rmjax.bench import profile
  up = "jit(_train_step)/transpose(jvp(ConfidenceModel))/decoder/layers/mlp/up_proj/dot_general"
  for fusion in ("ynn_fusion.12", "onednn_fusion.3"):
    assert profile.classify(fusion, up) == ("matmul", "bwd", "layers/mlp/up_proj")


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


def test_isolated_child_gets_every_setting():
  """The child process of an isolated run rebuilds its settings from argv: every field that is
  not the default must survive the trip (a forgotten flag silently benchmarks the default)."""
  import dataclasses
  from rmjax.bench import __main__ as bench_main
  changed = common.BenchSettings(preset="qwen3-4b", seq_len=64, batch=3, grad_accum=2, steps=2, warmup=1, remat=True, dtype="bfloat16",
                                 dropout=0.1, seed=7, frozen_dtype="float32", attention_mask="segments",
                                 segment_attention="cudnn_packed",
                                 attention="xla", opt_state_dtype="bfloat16", remat_name="dots_saveable",
                                 scan_unroll=0, attention_query_block=64, cpu_dot_library="onednn", flops=False, analysis_only=True, profile_dir="/tmp/p",
                                 target="h100")
  defaults = common.BenchSettings()
  untouched = {f.name for f in dataclasses.fields(common.BenchSettings)
               if getattr(changed, f.name) == getattr(defaults, f.name)}
  # Not command-line options: the model's head, LoRA shape and optimizer are fixed for both impls.
  assert untouched == {"head_dims", "lora_rank", "lora_alpha", "lr_full", "lr_lora", "weight_decay",
                       "max_grad_norm"}, untouched
  argv = bench_main.child_argv("rmjax", changed, "lora")[3:]  # after `python -m rmjax.bench`
  assert bench_main.settings_from(bench_main.parse_args(argv)) == changed


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
