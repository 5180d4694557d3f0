"""The decoder backbone (Qwen3 / Qwen2 / Llama) in Flax linen, hidden states only.

Why it exists: transformers 5 has no Flax models, so the JAX decoder is ours. It must match
transformers' hidden states to 1e-5 in fp32 (tests/test_model_parity.py), train with LoRA,
and compile fast for deep models. Hence:
  * layers stacked with `nn.scan` (one compiled layer body; params carry a leading layer axis),
    optional `nn.remat` per layer with a named checkpoint policy; `scan_unroll=0` unrolls the
    loop (same params), so a GPU's GEMMs read each layer's weights in place: inside the loop
    XLA copies every layer's weights and saved activations out of their stacks;
  * attention through `jax.nn.dot_product_attention` (cuDNN by default on a GPU) or, for XLA,
    model/blocked_attention.py's own, causal and restricted to equal nonzero
    segment ids (0 = padding), which also makes sequence packing correct; or, for packed rows
    under cuDNN with `segment_attention="cudnn_packed"`, cuDNN's packed layout, each example a
    sequence of its own (model/cudnn_attention.py);
  * RoPE from explicit position ids (HF rotate_half layout, llama3/linear scaling; model/rope.py);
  * the `<CONFIDENCE>` marker's embedding row is its own parameter `embed/marker`, so LoRA can
    train it while the embedding matrix stays frozen;
  * no vocabulary logits, ever: the output is the final-normed hidden state, or only the rows
    the caller asks for (the confidence model's markers), whose unrolled last layer then runs
    at those rows alone (Decoder).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from rmjax.model import cudnn_attention
from rmjax.model.blocked_attention import blocked_causal_attention, query_attention
from rmjax.model.config import ModelConfig
from rmjax.model.projection import matmul
from rmjax.model.rope import apply_rope, rope_cos_sin
from rmjax.model.swiglu import swiglu

Array = jax.Array
_EMBED_INIT = nn.initializers.normal(stddev=0.02)
# peft's LoRA A init (kaiming_uniform, a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
_LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# The primitive of jax's cuDNN attention forward (outputs: attention output, softmax log-sum-exp).
_CUDNN_ATTENTION_FWD = frozenset({"dot_product_attention_fwd_wrapper", "dot_product_attention_fwd"})


def _dots_and_attention_saveable(prim, *avals, **params) -> bool:
  """dots_with_no_batch_dims_saveable, plus cuDNN attention's outputs: under the dots policy
  alone the backward pass runs each layer's cuDNN attention forward again (it is a custom call,
  not a dot); saving its output and log-sum-exp costs B*T*H*d + B*H*T values per layer."""
  return (prim.name in _CUDNN_ATTENTION_FWD
          or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


# Proj outputs saved by "projections_and_attention_saveable" (down_proj's feeds only the residual
# sum, whose backward needs no values).
_SAVED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
_save_projections = jax.checkpoint_policies.save_only_these_names(*_SAVED_PROJECTIONS)


def _projections_and_attention_saveable(prim, *avals, **params) -> bool:
  """Each projection's OUTPUT (the LoRA sum included, named in `Proj`) and cuDNN attention's
  outputs; norms, rope, SwiGLU and LoRA's rank-r products are recomputed. Unlike the dots
  policies it does not save every dot's output: under LoRA a projection is three dots (x W,
  x A, (x A) B), two of them full-size, so they save twice the activations a projection needs,
  and the backward pass copies each saved value out of its layer stack."""
  return prim.name in _CUDNN_ATTENTION_FWD or _save_projections(prim, *avals, **params)


# Saved by "mlp_projections_saveable": the MLP's two wide outputs, the layer's largest dots. The
# backward pass recomputes the attention block (its norm, projections and attention) and SwiGLU,
# not the MLP's three dots: about a third of the forward's dot FLOPs at Qwen3-4B's shape (rows of
# 2048) rather than all of them (full remat), for gate + up's 2 x intermediate_size values a token
# and layer.
_SAVED_MLP_PROJECTIONS = ("gate_proj", "up_proj")


_REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
  "full": None,
  "nothing_saveable": None,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "dots_and_attention_saveable": _dots_and_attention_saveable,
  "projections_and_attention_saveable": _projections_and_attention_saveable,
  "mlp_projections_saveable": jax.checkpoint_policies.save_only_these_names(*_SAVED_MLP_PROJECTIONS),
}


def _dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def attention_mask(segment_ids_BT: Array, query_positions_BM: Array | None = None,
                   segments: bool = True) -> Array:
  """(B, 1, M, T) bool, the rows of the queries at `query_positions_BM` (default: every position,
  M = T): causal and, with `segments`, within the query's own nonzero segment. The diagonal is
  always on so padded query rows are never fully masked (no NaN/garbage from any attention
  implementation)."""
  b, t = segment_ids_BT.shape
  if query_positions_BM is None:
    query_positions_BM = jnp.broadcast_to(jnp.arange(t), (b, t))
  key_1T = jnp.arange(t)[None, None, :]
  query_BM1 = query_positions_BM[:, :, None]
  allowed_BMT = key_1T <= query_BM1
  if segments:
    seg_q = jnp.take_along_axis(segment_ids_BT, query_positions_BM, axis=1)[:, :, None]
    seg_k = segment_ids_BT[:, None, :]
    allowed_BMT &= (seg_q == seg_k) & (seg_k != 0)
  return (allowed_BMT | (key_1T == query_BM1))[:, None]


def auto_attention_impl(cfg: ModelConfig, dtype: Any, backend: str | None = None) -> str:
  """The attention implementation when the config leaves it open (attention_impl=None).

  cuDNN's fused attention on a GPU when it applies (fp16/bf16, head_dim a multiple of 8 and at
  most 128: flash attention, no (T, T) score buffers), XLA otherwise (CPU, fp32).
  Decided at trace time from the default backend (or `backend`, when compiling for a GPU that
  is not attached), so one config runs on both platforms.
  """
  cudnn_ok = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
              and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)
  return "cudnn" if cudnn_ok and (backend or jax.default_backend()) == "gpu" else "xla"


def uses_packed_layout(cfg: ModelConfig) -> bool:
  """Whether segments go to cuDNN as its packed layout (else: the mask, or causal only).
  "auto" takes it where it can run: it gives the mask's values to bf16 rounding, faster
  (BUILD.md)."""
  impl = cfg.attention_impl or auto_attention_impl(cfg, cfg.compute_dtype)
  if cfg.attention_mask != "segments" or impl != "cudnn" or cfg.segment_attention == "mask":
    return False
  return cfg.segment_attention == "cudnn_packed" or cudnn_attention.packed_unsupported_reason() is None


def attention_inputs(cfg: ModelConfig, segment_ids_BT: Array, max_segments: int | None) -> Any:
  """What every layer's attention needs besides q, k, v, built once per batch: None (causal
  only), the (B, 1, T, T) segment mask, or, for cuDNN with segment_attention="cudnn_packed",
  the packed layout (seqlen_BS, offsets_BS1) of `cudnn_attention.segment_layout`."""
  if cfg.attention_mask == "causal":
    return None
  if not uses_packed_layout(cfg):
    return attention_mask(segment_ids_BT)
  if max_segments is None:
    raise ValueError("segment_attention='cudnn_packed' needs max_segments (segments per row at most)")
  reason = cudnn_attention.packed_unsupported_reason()
  if reason:
    raise ValueError(f"segment_attention='cudnn_packed': {reason}; use 'mask'")
  return cudnn_attention.segment_layout(segment_ids_BT, max_segments)


def attend(cfg: ModelConfig, q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, inputs: Any) -> Array:
  """Causal attention of one layer, restricted as `attention_inputs` says."""
  scale = cfg.head_dim ** -0.5
  if isinstance(inputs, tuple):
    return cudnn_attention.packed_causal_attention(q_BTNH, k_BTKH, v_BTKH, *inputs, scale)
  impl = cfg.attention_impl or auto_attention_impl(cfg, q_BTNH.dtype)
  if impl == "xla":
    return blocked_causal_attention(q_BTNH, k_BTKH, v_BTKH, inputs, scale, cfg.attention_query_block)
  # is_causal repeats what the mask already says, so results are unchanged; it lets cuDNN skip
  # the blocks above the diagonal instead of computing all T x T scores under a bias (the mask
  # alone gives cuDNN's NO_MASK kernel: about twice the attention FLOPs).
  return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=inputs, scale=scale, is_causal=True,
                                      implementation=impl)


# -- building blocks -----------------------------------------------------------------------------
class RMSNorm(nn.Module):
  """HF RMSNorm: normalise in float32, cast back, multiply by the scale."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), _dtype(self.cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def lora_update(x_TK: Array, a_KR: Array, b_RN: Array, scale: float) -> Array:
  """LoRA's scale * (x A) B, the scale applied to the rank-R product x A: its transpose then
  scales (tokens, R) values in the backward pass, not each projection's (tokens, out) gradient."""
  return matmul(scale * matmul(x_TK, a_KR), b_RN)


