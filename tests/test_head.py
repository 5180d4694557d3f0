"""Confidence head (init, torch Sequential layout, dropout) and the full ConfidenceModel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rmjax.model.config import ModelConfig
from rmjax.model.confidence import ConfidenceModel
from rmjax.model.head import ConfidenceHead, HeadConfig, torch_layer_names
from rmjax.model.transformer import Decoder


def _init_head(cfg: HeadConfig, d: int = 64, seed: int = 0):
  return ConfidenceHead(cfg).init(jax.random.key(seed), jnp.zeros((1, d)))["params"]


def test_initial_predictions_near_half():
  cfg = HeadConfig()
  params = _init_head(cfg, d=64)
  x = 3.0 * jax.random.normal(jax.random.key(1), (256, 64))  # hidden-state-like scale
  p = jax.nn.sigmoid(ConfidenceHead(cfg).apply({"params": params}, x))
  assert p.shape == (256, 1)
  assert float(jnp.abs(p - 0.5).max()) < 0.02
  assert float(jnp.std(p)) > 0  # the final layer is small, not dead: the input still matters


def test_layout_matches_torch_sequential():
  cfg = HeadConfig(hidden_dims=(48, 16))
  params = _init_head(cfg, d=32)
  names = torch_layer_names(cfg)
  assert names == ["linear_0", "linear_3", "linear_6"] and set(params) == set(names)
  seq = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Dropout(0.1),
                            torch.nn.Linear(48, 16), torch.nn.GELU(), torch.nn.Dropout(0.1),
                            torch.nn.Linear(16, 1)).eval()
  state = {}
  for name in names:
    idx = name.split("_")[1]
    state[f"{idx}.weight"] = torch.tensor(np.asarray(params[name]["kernel"]).T)
    state[f"{idx}.bias"] = torch.tensor(np.asarray(params[name]["bias"]))
  seq.load_state_dict(state)  # strict: the key set must be exactly Sequential's
  x = np.random.default_rng(0).normal(0, 3, (10, 32)).astype(np.float32)
  ours = np.asarray(ConfidenceHead(cfg).apply({"params": params}, x))
  with torch.no_grad():
    theirs = seq(torch.tensor(x)).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-5)


def test_gelu_is_exact_not_tanh():
  cfg = HeadConfig(hidden_dims=(8,), dropout=0.0)
  params = jax.tree.map(jnp.ones_like, _init_head(cfg, d=1))
  x = jnp.array([[-2.0]])
  out = float(ConfidenceHead(cfg).apply({"params": params}, x)[0, 0])
  expected = 8 * float(torch.nn.functional.gelu(torch.tensor(-1.0))) + 1  # Dense(1->8) of -2+1 = -1
  assert out == pytest.approx(expected, abs=1e-6)
  assert out != pytest.approx(8 * float(torch.nn.functional.gelu(torch.tensor(-1.0), approximate="tanh")) + 1, abs=1e-6)


def test_dropout_only_in_training():
  cfg = HeadConfig(hidden_dims=(64,), dropout=0.5)
  params = _init_head(cfg, d=16)
  x = jnp.ones((4, 16))
  head = ConfidenceHead(cfg)
  a = head.apply({"params": params}, x, deterministic=True)
  b = head.apply({"params": params}, x, deterministic=True)
  c = head.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  d = head.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(c, a) and not np.allclose(c, d)


def test_bad_head_config():
  with pytest.raises(ValueError, match="activation"):
    HeadConfig(activation="swishy")
  with pytest.raises(ValueError, match="dropout"):
    HeadConfig(dropout=1.0)


def test_confidence_model_gathers_marker_hidden_states():
  mcfg = ModelConfig.tiny("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, head_dim=8, marker_id=9)
  hcfg = HeadConfig(hidden_dims=(16,))
  model = ConfidenceModel(mcfg, hcfg)
  ids = np.array([[4, 9, 5, 9, 0, 0], [7, 7, 9, 0, 0, 0]], np.int32)
  seg = (ids > 0).astype(np.int32)
  pos = np.where(seg > 0, np.arange(6), 0).astype(np.int32)
  markers = np.array([[1, 3], [2, 0]], np.int32)
  params = model.init(jax.random.key(0), ids, pos, seg, markers)["params"]
  assert set(params) == {"decoder", "head"} and "marker" in params["decoder"]["embed"]
  logits = model.apply({"params": params}, ids, pos, seg, markers)
  assert logits.shape == (2, 2) and logits.dtype == jnp.float32
  hidden = Decoder(mcfg).apply({"params": params["decoder"]}, ids, pos, seg)
  expected = ConfidenceHead(hcfg).apply({"params": params["head"]}, hidden[np.arange(2)[:, None], markers])[..., 0]
  np.testing.assert_allclose(logits, expected, atol=1e-6)
  train = model.apply({"params": params}, ids, pos, seg, markers, deterministic=False,
                      rngs={"dropout": jax.random.key(3)})
  assert train.shape == (2, 2) and not np.allclose(train, logits)
