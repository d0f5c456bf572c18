"""Atomic file writes: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _written_beside(path: Path, text: str) -> Path:
    """A new file holding `text` in path's folder, uniquely named (tasks on other nodes may share a pid)."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(handle, 0o666 & ~umask)  # as a plain write would (mkstemp makes it private)
    with os.fdopen(handle, "w") as file:
        file.write(text)
    return Path(name)


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    os.replace(_written_beside(path, text), path)


def publish_once(path: Path, text: str) -> str:
    """Write `text` to `path` unless a file is there already; return what `path` holds.

    For a result that every array task computes but all must share: the first task to finish
    publishes (a hard link fails if the name exists, also on NFS), the others adopt its text.
    """
    tmp = _written_beside(path, text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text()