class Proj(nn.Module):
  """Linear layer with kernel stored (in, out), optional bias and optional LoRA (A, B).

  The input is flattened to (tokens, in) and the output reshaped back: both are free bitcasts,
  and with 2-D operands XLA's CPU layout assignment does not fuse the SwiGLU backward with a
  strided transpose for the weight gradient, which it writes column by column (GPU gemms are
  2-D either way). The products go through model/projection.py's `matmul`, whose float32
  weight gradient runs on YNNPACK's GEMM on a CPU.
  """
  cfg: ModelConfig
  features: int
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    cfg, pdt, cdt = self.cfg, _dtype(self.cfg.param_dtype), _dtype(self.cfg.compute_dtype)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), pdt)
    y = matmul(x, kernel.astype(cdt))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), pdt).astype(cdt)
    if cfg.lora_rank > 0 and self.name in cfg.lora_targets:
      # LoRA params are float32 whatever param_dtype is: they are the trained weights.
      a = self.param("lora_a", _LORA_A_INIT, (x.shape[-1], cfg.lora_rank), jnp.float32)
      b = self.param("lora_b", nn.initializers.zeros, (cfg.lora_rank, self.features), jnp.float32)
      y = y + lora_update(x, a.astype(cdt), b.astype(cdt), cfg.lora_alpha / cfg.lora_rank)
    # A name for remat policies (identity otherwise): the projection's output, LoRA included.
    return checkpoint_name(y, self.name).reshape(*lead, self.features)


