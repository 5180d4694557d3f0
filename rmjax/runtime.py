"""Process-level set-up and exit: the compilation cache, jax.distributed, host memory, leaving.

Why it exists: the cache and jax.distributed must happen once, before the first computation,
in every entry point (rmjax.launch and the seed-compatible launchers), and both read the
environment; keeping them here keeps the launchers thin and lets tests call them with a fake
environment. jax is imported inside the functions so importing this module stays cheap. The
entry points also leave through `exit_process`, so a run that has reported its error is not
held open by library threads that wait for nothing. On a CPU, how the process's malloc serves
XLA's buffers (huge pages, pages kept between steps) is set here too.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import sys
import threading
from typing import Any, Mapping, MutableMapping, NoReturn, Sequence

CACHE_ENV = "RMJAX_COMPILATION_CACHE"
DEFAULT_CACHE = pathlib.Path("~/.cache/rmjax/jax-cache")


def compilation_cache_dir(env: Mapping[str, str] = os.environ) -> pathlib.Path | None:
  """Where compiled programs are cached: $RMJAX_COMPILATION_CACHE, "off" disables it."""
  value = env.get(CACHE_ENV, "").strip()
  if value.lower() in ("off", "none", "0", "false"):
    return None
  return pathlib.Path(value or DEFAULT_CACHE).expanduser()


def quiet_library_logs() -> None:
  """Libraries log through absl at INFO (orbax every save and restore, jax each backend it
  could not start, e.g. "Unable to initialize backend 'tpu'"); keep stderr for rmjax's own
  lines, so an error stays one line."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
HUGE_PAGES_ENV = "RMJAX_HUGE_PAGES"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def reuse_host_memory(platform: str, libc: Any = None) -> bool:
  """On a CPU backend, keeps memory that malloc freed in the process for the next step.

  Why: XLA's CPU client allocates each execution's temporary buffer afresh (gigabytes for a
  training step) and frees it at the end. Above glibc's mmap threshold (32 MB at most) malloc
  maps every such request anew and unmaps it on free, so each step faults in, and the kernel
  zeroes, every page of its temporaries again. With mmap off and the heap never trimmed, freed
  blocks stay in the process; it keeps its peak, which a training process reaches every step
  anyway. These settings rule glibc's main arena, which serves the main thread. XLA allocates
  on its own threads, each with an arena whose heaps grow to 64 MB at most, so their larger
  blocks are still mapped and unmapped every step; one arena for every thread
  (`GLIBC_TUNABLES=glibc.malloc.arena_max=1`) keeps those too, but measured no faster step, so
  it is not set (BUILD.md, Results). A GPU backend's temporaries live on the device: nothing
  changes there. Returns whether it applied (glibc only).
  """
  if platform != "cpu":
    return False
  if libc is None:
    import ctypes
    import platform as platform_lib
    if platform_lib.libc_ver()[0] != "glibc":
      return False
    libc = ctypes.CDLL(None)
  # -1 is SIZE_MAX to glibc: never trim (mallopt takes an int, too small for a many-GB heap top)
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def huge_page_malloc_env(env: Mapping[str, str], glibc: bool, thp_setting: str,
                         gpu_plugins: Sequence[str]) -> dict[str, str] | None:
  """The environment to restart this process in so that malloc backs its large blocks with
  transparent huge pages (glibc's `glibc.malloc.hugetlb=1` tunable), or None when it needs no
  restart: not glibc, the kernel's THP setting "never", the tunable already set (either way),
  $RMJAX_HUGE_PAGES=0, or a jax GPU plugin installed (the host's memory is not where a GPU
  run's steps work) unless JAX_PLATFORMS is "cpu".

  Why: a CPU training step streams through gigabytes of XLA's buffers; in 4 KB pages its GEMMs
  and copies miss the TLB far more than in 2 MB ones. glibc reads the tunable only when a
  process starts, hence the restart. Step times with and without: BUILD.md, Results.
  """
  tunables = env.get("GLIBC_TUNABLES", "")
  if (not glibc or "[never]" in thp_setting or HUGETLB_TUNABLE in tunables
      or env.get(HUGE_PAGES_ENV, "").strip().lower() in ("0", "off", "false", "no")
      or (gpu_plugins and env.get("JAX_PLATFORMS", "").strip().lower() != "cpu")):
    return None
  return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{HUGETLB_TUNABLE}=1"]))}


def _read_thp_setting() -> str:
  try:
    return THP_SETTING.read_text()
  except OSError:
    return "[never]"  # no THP in this kernel


def restart_with_huge_page_malloc() -> None:
  """Re-runs this process's command (same pid, same arguments) with huge-page malloc when
  `huge_page_malloc_env` asks for it; returns only when it does not. Call it first thing in a
  program's `__main__`, never from a library call."""
  import platform as platform_lib
  import pkgutil
  try:
    import jax_plugins  # namespace package of jax's PJRT plugins (CUDA, ROCm)
    plugins = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    plugins = []
  env = huge_page_malloc_env(os.environ, platform_lib.libc_ver()[0] == "glibc", _read_thp_setting(), plugins)
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
DEFAULT_MEMORY_FRACTION = "0.9"


def default_gpu_memory_fraction(env: MutableMapping[str, str] = os.environ) -> str | None:
  """Lets jax take 90% of each GPU's memory, not its own default 75%, unless the user chose.

  Why: full fine-tuning of the Qwen3-4B shape on one 80 GB GPU needs more than jax's 75% and
  less than 90% (BUILD.md, Results); the rest stays for the CUDA context and libraries (cuDNN
  and cuBLAS workspaces, NCCL). Must run before jax starts its GPU backend; read nowhere else (a
  CPU ignores it). Returns the fraction set, or None when the environment already says (the
  fraction, or no preallocation at all).
  """
  if MEMORY_FRACTION_ENV in env or env.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
    return None
  env[MEMORY_FRACTION_ENV] = DEFAULT_MEMORY_FRACTION
  return DEFAULT_MEMORY_FRACTION


