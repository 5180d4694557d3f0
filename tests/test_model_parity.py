"""rmjax Decoder vs transformers: hidden states equal to 1e-5 (fp32), never loosened.

Tiny random HF models are built in-process (tests/_hf_tiny.py), saved with save_pretrained and
loaded with rmjax.model.hf.load_hf_params. Cases cover Qwen3 (qk-norm, tied/untied, bare
Qwen3Model, sharded checkpoint), Qwen2 (q/k/v biases), Llama (llama3 rope scaling, attention
bias incl. o_proj) and GQA ratios 1, 2 and 4; each with right and left padding.
"""

import functools

import numpy as np
import pytest

import _hf_tiny as H
from _jaxpr import equations
import jax
import jax.numpy as jnp

from rmjax.model.config import ModelConfig
from rmjax.model.hf import load_hf_params
from rmjax.model.transformer import Decoder, init_params

TOL = 1e-5
CASES = {
  # name: (arch, build kwargs)
  "qwen3_untied_gqa2": ("qwen3", dict(heads=4, kv_heads=2)),
  "qwen3_tied_gqa4_bare_sharded": ("qwen3", dict(heads=4, kv_heads=1, tied=True, bare=True, max_shard_size="40KB")),
  "qwen2_bias_gqa1": ("qwen2", dict(heads=4, kv_heads=4)),
  "llama_rope3_bias_gqa2": ("llama", dict(heads=4, kv_heads=2, rope_parameters=H.LLAMA3_ROPE, attention_bias=True)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  arch, kw = CASES[request.param]
  out = tmp_path_factory.mktemp(request.param)
  model = H.build(arch, out, **kw)
  if "max_shard_size" in kw:
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
  cfg = ModelConfig.from_hf(out)
  return model, cfg, load_hf_params(out, cfg), out


@functools.cache
def _decoder(cfg: ModelConfig):
  """The jitted Decoder(cfg).apply, one per config, so repeated calls of one shape compile once."""
  return jax.jit(Decoder(cfg).apply)


def _apply(cfg, params, ids, pos, seg):
  return np.asarray(_decoder(cfg)({"params": params}, ids, pos, seg))


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_hidden_states_match_transformers(case, left):
  model, cfg, params, _ = case
  ids, pos, seg = H.padded_batch([9, 5, 2, 7], 9, left)
  pos[3] += 40 * (seg[3] > 0)  # a row whose positions start late exercises rope further out
  ref = H.hidden_states(model, ids, pos, seg)
  out = _apply(cfg, params, ids, pos, seg)
  real = seg > 0
  assert np.isfinite(out).all(), "padded rows must not produce NaN/inf"
  assert np.abs(out[real] - ref[real]).max() <= TOL


def test_packed_segments_equal_separate_sequences(case):
  """Two examples packed in one row == each run alone by transformers."""
  model, cfg, params, _ = case
  rng = np.random.default_rng(1)
  a, b = rng.integers(1, 200, 4), rng.integers(1, 200, 3)
  ids = np.array([[*a, *b, 0]], np.int32)
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0]], np.int32)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]], np.int32)
  out = _apply(cfg, params, ids, pos, seg)[0]
  ref_a = H.hidden_states(model, a[None], np.arange(4)[None], np.ones((1, 4)))[0]
  ref_b = H.hidden_states(model, b[None], np.arange(3)[None], np.ones((1, 3)))[0]
  assert np.abs(out[:4] - ref_a).max() <= TOL
  assert np.abs(out[4:7] - ref_b).max() <= TOL


def test_bf16_close_to_fp32(case):
  """bf16 params + compute: relative L2 error of hidden states below 3% (bf16 has ~3 digits)."""
  _, cfg, params, path = case
  cfg16 = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
  params16 = load_hf_params(path, cfg16, "bfloat16")
  assert params16["embed"]["embedding"].dtype == jnp.bfloat16
  ids, pos, seg = H.padded_batch([9, 6], 9, left=True)
  ref = _apply(cfg, params, ids, pos, seg)
  out = _apply(cfg16, params16, ids, pos, seg).astype(np.float32)
  real = seg > 0
  rel = np.linalg.norm(out[real] - ref[real]) / np.linalg.norm(ref[real])
  print(f"bf16 relative error {rel:.4f}")
  assert np.isfinite(out).all() and rel < 3e-2, rel