class Embed(nn.Module):
  """Token embedding; ids equal to cfg.marker_id read the separate `marker` vector."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BT: Array) -> Array:
    cfg, cdt = self.cfg, _dtype(self.cfg.compute_dtype)
    table_VD = self.param("embedding", _EMBED_INIT, (cfg.vocab_size, cfg.hidden_size),
                          _dtype(cfg.param_dtype))
    x_BTD = jnp.take(table_VD, input_ids_BT, axis=0).astype(cdt)
    if cfg.marker_id is not None:
      marker_D = self.param("marker", _EMBED_INIT, (cfg.hidden_size,), jnp.float32)
      x_BTD = jnp.where((input_ids_BT == cfg.marker_id)[..., None], marker_D.astype(cdt), x_BTD)
    return x_BTD


def gather_rows(x_BT_: Array, positions_BM: Array) -> Array:
  """Rows at `positions_BM` of each batch row: (B, T, ...), (B, M) -> (B, M, ...)."""
  index = positions_BM.astype(jnp.int32).reshape(positions_BM.shape + (1,) * (x_BT_.ndim - 2))
  return jnp.take_along_axis(x_BT_, index, axis=1)


class Attention(nn.Module):
  """Self-attention; with `query_positions_BM`, only those rows query (keys and values are every
  row's) and `attn_inputs` is their (B, 1, M, T) `attention_mask`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array, cos_BTH: Array, sin_BTH: Array, attn_inputs: Any,
               query_positions_BM: Array | None = None) -> Array:
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    xq_BMD, cosq_BMH, sinq_BMH = (x_BTD, cos_BTH, sin_BTH) if query_positions_BM is None else (
        gather_rows(a, query_positions_BM) for a in (x_BTD, cos_BTH, sin_BTH))
    m = xq_BMD.shape[1]
    q_BMNH = Proj(cfg, n * h, cfg.attention_bias, name="q_proj")(xq_BMD).reshape(b, m, n, h)
    k_BTKH = Proj(cfg, k * h, cfg.attention_bias, name="k_proj")(x_BTD).reshape(b, t, k, h)
    v_BTKH = Proj(cfg, k * h, cfg.attention_bias, name="v_proj")(x_BTD).reshape(b, t, k, h)
    if cfg.qk_norm:
      q_BMNH = RMSNorm(cfg, name="q_norm")(q_BMNH)
      k_BTKH = RMSNorm(cfg, name="k_norm")(k_BTKH)
    q_BMNH = apply_rope(q_BMNH, cosq_BMH, sinq_BMH)
    k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
    if query_positions_BM is None:
      out_BMNH = attend(cfg, q_BMNH, k_BTKH, v_BTKH, attn_inputs)
    else:
      out_BMNH = query_attention(q_BMNH, k_BTKH, v_BTKH, attn_inputs, cfg.head_dim ** -0.5)
    return Proj(cfg, cfg.hidden_size, cfg.o_bias, name="o_proj")(out_BMNH.reshape(b, m, n * h))


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    gate = Proj(cfg, cfg.intermediate_size, name="gate_proj")(x_BTD)
    up = Proj(cfg, cfg.intermediate_size, name="up_proj")(x_BTD)
    return Proj(cfg, cfg.hidden_size, name="down_proj")(swiglu(gate, up))


