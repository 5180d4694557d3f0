"""cuDNN's packed layout for packed rows, which jax's public attention API does not expose.

Why it exists: under a segment mask cuDNN computes every score block on or below the diagonal of
the whole row, and jax's cuDNN wrapper has the backward kernel compute the mask's gradient, which
nobody uses. In cuDNN's packed ("ragged") layout each segment is attended as a sequence of its
own: no mask, no mask gradient, no work on the blocks between two examples of a row (a row of
four 500-token examples costs about a quarter of the masked attention). This is the model's
`segment_attention="cudnn_packed"`. It goes through jax's private cuDNN module
(`jax._src.cudnn.fused_attention_stablehlo`), only where that module's function has exactly the
parameters passed here. `segment_layout` turns segment ids into the per-segment lengths and
start offsets it takes. jax's wrapper scales the key/value offsets by the QUERY heads (jax
0.10.2, `_fix_seqlen_offsets`), which is wrong for grouped-query attention, so keys and values
are repeated to the query heads first. cuDNN runs the packed layout on Hopper or later only.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp

# What packed_causal_attention passes to the module's own dot_product_attention (jax 0.10.2).
_PACKED_PARAMETERS = frozenset({"query", "key", "value", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets",
                                "scale", "mask_type", "qkv_layout"})


def _private_module() -> Any | None:
  try:
    from jax._src.cudnn import fused_attention_stablehlo as module
  except ImportError:
    return None
  return module


def _packed_function() -> Any | None:
  """The private module's own `dot_product_attention` (it takes q/kv offsets), if it has the
  parameters `packed_causal_attention` passes."""
  module = _private_module()
  function = getattr(module, "dot_product_attention", None)
  if function is None or not hasattr(module, "MaskType"):
    return None
  try:
    names = set(inspect.signature(function).parameters)
  except (TypeError, ValueError):
    return None
  return function if _PACKED_PARAMETERS <= names else None


def packed_available() -> bool:
  """Whether this jax's private cuDNN module takes the packed layout as `packed_causal_attention`
  passes it."""
  return _packed_function() is not None


def packed_unsupported_reason(device: Any = None) -> str | None:
  """Why `packed_causal_attention` cannot run here (None if it can, or if `device`, by default
  the first, is no GPU: a compile for a GPU target is judged by the target's checks)."""
  if not packed_available():
    return f"this jax ({jax.__version__}) does not offer cuDNN's packed layout as expected"
  device = device or jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if device.platform == "gpu" and capability and tuple(int(x) for x in str(capability).split(".")) < (9, 0):
    return (f"cuDNN's packed layout needs a Hopper or later GPU (compute capability 9.0); "
            f"this {device.device_kind} has {capability}")
  return None


def segment_layout(segment_ids_BT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
  """cuDNN's packed layout of rows holding segments 1, 2, ..., k (contiguous, in this order),
  then padding (0) to the end, for k <= max_segments (what the data pipeline builds).

  Returns (seqlen_BS, offsets_BS1) int32 with S = max_segments + 1 slots: slot j < max_segments
  is segment j + 1, the last slot is the padding tail (so every position belongs to a sequence
  and no output is left undefined; padded positions attend only among themselves). Slots with
  no tokens are -1 in both, as jax's wrapper wants, and offsets carry one more -1 column.
  """
  b = segment_ids_BT.shape[0]
  ids_S = jnp.arange(1, max_segments + 1, dtype=segment_ids_BT.dtype)
  counts_BM = jnp.sum(segment_ids_BT[:, None, :] == ids_S[None, :, None], axis=-1, dtype=jnp.int32)
  padding_B1 = jnp.sum(segment_ids_BT == 0, axis=-1, keepdims=True, dtype=jnp.int32)
  counts_BS = jnp.concatenate([counts_BM, padding_B1], axis=1)
  starts_BS = jnp.cumsum(counts_BS, axis=1, dtype=jnp.int32) - counts_BS
  present = counts_BS > 0
  seqlen_BS = jnp.where(present, counts_BS, -1)
  offsets_BS1 = jnp.concatenate([jnp.where(present, starts_BS, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
  return seqlen_BS, offsets_BS1


def packed_causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                            seqlen_BS: jax.Array, offsets_BS1: jax.Array, scale: float) -> jax.Array:
  """Causal attention within each sequence of `segment_layout`, by cuDNN's packed layout: the
  segment mask's values at every real position, to bf16 rounding (BUILD.md, Measuring:
  `python -m benchmarks.attention`). Needs a Hopper GPU and `packed_available()`."""
  function = _packed_function()
  if function is None:
    raise RuntimeError("this jax's private cuDNN module does not take the packed layout as expected")
  repeats = q_BTNH.shape[2] // k_BTKH.shape[2]
  k_BTNH, v_BTNH = (jnp.repeat(x, repeats, axis=2) for x in (k_BTKH, v_BTKH))
  return function(q_BTNH, k_BTNH, v_BTNH, q_seqlen=seqlen_BS, kv_seqlen=seqlen_BS, q_offsets=offsets_BS1,
                  kv_offsets=offsets_BS1, scale=scale, mask_type=_private_module().MaskType.PADDING_CAUSAL,
                  qkv_layout="BTNH")