# -- model behaviour without transformers ------------------------------------------------------------
def _tiny(**kw):
  cfg = ModelConfig.tiny("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, head_dim=8, **kw)
  return cfg, init_params(cfg, jax.random.key(0))


def test_padding_does_not_change_real_tokens():
  """Whatever the padding holds (ids, positions), before or after the real tokens, the same
  program gives bit-identical real hidden states. Adding padding changes the length, so XLA may
  pick other kernels and sum in another order (1.5e-6 seen on an AVX2-only CPU): against the
  unpadded call the fp32 parity tolerance holds."""
  cfg, params = _tiny()
  ids, pos, seg = H.padded_batch([5], 5, left=False, vocab=64)
  short = _apply(cfg, params, ids, pos, seg)[0]

  def padded(fill, pad_pos, left):
    cat = lambda real, pad: np.concatenate([pad, real] if left else [real, pad], 1)
    return (cat(ids, np.full((1, 3), fill, np.int32)), cat(pos, np.asarray([pad_pos], np.int32)),
            cat(seg, np.zeros((1, 3), np.int32)))
  for left in (False, True):
    real = slice(3, 8) if left else slice(0, 5)
    out = _apply(cfg, params, *padded(7, [0, 0, 0], left))[0, real]
    np.testing.assert_array_equal(_apply(cfg, params, *padded(60, [9, 3, 5], left))[0, real], out)
    assert np.abs(out - short).max() <= TOL, left


def test_attention_is_declared_causal_besides_the_segment_mask(monkeypatch):
  """cuDNN skips the blocks above the diagonal only when told is_causal; the mask alone selects
  its NO_MASK kernel (all T x T scores). The call is recorded, then run by XLA (this is a CPU).
  Values are covered by the parity tests above."""
  from rmjax.model import transformer
  calls, real = [], jax.nn.dot_product_attention
  monkeypatch.setattr(transformer.jax.nn, "dot_product_attention",
                      lambda *a, **kw: calls.append(kw) or real(*a, **(kw | {"implementation": "xla"})))
  cfg, params = _tiny(attention_impl="cudnn", segment_attention="mask")
  _apply(cfg, params, *H.padded_batch([5, 3], 5, left=False, vocab=64))
  assert calls and all(kw["is_causal"] and kw["mask"] is not None and kw["implementation"] == "cudnn"
                       for kw in calls)


def test_dots_and_attention_policy_saves_cudnn_attention_and_dots_only():
  from rmjax.model import transformer
  policy = transformer._REMAT_POLICIES["dots_and_attention_saveable"]
  f32 = jax.core.ShapedArray((8, 8), jnp.float32)
  cudnn_fwd = type("Prim", (), {"name": "dot_product_attention_fwd_wrapper"})()
  assert policy(cudnn_fwd, f32, f32, f32)
  assert policy(jax.lax.dot_general_p, f32, f32, dimension_numbers=(((1,), (0,)), ((), ())))
  assert not policy(jax.lax.dot_general_p, f32, f32, dimension_numbers=(((1,), (0,)), ((0,), (0,))))
  assert not policy(jax.lax.exp_p, f32)


@pytest.mark.parametrize("remat", ["projections_and_attention_saveable", "mlp_projections_saveable"])
def test_projection_policies_save_their_named_outputs_per_layer_and_no_other_dot(capsys, remat):
  """With LoRA a projection is three dots; these policies save only named outputs (the sum):
  q, k, v, o, gate and up per layer, or the MLP's gate and up alone (down_proj's output and the
  rank-r products are never saved). On CPU attention is XLA's, so no cuDNN output is saved here."""
  cfg, _ = _tiny()
  cfg = cfg.replace(remat=remat, lora_rank=2)
  params = init_params(cfg, jax.random.key(0))
  ids, pos, seg = H.padded_batch([6, 3], 6, left=False, vocab=64)
  jax.ad_checkpoint.print_saved_residuals(lambda p: jnp.sum(Decoder(cfg).apply({"params": p}, ids, pos, seg)), params)
  stacked = sorted(line.split()[0] for line in capsys.readouterr().out.splitlines() if "output of scan" in line)
  tokens, layers = 2 * 6, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  mlp = [cfg.intermediate_size, cfg.intermediate_size]
  widths = {"projections_and_attention_saveable": [q, kv, kv, cfg.hidden_size, *mlp],
            "mlp_projections_saveable": mlp}[remat]
  carries = [f"f32[{layers},2,6,{cfg.hidden_size}]", f"f32[2,6,{cfg.hidden_size}]"]  # layer inputs, final output
  assert stacked == sorted([f"f32[{layers},{tokens},{w}]" for w in widths] + carries)


_W_BTD = jax.random.normal(jax.random.key(2), (2, 6, 32))  # not sum(h**2): RMSNorm makes that ~constant


def _hidden_loss_and_grads(cfg, params):
  """Hidden states, loss sum(h * W) and its gradients for the (2, 6) batch, one compiled call."""
  ids, pos, seg = H.padded_batch([6, 3], 6, left=False, vocab=64)

  def loss(p):
    h = Decoder(cfg).apply({"params": p}, ids, pos, seg)
    return jnp.sum(h * _W_BTD), h
  (value, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(hidden), float(value), jax.tree.map(np.asarray, grads)


@functools.cache
def _without_remat():
  cfg, params = _tiny()
  return _hidden_loss_and_grads(cfg, params)


@pytest.mark.parametrize("remat", ["full", "dots_saveable", "save_dots_no_batch", "dots_and_attention_saveable",
                                   "projections_and_attention_saveable", "mlp_projections_saveable"])
def test_remat_policies_same_values_and_grads(remat):
  cfg, params = _tiny()
  h0, v0, g0 = _without_remat()
  h1, v1, g1 = _hidden_loss_and_grads(cfg.replace(remat=remat), params)
  # Remat changes the fusion and so the order of fp32 sums: the loss sums 384 terms of total
  # magnitude ~260 to ~3.8 (1.8e-6 relative seen on an AVX-512 CPU, with identical terms).
  np.testing.assert_allclose(h1, h0, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(v1, v0, rtol=TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * np.abs(b).max()), g1, g0)


@pytest.mark.parametrize("remat", ["none", "dots_and_attention_saveable"])
def test_unrolled_layers_same_params_values_and_grads(remat):
  """scan_unroll=0 (no layer loop) is a compilation choice: same weights from the same key,
  same hidden states and gradients (to the fp32 summation order), LoRA included. The weights are
  compared as a run draws them, under jit (train/state.py): op by op, a random transform may round
  differently than in the layer loop's compiled body (tests/_xla_env.py's emitters)."""
  cfg, params = _tiny(num_layers=3, lora_rank=4, remat=remat)
  unrolled = cfg.replace(scan_unroll=0)
  jitted_init = lambda c: jax.jit(functools.partial(init_params, c))(jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, jitted_init(unrolled), jitted_init(cfg))
  params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape), params)  # LoRA B != 0
  h0, v0, g0 = _hidden_loss_and_grads(cfg, params)
  h1, v1, g1 = _hidden_loss_and_grads(unrolled, params)
  np.testing.assert_allclose(h1, h0, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(v1, v0, rtol=TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * np.abs(b).max()), g1, g0)
  with pytest.raises(ValueError, match="scan_unroll"):
    cfg.replace(scan_unroll=-1)


