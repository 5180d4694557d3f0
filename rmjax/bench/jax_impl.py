"""The rmjax side of the benchmark: the real training step, timed on one device.

Why it exists: the number we publish must come from the code users run, not from a
benchmark-only copy. This builds the state with `rmjax.train.state.create_train_state` and
steps it with `rmjax.train.step.make_steps` (the same jitted, donated `train_step` the
training loop uses), for the model shape and batches of `common.py`. Before timing, the step
is lowered and compiled once ahead of time to read XLA's cost and memory analysis; jax reuses
that executable for the jitted calls, so nothing is compiled twice.

`compiled_flops` must be comparable with the analytic `model_flops`, but XLA's cost analysis
counts a while-loop body ONCE and the decoder's layers are an `nn.scan` (a while loop). So the
FLOPs come from two analysis-only compiles of the same step with the layer scan UNROLLED
(`scan_unroll`), at 1 and at 2 layers, with XLA attention (a cuDNN custom call reports no
FLOPs): per_layer = F(2) - F(1), rest = F(1) - per_layer (embedding, head, loss, optimizer of
the non-layer params), compiled_flops = rest + L * per_layer. Layers are identical, so this is
exact up to XLA making different fusion choices at depth L. The analysis compiles use abstract
state (no device memory). `compiled_temp_mb` / `compiled_arg_mb` come from the real step's
compile (memory analysis; XLA's temp is the live peak beyond arguments and outputs).
`compiled_init_mb` is the random init's compiled temp + result (the state's birth), and
`compiled_peak_mb` the larger of that and the step's arguments + temp + non-aliased outputs:
XLA's bound on the device peak, which tracks the measured peak (BUILD.md).

`--grad-accum N` steps `settings.grad_accum` micro-batches per optimizer step through the same
`train_step` (OptimConfig.grad_accum_steps, the lax.scan of gradient sums training runs), so
with N = 4 its memory analysis is the default spec's step. Its micro-batch loop is a while
loop too, so `compiled_flops` counts the one-micro-batch step over the same global rows: the
micro-batches' work is linear in rows, and that leaves out only the gradient sums' adds (one
per trained weight and micro-batch, next to ~6 FLOPs per weight and token).

`--target h100` compiles for a described GPU without one (gpu_target.py): the step and the init
compile for it, `compiled_flops` still comes from the local device (the count is the same).

`--scan-unroll auto` (the default) takes what the training loop's `model.scan_unroll: auto` tries
first (`resolve_scan_unroll`), so the figure is what a user gets; the record holds the number.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from rmjax import runtime
from rmjax import sharding as shd
from rmjax.bench import common, gpu_target
from rmjax.model.confidence import ConfidenceModel
from rmjax.model.head import HeadConfig
from rmjax.model.transformer import auto_attention_impl, last_layer_at_queries
from rmjax.train import optim
from rmjax.train.auto_settings import (AUTO, abstract_batch, candidates, compile_step, compiled_peak,  # noqa: F401
                                       memory_analysis, cost_flops as _cost_flops, mb as _mb)
from rmjax.train.state import abstract_train_state, create_train_state, param_layout, random_init
from rmjax.train.step import device_batch, make_steps


def resolve_scan_unroll(settings: common.BenchSettings, mode: str, platform: str) -> common.BenchSettings:
  """These settings with scan_unroll "auto" resolved: the first of the training loop's auto cost
  order (auto_settings.candidates) for `platform` and `mode` with the bench's remat held. Unlike
  training it checks no memory: the bench's shapes are the user's choice (a step that does not
  fit is that run's error)."""
  if settings.scan_unroll != AUTO:
    return settings
  first = candidates(mode, platform, remat=settings.remat_policy)[0]
  return dataclasses.replace(settings, scan_unroll=first.scan_unroll)


def optim_config(settings: common.BenchSettings, mode: str) -> optim.OptimConfig:
  """AdamW + clipping as in training; constant lr so the schedule does not matter."""
  return optim.OptimConfig(lr=settings.lr(mode), schedule="constant", warmup_steps=0,
                           max_steps=max(settings.warmup + settings.steps, 1),
                           weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
                           grad_accum_steps=settings.grad_accum, loss="mse", mode=mode,
                           frozen_dtype=settings.frozen_dtype if mode == "lora" else "float32",
                           opt_state_dtype=settings.opt_state_dtype)


def _model(settings: common.BenchSettings, cfg) -> ConfidenceModel:
  return ConfidenceModel(cfg, HeadConfig(hidden_dims=settings.head_dims, activation="gelu",
                                         dropout=settings.dropout))


def build(settings: common.BenchSettings, mode: str, device: jax.Device, cfg=None):
  """(steps, state, mesh) on a one-device mesh."""
  model = _model(settings, cfg or settings.model_config(mode))
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), devices=[device])
  opt_cfg = optim_config(settings, mode)
  state, shardings = create_train_state(model, opt_cfg, mesh, jax.random.key(settings.seed))
  return make_steps(model, opt_cfg, mesh, shardings), state, mesh


