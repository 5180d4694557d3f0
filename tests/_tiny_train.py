"""The tiny ConfidenceModel, random batches and train-state set-up the train-step and
optimizer tests share (8 fake CPU devices from conftest.py, compute in float32)."""

import jax
import numpy as np

from rmjax import sharding as shd
from rmjax.model.confidence import ConfidenceModel
from rmjax.model.config import ModelConfig
from rmjax.model.head import HeadConfig
from rmjax.train import optim
from rmjax.train import state as st
from rmjax.train import step as sp


VOCAB, MARKER = 64, 5


def tiny_model(lora_rank: int = 0, dropout: float = 0.0, compute_dtype: str = "float32",
               cpu_dot_library: str = ModelConfig.cpu_dot_library) -> ConfidenceModel:
  mc = ModelConfig.tiny("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, lora_rank=lora_rank, lora_alpha=8.0,
                        marker_id=MARKER, compute_dtype=compute_dtype, cpu_dot_library=cpu_dot_library)
  return ConfidenceModel(mc, HeadConfig(hidden_dims=(16,), dropout=dropout))


def make_batch(seed: int, rows: int = 8, seq: int = 16, slots: int = 3) -> dict[str, np.ndarray]:
  """Random rows with trailing padding, markers at valid positions, some empty slots."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(seq // 2, seq + 1, rows)
  valid = np.arange(seq)[None, :] < lengths[:, None]
  ids = np.where(valid, rng.integers(6, VOCAB, (rows, seq)), 0).astype(np.int32)
  pos = np.sort(rng.integers(1, seq // 2, (rows, slots)), axis=1).astype(np.int32)
  ids[np.arange(rows)[:, None], pos] = MARKER
  mask = (rng.random((rows, slots)) < 0.8).astype(np.float32)
  mask[0, 0] = 1.0
  return {
    "input_ids": ids,
    "positions": np.where(valid, np.arange(seq)[None, :], 0).astype(np.int32),
    "segment_ids": valid.astype(np.int32),
    "marker_positions": np.where(mask > 0, pos, 0).astype(np.int32),
    "targets": np.where(mask > 0, rng.integers(0, 2, (rows, slots)), 0).astype(np.float32),
    "target_mask": mask,
  }


def setup(mode="full", k=1, mesh_cfg=(2, 2, 2), devices=None, lora_rank=0, dropout=0.0,
          compute_dtype="float32", cpu_dot_library=ModelConfig.cpu_dot_library, **cfg_kw):
  model = tiny_model(lora_rank=lora_rank, dropout=dropout, compute_dtype=compute_dtype, cpu_dot_library=cpu_dot_library)
  cfg = optim.OptimConfig(**({"lr": 1e-3, "warmup_steps": 2, "max_steps": 20, "mode": mode,
                              "grad_accum_steps": k} | cfg_kw))
  mesh = shd.make_mesh(shd.MeshConfig(*mesh_cfg), devices=devices)
  state, shardings = st.create_train_state(model, cfg, mesh, jax.random.PRNGKey(0))
  return model, cfg, mesh, state, sp.make_steps(model, cfg, mesh, shardings)


def snapshot(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
