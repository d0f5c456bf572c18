"""Work units, their split into shards, and the plan file that fixes both for a run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import write_text_atomic
from common.errors import UserError


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
        data = json.loads(path.read_text())
        return cls(
            run_id=data["run_id"],
            job=data["job"],
            units=tuple(WorkUnit(**unit) for unit in data["units"]),
            shards=tuple(tuple(ids) for ids in data["shards"]),
        )


def make_plan(run_id: str, job: str, units: list[WorkUnit], n_shards: int) -> Plan:
    """Split units into `n_shards` contiguous, near-equal shards (same input, same split)."""
    ids = [unit.id for unit in units]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
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
