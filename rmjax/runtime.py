"""Process-level JAX set-up: the persistent compilation cache and jax.distributed.

Why it exists: both must happen once, before the first computation, in every entry point
(rmjax.launch and the seed-compatible launchers), and both read the environment; keeping them
here keeps the launchers thin and lets tests call them with a fake environment.
jax is imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

CACHE_ENV = "RMJAX_COMPILATION_CACHE"
DEFAULT_CACHE = pathlib.Path("~/.cache/rmjax/jax-cache")


def compilation_cache_dir(env: Mapping[str, str] = os.environ) -> pathlib.Path | None:
  """Where compiled programs are cached: $RMJAX_COMPILATION_CACHE, "off" disables it."""
  value = env.get(CACHE_ENV, "").strip()
  if value.lower() in ("off", "none", "0", "false"):
    return None
  return pathlib.Path(value or DEFAULT_CACHE).expanduser()


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

  The spec's `distributed` group wins; otherwise JAX's own environment detection is used when
  the environment says there are several processes (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI).
  """
  if dist.coordinator_address:
    args: dict[str, Any] = {"coordinator_address": dist.coordinator_address}
    if dist.num_processes > 0:
      args["num_processes"] = int(dist.num_processes)
    if dist.process_id >= 0:
      args["process_id"] = int(dist.process_id)
    return args
  if env.get("JAX_COORDINATOR_ADDRESS"):
    # jax reads the address itself but not the count or the id (no cluster type does for a
    # plain environment), so launch/local.sh and launch/k8s-indexed-job.yaml set these two.
    args = {}
    for key, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
      if env.get(key, "").strip():
        args[name] = _env_int(env, key)
    return args
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(key, "").strip() and _env_int(env, key) > 1:
      return {}
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
  return True
