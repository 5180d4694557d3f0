"""Tiny random transformers models (built in-process, never downloaded) for model tests."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

_CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2Model"),
            "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaModel")}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def hf_config(arch: str, heads: int = 4, kv_heads: int = 2, tied: bool = False, **kw) -> transformers.PretrainedConfig:
  cls = getattr(transformers, _CLASSES[arch][0])
  args = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads,
              max_position_embeddings=128, tie_word_embeddings=tied, attn_implementation="eager")
  return cls(**(args | kw))


def build(arch: str, out_dir: pathlib.Path | None = None, bare: bool = False, seed: int = 0,
          max_shard_size: str | None = None, **kw) -> torch.nn.Module:
  """A random fp32 model with non-trivial norms/biases (so the mapping of each tensor matters)."""
  torch.manual_seed(seed)
  cfg = hf_config(arch, **kw)
  model = getattr(transformers, _CLASSES[arch][2 if bare else 1])(cfg).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith(".bias"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
  if out_dir is not None:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
  return model


def hidden_states(model: torch.nn.Module, ids: np.ndarray, positions: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
  base = model.model if hasattr(model, "model") else model
  with torch.no_grad():
    out = base(input_ids=torch.as_tensor(ids, dtype=torch.long),
               position_ids=torch.as_tensor(positions, dtype=torch.long),
               attention_mask=torch.as_tensor(attention_mask, dtype=torch.long))
  return out.last_hidden_state.float().numpy()


def padded_batch(lengths: list[int], total: int, left: bool, vocab: int = 200, seed: int = 0):
  """ids, positions, segment_ids (1 = real, 0 = pad) for right or left padding."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), total), np.int32)
  pos = np.zeros_like(ids)
  seg = np.zeros_like(ids)
  for b, n in enumerate(lengths):
    sl = slice(total - n, total) if left else slice(0, n)
    ids[b, sl] = rng.integers(1, vocab, n)
    pos[b, sl] = np.arange(n)
    seg[b, sl] = 1
  return ids, pos, seg
