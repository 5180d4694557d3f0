"""`python -m rmjax.bench.attention`: the attention of packed rows, timed and compared, forward + backward.

Why it exists: packed rows need the segment mask, and on an H100 the masked cuDNN attention took
103.5 ms per 4B step against 58.8 ms for causal attention alone (BUILD.md, session 4). Part of
that is a gradient nobody uses: jax's cuDNN wrapper has the backward kernel compute the mask's
(bias's) gradient (model/cudnn_attention.py). This times, on one layer's attention of the Qwen3-4B
shape (default 4 x 2048, 32 query heads, 8 key/value heads, head_dim 128, bf16), the gradient of
sum(out * w) with respect to q, k and v for:
  causal                 public API, causal only (what unpacked rows run)
  segments               public API, segment mask + causal (what packed rows run now)
  segments_no_mask_grad  the private primitive without the mask's gradient (cudnn_attention.py)
and gives each variant's max abs difference from `segments` in out, dq, dk, dv (the two segment
variants must agree to bf16 rounding; `causal` differs by design). Rows are packed from
PRM800K-like lengths (log-normal, median 450). On a CPU the first two run XLA's attention and the
third is reported unavailable (it needs cuDNN). One JSON line per variant.

  python -m rmjax.bench.attention                      # on a GPU
  python -m rmjax.bench.attention --seq-len 64 --heads 4 --kv-heads 2 --head-dim 16   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.model import cudnn_attention
from rmjax.model.transformer import attention_mask


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


def variants(impl: str, scale: float) -> dict[str, Callable | None]:
  public = lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                                              implementation=impl)
  no_mask_grad = None
  if impl == "cudnn" and cudnn_attention.available():
    no_mask_grad = lambda q, k, v, mask: cudnn_attention.causal_attention_constant_mask(q, k, v, mask, scale)
  return {"causal": lambda q, k, v, mask: public(q, k, v, None), "segments": public,
          "segments_no_mask_grad": no_mask_grad}


def time_grads(attend: Callable, args: tuple, steps: int) -> tuple[float, tuple]:
  """Median seconds of one jitted forward + backward; its output and (dq, dk, dv)."""
  q, k, v, mask, w = args

  def loss(q, k, v):
    out = attend(q, k, v, mask)
    return jnp.sum(out.astype(jnp.float32) * w), out
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
  grads, out = jax.block_until_ready(step(q, k, v))  # compile
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step(q, k, v))
    times.append(time.perf_counter() - start)
  return statistics.median(times), (out, *grads)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m rmjax.bench.attention", description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--median", type=float, default=450.0, help="median example length of the packed rows")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.heads % args.kv_heads:
    p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
  device = jax.devices()[0]
  impl = "cudnn" if device.platform == "gpu" else "xla"
  dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
  rng = np.random.default_rng(args.seed)
  shape = lambda heads: (args.batch, args.seq_len, heads, args.head_dim)
  q, k, v, w = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                (shape(args.heads), shape(args.kv_heads), shape(args.kv_heads), shape(args.heads)))
  segments = packed_segment_ids(args.batch, args.seq_len, args.median, rng)
  mask = attention_mask(jnp.asarray(segments))
  results = {}
  for name, attend in variants(impl, args.head_dim ** -0.5).items():
    record = {"variant": name, "impl": impl, "device": device.device_kind, "batch": args.batch,
              "seq_len": args.seq_len, "segments_per_row": float(np.mean(segments.max(axis=1)))}
    if attend is None:
      print(json.dumps(record | {"unavailable": "needs cuDNN and jax's private attention primitive "
                                                "with the expected parameters"}), flush=True)
      continue
    seconds, results[name] = time_grads(attend, (q, k, v, mask, w), args.steps)
    diffs = {}
    if "segments" in results:
      diffs = {f"max_abs_diff_{part}": float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for part, a, b in zip(("out", "dq", "dk", "dv"), results[name], results["segments"])}
    print(json.dumps(record | {"ms": round(1e3 * seconds, 3)} | diffs), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