@pytest.mark.parametrize("remat,mask", [("none", "segments"), ("full", "causal")])
def test_query_rows_last_layer_same_values_and_grads_and_fewer_flops(remat, mask):
  """With query positions and the layers unrolled, the last layer runs at those rows only: the
  same hidden states at those rows and the same gradients as the full output's rows (to the fp32
  summation order: the products have other shapes), LoRA and packed rows included, for fewer
  FLOPs. Slot 0 stands for a padded marker slot."""
  cfg, params = _tiny(num_layers=3, lora_rank=4, remat=remat, scan_unroll=0, attention_mask=mask)
  params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape), params)  # LoRA B != 0
  ids, pos, seg = H.padded_batch([8, 3], 8, left=False, vocab=64)
  seg[0, 4:] = 2  # two examples packed in row 0
  pos[0, 4:] -= 4
  queries = np.array([[1, 3, 5, 7], [2, 0, 0, 0]], np.int32)
  weights_BMD = jax.random.normal(jax.random.key(4), (2, 4, 32))

  def loss(p, rows_only):
    if rows_only:
      h = Decoder(cfg).apply({"params": p}, ids, pos, seg, query_positions_BM=queries)
    else:
      h = jnp.take_along_axis(Decoder(cfg).apply({"params": p}, ids, pos, seg), queries[..., None], axis=1)
    return jnp.sum(h * weights_BMD), h
  results = []
  for rows_only in (True, False):
    step = jax.jit(jax.value_and_grad(functools.partial(loss, rows_only=rows_only), has_aux=True))
    results.append((step(params), step.lower(params).compile().cost_analysis()["flops"]))
  ((v1, h1), g1), flops_rows = results[0]
  ((v0, h0), g0), flops_full = results[1]
  np.testing.assert_allclose(h1, h0, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(v1, v0, rtol=TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * np.abs(b).max()), g1, g0)
  # 4 of 8 rows in 1 of 3 layers: the projections skip half of that layer's rows
  assert flops_rows < 0.95 * flops_full, (flops_rows, flops_full)


