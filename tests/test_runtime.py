"""Process-level set-up (rmjax/runtime.py): host memory for XLA's CPU steps (freed pages kept,
huge-page malloc)."""

import os
import platform
import subprocess
import sys

import pytest

from rmjax import runtime


class _RecordingLibc:
  def __init__(self):
    self.calls = []

  def mallopt(self, param, value):
    self.calls.append((param, value))
    return 1


def test_reuse_host_memory_turns_off_mmap_and_trimming_on_a_cpu_only():
  libc = _RecordingLibc()
  assert runtime.reuse_host_memory("gpu", libc) is False and libc.calls == []
  assert runtime.reuse_host_memory("cpu", libc) is True
  assert libc.calls == [(-4, 0), (-1, -1)]  # M_MMAP_MAX = 0; M_TRIM_THRESHOLD = SIZE_MAX


_FREE_AND_MEASURE = """
import ctypes
from rmjax import runtime
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

def kept_after_free(size=256 << 20):
  p = libc.malloc(size)
  libc.memset(p, 1, size)
  touched = rss()
  libc.free(p)
  return touched - rss()  # MB returned to the system by free

print(kept_after_free(), runtime.reuse_host_memory("cpu"), kept_after_free())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_stays_in_the_process_for_the_next_step():
  """A freed 256 MB buffer (like a step's temporaries) goes back to the system by default and
  stays in the process once reuse_host_memory has run: in a child, the setting is process-wide."""
  out = subprocess.run([sys.executable, "-c", _FREE_AND_MEASURE], capture_output=True, text=True, timeout=60,
                       check=True).stdout.split()
  returned_before, applied, returned_after = int(out[0]), out[1], int(out[2])
  assert returned_before >= 250 and applied == "True" and returned_after <= 5


def test_huge_page_malloc_restart_only_where_it_applies():
  on = lambda env, plugins=(): runtime.huge_page_malloc_env(env, True, "always [madvise] never", plugins)
  assert on({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert on({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert on({"JAX_PLATFORMS": "cpu"}, ["xla_cuda12"]) is not None
  # no restart: already set (either way), switched off, a GPU plugin, THP never, not glibc
  for env, plugins in (({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, ()), ({"RMJAX_HUGE_PAGES": "0"}, ()),
                       ({}, ["xla_cuda12"])):
    assert on(env, plugins) is None
  assert runtime.huge_page_malloc_env({}, True, "always madvise [never]", []) is None
  assert runtime.huge_page_malloc_env({}, False, "[always] madvise never", []) is None


_RESTART_PROBE = """
import os, sys
from rmjax import runtime
print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
runtime.restart_with_huge_page_malloc()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or "[never]" in runtime._read_thp_setting(),
                    reason="glibc with transparent huge pages only")
def test_restart_reruns_the_same_command_once_with_the_tunable():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RMJAX_HUGE_PAGES", "JAX_PLATFORMS")}
  env["JAX_PLATFORMS"] = "cpu"  # a GPU plugin, if installed, would otherwise stop the restart
  out = subprocess.run([sys.executable, "-c", _RESTART_PROBE, "a", "b"], capture_output=True, text=True,
                       timeout=60, env=env, check=True).stdout.splitlines()
  assert out == ["None ['a', 'b']", "glibc.malloc.hugetlb=1 ['a', 'b']"]
