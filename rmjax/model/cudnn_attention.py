"""cuDNN attention under a constant mask, without computing the mask's gradient.

Why it exists: `jax.nn.dot_product_attention(..., mask=m, implementation="cudnn")` hands the
mask to cuDNN as an additive bias, and jax 0.10's cuDNN wrapper always asks the backward kernel
for that bias's gradient (`should_export_dbias` returns True; earlier jax skipped it for a bias
broadcast over heads). Packed rows' segment mask is a constant, so that gradient, a (B, 1, T, T)
tensor summed over heads, is computed in every layer's backward pass and thrown away: compiled
for an H100, the 4B LoRA step with the segment mask has backward custom calls that output
bf16[4,1,2048,2048] besides dq, dk, dv. The public API has no switch for it, so this calls jax's
private cuDNN primitive with the arguments the public wrapper passes, except has_dbias=False.

It is used only where the private function has exactly the parameters expected (`available()`),
and not yet by the model: `python -m rmjax.bench.attention` (a GPU check) times it against the
public call and compares outputs and gradients first.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp

# The private primitive's parameters as of jax 0.10.2 (jax/_src/cudnn/fused_attention_stablehlo.py).
_EXPECTED_PARAMETERS = (
  "query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "page_table_k",
  "page_table_v", "scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout",
  "sliding_window_length", "cudnn_version", "return_residual")


def _private_module() -> Any | None:
  try:
    from jax._src.cudnn import fused_attention_stablehlo as module
  except ImportError:
    return None
  return module


def available() -> bool:
  """Whether this jax has the private cuDNN primitive with the parameters this module passes."""
  module = _private_module()
  function = getattr(module, "_dot_product_attention", None)
  if function is None or not all(hasattr(module, name) for name in
                                 ("combine_bias_and_mask", "check_cudnn_version", "MaskType", "AttentionLayout")):
    return False
  try:
    return tuple(inspect.signature(function).parameters) == _EXPECTED_PARAMETERS
  except (TypeError, ValueError):
    return False


def causal_attention_constant_mask(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                                   mask_B1TT: jax.Array, scale: float) -> jax.Array:
  """Causal cuDNN attention restricted by a boolean mask that gets no gradient; the same values
  as `jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
  implementation="cudnn")`. Needs a GPU and `available()`."""
  if not available():
    raise RuntimeError("this jax has no private cuDNN attention primitive with the expected parameters")
  fa = _private_module()
  bias = fa.combine_bias_and_mask(None, mask_B1TT, q_BTNH.dtype)
  unused = jnp.zeros(0, q_BTNH.dtype)
  return fa._dot_product_attention(
    q_BTNH, k_BTKH, v_BTKH, bias, unused, unused, unused, unused, unused, unused,
    scale, 42, 0.0, (True, False), fa.MaskType.CAUSAL, fa.AttentionLayout.BTNH.value, None,
    fa.check_cudnn_version(), False)
