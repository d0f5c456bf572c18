"""The runs under a folder, each in a line: what `saebatch runs` lists.

A run's state sums up its shards and its merge (`common/status.py`): merged (merged.h5 and the
report are current), running (a shard or the reduce is pending or running), failed (a shard or
the reduce failed, or a shard is corrupt), done (every shard is done, not merged yet) or
incomplete (shards missing or partial and nothing running: `submit --resume` continues it).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import UserError
from common.rundir import RunDir
from common.status import ACTIVE, reduce_state, shard_states


@dataclass
class RunLine:
    """One run as `saebatch runs` shows it."""

    run: str
    job: str
    state: str  # merged | running | failed | done | incomplete | unreadable
    shards_done: int
    shards: int
    updated: float  # epoch seconds of the run's latest change
    detail: str = ""


def find_runs(root: Path) -> list[RunDir]:
    """The run directories directly under `root` (or `root` itself when it is one)."""
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give the folder that holds your runs "
                        f"(the manifests' run.root, by default ./runs)")
    if RunDir(root).exists():
        return [RunDir(root)]
    return [RunDir(path) for path in sorted(root.iterdir())
            if path.is_dir() and not path.name.startswith(".") and RunDir(path).exists()]


def summarise(run: RunDir) -> RunLine:
    """The run's state and shard counts (a run that cannot be read says why, instead of stopping the list)."""
    try:
        job = run.load_plan().job
        states = shard_states(run)
        reduce = reduce_state(run, states)
    except Exception as error:  # noqa: BLE001  a run folder damaged by hand, or written by another version
        return RunLine(str(run.path), "?", "unreadable", 0, 0, _updated(run), f"{type(error).__name__}: {error}")
    done = sum(s.state == "done" for s in states)
    if reduce.startswith("done"):
        state = "merged"
    elif any(s.state in ACTIVE for s in states) or reduce.startswith(("pending", "running")):
        state = "running"
    elif any(s.state in ("failed", "corrupt") for s in states) or reduce.startswith("failed"):
        state = "failed"
    elif done == len(states):
        state = "done"
    else:
        state = "incomplete"
    return RunLine(str(run.path), job, state, done, len(states), _updated(run), reduce)


def list_runs(root: Path) -> list[RunLine]:
    """Every run under `root`, the most recently changed first."""
    return sorted((summarise(run) for run in find_runs(root)), key=lambda line: line.updated, reverse=True)


def age(seconds: float) -> str:
    """'12 s', '5 min', '3 h', '2 d'."""
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{max(0, int(seconds))} s"


def as_json(lines: list[RunLine]) -> str:
    return json.dumps([asdict(line) | {"age_seconds": round(time.time() - line.updated)} for line in lines], indent=1)


def _updated(run: RunDir) -> float:
    """When the run last changed: a submission, a shard written or renamed, a merge."""
    paths = [run.path, run.jobs_path, run.shards_dir, run.merged_path, run.report_dir / "report.md"]
    return max((path.stat().st_mtime for path in paths if path.exists()), default=0.0)
