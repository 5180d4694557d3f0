"""`python -m rmjax.bench --loop` on a tiny shape: one JSON line whose ratio is its two figures'.

Figures are timings, so nothing here asserts a speed: only the record's fields and arithmetic."""

import json

from rmjax.bench import __main__ as bench_main
from rmjax.bench import loop as bench_loop


def test_loop_bench_prints_one_record_with_both_figures_and_their_ratio(tmp_path, capsys):
  argv = ["--loop", "--preset", "tiny", "--seq-len", "64", "--batch", "8", "--grad-accum", "1",
          "--windows", "3", "--segment", "5", "--block", "2", "--set", "logging_steps=2",
          "--set", "data.synthetic.train_records=64", "--set", "data.synthetic.test_records=8", "--keep", str(tmp_path)]
  assert bench_main.main(argv) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert len(lines) == 1
  r = json.loads(lines[0])
  assert r["loop_tokens_per_s"] > 0 and r["step_tokens_per_s"] > 0
  assert abs(r["loop_over_step"] - r["loop_tokens_per_s"] / r["step_tokens_per_s"]) < 1e-9
  # 6 timed loop steps hold one segment of 5 (steps 3-7): a bare block of 2 before it, its first
  # 3 intervals untimed (the block, the prefetcher's refill), 2 timed; the rates are its sums' ratios.
  (w,) = r["segments"]
  assert (r["timed_steps"], r["bare_steps"], r["warmup_steps"]) == (2, 2, 2)
  assert r["loop_tokens_per_s"] == w["loop_tokens"] / w["loop_seconds"]
  assert r["step_tokens_per_s"] == w["step_tokens"] / w["step_seconds"]
  assert w["loop_tokens"] == r["tokens_per_step"] * 2
  assert w["step_tokens"] == w["loop_tokens"]  # the bare block ran the batches of the timed loop steps
  assert 0 < r["fill"] <= 1 and r["chosen"]["remat"] == "none"  # the demo spec sets remat; scan_unroll is auto
  assert w["loop_seconds_per_step_median"] > 0 and w["step_seconds_per_step_median"] > 0
  assert r["batch_shape"] == [[8, 64]] and r["step_retraced"] is False and r["train_step_traces"] == 1
  assert r["spec"]["logging_steps"] == 2 and r["model_demo"]["num_layers"] == 2


def test_bad_loop_option_is_one_line(capsys):
  assert bench_main.main(["--loop", "--preset", "tiny", "--set", "no_such_key=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("rmjax.bench: error: ") and "no_such_key" in err and len(err.splitlines()) == 1


def test_model_flops_count_each_packed_example_over_its_own_length_and_mfu_divides_by_the_peak():
  """One row of 4 slots: examples of 2 and 1 tokens, one pad. Per token 6N (full fine-tuning)
  plus 6 * L * H * d_head * (its example's length): 2 (6N + 12 LHd) + (6N + 6 LHd)."""
  import jax
  import numpy as np
  from rmjax.model.config import ModelConfig
  cfg = ModelConfig.tiny("qwen3", vocab_size=64)
  D, H, K, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  I, L = cfg.intermediate_size, cfg.num_layers
  n = L * (D * H * d + 2 * D * K * d + H * d * D + 3 * D * I)
  batch = {"input_ids": np.zeros((1, 4), np.int32), "segment_ids": np.array([[1, 1, 2, 0]], np.int32),
           "marker_positions": np.array([[1, 2]], np.int32), "target_mask": np.zeros((1, 2), np.float32)}
  expected = 18 * n + 30 * L * H * d
  assert bench_loop.model_flops(cfg, batch, "full", ()) == expected
  # Unrolled, the last layer's q, o and MLP run at the supervised markers only (one per example
  # here): example 1 skips them, and its last layer's attention, at 1 of its 2 rows; the head
  # (D x 1) runs at the 2 markers.
  supervised = {**batch, "target_mask": np.ones((1, 2), np.float32)}
  skipped = 6 * (2 * D * H * d + 3 * D * I) + 6 * H * d * 2
  unrolled = cfg.replace(scan_unroll=0)
  assert bench_loop.model_flops(unrolled, supervised, "full", ()) == expected + 6 * D * 2 - skipped
  assert bench_loop.model_flops(cfg, supervised, "full", ()) == expected + 6 * D * 2
  u = bench_loop.utilisation(cfg, "full", [batch], [3.0], [expected], 1, "NVIDIA H100 80GB HBM3", 30.0, 60.0)
  peak = 989.5e12 * jax.device_count()
  assert u["fill"] == 0.75 and u["model_flops_per_token"] == expected / 3
  assert np.isclose(u["loop_mfu"], 30.0 * expected / 3 / peak) and np.isclose(u["step_mfu"], 2 * u["loop_mfu"])
  rows = 4 * (6 * n + 6 * L * H * d * 4)  # the step bench's way: 4 slots, each causal over the row of 4
  assert np.isclose(u["loop_mfu_rows"], 30.0 * rows / 3 / peak) and np.isclose(u["step_mfu_rows"], 60.0 * rows / 3 / peak)
  assert bench_loop.utilisation(cfg, "full", [batch], [3.0], [expected], 1, "cpu", 30.0, 60.0)["loop_mfu"] is None


def test_a_shipped_spec_runs_on_the_demo_backbone_with_the_presets_vocabulary(capsys):
  """--spec keeps the spec's own keys (specs/lora.py: LoRA, 4 micro-batches, auto) and swaps in
  the demo backbone at the preset's shape and vocabulary and the demo's synthetic data."""
  argv = ["--loop", "--spec", "specs/lora.py", "--preset", "tiny", "--seq-len", "64", "--batch", "32",
          "--dtype", "float32", "--windows", "3", "--segment", "5", "--block", "2", "--set", "logging_steps=2", "--set", "data.synthetic.train_records=64",
          "--set", "data.synthetic.test_records=8"]
  assert bench_main.main(argv) == 0
  r = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][0])
  assert r["mode"] == "lora" and r["spec_file"] == "specs/lora.py"
  assert (r["spec"]["batch_size"], r["spec"]["grad_accum_steps"]) == (32, 4)  # lora.py's 4 micro-batches, 8 rows each
  assert r["spec"]["model.remat"] == "auto" and set(r["chosen"]) == {"remat", "scan_unroll"}
  auto = r["auto"]  # untimed: the first in the cost order that fits, said next to the old default
  assert auto["chosen"] == auto["order_pick"] == r["chosen"] and auto["timed"] is False
  assert auto["old_default"] == {"remat": "full", "scan_unroll": 1}
  assert auto["trials"][-1]["fits"] and "step_s" not in auto["trials"][-1]
  assert r["model_demo"]["vocab_size"] == 512 and r["batch_shape"] == [[32, 64]]  # the tiny preset's vocabulary
