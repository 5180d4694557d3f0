"""Tests of `python -m benchmarks.as_avx2`: the switches it sets and the YNNPACK cap it applies."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from benchmarks import as_avx2

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_environment_caps_xla_and_torch_and_keeps_other_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX512", "PATH": "/bin"}
  as_avx2.set_environment(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", "--xla_cpu_max_isa=AVX2"]
  assert (env["ATEN_CPU_CAPABILITY"], env["MKL_ENABLE_INSTRUCTIONS"], env["ONEDNN_MAX_CPU_ISA"]) == \
      ("avx2", "AVX2", "AVX2")
  assert env["PATH"] == "/bin"


def test_load_address_is_the_mapping_at_file_offset_zero(tmp_path):
  library = tmp_path / "libx.so"
  library.write_bytes(b"")
  maps = tmp_path / "maps"
  maps.write_text(
      f"7f0000001000-7f0000002000 r-xp 00001000 08:01 12 {library}\n"
      f"7f0000000000-7f0000001000 r--p 00000000 08:01 12 {library}\n"
      "7f0000100000-7f0000101000 r--p 00000000 08:01 13 /usr/lib/libother.so\n")
  assert as_avx2.load_address(str(library), str(maps)) == 0x7F0000000000
  with pytest.raises(as_avx2.EmulationUnavailable, match="not loaded"):
    as_avx2.load_address(str(tmp_path / "libabsent.so"), str(maps))


_PROBE = """
import subprocess, sys
from benchmarks import as_avx2
child = "from benchmarks import as_avx2; print(hex(as_avx2.ynnpack_features()))"
print(sys.argv[1:], hex(as_avx2.ynnpack_features()),
      subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout.strip())
"""


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
def test_caps_this_jaxlibs_ynnpack_and_its_childrens_and_runs_the_module(tmp_path):
  """The whole tool on this jaxlib, in a child (the cap would outlive the test in this process):
  YNNPACK's features must read back as the machine's with every bit above FMA3 cleared, in the
  module, run with its arguments, and in a Python process the module starts."""
  (tmp_path / "avx2_probe.py").write_text(_PROBE)
  env = {**os.environ, "PYTHONPATH": str(tmp_path)}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.as_avx2", "avx2_probe", "--flag"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr
  line = next(l for l in proc.stderr.splitlines() if l.startswith("[as_avx2]"))
  before, after = (int(word, 16) for word in line.split("features ")[1].split(";")[0].split(" -> "))
  assert after == before & 0x7F and before & 0x60 == 0x60  # the machine has AVX2 and FMA3
  assert proc.stdout.split() == ["['--flag']", hex(after), hex(after)]


def test_refuses_a_call_without_a_module():
  assert as_avx2.main([]) == 2 and as_avx2.main(["--help"]) == 2