def memory_fraction(env: Mapping[str, str] = os.environ) -> str:
  """The share of each GPU's memory jax may use, as the environment sets it (jax's default 0.75)."""
  return env.get(MEMORY_FRACTION_ENV, "0.75")


def enable_compilation_cache(env: Mapping[str, str] = os.environ) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache unless disabled; returns its directory.

  A cache directory configured elsewhere (e.g. by tests, or JAX_COMPILATION_CACHE_DIR) wins.
  """
  import jax
  if jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  path = compilation_cache_dir(env)
  if path is None:
    return None
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  return path


def distributed_args(dist: Any, env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
  """Arguments for jax.distributed.initialize, or None for a single-process run.

  Each of the coordinator address, the process count and the process id comes from the spec's
  `distributed` group when set there, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID (jax reads only the address itself; launch/local.sh and the k8s Job set all
  three), so a spec may fix some and leave the others to the launcher. Without an address, SLURM
  and Open MPI runs use JAX's own cluster detection; several processes with no way to find the
  coordinator is a one-line ValueError rather than N independent single-process runs.
  """
  address = str(dist.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")).strip()
  args: dict[str, Any] = {}
  if int(dist.num_processes) > 0:
    args["num_processes"] = int(dist.num_processes)
  elif env.get("JAX_NUM_PROCESSES", "").strip():
    args["num_processes"] = _env_int(env, "JAX_NUM_PROCESSES")
  if int(dist.process_id) >= 0:
    args["process_id"] = int(dist.process_id)
  elif env.get("JAX_PROCESS_ID", "").strip():
    args["process_id"] = _env_int(env, "JAX_PROCESS_ID")
  cluster = any(env.get(k, "").strip() and _env_int(env, k) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  if address:
    missing = [name for name in ("num_processes", "process_id") if name not in args]
    if missing and not cluster:  # jax's own error names neither the spec key nor the variable
      raise ValueError(f"a coordinator address is set but not {' or '.join(missing)}: set "
                       + " and ".join(f"distributed.{m} or JAX_{m.upper()}" for m in missing))
    return {"coordinator_address": address, **args}
  if cluster:
    return args  # JAX's cluster detection finds the coordinator
  if args.get("num_processes", 1) > 1:
    raise ValueError(f"{args['num_processes']} processes but no coordinator address: set "
                     "distributed.coordinator_address or JAX_COORDINATOR_ADDRESS (host:port of process 0)")
  return None


def _env_int(env: Mapping[str, str], key: str) -> int:
  """A non-negative integer from the environment, or a ValueError that names the variable."""
  value = env[key].strip()
  if not value.isdigit():
    raise ValueError(f"environment variable {key}={env[key]!r} must be a non-negative integer")
  return int(value)


def init_distributed(dist: Any, env: Mapping[str, str] = os.environ) -> bool:
  """Calls jax.distributed.initialize when the run has several processes; True if it did."""
  args = distributed_args(dist, env)
  if args is None:
    return False
  import jax
  if not jax.distributed.is_initialized():  # idempotent: launchers may call it early
    jax.distributed.initialize(**args)
    catch_sigterm_from_start()
  return True


_startup_sigterm: list[int] = []


def catch_sigterm_from_start() -> None:
  """jax.distributed.initialize installs a native SIGTERM catcher (its preemption notifier) that
  only notes the signal, so a SIGTERM before the training loop installs its own handler (model
  build, data, restore) was lost and the run trained on. This records it instead; the loop's stop
  flag starts from it and stops, with every process, at its first step boundary."""
  try:
    signal.signal(signal.SIGTERM, lambda signum, _frame: _startup_sigterm.append(signum))
  except ValueError:  # not the main thread: nothing to install
    pass


def sigterm_during_startup() -> int | None:
  """The SIGTERM `catch_sigterm_from_start` recorded, if any."""
  return _startup_sigterm[0] if _startup_sigterm else None


def _leave_distributed() -> None:
  """jax.distributed's shutdown barrier, which os._exit would skip: every process meets there on
  its way out, and one that left without it keeps the others waiting for its heartbeat (~100 s)."""
  jax = sys.modules.get("jax")
  if jax is None:
    return
  try:
    if jax.distributed.is_initialized():
      jax.distributed.shutdown()
  except Exception:  # noqa: BLE001 -- a partner already gone: leave anyway
    logging.getLogger("rmjax").debug("jax.distributed.shutdown failed", exc_info=True)


def exit_process(code: int | str | None) -> NoReturn:
  """Ends the process with `code` (as SystemExit would).

  When a checkpoint write fails inside orbax (a directory that turned read-only after rmjax's
  probe, a disk that filled up), orbax's non-daemon signal threads go on waiting for signals
  that will never come, up to its coordination timeout (300 s), and the interpreter waits for
  them before it exits. So when such threads are alive at exit, logs and streams are flushed
  and the process ends at once (os._exit); otherwise this raises SystemExit as usual.
  """
  lingering = [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
  if not lingering:
    raise SystemExit(code)
  status = code if isinstance(code, int) else (0 if code is None else 1)
  if isinstance(code, str):
    print(code, file=sys.stderr)
  logging.getLogger("rmjax").debug("leaving with %d non-daemon threads alive: %s", len(lingering),
                                   ", ".join(t.name for t in lingering))
  _leave_distributed()
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)
