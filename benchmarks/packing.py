"""`python -m benchmarks.packing`: supervised markers per second, packed vs unpacked batches.

Why it exists: PRM800K-like data has many examples far shorter than max_length, so one example
per row (padded to the smallest length bucket) spends most of each step on padding, while
first-fit packing (segment ids, per-segment positions) fills rows. This measures what that
buys with the real jitted train step: the same examples are stepped through once as padded
rows and once as packed rows of `--row` tokens, with `--batch` rows per step either way, every
batch shape compiled before timing. Both layouts are the training pipeline's own: bucketed
padding, and the streaming packer with its lookahead (`pack_stream` below, through the
`pack_batch` the pipeline's iterator calls); each with the attention training uses for it
(unpacked rows causal attention alone, packed rows the segment mask; train/build.py).
`--segment-attention cudnn_packed` gives packed rows cuDNN's packed layout instead (the spec's
model.segment_attention; GPU only), and `both` steps the packed rows once with each.

Lengths are SYNTHETIC, PRM800K-like: log-normal with median `--median` tokens (default 450,
sigma 0.6), clipped to [--min-length, row]; one marker per ~50 tokens (PRM800K steps are
short). Token ids are random; the FLOPs do not depend on them. Output: one JSON line per
layout as soon as it has run, each packed layout's followed by its ratio to the unpacked one
(`<layout>_over_unpacked_markers_per_s`), so a run cut short keeps what it measured; a layout
whose run fails gives a line with its `error` instead, the others still run, and the exit
status is 1.

The ratio depends on how much of a step is attention: packed rows are full-length, so their
attention (quadratic in the row) costs more per token than short padded rows'. A CPU proxy for
Qwen3-4B at 2048 keeps that share (attention / 6N = 8.3% at full rows) with the 75m preset at
a third of the row, lengths and buckets:
`--preset 75m --row 680 --median 150 --min-length 21 --buckets 85,170,340,680`.

  python -m benchmarks.packing --preset tiny --examples 64 --batch 4 --row 2048
  python -m benchmarks.packing --preset 75m --row 680 --median 150 --min-length 21 --buckets 85,170,340,680 --examples 384
"""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence

import jax
import numpy as np

from rmjax import cli
from rmjax.bench import common, jax_impl
from rmjax.data.defaults import PACK_LOOKAHEAD as DEFAULT_PACK_LOOKAHEAD
from rmjax.data.packing import Row, batch_rows, pack_batch
from rmjax.data.render import RenderConfig, Tokenized
from rmjax.model.transformer import auto_attention_impl
from rmjax.train.step import device_batch

TOKENS_PER_MARKER = 50


def pack_stream(examples: Sequence[Tokenized], rows: int, row_length: int, max_markers: int,
                lookahead: int = 0, *, max_segments: int | None = None) -> list[list[Row]]:
  """The batches the training pipeline's packer (`rmjax.data.packing.pack_batch`) makes from
  `examples` in this order; the pipeline itself reads a grain iterator (rmjax/data/pipeline.py)."""
  stream = iter((t, None) for t in examples)
  batches, pending = [], []
  while True:
    batch, pending = pack_batch(pending, lambda: next(stream, None), rows, row_length, max_markers, lookahead,
                                max_segments=max_segments)
    if not batch:
      return batches
    batches.append(batch)


def synthetic_examples(n: int, row: int, median: float, marker_id: int, seed: int,
                       min_length: int = 64) -> list[Tokenized]:
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(np.log(median), 0.6, size=n), min_length, row).astype(int)
  out = []
  for i, length in enumerate(lengths):
    ids = rng.integers(0, marker_id, size=length).astype(np.int32)
    pos = np.arange(TOKENS_PER_MARKER - 1, length, TOKENS_PER_MARKER, dtype=np.int32)
    pos = pos if pos.size else np.asarray([length - 1], np.int32)
    ids[pos] = marker_id
    out.append(Tokenized("synthetic", str(i), ids, pos, rng.integers(0, 2, pos.size).astype(np.float32),
                         np.ones(pos.size, np.float32)))
  return out


def default_buckets(row: int) -> tuple[int, ...]:
  """The powers of two from 256 to 4096 below `row` (specs/common.py's length buckets and the
  next), then `row`."""
  return tuple(b for b in (256, 512, 1024, 2048, 4096) if b < row) + (row,)


def layouts(examples: list[Tokenized], row: int, batch: int, max_markers: int,
            lookahead: int, buckets: tuple[int, ...], max_segments: int = 0) -> dict[str, list[dict]]:
  """The batches the training pipeline makes of `examples`, padded (pack=False) to the smallest
  of `buckets` that fits, and packed (at most `max_segments` examples a row, 0 = no cap)."""
  render = RenderConfig(max_length=row, length_buckets=buckets, max_markers=max_markers, max_segments=max_segments)
  pad = lambda rows: batch_rows(rows, render, pad_id=0, num_rows=batch)
  packed = pack_stream(examples, batch, row, max_markers, lookahead, max_segments=render.segments)
  return {"unpacked": [pad(examples[i:i + batch]) for i in range(0, len(examples), batch)],
          "packed": [pad(rows) for rows in packed]}


