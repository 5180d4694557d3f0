"""One training run per run directory at a time: an exclusive lock on <run_dir>/.rmjax.lock.

Why it exists: two launches into the same <output_dir>/<experiment_name> would both write
checkpoint_step_N, best.json and the logs, the later run overwriting the earlier one's without a
word. The lock is flock(2), which the kernel drops when the process ends however it ends
(SIGKILL included), so a crashed run leaves nothing to clean up and a relaunch resumes at once.
Process 0 takes it for the whole run (the run's other processes write the same folder under it).

A filesystem that cannot lock (some NFS mounts refuse flock) fails with an error other than "held
by another process": the run then goes on without the lock, and says so.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import socket

LOCK_FILE = ".rmjax.lock"
log = logging.getLogger("rmjax.train")


class RunDirectoryBusy(ValueError):
  """Another live process holds the run directory's lock (a user error: one line, exit 2)."""


class RunDirectoryUnusable(ValueError):
  """The run directory cannot be created or written (a user's path: one line, exit 2)."""


def lock_run_directory(run_dir: pathlib.Path) -> int | None:
  """Takes the lock (creating run_dir); returns its file descriptor, to pass to `unlock`, or None
  where the filesystem cannot lock. Raises RunDirectoryBusy, naming the holder, when it is held."""
  import fcntl
  path = run_dir / LOCK_FILE
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:  # output_dir is a file, or read-only: the user's path
    raise RunDirectoryUnusable(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
      raise RunDirectoryBusy(f"another run is writing {run_dir} ({holder or 'a live process'}); wait for it "
                             f"to end, or give this run another --spec.output_dir or --spec.experiment_name") from None
    log.warning("cannot lock %s (%s): nothing stops a second run from writing into this run's folder", path,
                os.strerror(e.errno or 0))
    return None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
  return fd


def unlock(fd: int | None) -> None:
  """Releases the lock (closing its descriptor releases the flock)."""
  if fd is not None:
    os.close(fd)
