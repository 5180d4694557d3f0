"""Caps a child of `python -m benchmarks.as_avx2` as its parent was capped, before it imports
anything else: this folder is on the PYTHONPATH only of processes that tool started. A process
that is the tool itself again (a program that restarts its own command) caps itself."""

import sys

if sys.orig_argv[1:3] != ["-m", "benchmarks.as_avx2"]:
  from benchmarks import as_avx2

  try:
    as_avx2.cap_ynnpack()
  except as_avx2.EmulationUnavailable as e:
    print(f"[as_avx2] error in a child process: {e}", file=sys.stderr)
    sys.exit(2)
