"""`python -m benchmarks.attention`: the attention of packed rows, timed and compared, forward + backward.

Why it exists: packed rows need the segment mask, and the masked cuDNN attention costs more than
causal attention alone on an H100 (BUILD.md, Results). Part of that is a gradient nobody uses:
jax's cuDNN wrapper has the backward kernel compute the mask's (bias's) gradient; part is the
score blocks between two examples of a row, which a mask cannot skip (model/cudnn_attention.py).
This times, on one layer's attention of the Qwen3-4B shape
(default 4 x 2048, 32 query heads, 8 key/value heads, head_dim 128, bf16), the gradient of
sum(out * w) with respect to q, k and v for:
  segments               public API, segment mask + causal (what packed rows run by default; the reference)
  causal                 public API, causal only (what unpacked rows run)
  segments_no_mask_grad  the private primitive without the mask's gradient (below)
  segments_cudnn_packed  cuDNN's packed layout, each example its own sequence
                         (the model's segment_attention="cudnn_packed"), with 40 segment slots
                         per row (packed rows' marker slots at data.max_steps_per_example 10)
  segments_cudnn_packed_tight  the same with only as many slots as the fullest row needs: what
                         the empty slots cost (cuDNN gets B x slots sequences, most of them empty)
and gives each later variant's max abs difference from `segments` in out, dq, dk, dv (the segment
variants must agree to bf16 rounding; `causal` differs wherever a row holds more than one
example). Rows are packed from PRM800K-like lengths (log-normal, median 450), padded at the end;
differences are taken over real tokens only (padded positions attend differently under the
packed layout, and nothing reads them). On a CPU the first two run XLA's attention and the
cuDNN-only ones are reported unavailable. One JSON line per variant, printed as it finishes; a
variant that fails gives a line with its `error`, the others still run, and the exit status is 1
(the differences are from `segments` only when it ran).

`--target h100` compiles the cuDNN variants for an H100 without one (rmjax/bench/gpu_target.py, jax's
CUDA plugin) and, instead of timing, lists each compiled cuDNN call's outputs and whether its
backend config equals the reference's: the public call's backward also outputs the mask's
gradient, (B, 1, T, T).

  python -m benchmarks.attention                      # on a GPU
  python -m benchmarks.attention --target h100        # any machine with jax's CUDA plugin
  python -m benchmarks.attention --seq-len 64 --heads 4 --kv-heads 2 --head-dim 16   # smoke
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import cli
from rmjax.bench import common, gpu_target
from rmjax.model import cudnn_attention
from rmjax.model.transformer import attention_mask

# Segment slots of the packed layout (4x the marker slots of data.max_steps_per_example 10: more
# than training's data.max_segments_per_row, to show what empty slots cost); rows with more
# examples are refused.
MAX_SEGMENTS = 40

_UNAVAILABLE = "needs cuDNN and jax's private attention primitive with the expected parameters"
_CUDNN_CALL = re.compile(r"= \(([^)]*)\) custom-call\(.*custom_call_target=\"(__cudnn\$fmha\w*)\""
                         r".*backend_config=(\{.*\})\s*$", re.M)


# jax's private cuDNN primitive's parameters as of jax 0.10.2 (fused_attention_stablehlo.py).
_EXPECTED_PARAMETERS = (
  "query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "page_table_k",
  "page_table_v", "scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout",
  "sliding_window_length", "cudnn_version", "return_residual")


def constant_mask_available() -> bool:
  """Whether this jax has the private cuDNN primitive with the parameters this module passes."""
  module = cudnn_attention._private_module()
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
  """Causal cuDNN attention restricted by a boolean mask that gets no gradient (jax's public
  wrapper always has the backward kernel compute the mask's, as a bias's, gradient); the same values
  as `jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
  implementation="cudnn")`. Needs a GPU and `constant_mask_available()`."""
  if not constant_mask_available():
    raise RuntimeError("this jax has no private cuDNN attention primitive with the expected parameters")
  fa = cudnn_attention._private_module()
  bias = fa.combine_bias_and_mask(None, mask_B1TT, q_BTNH.dtype)
  unused = jnp.zeros(0, q_BTNH.dtype)
  return fa._dot_product_attention(
    q_BTNH, k_BTKH, v_BTKH, bias, unused, unused, unused, unused, unused, unused,
    scale, 42, 0.0, (True, False), fa.MaskType.CAUSAL, fa.AttentionLayout.BTNH.value, None,
    fa.check_cudnn_version(), False)


def packed_segment_ids(batch: int, seq_len: int, median: float, rng: np.random.Generator) -> np.ndarray:
  """(B, T) int32 segment ids 1..k of log-normal-length examples filled left to right, 0 after."""
  out = np.zeros((batch, seq_len), np.int32)
  for row in out:
    start, segment = 0, 1
    while start < seq_len:
      length = int(np.clip(rng.lognormal(np.log(median), 0.6), 8, seq_len))
      if start + length > seq_len:
        break
      row[start:start + length] = segment
      start, segment = start + length, segment + 1
  return out


def variants(impl: str, scale: float, tight_segments: int) -> dict[str, Callable | None]:
  """Each variant: (q, k, v, segment_ids_BT) -> out, or None where this jax/device lacks it. The
  mask or packed layout is built inside, as the model builds it once per step."""
  public = lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                                              implementation=impl)
  no_mask_grad = packed = packed_tight = None
  if impl == "cudnn" and constant_mask_available():
    no_mask_grad = lambda q, k, v, seg: causal_attention_constant_mask(
      q, k, v, attention_mask(seg), scale)
  if impl == "cudnn" and cudnn_attention.packed_available():
    packed, packed_tight = (
      lambda q, k, v, seg, slots=slots: cudnn_attention.packed_causal_attention(
        q, k, v, *cudnn_attention.segment_layout(seg, slots), scale) for slots in (MAX_SEGMENTS, tight_segments))
  return {"segments": lambda q, k, v, seg: public(q, k, v, attention_mask(seg)),
          "causal": lambda q, k, v, seg: public(q, k, v, None),
          "segments_no_mask_grad": no_mask_grad, "segments_cudnn_packed": packed,
          "segments_cudnn_packed_tight": packed_tight}


def grad_step(attend: Callable) -> Callable:
  """jit of (q, k, v, segment_ids, w) -> ((dq, dk, dv), out) for the loss sum(out * w)."""
  def loss(q, k, v, segment_ids, w):
    out = attend(q, k, v, segment_ids)
    return jnp.sum(out.astype(jnp.float32) * w), out
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def time_grads(attend: Callable, args: tuple, steps: int) -> tuple[float, tuple]:
  """Median seconds of one forward + backward (compiled first); its output and (dq, dk, dv)."""
  step = grad_step(attend)
  grads, out = jax.block_until_ready(step(*args))  # compile
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), (out, *grads)


def cudnn_calls(attend: Callable, abstract_args: tuple) -> list[dict[str, str]]:
  """Each cuDNN attention call of the compiled forward + backward: target, outputs, config."""
  text = grad_step(attend).lower(*abstract_args).compile().as_text()
  return [{"target": target, "outputs": outputs, "backend_config": config}
          for outputs, target, config in _CUDNN_CALL.findall(text)]


def compile_for_target(args: argparse.Namespace, base: dict) -> int:
  """The cuDNN variants compiled for `args.target` (no GPU needed): their cuDNN calls."""
  if not os.environ.get("JAX_PLATFORMS"):  # the CUDA plugin compiles without a GPU only this way
    jax.config.update("jax_platforms", "cpu")
  try:
    device = gpu_target.target_device(args.target)
  except gpu_target.TargetUnavailable as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh([device], ("d",)), jax.sharding.PartitionSpec())
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  b, t, d = args.batch, args.seq_len, args.head_dim
  abstract = (spec((b, t, args.heads, d)), spec((b, t, args.kv_heads, d)), spec((b, t, args.kv_heads, d)),
              spec((b, t), jnp.int32), spec((b, t, args.heads, d), jnp.float32))
  reference = None
  # Shapes only: the tight variant gets the slots PRM800K-like rows of this length need at most.
  tight = int(packed_segment_ids(b, t, args.median, np.random.default_rng(args.seed)).max())
  for name, attend in variants("cudnn", d ** -0.5, tight).items():
    if attend is None:
      print(json.dumps(base | {"variant": name, "unavailable": _UNAVAILABLE}), flush=True)
      continue
    with gpu_target.cudnn_checks_for(args.target):
      calls = cudnn_calls(attend, abstract)
    reference = reference or calls
    same = [c["backend_config"] == r["backend_config"] for c, r in zip(calls, reference)]
    print(json.dumps(base | {"variant": name, "target": args.target, "device": device.device_kind,
                             "cudnn_calls": [{k: c[k] for k in ("target", "outputs")} for c in calls],
                             "same_backend_configs_as_segments": len(calls) == len(reference) and all(same)}),
          flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--median", type=float, default=450.0, help="median example length of the packed rows")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--target", default="", choices=("", *gpu_target.TARGET_CONFIGS),
                 help="compile the cuDNN variants for this GPU (no GPU needed) and list their cuDNN calls")
  args = p.parse_args(argv)
  if args.heads % args.kv_heads:
    p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
  base = {"batch": args.batch, "seq_len": args.seq_len}
  if args.target:
    return compile_for_target(args, base)
  device = jax.devices()[0]
  impl = "cudnn" if device.platform == "gpu" else "xla"
  dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
  rng = np.random.default_rng(args.seed)
  shape = lambda heads: (args.batch, args.seq_len, heads, args.head_dim)
  q, k, v, w = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                (shape(args.heads), shape(args.kv_heads), shape(args.kv_heads), shape(args.heads)))
  segments = packed_segment_ids(args.batch, args.seq_len, args.median, rng)
  if segments.max() > MAX_SEGMENTS:
    p.error(f"--median {args.median} packs more than {MAX_SEGMENTS} examples into a row")
  real = jnp.asarray(segments > 0)[:, :, None, None]  # (B, T, 1, 1): compare real tokens only
  base |= {"impl": impl, "device": device.device_kind, "segments_per_row": float(np.mean(segments.max(axis=1)))}
  reference, failed = None, False
  base["tight_segment_slots"] = int(segments.max())
  for name, attend in variants(impl, args.head_dim ** -0.5, int(segments.max())).items():
    if attend is None:
      print(json.dumps(base | {"variant": name, "unavailable": _UNAVAILABLE}), flush=True)
      continue
    try:
      seconds, result = time_grads(attend, (q, k, v, jnp.asarray(segments), w), args.steps)
    except common.RUN_ERRORS as e:  # an error line, and the other variants still run
      failed = True
      print(json.dumps(base | {"variant": name, "error": common.error_text(e)}), flush=True)
      continue
    diffs = {}
    if name == "segments":
      reference = result
    elif reference is not None:
      diffs = {f"max_abs_diff_{part}": float(jnp.max(jnp.where(real, jnp.abs(a.astype(jnp.float32)
                                                                             - b.astype(jnp.float32)), 0.0)))
               for part, a, b in zip(("out", "dq", "dk", "dv"), result, reference)}
    print(json.dumps(base | {"variant": name, "ms": round(1e3 * seconds, 3)} | diffs), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
