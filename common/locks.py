"""One exclusive lock per file, for tasks that must not run the same step at once."""

from __future__ import annotations

import errno
import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import UserError

log = logging.getLogger(__name__)

# What flock raises on file systems without locks (some Lustre and NFS mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


@contextmanager
def exclusive(lock_path: Path, holder: str, wait: bool) -> Iterator[None]:
    """Hold an flock on `lock_path`. While `holder` has it: wait (saying so), or refuse.

    Where the file system has no locks, go ahead with a warning.
    """
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise UserError(f"{holder} is running right now (lock {lock_path}); "
                                "wait for it, or cancel it first") from None
            log.info("waiting for %s to finish (%s)", holder, lock_path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                raise
            log.warning("no file locks here (%s): make sure only one %s runs at a time", lock_path, holder)
        yield