class DecoderLayer(nn.Module):
  """Pre-norm block; scan-shaped: (carry, *broadcast) -> (carry, None). With
  `query_positions_BM` the output is those rows' (B, M, D) (see Attention)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array, cos_BTH: Array, sin_BTH: Array, attn_inputs: Any,
               query_positions_BM: Array | None = None):
    cfg = self.cfg
    attn_BMD = Attention(cfg, name="attn")(RMSNorm(cfg, name="input_norm")(x_BTD), cos_BTH, sin_BTH, attn_inputs,
                                           query_positions_BM)
    h = attn_BMD + (x_BTD if query_positions_BM is None else gather_rows(x_BTD, query_positions_BM))
    out = h + MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attn_norm")(h))
    return out.astype(x_BTD.dtype), None


def layers_per_iteration(cfg: ModelConfig) -> int:
  """Decoder layers in one iteration of the layer loop (num_layers: no loop)."""
  return min(cfg.scan_unroll or cfg.num_layers, cfg.num_layers)


def last_layer_at_queries(cfg: ModelConfig) -> bool:
  """Whether the Decoder, given query positions, runs its last layer at those rows only: with
  the layers unrolled, unless the config says otherwise (see Decoder)."""
  return cfg.last_layer_query_rows_only and layers_per_iteration(cfg) == cfg.num_layers


def _layer_class(cfg: ModelConfig) -> type[nn.Module]:
  if cfg.remat == "none":
    return DecoderLayer
  # prevent_cse=False is safe only when each layer is a loop body of its own: with layers
  # unrolled, XLA would merge the recomputation with the forward pass and keep every value.
  return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=cfg.scan_unroll != 1)


def layer_params(stacked: Any, num_layers: int) -> list[Any]:
  """The stacked layer params (leading layer axis) as one tree per layer, each stack split once.

  Why split rather than index (`a[i]`): the gradient of an index is the layer's gradient padded
  with zeros to the whole stack, so the stacked gradient would be a sum of `num_layers` padded
  stacks (XLA's pad+add fusions, each writing the whole stack); the gradient of a split is one
  concatenate. The step with each: BUILD.md, Results."""
  leaves, treedef = jax.tree.flatten(stacked)
  parts = [jnp.split(leaf, num_layers, axis=0) for leaf in leaves]
  return [treedef.unflatten([jnp.squeeze(part[i], 0) for part in parts]) for i in range(num_layers)]


class Decoder(nn.Module):
  """input_ids/positions/segment_ids (B, T) -> final-normed hidden states (B, T, D), or with
  `query_positions_BM` (B, M) those rows' (B, M, D).

  Segment ids are 1, 2, ... per example of a row, in order, then 0 for padding to the end.
  `max_segments` bounds the examples per row; only cuDNN's packed layout needs it (the
  confidence model passes its marker slots: every example has at least one marker).

  With query positions and the layer loop unrolled, the last layer computes its queries, output
  projection and MLP at those rows only (its keys and values need every row): the confidence
  model reads the marker rows alone, so the rest of that layer's work is dropped. With the loop
  rolled the layers stay one loop over the stacked weights (cutting the last one off the stack
  would copy the stack) and the rows are taken from the full output."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BT: Array, positions_BT: Array, segment_ids_BT: Array,
               max_segments: int | None = None, query_positions_BM: Array | None = None) -> Array:
    cfg = self.cfg
    x_BTD = Embed(cfg, name="embed")(input_ids_BT)
    cos_BTH, sin_BTH = rope_cos_sin(cfg, positions_BT)
    attn_inputs = attention_inputs(cfg, segment_ids_BT, max_segments)
    if query_positions_BM is None or not last_layer_at_queries(cfg) or self.is_initializing():
      layers = nn.scan(_layer_class(cfg), variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                       unroll=layers_per_iteration(cfg))
      x_BTD, _ = layers(cfg, name="layers")(x_BTD, cos_BTH, sin_BTH, attn_inputs)
      hidden = RMSNorm(cfg, name="final_norm")(x_BTD)
      return hidden if query_positions_BM is None else gather_rows(hidden, query_positions_BM)
    # The unrolled loop, layer by layer on the stacked params the scan above creates; an unbound
    # layer named as the scan, so ops carry the same "layers/..." names (bench/profile.py).
    stacked = self.variables["params"]["layers"]
    layer = _layer_class(cfg)(cfg, parent=None, name="layers")
    per_layer = layer_params(stacked, cfg.num_layers)
    for i in range(cfg.num_layers - 1):
      x_BTD, _ = layer.apply({"params": per_layer[i]}, x_BTD, cos_BTH, sin_BTH, attn_inputs)
    query_mask = attention_mask(segment_ids_BT, query_positions_BM, segments=cfg.attention_mask == "segments")
    x_BMD, _ = layer.apply({"params": per_layer[-1]}, x_BTD, cos_BTH, sin_BTH, query_mask, query_positions_BM)
    return RMSNorm(cfg, name="final_norm")(x_BMD)


def init_params(cfg: ModelConfig, rng: Array, seq_len: int = 8) -> dict[str, Any]:
  """Random decoder params (for tests and shape inference via jax.eval_shape)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return Decoder(cfg).init(rng, ids, ids, ids + 1, max_segments=1)["params"]
