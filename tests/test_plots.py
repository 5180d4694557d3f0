"""Tests for rmjax.plots: the reliability diagram renders a real, non-blank PNG per layout."""

import struct

import numpy as np
import pytest

from rmjax.plots import reliability_diagram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
  """(width, height) from the IHDR chunk that must follow the signature."""
  head = path.read_bytes()[:24]
  assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
  return struct.unpack(">II", head[16:24])


def synthetic(n, bias, seed):
  rng = np.random.default_rng(seed)
  p = rng.beta(4, 2, size=n)
  return p, (rng.random(n) < np.clip(p + bias, 0, 1)).astype(np.float32)


def test_three_sources_plus_overall(tmp_path):
  path = reliability_diagram({"prm800k": synthetic(500, -0.1, 0), "eqasc": synthetic(80, 0.0, 1),
                              "reveal": ([], [])}, tmp_path / "plots" / "reliability.png")
  width, height = png_size(path)
  # 4 panels (3 sources + overall) in one row: 4.3 in each at 110 dpi.
  assert width == pytest.approx(4 * 4.3 * 110, abs=2) and height == pytest.approx(5.6 * 110, abs=2)
  assert 20_000 < path.stat().st_size < 2_000_000
  import matplotlib.image
  rgb = matplotlib.image.imread(str(path))[..., :3]
  blue_ish = (rgb[..., 2] - rgb[..., 0]) > 0.25  # curve, markers and count bars
  assert blue_ish.mean() > 0.01
  assert (rgb.min(axis=-1) < 0.95).mean() > 0.02  # far from a blank page


def test_single_source_has_no_overall_panel(tmp_path):
  width, _ = png_size(reliability_diagram({"eqasc": synthetic(50, 0.0, 2)}, tmp_path / "one.png"))
  assert width == pytest.approx(4.3 * 110, abs=2)


def test_many_sources_wrap_into_rows(tmp_path):
  sources = {f"s{i}": synthetic(30, 0.0, i) for i in range(5)}  # 5 + overall = 6 panels -> 2 rows of 4
  width, height = png_size(reliability_diagram(sources, tmp_path / "many.png", n_bins=5))
  assert width == pytest.approx(4 * 4.3 * 110, abs=2) and height == pytest.approx(2 * 5.6 * 110, abs=2)


def test_bad_input_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="at least one source"):
    reliability_diagram({}, tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    reliability_diagram({"a": ([1.2], [1.0])}, tmp_path / "x.png")