def time_layout(steps, state, batches: list[dict], mesh) -> tuple[float, object]:
  """Seconds to step through all batches once (each shape compiled beforehand)."""
  dev = [device_batch(b, mesh) for b in batches]
  seen = set()
  for b in dev:  # compile every shape first (its step is not timed)
    shape = b["input_ids"].shape
    if shape not in seen:
      seen.add(shape)
      state, m = steps.train_step(state, b)
      jax.block_until_ready(m)
  start = time.perf_counter()
  for b in dev:
    state, m = steps.train_step(state, b)
  jax.block_until_ready((state, m))
  return time.perf_counter() - start, state


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny", choices=sorted(common.PRESETS))
  p.add_argument("--examples", type=int, default=64)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--row", type=int, default=2048)
  p.add_argument("--median", type=float, default=450.0)
  p.add_argument("--min-length", type=int, default=64, help="shortest example (lengths are clipped)")
  p.add_argument("--buckets", default="", help="padded-row lengths, comma-separated, the last = --row "
                 "(default: specs/common.py's 256,512,1024,2048 below --row, then --row)")
  p.add_argument("--lookahead", type=int, default=DEFAULT_PACK_LOOKAHEAD,
                 help="packer lookahead (the spec's data.pack_lookahead; 0 = close a batch at the first miss)")
  p.add_argument("--mode", default="lora", choices=common.MODES)
  p.add_argument("--max-segments", type=int, default=0,
                 help="examples per packed row at most (data.max_segments_per_row; 0 = as the marker slots allow)")
  p.add_argument("--segment-attention", default="mask", choices=("mask", "cudnn_packed", "both"),
                 help="packed rows' attention under cuDNN (model.segment_attention); both = a packed run with each")
  p.add_argument("--attention-query-block", type=int, default=common.ModelConfig.attention_query_block,
                 help="XLA attention's query rows per block (model.attention_query_block; 0 = one block)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else default_buckets(args.row)
  except ValueError:
    p.error(f"--buckets {args.buckets!r}: expected comma-separated integers")
  if list(buckets) != sorted(set(buckets)) or buckets[-1] != args.row:
    p.error(f"--buckets {args.buckets!r}: expected increasing lengths ending at --row {args.row}")
  if args.max_segments < 0:
    p.error(f"--max-segments {args.max_segments} must be >= 0")
  device = jax.devices()[0]
  # dtype "auto": bf16 on an accelerator, as in `python -m rmjax.bench` (BenchSettings' own
  # default is float32, which on a GPU also rules out cuDNN attention).
  settings = common.BenchSettings(preset=args.preset, seq_len=args.row, batch=args.batch, dtype="auto",
                                  seed=args.seed, attention_query_block=args.attention_query_block
                                  ).on_device(device.platform != "cpu")
  cfg = settings.model_config(args.mode).replace(max_segments=args.max_segments)
  examples = synthetic_examples(args.examples, args.row, args.median, cfg.marker_id, args.seed, args.min_length)
  max_markers = args.row // TOKENS_PER_MARKER + 1
  # Each layout runs the step training gives it (train/build.py): packed rows the segment mask
  # (or cuDNN's packed layout), unpacked rows causal attention alone. One state serves all (the
  # attention is not a parameter). Runs: (name, layout, model config, what the record says).
  choices = ("mask", "cudnn_packed") if args.segment_attention == "both" else (args.segment_attention,)
  runs = [("unpacked", "unpacked", cfg.replace(attention_mask="causal"),
           {"buckets": list(buckets), "attention_mask": "causal"})]
  runs += [("packed" if choice == "mask" else f"packed_{choice}", "packed",
            cfg.replace(attention_mask="segments", segment_attention=choice),
            {"lookahead": args.lookahead, "max_segments": args.max_segments, "attention_mask": "segments",
             "segment_attention": choice}) for choice in choices]
  _, state, mesh = jax_impl.build(settings, args.mode, device, cfg=runs[0][2])
  batches_by_layout = layouts(examples, args.row, args.batch, max_markers, args.lookahead, buckets,
                              args.max_segments)
  markers_per_s, failed = {}, False
  for name, layout_name, run_cfg, layout in runs:
    batches = batches_by_layout[layout_name]
    try:
      steps, _ = jax_impl.build_abstract(settings, args.mode, device, cfg=run_cfg)
      seconds, state = time_layout(steps, state, batches, mesh)
    except common.RUN_ERRORS as e:  # an error line, and the other layouts still run
      failed = True
      print(json.dumps({"layout": name, **layout, "error": common.error_text(e)}), flush=True)
      if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state)):
        _, state, mesh = jax_impl.build(settings, args.mode, device, cfg=runs[0][2])  # donated to the failed step
      continue
    markers = sum(common.supervised_markers(b) for b in batches)
    real = sum(common.non_pad_tokens(b) for b in batches)
    slots = sum(b["input_ids"].size for b in batches)
    markers_per_s[name] = markers / seconds
    print(json.dumps({"layout": name, **layout, "attention": auto_attention_impl(cfg, cfg.compute_dtype),
                      "attention_query_block": cfg.attention_query_block,
                      "preset": args.preset, "mode": args.mode,
                      "device": device.device_kind, "examples": len(examples), "steps": len(batches),
                      "seconds": round(seconds, 4), "markers": markers, "real_tokens": real,
                      "markers_per_s": markers / seconds, "real_tokens_per_s": real / seconds,
                      "token_fill": round(real / slots, 4),
                      "most_examples_per_row": int(max(b["segment_ids"].max() for b in batches))}), flush=True)
    if name != "unpacked" and "unpacked" in markers_per_s:
      print(json.dumps({f"{name}_over_unpacked_markers_per_s": markers_per_s[name] / markers_per_s["unpacked"]}),
            flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