def test_unrolled_layers_gradient_concatenates_the_layers_into_the_stack():
  """The unrolled layers take their weights out of the stack by one split per leaf, so the stacked
  gradient is one concatenate of the layers' gradients, never a layer's gradient padded to the
  whole stack and summed (indexing each layer would give that: a pad per layer and leaf)."""
  cfg, params = _tiny(num_layers=3, lora_rank=4, scan_unroll=0)
  ids, pos, seg = H.padded_batch([8, 3], 8, left=False, vocab=64)
  queries = np.array([[1, 3, 5, 7], [2, 0, 0, 0]], np.int32)
  loss = lambda p: jnp.sum(Decoder(cfg).apply({"params": p}, ids, pos, seg, query_positions_BM=queries))
  eqns = list(equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
  stack_shapes = {leaf.shape for leaf in jax.tree.leaves(params["layers"])}
  out_shapes = lambda name: [v.aval.shape for e in eqns if e.primitive.name == name for v in e.outvars]
  assert not stack_shapes & set(out_shapes("pad")), out_shapes("pad")
  assert stack_shapes <= set(out_shapes("concatenate")), (stack_shapes, out_shapes("concatenate"))


def _strip_lora(tree):
  return {k: _strip_lora(v) if isinstance(v, dict) else v for k, v in tree.items()
          if k not in ("lora_a", "lora_b")}


def test_lora_starts_as_identity_and_then_matters():
  cfg, _ = _tiny()
  lcfg = cfg.replace(lora_rank=4, lora_targets=("q_proj", "v_proj", "down_proj"))
  lparams = jax.tree.map(np.asarray, init_params(lcfg, jax.random.key(1)))
  assert lparams["layers"]["attn"]["q_proj"]["lora_a"].shape == (2, 32, 4)
  assert lparams["layers"]["mlp"]["down_proj"]["lora_b"].shape == (2, 4, 32)
  assert "lora_a" not in lparams["layers"]["attn"]["k_proj"]
  ids, pos, seg = H.padded_batch([6], 6, left=False, vocab=64)
  base = _apply(cfg, _strip_lora(lparams), ids, pos, seg)
  np.testing.assert_allclose(_apply(lcfg, lparams, ids, pos, seg), base, atol=1e-6)
  lparams["layers"]["attn"]["v_proj"]["lora_b"] = np.ones_like(lparams["layers"]["attn"]["v_proj"]["lora_b"])
  assert np.abs(_apply(lcfg, lparams, ids, pos, seg) - base).max() > 1e-3


def test_marker_param_replaces_marker_embedding():
  cfg, params = _tiny()
  mcfg = cfg.replace(marker_id=3)
  marker = np.random.default_rng(0).normal(size=32).astype(np.float32)
  mparams = {**params, "embed": {"embedding": params["embed"]["embedding"], "marker": marker}}
  ids = np.array([[5, 3, 9, 3]], np.int32)
  pos, seg = np.arange(4, dtype=np.int32)[None], np.ones((1, 4), np.int32)
  table = np.asarray(params["embed"]["embedding"]).copy()
  table[3] = marker
  ref = _apply(cfg, {**params, "embed": {"embedding": table}}, ids, pos, seg)
  np.testing.assert_allclose(_apply(mcfg, mparams, ids, pos, seg), ref, atol=1e-6)
  assert np.abs(_apply(cfg, params, ids, pos, seg) - ref).max() > 1e-3


def test_decoder_param_names():
  cfg, params = _tiny(marker_id=1)
  flat = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert {"embed/embedding", "embed/marker", "final_norm/scale", "layers/input_norm/scale",
          "layers/attn/q_proj/kernel", "layers/attn/q_norm/scale", "layers/attn/k_norm/scale",
          "layers/post_attn_norm/scale", "layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel",
          "layers/mlp/down_proj/kernel"} <= flat
  assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 4 * 8)  # (L, in, out)
