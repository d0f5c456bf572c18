"""Finds job modules in the `jobs` package and states the contract they follow.

Every module in `jobs/` that does not start with "_" is a job; its name is the manifest's `job:`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from common.errors import UserError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from common.manifest import Manifest
    from common.plan import Estimate, WorkUnit
    from common.shards import ShardWriter


class Job(Protocol):
    """What a job module provides (module-level names), so that the CLI treats all alike."""

    Settings: type[BaseModel]  # the manifest section named after the job

    def plan(self, manifest: Manifest) -> list[WorkUnit]:
        """Validate what needs no GPU and list the work units, deterministically."""

    def estimate(self, manifest: Manifest, units: list[WorkUnit]) -> Estimate:
        """Output size and task memory for these units (one shard's share)."""

    def run_shard(self, manifest: Manifest, units: list[WorkUnit], shard: ShardWriter) -> None:
        """Do the GPU work for the shard's planned `units` that `shard.pending()` still names
        (batched with `shard.pending_batches`), writing each with `shard.unit(...)`."""

    def reduce(self, manifest: Manifest, shard_paths: list[Path], run_dir: Path) -> None:
        """Merge checked shards into `merged.h5` and write `report/`."""


_CONTRACT = ("Settings", "plan", "estimate", "run_shard", "reduce")


def available_jobs() -> list[str]:
    import jobs

    return sorted(m.name for m in pkgutil.iter_modules(jobs.__path__) if not m.name.startswith("_"))


def get_job(name: str) -> Job:
    known = available_jobs()
    if name not in known:
        raise UserError(f"unknown job {name!r} in `job:`; available jobs: {', '.join(known)}")
    module: ModuleType = importlib.import_module(f"jobs.{name}")
    missing = [attr for attr in _CONTRACT if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"job module jobs.{name} lacks {', '.join(missing)} (see common.registry.Job)")
    return module  # type: ignore[return-value]
