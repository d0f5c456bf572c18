"""Atomic file writes: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish_once(path: Path, text: str) -> str:
    """Write `text` to `path` unless a file is there already; return what `path` holds.

    For a result that every array task computes but all must share: the first task to finish
    publishes (a hard link fails if the name exists, also on NFS), the others adopt its text.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text()
