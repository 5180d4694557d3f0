"""`python -m rmjax.bench --loop` on a tiny shape: one JSON line whose ratio is its two figures'.

Figures are timings, so nothing here asserts a speed: only the record's fields and arithmetic."""

import json

from rmjax.bench import __main__ as bench_main
from rmjax.bench import loop as bench_loop


def test_loop_bench_prints_one_record_with_both_figures_and_their_ratio(tmp_path, capsys):
  argv = ["--loop", "--preset", "tiny", "--seq-len", "64", "--batch", "8", "--grad-accum", "1",
          "--windows", "1", "--set", "logging_steps=2", "--set", "data.synthetic.train_records=64",
          "--set", "data.synthetic.test_records=8", "--keep", str(tmp_path)]
  assert bench_main.main(argv) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert len(lines) == 1
  r = json.loads(lines[0])
  assert r["loop_tokens_per_s"] > 0 and r["step_tokens_per_s"] > 0
  assert abs(r["loop_over_step"] - r["loop_tokens_per_s"] / r["step_tokens_per_s"]) < 1e-9
  assert r["step_tokens_per_s"] == max(r["step_tokens_per_s_back_to_back"], r["step_tokens_per_s_paced"])
  assert 0 < r["fill"] <= 1 and r["chosen"]["remat"] == "none"  # the demo spec sets remat; scan_unroll is auto
  assert (r["timed_steps"], r["warmup_steps"]) == (2, 2)
  medians = r["seconds_per_step_median"]
  assert sorted(medians) == ["back_to_back", "loop", "paced"] and all(v > 0 for v in medians.values())
  assert r["batch_shape"] == [[8, 64]] and r["step_retraced"] is False and r["train_step_traces"] == 1
  assert r["spec"]["logging_steps"] == 2 and r["model_demo"]["num_layers"] == 2


def test_loop_rate_sums_the_logged_windows_after_the_warm_up(tmp_path):
  """Windows of 2 steps: [1-2] is warm-up; [3-4] 40 tokens at 10/s = 4 s, [5-6] 60 at 20/s = 3 s;
  a last step before [5-6] leaves that window out."""
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 2, "train/tokens_per_s": 1.0}, {"step": 4, "train/tokens_per_s": 10.0},
          {"step": 5, "val/loss": 0.1}, {"step": 6, "train/tokens_per_s": 20.0}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert bench_loop.loop_rate(path, [5, 5, 20, 20, 30, 30], first_step=2, last_step=6) == (100 / 7, 4)
  assert bench_loop.loop_rate(path, [5, 5, 20, 20, 30, 30], first_step=2, last_step=4) == (10.0, 2)


def test_bad_loop_option_is_one_line(capsys):
  assert bench_main.main(["--loop", "--preset", "tiny", "--set", "no_such_key=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "no_such_key" in err and len(err.splitlines()) == 1


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
           "target_mask": np.zeros((1, 2), np.float32)}
  expected = 18 * n + 30 * L * H * d
  assert bench_loop.model_flops(cfg, batch, "full", ()) == expected
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
          "--dtype", "float32", "--windows", "1", "--set", "logging_steps=2", "--set", "data.synthetic.train_records=64",
          "--set", "data.synthetic.test_records=8"]
  assert bench_main.main(argv) == 0
  r = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][0])
  assert r["mode"] == "lora" and r["spec_file"] == "specs/lora.py"
  assert (r["spec"]["batch_size"], r["spec"]["grad_accum_steps"]) == (32, 4)  # lora.py's 4 micro-batches, 8 rows each
  assert r["spec"]["model.remat"] == "auto" and set(r["chosen"]) == {"remat", "scan_unroll"}
  assert r["model_demo"]["vocab_size"] == 512 and r["batch_shape"] == [[32, 64]]  # the tiny preset's vocabulary
