"""The PyTorch reference training step that rmjax is measured against.

Why it exists: "rmjax is N times faster" only means something against a baseline written the
way a competent user of the PyTorch stack writes it, with no deliberate handicap. This is that
baseline, for the same model shape, batches and head as the rmjax side (see `common.py`):

- `transformers` `Qwen3Model` (via `AutoModel.from_config`, random init from a fixed torch
  seed, `attn_implementation="sdpa"`, no LM head), `model.train()`;
- LoRA through `peft` (`LoraConfig(r=16, lora_alpha=32, target q/k/v/o, lora_dropout=0)`),
  the head always fully trained;
- the confidence head: `nn.Sequential(Linear, GELU, Dropout, ..., Linear -> 1)` on the hidden
  state gathered at the marker positions, sigmoid, masked MSE;
- `torch.optim.AdamW(fused=True)` (CUDA and CPU: one pass over each weight, as XLA fuses the
  rmjax side's update; torch's CPU default is the slower per-op loop), gradient clipping at 1.0;
- bf16 autocast when `--dtype bfloat16`; trained parameters stay float32, as on the rmjax side;
- in LoRA mode the frozen base is created in `--frozen-dtype` (bf16 on a GPU by default, as
  rmjax's frozen base is), as a peft user loads it (`from_pretrained(dtype=torch.bfloat16)`),
  and peft keeps the adapters float32 (`autocast_adapter_dtype`); full fine-tuning trains every
  weight, so its parameters stay float32 whatever `--frozen-dtype` says;
- gradient checkpointing (non-reentrant) only with `--remat`;
- `--grad-accum N`: N forward/backward passes over consecutive row blocks of the step's batch,
  gradients summed in `.grad`, each loss divided by the whole batch's supervised markers (so the
  sum is the one-pass loss, as rmjax's accumulation), then one clip and one optimizer step;
- on CPU `torch.set_num_threads` = every core this process may use.

Known difference: the rmjax LoRA mode also trains the marker's embedding row; peft's plain
LoRA leaves the embedding frozen (a one-row gradient, negligible in cost).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from rmjax.bench import common
from rmjax.model.config import ModelConfig


def _torch():
  import torch
  return torch


def hf_config(cfg: ModelConfig):
  """The transformers Qwen3Config/Qwen2Config/LlamaConfig for an rmjax ModelConfig."""
  from transformers import AutoConfig
  d = cfg.to_hf(dtype="float32")
  d.pop("architectures")
  return AutoConfig.for_model(d.pop("model_type"), **d)


def build_head(hidden_size: int, head_dims: tuple[int, ...], dropout: float):
  nn = _torch().nn
  layers, width = [], hidden_size
  for dim in head_dims:
    # exact (erf) GELU, as the rmjax head's default "gelu" activation.
    layers += [nn.Linear(width, dim), nn.GELU(), nn.Dropout(dropout)]
    width = dim
  layers.append(nn.Linear(width, 1))
  return nn.Sequential(*layers)


class ConfidenceModel:
  """Backbone + head + loss, the forward a user writes around a HF model."""

  def __init__(self, backbone, head):
    self.backbone, self.head = backbone, head

  def loss(self, batch: dict[str, Any], denom=None):
    """Masked MSE summed over `batch`'s markers, over `denom` (default: its own marker count)."""
    torch = _torch()
    hidden_BTD = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["positions"], use_cache=False).last_hidden_state
    index_BMD = batch["marker_positions"].long()[..., None].expand(-1, -1, hidden_BTD.shape[-1])
    # float32 into the head: a bf16 frozen base's hidden states meet the float32 head (under
    # autocast its matmuls run in bf16 either way).
    logits_BM = self.head(torch.gather(hidden_BTD, 1, index_BMD).float()).squeeze(-1)
    probs_BM = torch.sigmoid(logits_BM.float())
    mask_BM = batch["target_mask"]
    denom = mask_BM.sum().clamp_min(1.0) if denom is None else denom
    return ((probs_BM - batch["targets"]) ** 2 * mask_BM).sum() / denom