def build_abstract(settings: common.BenchSettings, mode: str, device: jax.Device, cfg=None):
  """(steps, abstract state): the same step, with shapes only (nothing allocated)."""
  model = _model(settings, cfg or settings.model_config(mode))
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), devices=[device])
  opt_cfg = optim_config(settings, mode)
  abstract, shardings = abstract_train_state(model, opt_cfg, mesh)
  return make_steps(model, opt_cfg, mesh, shardings), abstract


def init_memory(settings: common.BenchSettings, mode: str, device: jax.Device) -> dict[str, Any]:
  """compiled_init_mb: the jitted random init's temp + result bytes on `device` (nothing runs)."""
  model = _model(settings, settings.model_config(mode))
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), devices=[device])
  opt_cfg = optim_config(settings, mode)
  # the key create_train_state passes (a typed key, uncommitted): the same program as the state's
  # init, so a persistent compilation cache serves this compile instead of compiling it again
  key = jax.eval_shape(lambda: jax.random.split(jax.random.key(settings.seed))[0])
  init = random_init(model, opt_cfg, param_layout(model, opt_cfg, mesh))
  mem = init.lower(key).compile().memory_analysis()
  return {} if mem is None else {"compiled_init_mb": _mb(mem.temp_size_in_bytes + mem.output_size_in_bytes)}


def unrolled_layers_config(cfg, num_layers: int):
  """`cfg` at `num_layers` layers, unrolled (XLA's cost analysis counts a loop's body once), XLA
  attention, and its last layer where `cfg` runs it: every row where `cfg` loops over its layers
  (model/transformer.py's Decoder). Compiles of 1 and 2 layers extrapolate to `cfg`'s step."""
  return cfg.replace(num_layers=num_layers, scan_unroll=0, attention_impl="xla",
                     last_layer_query_rows_only=last_layer_at_queries(cfg))


def layer_extrapolated_flops(settings: common.BenchSettings, mode: str, device: jax.Device,
                             host_batch: dict[str, np.ndarray], cfg=None) -> dict[str, Any]:
  """compiled_flops of the L-layer step from unrolled 1- and 2-layer compiles of the step over
  `host_batch` in one micro-batch (module docstring)."""
  cfg = cfg or settings.model_config(mode)
  accumulated = settings.grad_accum > 1
  settings = dataclasses.replace(settings, grad_accum=1)
  counts = []
  for n in (1, 2):
    steps, abstract = build_abstract(settings, mode, device, unrolled_layers_config(cfg, n))
    counts.append(_cost_flops(compile_step(steps, abstract, abstract_batch(host_batch))))
  if None in counts:
    return {"compiled_flops": None}
  per_layer = counts[1] - counts[0]
  total = counts[0] - per_layer + cfg.num_layers * per_layer
  return {"compiled_flops": total, "compiled_flops_per_layer": per_layer,
          "compiled_flops_note": "XLA cost analysis, layer scan unrolled at 1 and 2 layers, "
                                 "extrapolated to num_layers; XLA attention"
                                 + ("; the step's rows in one micro-batch" if accumulated else "")}


def compiled_analysis(steps, state, batch: dict[str, jax.Array]) -> tuple[dict[str, Any], str]:
  """XLA memory analysis of the jitted train step for these shapes (the executable jax reuses),
  and the compiled HLO text (for attributing profile events)."""
  compiled = compile_step(steps, state, batch)
  return memory_analysis(compiled), compiled.as_text()


def _device_peak_mb(device: jax.Device) -> float | None:
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def run(settings: common.BenchSettings, mode: str) -> dict[str, Any]:
  """Benchmark rmjax's train step for one mode; returns the JSON record."""
  if not settings.target:
    return _run(settings, mode)
  with gpu_target.cudnn_checks_for(settings.target):  # the target's capability, not the CPU's
    return _run(settings, mode)


