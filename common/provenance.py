"""What produced a run: code version, package versions, host and times."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path

PACKAGES = ("saebatch", "torch", "transformers", "accelerate", "sae-lens", "submitit", "h5py",
            "numpy", "scipy", "pandas", "pydantic", "cloudpickle")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


SOURCE = Path(__file__).resolve().parent.parent  # the checkout (or installed tree) holding common/ and jobs/


def git_version(source: Path = SOURCE) -> dict[str, object]:
    """Commit of the checkout holding the code, and whether its code (common/, jobs/) differs from
    it; None for both outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(source), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "common", "jobs"))}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect() -> dict[str, object]:
    return {
        "code": git_version(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "time": now(),
    }
