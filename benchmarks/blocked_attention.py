"""`python -m benchmarks.blocked_attention`: XLA attention's time by query block size.

Why it exists: `model.attention_query_block` (model/blocked_attention.py) splits XLA attention's
queries into blocks that skip the scores above the diagonal; how large a block should be is a
trade between skipped work (small blocks) and per-block overhead (many small ops). This times the
forward and backward pass of one layer's attention (the segment mask of rows holding four
examples) for each sequence length and block size, median of `--repeats` after one compile, and
prints one JSON line per length: {"T": t, "<block>": seconds, ..., "jax": seconds}; block 0 is one
block (all T x T scores), "jax" jax's own XLA attention (`jax.nn.dot_product_attention`), what
rmjax's replaces. `--mask causal` leaves the segment mask out (rows of one example, what the
bench's synthetic rows are), and `--torch` adds "torch": torch's scaled_dot_product_attention on
the same shapes and mask, as transformers' sdpa attention calls it (key/value heads shared by
`enable_gqa`, `is_causal` without a mask): what the bench's torch reference runs, so the two sides'
attention can be compared on their own (torch's intra-op threads left at its default).
Defaults are the 75m preset's attention shape (12 query heads, 4 key/value heads, head_dim 64).

  python -m benchmarks.blocked_attention --seq-lens 512,680,2048 --blocks 0,64,128,192,256,512
  python -m benchmarks.blocked_attention --seq-lens 512 --blocks 128 --mask causal --torch
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from rmjax import cli
from rmjax.model.blocked_attention import blocked_causal_attention
from rmjax.model.transformer import attention_mask


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
  run()  # compiles (jax) or warms up (torch)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return round(sorted(times)[len(times) // 2], 4)


def _torch_seconds(t: int, batch: int, heads: int, kv_heads: int, head_dim: int, causal_only: bool,
                   repeats: int) -> float:
  import torch
  generator = torch.Generator().manual_seed(0)
  q, k, v = (torch.randn(batch, n, t, head_dim, generator=generator, requires_grad=True)
             for n in (heads, kv_heads, kv_heads))
  segments = torch.tensor([1 + (4 * i) // t for i in range(t)])
  causal = torch.ones(t, t, dtype=torch.bool).tril()
  mask = None if causal_only else (causal & (segments[:, None] == segments[None, :]))

  def run() -> None:
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                           scale=head_dim ** -0.5, enable_gqa=True)
    torch.autograd.grad(torch.sin(out).sum(), (q, k, v))
  return _median_seconds(run, repeats)


def time_blocks(t: int, blocks: Sequence[int], batch: int, heads: int, kv_heads: int, head_dim: int,
                repeats: int, causal_only: bool = False, with_torch: bool = False) -> dict[str, float]:
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, t, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, t, kv_heads, head_dim)) for key in keys[1:])
  segments = jnp.asarray([[1 + (4 * i) // t for i in range(t)]] * batch, jnp.int32)
  mask, scale = None if causal_only else attention_mask(segments), head_dim ** -0.5
  attend = {str(block): (lambda q, k, v, block=block: blocked_causal_attention(q, k, v, mask, scale, block))
            for block in blocks if block < t}
  attend["jax"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                                               implementation="xla")
  row: dict[str, float] = {}
  for name, fn in attend.items():
    grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2)))
    row[name] = _median_seconds(lambda grad=grad: jax.block_until_ready(grad(q, k, v)), repeats)
  if with_torch:
    row["torch"] = _torch_seconds(t, batch, heads, kv_heads, head_dim, causal_only, repeats)
  return row


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(prog="python -m benchmarks.blocked_attention", description=__doc__.split("\n\n")[0])
  p.add_argument("--seq-lens", default="512,680,2048", help="comma-separated sequence lengths")
  p.add_argument("--blocks", default="0,64,128,192,256,512", help="comma-separated query blocks (0 = one block)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--kv-heads", type=int, default=4)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--mask", choices=("segments", "causal"), default="segments",
                 help="segments: rows of four examples each (packed rows); causal: one example a row")
  p.add_argument("--torch", action="store_true", help="also time torch's scaled_dot_product_attention")
  args = p.parse_args(argv)
  try:
    lengths, blocks = _ints(args.seq_lens), _ints(args.blocks)
  except ValueError:
    p.error("--seq-lens and --blocks take comma-separated integers")
  if not lengths or min(lengths) < 2 or not blocks or min(blocks) < 0 or args.heads % args.kv_heads:
    p.error("need lengths >= 2, blocks >= 0 and heads a multiple of kv-heads")
  for t in lengths:
    row = time_blocks(t, blocks, args.batch, args.heads, args.kv_heads, args.head_dim, args.repeats,
                      causal_only=args.mask == "causal", with_torch=args.torch)
    print(json.dumps({"T": t, "device": jax.devices()[0].device_kind, **row}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
