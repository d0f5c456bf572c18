"""Work units, their split into shards, and the plan file that fixes both for a run.

Planning may run ahead of the runs it reads: inside `estimating()` (what `saebatch plan` uses) a
step whose upstream run does not exist yet is planned from the upstream manifest, and every
assumption this takes is recorded, so the output can say which figures are estimates. Outside it
(submitting, running) a missing upstream run is refused as before.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atomic import write_text_atomic
from common.errors import UserError

if TYPE_CHECKING:
    from common.runtime import Work


@dataclass(frozen=True)
class WorkUnit:
    """One indivisible piece of work; `id` names it in shards and must be unique in a run."""

    id: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Estimate:
    """What one shard will need and write, with the assumptions behind the numbers."""

    output_bytes: int
    task_memory_bytes: int
    notes: tuple[str, ...] = ()
    work: tuple[Work, ...] = ()  # what the units compute, device-independent; common.runtime times it


_ASSUMED: ContextVar[list[str] | None] = ContextVar("assumed", default=None)


@contextmanager
def estimating() -> Iterator[list[str]]:
    """Plan without the upstream runs: inside, a missing input is estimated instead of refused, and
    the list yielded collects what was assumed in its place (each statement once, in order)."""
    assumed: list[str] = []
    token = _ASSUMED.set(assumed)
    try:
        yield assumed
    finally:
        _ASSUMED.reset(token)


def only_estimating(missing: UserError) -> None:
    """An input this step reads is missing: refuse with `missing` (submitting, running), unless
    planning inside `estimating()`, where the caller goes on to estimate in its place."""
    if _ASSUMED.get() is None:
        raise missing


def assume(statement: str) -> None:
    """Record what a plan takes in place of a missing input, once (only inside `estimating()`)."""
    assumed = _ASSUMED.get()
    if assumed is None:
        raise RuntimeError("assume() is for planning inside estimating(); call only_estimating() first")
    if statement not in assumed:
        assumed.append(statement)


@dataclass(frozen=True)
class Plan:
    run_id: str
    job: str
    units: tuple[WorkUnit, ...]
    shards: tuple[tuple[str, ...], ...]  # unit ids of each shard, in order

    def shard_units(self, index: int) -> list[WorkUnit]:
        by_id = {unit.id: unit for unit in self.units}
        return [by_id[unit_id] for unit_id in self.shards[index]]

    def save(self, path: Path) -> None:
        data = {
            "run_id": self.run_id,
            "job": self.job,
            "units": [asdict(unit) for unit in self.units],
            "shards": [list(ids) for ids in self.shards],
        }
        write_text_atomic(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> Plan:
        """The plan saved at `path`; a damaged file is a UserError (saebatch never rewrites it)."""
        try:
            data = json.loads(path.read_text())
            return cls(
                run_id=data["run_id"],
                job=data["job"],
                units=tuple(WorkUnit(**unit) for unit in data["units"]),
                shards=tuple(tuple(ids) for ids in data["shards"]),
            )
        except (ValueError, KeyError, TypeError) as error:  # not JSON, not UTF-8, or not a plan's fields
            raise UserError(
                f"{path} is damaged ({type(error).__name__}: {error}), so this run cannot be read, and saebatch "
                f"does not write a run's plan again: restore the file from a backup, or move {path.parent} aside "
                "and submit its manifest again to start the run afresh"
            ) from None


def make_plan(run_id: str, job: str, units: list[WorkUnit], n_shards: int) -> Plan:
    """Split units into `n_shards` contiguous, near-equal shards (same input, same split)."""
    ids = [unit.id for unit in units]
    duplicated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicated:
        raise UserError(f"work unit ids must be unique; repeated: {', '.join(duplicated)}")
    bad = [i for i in ids if not i or "/" in i]
    if bad:
        raise UserError(f"work unit ids must be non-empty and contain no '/': {bad}")
    if not units:
        raise UserError("the manifest produces no work units; nothing to run")
    if n_shards > len(units):
        raise UserError(
            f"run.shards is {n_shards} but the manifest has only {len(units)} work unit(s); "
            f"set run.shards to at most {len(units)}"
        )
    base, extra = divmod(len(units), n_shards)
    shards, start = [], 0
    for index in range(n_shards):
        size = base + (1 if index < extra else 0)
        shards.append(tuple(ids[start : start + size]))
        start += size
    return Plan(run_id=run_id, job=job, units=tuple(units), shards=tuple(shards))
