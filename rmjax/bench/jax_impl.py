"""The rmjax side of the benchmark: the real training step, timed on one device.

Why it exists: the number we publish must come from the code users run, not from a
benchmark-only copy. This builds the state with `rmjax.train.state.create_train_state` and
steps it with `rmjax.train.step.make_steps` (the same jitted, donated `train_step` the
training loop uses), for the model shape and batches of `common.py`. Before timing, the step
is lowered and compiled once ahead of time to read XLA's cost and memory analysis; jax reuses
that executable for the jitted calls, so nothing is compiled twice.

`compiled_flops` is XLA's count for the compiled program: it includes remat recomputation
and optimizer arithmetic, but XLA's cost analysis counts a while-loop body ONCE, and the
decoder's layers are an `nn.scan` (a while loop), so it holds one layer, not L of them
(measured: 1, 2 and 4 layers give nearly the same count). It is therefore reported beside,
never instead of, the analytic `model_flops` that MFU uses (GUIDE.md section 4).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rmjax import sharding as shd
from rmjax.bench import common
from rmjax.model.confidence import ConfidenceModel
from rmjax.model.head import HeadConfig
from rmjax.train import optim
from rmjax.train.state import create_train_state
from rmjax.train.step import TRAIN_KEYS, device_batch, make_steps


def optim_config(settings: common.BenchSettings, mode: str) -> optim.OptimConfig:
  """AdamW + clipping as in training; constant lr so the schedule does not matter."""
  return optim.OptimConfig(lr=settings.lr(mode), schedule="constant", warmup_steps=0,
                           max_steps=max(settings.warmup + settings.steps, 1),
                           weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
                           grad_accum_steps=1, loss="mse", mode=mode,
                           frozen_dtype=settings.frozen_dtype if mode == "lora" else "float32")


def build(settings: common.BenchSettings, mode: str, device: jax.Device):
  """(steps, state, mesh) on a one-device mesh."""
  cfg = settings.model_config(mode)
  model = ConfidenceModel(cfg, HeadConfig(hidden_dims=settings.head_dims, activation="gelu",
                                          dropout=settings.dropout))
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), devices=[device])
  opt_cfg = optim_config(settings, mode)
  state, shardings = create_train_state(model, opt_cfg, mesh, jax.random.key(settings.seed))
  return make_steps(model, opt_cfg, mesh, shardings), state, mesh


def compiled_analysis(steps, state, batch: dict[str, jax.Array]) -> dict[str, Any]:
  """XLA cost / memory analysis of the jitted train step for these shapes."""
  with jax.set_mesh(steps.mesh):
    compiled = steps._train.lower(state, {k: batch[k] for k in TRAIN_KEYS}).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
    cost = cost[0] if cost else {}
  mem = compiled.memory_analysis()
  mb = lambda name: None if mem is None else round(getattr(mem, name) / 2**20, 1)
  flops = (cost or {}).get("flops")
  return {"compiled_flops": None if flops is None else float(flops),
          "compiled_flops_note": "XLA count; the scanned layer body is counted once, not per layer",
          "compiled_temp_mb": mb("temp_size_in_bytes"), "compiled_arg_mb": mb("argument_size_in_bytes")}


def _device_peak_mb(device: jax.Device) -> float | None:
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def run(settings: common.BenchSettings, mode: str) -> dict[str, Any]:
  """Benchmark rmjax's train step for one mode; returns the JSON record."""
  device = jax.devices()[0]
  accelerator = device.platform != "cpu"
  settings = settings.on_device(accelerator)
  cfg = settings.model_config(mode)
  steps, state, mesh = build(settings, mode, device)
  host_batches = common.make_batches(cfg, settings, settings.warmup + settings.steps)
  batches = [device_batch(b, mesh) for b in host_batches]
  analysis = compiled_analysis(steps, state, batches[0])
  holder = {"state": state}

  def step(batch: dict[str, jax.Array]) -> None:
    new_state, metrics = steps.train_step(holder["state"], batch)
    jax.block_until_ready((new_state, metrics))
    if not bool(metrics["finite"]):
      raise FloatingPointError("rmjax train step produced a non-finite loss or gradient")
    holder["state"] = new_state

  times = common.time_steps(step, batches, settings.warmup, settings.steps)
  if accelerator:
    peak_mem, peak = _device_peak_mb(device), common.peak_flops(device.device_kind)
  else:
    peak_mem, peak = common.host_peak_rss_mb(), None
  trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"].params))
  flops = common.mean_model_flops(cfg, settings, host_batches[settings.warmup:], mode)
  return common.make_record("rmjax", mode, settings, host_batches[0], flops, times, peak_mem, peak,
                            device.device_kind, **analysis, trainable_params=trainable,
                            traces=int(steps.traces["train"]), jax_version=jax.__version__)