def _run(settings: common.BenchSettings, mode: str) -> dict[str, Any]:
  local = jax.devices()[0]
  device = gpu_target.target_device(settings.target) if settings.target else local
  accelerator = device.platform != "cpu"
  settings = resolve_scan_unroll(settings.on_device(accelerator), mode, "gpu" if settings.target else device.platform)
  if settings.target and not settings.attention:  # "auto" would ask this machine's backend
    cfg = settings.model_config(mode)
    settings = dataclasses.replace(settings, attention=auto_attention_impl(cfg, cfg.compute_dtype, "gpu"))
  cfg = settings.model_config(mode)
  host_batches = common.make_batches(cfg, settings, settings.warmup + settings.steps)
  analysis = layer_extrapolated_flops(settings, mode, local, host_batches[0]) if settings.flops else {}
  if settings.analysis_only:  # compile the real step from shapes only: memory without allocating
    steps, abstract = build_abstract(settings, mode, device)
    analysis |= memory_analysis(compile_step(steps, abstract, abstract_batch(host_batches[0])))
    analysis |= init_memory(settings, mode, device)
    record = {"impl": "rmjax", "mode": mode, "preset": settings.preset, "seq_len": settings.seq_len,
            "batch": settings.batch, "grad_accum": settings.grad_accum, "dtype": settings.dtype,
            "remat": settings.remat_policy,
            "scan_unroll": settings.scan_unroll, "attention_query_block": cfg.attention_query_block,
            "opt_state_dtype": settings.opt_state_dtype, "frozen_dtype": settings.frozen_dtype,
            "attention": cfg.attention_impl or f"auto:{auto_attention_impl(cfg, cfg.compute_dtype)}",
            "attention_mask": cfg.attention_mask, "segment_attention": cfg.segment_attention,
            "device": device.device_kind, "analysis_only": True,
            "target": settings.target or None,
            "model_flops": common.mean_model_flops(cfg, settings, host_batches[:1], mode,
                                                   last_layer_at_queries(cfg)),
            **analysis, **compiled_peak(analysis)}
    return with_ratio(record)
  runtime.reuse_host_memory(device.platform)  # as the launcher does (under --no-isolate, for torch too)
  steps, state, mesh = build(settings, mode, device)
  batches = [device_batch(b, mesh) for b in host_batches]
  memory, hlo_text = compiled_analysis(steps, state, batches[0])
  analysis |= memory | init_memory(settings, mode, device)
  analysis |= compiled_peak(analysis)
  holder = {"state": state}

  def step(batch: dict[str, jax.Array]) -> None:
    new_state, metrics = steps.train_step(holder["state"], batch)
    jax.block_until_ready((new_state, metrics))
    if not bool(metrics["finite"]):
      raise FloatingPointError("rmjax train step produced a non-finite loss or gradient")
    holder["state"] = new_state

  times = common.time_steps(step, batches, settings.warmup, settings.steps)
  if settings.profile_dir:  # one more step, traced (after timing, so tracing costs no timed step)
    from rmjax.bench import profile
    trace_dir = f"{settings.profile_dir}/rmjax-{mode}"
    analysis["profile"] = profile.profile_step(lambda: step(batches[0]), trace_dir, hlo_text)
  if accelerator:
    peak_mem, peak = _device_peak_mb(device), common.peak_flops(device.device_kind)
  else:
    peak_mem, peak = common.host_peak_rss_mb(), None
  trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"].params))
  flops = common.mean_model_flops(cfg, settings, host_batches[settings.warmup:], mode, last_layer_at_queries(cfg))
  record = common.make_record("rmjax", mode, settings, host_batches[0], flops, times, peak_mem, peak,
                            device.device_kind, **analysis, trainable_params=trainable,
                            traces=int(steps.traces["train"]), jax_version=jax.__version__,
                            opt_state_dtype=settings.opt_state_dtype, remat_policy=settings.remat_policy,
                            scan_unroll=settings.scan_unroll, attention_query_block=cfg.attention_query_block,
                            cpu_dot_library=cfg.cpu_dot_library if device.platform == "cpu" else None,
                            attention=cfg.attention_impl or f"auto:{auto_attention_impl(cfg, cfg.compute_dtype)}",
                            attention_mask=cfg.attention_mask, segment_attention=cfg.segment_attention)
  return with_ratio(record)


def with_ratio(record: dict[str, Any]) -> dict[str, Any]:
  """Adds compiled_over_model = compiled_flops / model_flops when both are known."""
  c, m = record.get("compiled_flops"), record.get("model_flops")
  return record | ({"compiled_over_model": round(c / m, 4)} if c and m else {})