def build(settings: common.BenchSettings, mode: str, device: str):
  """(model, trainable parameters) for one mode, initialised from the fixed seed."""
  torch = _torch()
  from transformers import AutoModel
  cfg = settings.model_config(mode)
  torch.manual_seed(settings.seed)
  frozen = torch.bfloat16 if mode == "lora" and settings.frozen_dtype == "bfloat16" else torch.float32
  backbone = AutoModel.from_config(hf_config(cfg), attn_implementation="sdpa", dtype=frozen)
  if settings.remat_policy != "none":
    enable = getattr(backbone, "activation_checkpointing_enable", None)
    if enable is not None:
      enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
      backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  if mode == "lora":
    from peft import LoraConfig, get_peft_model
    backbone = get_peft_model(backbone, LoraConfig(
      r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
      target_modules=list(cfg.lora_targets)))
  head = build_head(cfg.hidden_size, settings.head_dims, settings.dropout)
  backbone.to(device).train()
  head.to(device).train()
  params = [p for p in (*backbone.parameters(), *head.parameters()) if p.requires_grad]
  return ConfidenceModel(backbone, head), params


def to_device(batch: dict[str, np.ndarray], device: str) -> dict[str, Any]:
  torch = _torch()
  out = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
  out["attention_mask"] = (out["segment_ids"] > 0).long()
  return out


def backward_micro_batches(model: ConfidenceModel, batch: dict[str, Any], n: int, autocast):
  """Accumulates into `.grad` the gradient of the whole batch's loss in `n` forward/backward
  passes over consecutive row blocks; returns the loss (detached)."""
  denom = batch["target_mask"].sum().clamp_min(1.0)
  rows = batch["input_ids"].shape[0] // n
  total = 0.0
  for i in range(n):
    micro = {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}
    with autocast():
      loss = model.loss(micro, denom)
    loss.backward()
    total = total + loss.detach()
  return total


def make_step(model: ConfidenceModel, params, settings: common.BenchSettings, mode: str, device: str):
  """One optimizer step on a device batch; blocks until the device has finished it."""
  torch = _torch()
  cuda = device.startswith("cuda")
  opt = torch.optim.AdamW(params, lr=settings.lr(mode), weight_decay=settings.weight_decay, fused=True)
  amp = settings.dtype == "bfloat16"
  autocast = functools.partial(torch.autocast, device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                               enabled=amp)

  def step(batch: dict[str, Any]) -> None:
    opt.zero_grad(set_to_none=True)
    loss = backward_micro_batches(model, batch, settings.grad_accum, autocast)
    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    opt.step()
    if cuda:
      torch.cuda.synchronize()
    if not torch.isfinite(loss):
      raise FloatingPointError("torch reference produced a non-finite loss")

  return step


def pick_device() -> str:
  return "cuda" if _torch().cuda.is_available() else "cpu"


def run(settings: common.BenchSettings, mode: str) -> dict[str, Any]:
  """Benchmark the reference step for one mode; returns the JSON record."""
  torch = _torch()
  device = pick_device()
  settings = settings.on_device(device.startswith("cuda"))
  if device == "cpu":
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  cfg = settings.model_config(mode)
  model, params = build(settings, mode, device)
  host_batches = common.make_batches(cfg, settings, settings.warmup + settings.steps)
  batches = [to_device(b, device) for b in host_batches]
  step = make_step(model, params, settings, mode, device)
  if device.startswith("cuda"):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  times = common.time_steps(step, batches, settings.warmup, settings.steps)
  if device.startswith("cuda"):
    name = torch.cuda.get_device_name()
    peak_mem, peak = torch.cuda.max_memory_allocated() / 2**20, common.peak_flops(name)
  else:
    name, peak_mem, peak = "cpu", common.host_peak_rss_mb(), None
  flops = common.mean_model_flops(cfg, settings, host_batches[settings.warmup:], mode)
  return common.make_record("torch", mode, settings, host_batches[0], flops, times, peak_mem, peak, name,
                            trainable_params=sum(p.numel() for p in params), torch_version=torch.__version__,
                            frozen_dtype=settings.frozen_dtype if mode == "lora" else None)
