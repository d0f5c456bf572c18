"""Finds job modules in the `jobs` package and states the contract they follow.

Every module in `jobs/` that does not start with "_" is a job; its name is the manifest's `job:`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel

from common.errors import UserError

if TYPE_CHECKING:
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

    def reduce(self, manifest: Manifest, shard_paths: list[Path], out_dir: Path) -> None:
        """Merge checked shards (in plan order) into `out_dir`'s `merged.h5` and write `report/`
        there; a job may write more beside them, under names it owns."""


FUNCTIONS = ("plan", "estimate", "run_shard", "reduce")


def contract_breaches(module: ModuleType) -> list[str]:
    """How a job module departs from `Job`: a missing name, a Settings that is no pydantic model,
    a function whose parameters are not the contract's (by name and order)."""
    settings = getattr(module, "Settings", None)
    breaches = [] if isinstance(settings, type) and issubclass(settings, BaseModel) else \
        ["Settings is not a pydantic model class (the manifest section named after the job)"]
    for name in FUNCTIONS:
        function = getattr(module, name, None)
        if not callable(function):
            breaches.append(f"{name} is missing")
            continue
        wanted = list(inspect.signature(getattr(Job, name)).parameters)[1:]  # without self
        has = list(inspect.signature(function).parameters)
        if has != wanted:
            breaches.append(f"{name}({', '.join(has)}) should take ({', '.join(wanted)})")
    return breaches


def available_jobs() -> list[str]:
    import jobs

    return sorted(m.name for m in pkgutil.iter_modules(jobs.__path__) if not m.name.startswith("_"))


def get_job(name: str) -> Job:
    known = available_jobs()
    if name not in known:
        raise UserError(f"unknown job {name!r} in `job:`; available jobs: {', '.join(known)}")
    module: ModuleType = importlib.import_module(f"jobs.{name}")
    breaches = contract_breaches(module)
    if breaches:
        raise TypeError(f"job module jobs.{name} breaks the job contract (common.registry.Job): {'; '.join(breaches)}")
    return module
