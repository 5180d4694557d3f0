"""A tiny fake training run (HF base model + run dir + orbax checkpoint) for export/score/evaluate tests.

The checkpoint is not trained: its LoRA B matrices, marker row, head and (full mode) some base
weights are perturbed away from their init, so a round trip that drops any of them is caught.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import traverse_util

import _hf_tiny as H
from rmjax import sharding as shd
from rmjax.checkpoint import CheckpointConfig, Checkpointer
from rmjax.convert import load_hf_backbone
from rmjax.data.render import RenderConfig
from rmjax.model.confidence import ConfidenceModel
from rmjax.model.head import HeadConfig
from rmjax.run_artifacts import save_run_model
from rmjax.tokenizer import build_demo_tokenizer
from rmjax.train import optim
from rmjax.train import state as st

VOCAB = 320
HEAD = HeadConfig(hidden_dims=(16, 8), activation="gelu", dropout=0.1)
RENDER = RenderConfig(template="default", max_length=384, max_steps_per_example=6,
                      length_buckets=(64, 128, 256, 384), max_markers=0)


def make_base(out_dir: pathlib.Path, arch: str = "qwen3", tied: bool = True, seed: int = 0,
              spare_rows: bool = True) -> pathlib.Path:
  """A random fp32 HF model + the demo tokenizer (vocab 320, so the marker has a row; with
  spare_rows=False a tokenizer without the marker and exactly its rows, so adding the marker
  grows the vocabulary, as for Llama 3)."""
  tok = build_demo_tokenizer(vocab_size=VOCAB - 16, marker=spare_rows)
  assert len(tok) <= VOCAB
  H.build(arch, out_dir, seed=seed, vocab_size=VOCAB if spare_rows else len(tok), tied=tied)
  tok.save_pretrained(str(out_dir))
  return out_dir


def _perturb(params: dict, mode: str, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for k, v in flat.items():
    v = np.asarray(v)
    name = k[-1]
    bump = name in ("lora_a", "lora_b", "marker") or k[0] == "head"
    if mode == "full" and k[0] == "decoder" and name in ("kernel", "scale", "embedding"):
      bump = True
    if bump:
      if k[0] == "head" and name == "kernel":  # O(1) logits, so score differences are visible
        scale = 1.5 / np.sqrt(v.shape[0])
      elif name in ("lora_b", "marker"):
        scale = 0.2
      else:
        scale = 0.05 * (np.std(v) + 0.1)
      v = (v + scale * rng.standard_normal(v.shape)).astype(v.dtype)
    out[k] = v
  return traverse_util.unflatten_dict(out)


def make_run(run_dir: pathlib.Path, base_dir: pathlib.Path, mode: str = "lora", rank: int = 4,
             step: int = 7, seed: int = 1, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
             base_name: str | None = None, later_steps: tuple[int, ...] = ()) -> dict:
  """Write run_dir/model + run_dir/checkpoints/checkpoint_step_<step> (val loss 0.25, the best;
  `later_steps` are saved too with worse losses); returns the full params. `base_name` is the
  base model name recorded in the run (default: base_dir; "demo" = no HF base)."""
  dec, cfg, tok = load_hf_backbone(base_dir, "float32")
  cfg = cfg.replace(compute_dtype="float32", lora_rank=rank if mode == "lora" else 0,
                    lora_alpha=8.0, lora_targets=tuple(targets))
  model = ConfidenceModel(cfg, HEAD)
  rand = jax.tree.map(np.asarray, model.init({"params": jax.random.PRNGKey(seed)}, *st.dummy_inputs())["params"])
  flat = traverse_util.flatten_dict(rand)
  for k, v in traverse_util.flatten_dict(dec).items():
    flat[("decoder",) + k] = np.asarray(v, np.float32)
  params = _perturb(traverse_util.unflatten_dict(flat), mode, seed)
  ocfg = optim.OptimConfig(lr=1e-3, max_steps=10, mode=mode)
  mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  state, _ = st.create_train_state(model, ocfg, mesh, jax.random.PRNGKey(seed), init_params=params)
  state = state.replace(step=state.step + step)
  with Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False)) as ck:
    ck.save(step, state, val_loss=0.25)
    for later in later_steps:
      ck.save(later, state, val_loss=0.5)
  save_run_model(run_dir, cfg, HEAD, RENDER, tok, base_name or str(base_dir), mode)
  return params
