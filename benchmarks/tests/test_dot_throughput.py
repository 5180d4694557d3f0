"""Tests of `python -m benchmarks.dot_throughput`."""

import argparse

import numpy as np
import pytest

from benchmarks import dot_throughput


def test_both_libraries_compute_the_same_product_and_are_timed():
  record = dot_throughput.measure(128, 64, 96, repeats=2, settle=0.0)  # 1.6 MFLOP: >= 0.1 GFLOP/s even on a busy CPU
  assert (record["M"], record["K"], record["N"]) == (128, 64, 96)
  assert record["max_abs_diff"] < 1e-4  # entries are sums of 64 products of unit normals
  assert record["xla_gflops"] > 0 and record["torch_gflops"] > 0 and record["xla_over_torch"] > 0


def test_eigen_side_compiles_without_ynnpack_and_computes_the_same_product():
  record = dot_throughput.measure(128, 64, 96, repeats=2, settle=0.0, eigen=True)
  assert record["eigen_uses_ynn"] is False and record["eigen_max_abs_diff"] < 1e-4
  assert record["xla_eigen_gflops"] > 0
  assert record["eigen_over_ynn"] == pytest.approx(record["xla_eigen_gflops"] / record["xla_gflops"], rel=1e-3)
  _, default_hlo = dot_throughput.compiled_dot(np.ones((128, 64), np.float32), np.ones((64, 96), np.float32))
  assert dot_throughput.YNN_INSTRUCTION.search(default_hlo)  # so the option above took YNNPACK away


def test_onednn_side_runs_the_dot_in_onednn_and_computes_the_same_product():
  record = dot_throughput.measure(128, 64, 96, repeats=2, settle=0.0, onednn=True)
  assert record["onednn_fusions"] == 1 and record["onednn_max_abs_diff"] < 1e-4
  assert record["xla_onednn_gflops"] > 0
  assert record["onednn_over_ynn"] == pytest.approx(record["xla_onednn_gflops"] / record["xla_gflops"], rel=1e-3)


def test_shapes_are_three_positive_ints():
  assert dot_throughput._shape("4,5,6") == (4, 5, 6)
  for bad in ("4,5", "4,0,6"):
    with pytest.raises(argparse.ArgumentTypeError):
      dot_throughput._shape(bad)
