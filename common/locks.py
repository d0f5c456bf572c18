"""One exclusive lock per file, for tasks that must not run the same step at once."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from common.errors import UserError

log = logging.getLogger(__name__)


class Held(UserError):
    """The lock is held by someone else and the caller would not wait."""


PROBE_GRACE_S = 2.0  # how long a lock found held is retried before its holder counts as running

# What flock raises on file systems without locks (some Lustre and NFS mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


@contextmanager
def exclusive(lock_path: Path, holder: str, wait: bool) -> Iterator[None]:
    """Hold an flock on `lock_path`. While `holder` has it: wait (saying so), or refuse.

    Where the file system has no locks, go ahead with a warning. The holder writes its process id
    and host into the file, for `held_by`.
    """
    with open(lock_path, "a+") as lock:  # not "w": that would wipe the holder's name before waiting
        try:
            if not _lock_within(lock, PROBE_GRACE_S):
                if not wait:
                    raise Held(f"{holder} is running right now (lock {lock_path}); "
                               "wait for it, or cancel it first") from None
                log.info("waiting for %s to finish (%s)", holder, lock_path)
                fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                raise
            log.warning("no file locks here (%s): make sure only one %s runs at a time", lock_path, holder)
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def _lock_within(lock: IO[str], seconds: float) -> bool:
    """Take the lock if it is free or becomes free within `seconds`: `held_by` holds it for an
    instant, which must not make a writer starting then believe another writer has it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def held_by(lock_path: Path) -> str | None:
    """Who holds the lock ("process <pid> on <host>"), or None when nobody does (or there are no locks)."""
    if not lock_path.exists():
        return None
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            return lock.read().strip() or "another process"
        except OSError:
            return None
        fcntl.flock(lock, fcntl.LOCK_UN)
        return None
