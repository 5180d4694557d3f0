"""Tests of the XLA dump readers: `benchmarks.buffers` and `benchmarks.traffic`."""

import os
import subprocess
import sys

import pytest

from rmjax.bench import common


def test_buffers_names_the_stacked_layer_residuals_in_the_temp_block(tmp_path):
  """A remat=full step keeps one (layers, batch, seq, hidden) stack of layer inputs in its temp
  block; the dump summary must find it there (shape from the tiny preset, not from the tool)."""
  from benchmarks import buffers
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_dump_to={tmp_path}")
  subprocess.run([sys.executable, "-m", "rmjax.bench", "--preset", "tiny", "--seq-len", "64", "--batch", "2",
                  "--mode", "lora", "--impl", "rmjax", "--remat", "--analysis-only", "--no-flops", "--no-isolate"],
                 env=env, check=True, capture_output=True, timeout=300)
  summary = buffers.summarize(tmp_path)
  cfg = common.PRESETS["tiny"]()
  stack = f"f32[{cfg.num_layers},2,64,{cfg.hidden_size}]"
  assert summary["temp_mb"] > 0 and summary["largest"]
  assert any(v["shape"].startswith(stack) for v in summary["largest"]), summary["largest"][:5]
  # The same dump read by the traffic tool: the layer loops run num_layers times per step.
  from benchmarks import traffic
  moved = traffic.summarize(tmp_path)
  assert moved["total_gb"] > 0 and moved["xla_remat_duplicates"] == 0
  assert sum(moved["by_category_gb"].values()) == pytest.approx(moved["total_gb"], abs=0.05)
  assert {r["runs"] for r in moved["largest"]} >= {cfg.num_layers}


_HLO = """HloModule jit_f, entry_computation_layout={(f32[3,10]{1,0})->f32[3,10]{1,0}}

%fused_slice_mul (param_0.1: f32[3,10], param_1.1: s32[]) -> f32[1,10] {
  %param_0.1 = f32[3,10]{1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  %dynamic-slice.1 = f32[1,10]{1,0} dynamic-slice(%param_0.1, %param_1.1, %constant.1), dynamic_slice_sizes={1,10}
  ROOT %multiply.1 = f32[1,10]{1,0} multiply(%dynamic-slice.1, %dynamic-slice.1)
}

%fused_update (param_0.2: f32[3,10], param_1.2: f32[1,10], param_2.2: s32[]) -> f32[3,10] {
  %param_0.2 = f32[3,10]{1,0} parameter(0)
  %param_1.2 = f32[1,10]{1,0} parameter(1)
  %param_2.2 = s32[] parameter(2)
  %constant.2 = s32[] constant(0)
  %negate.2 = f32[1,10]{1,0} negate(%param_1.2)
  ROOT %dynamic-update-slice.2 = f32[3,10]{1,0} dynamic-update-slice(%param_0.2, %negate.2, %param_2.2, %constant.2)
}

%body (p: (s32[], f32[3,10], f32[3,10])) -> (s32[], f32[3,10], f32[3,10]) {
  %p = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %xs = f32[3,10]{1,0} get-tuple-element(%p), index=1
  %ys = f32[3,10]{1,0} get-tuple-element(%p), index=2
  %sq = f32[1,10]{1,0} fusion(%xs, %i), kind=kLoop, calls=%fused_slice_mul
  %upd = f32[3,10]{1,0} fusion(%ys, %sq, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) tuple(%next, %xs, %upd)
}

%cond (q: (s32[], f32[3,10], f32[3,10])) -> pred[] {
  %q = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

ENTRY %main (x: f32[3,10]) -> f32[3,10] {
  %x = f32[3,10]{1,0} parameter(0)
  %zero = f32[] constant(0)
  %init = f32[3,10]{1,0} broadcast(%zero), dimensions={}
  %c0 = s32[] constant(0)
  %t0 = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) tuple(%c0, %x, %init)
  %w = (s32[], f32[3,10]{1,0}, f32[3,10]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[3,10]{1,0} get-tuple-element(%w), index=2
}
"""


def test_traffic_counts_slices_in_place_updates_and_loop_trips(tmp_path):
  """Hand count: the entry's broadcast moves 120 + 4 bytes. Each of the 3 loop trips: the first
  fusion reads one 40-byte row of the stack (not all 120) and the index (4), writes 40; the
  second reads the 40-byte row and the index, updates the stack in place (its buffer moves
  nothing) and writes the 40-byte row; the add moves 3 x 4. (124 + 3 x (84 + 84 + 12)) = 664."""
  from benchmarks import traffic
  (tmp_path / "module_0001.jit__train_step.gpu_after_optimizations.txt").write_text(_HLO)
  rows = {r["name"]: r for r in traffic.ops(_HLO)}
  assert set(rows) == {"init", "sq", "upd", "next"}
  assert (rows["init"]["bytes"], rows["sq"]["bytes"], rows["upd"]["bytes"], rows["next"]["bytes"]) == (124, 252, 252, 36)
  assert {rows[n]["runs"] for n in ("sq", "upd", "next")} == {3}
  assert sum(r["bytes"] for r in rows.values()) == 664
  summary = traffic.summarize(tmp_path)
  assert summary["by_computation_gb"].keys() == {"main", "body"} and summary["xla_remat_duplicates"] == 0
  assert traffic.main([str(tmp_path / "missing")]) == 2


_HLO_STATIC_SLICES = """HloModule jit_g, entry_computation_layout={(f32[3,10]{1,0})->f32[1,10]{1,0}}

%fused_static (param_0.3: f32[3,10]) -> f32[1,10] {
  %param_0.3 = f32[3,10]{1,0} parameter(0)
  %slice.3 = f32[1,10]{1,0} slice(%param_0.3), slice={[1:2], [0:10]}
  ROOT %exponential.3 = f32[1,10]{1,0} exponential(%slice.3)
}

ENTRY %main (x: f32[3,10]) -> f32[1,10] {
  %x = f32[3,10]{1,0} parameter(0)
  %a = f32[1,10]{1,0} fusion(%x), kind=kLoop, calls=%fused_static
  %b = f32[1,10]{1,0} slice(%x), slice={[2:3], [0:10]}
  ROOT %c = f32[1,10]{1,0} add(%a, %b)
}
"""


def test_traffic_counts_static_slices_as_the_rows_they_read():
  """An unrolled layer reads its weights as a static slice of the stack, inside a GEMM fusion or
  bare. Hand count: the fusion reads one 40-byte row (not the 120-byte stack) and writes 40; the
  bare slice reads and writes 40 each; the add reads 2 x 40 and writes 40."""
  from benchmarks import traffic
  rows = {r["name"]: r["bytes"] for r in traffic.ops(_HLO_STATIC_SLICES)}
  assert rows == {"a": 80, "b": 80, "c": 120}
