"""Where a run stands: each shard done, running, pending, failed, partial or missing.

Read from the run directory (shard files) and the scheduler (the jobs recorded in
logs/jobs.json, asked through submitit, which reads `sacct` on Slurm).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py

from common.launcher import load_submissions
from common.rundir import RunDir
from common.shards import shard_problem

_PENDING = {"PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT"}

# States a shard can be resubmitted from.
RESUBMIT = {"missing", "failed", "partial", "corrupt"}
ACTIVE = {"pending", "running"}


@dataclass(frozen=True)
class ShardState:
    index: int
    state: str  # done | pending | running | failed | partial | corrupt | missing
    job_id: str | None
    detail: str


def shard_states(run: RunDir) -> list[ShardState]:
    plan = run.load_plan()
    last_job: dict[int, tuple[str, str]] = {}  # shard -> (executor, job id) of its latest submission
    for submission in load_submissions(run):
        for shard, job_id in submission["shards"].items():
            last_job[int(shard)] = (submission["executor"], job_id)
    states = []
    for index in range(len(plan.shards)):
        path = run.shard_path(index)
        executor, job_id = last_job.get(index, (None, None))
        if path.exists():
            problem = shard_problem(plan, index, path)
            states.append(ShardState(index, "corrupt" if problem else "done", job_id, problem or str(path)))
            continue
        scheduler = _scheduler_state(run, executor, job_id) if job_id else None
        partial = RunDir.partial_path(path)
        written = _units_written(partial)
        progress = f"{written}/{len(plan.shards[index])} units written" if written is not None else ""
        if scheduler in ("pending", "running"):
            states.append(ShardState(index, scheduler, job_id, progress))
        elif scheduler is not None and scheduler.startswith("failed"):
            log = run.logs_dir / "submitit" / f"{job_id}_0_log.err"
            states.append(ShardState(index, "failed", job_id, f"{scheduler}; log: {log}"))
        elif written is not None:
            states.append(ShardState(index, "partial", job_id, progress))
        else:
            states.append(ShardState(index, "missing", job_id, "never run" if job_id is None else scheduler or ""))
    return states


def reduce_state(run: RunDir) -> str:
    if run.merged_path.exists() and (run.report_dir / "report.md").exists():
        return f"done: {run.merged_path}"
    submissions = load_submissions(run)
    if submissions and submissions[-1].get("reduce"):
        last = submissions[-1]
        return f"{_scheduler_state(run, last['executor'], last['reduce']) or 'unknown'} (job {last['reduce']})"
    return "not submitted"


def _units_written(partial) -> int | None:
    if not partial.exists():
        return None
    try:
        with h5py.File(partial, "r") as file:
            return sum(bool(g.attrs.get("complete", False)) for g in file["units"].values())
    except (OSError, KeyError):
        return 0


def _scheduler_state(run: RunDir, executor: str | None, job_id: str) -> str | None:
    """'pending', 'running', 'failed (<STATE>)', 'completed' or None when nothing is known."""
    import submitit
    from submitit.core.utils import pickle_load

    folder = run.logs_dir / "submitit"
    if executor == "slurm":
        state = submitit.SlurmJob(folder=folder, job_id=job_id).state.split()[0]
        if state in _PENDING:
            return "pending"
        if state in _RUNNING:
            return "running"
        if state == "COMPLETED":
            return "completed"
        return None if state == "UNKNOWN" else f"failed ({state})"
    job = submitit.LocalJob(folder=folder, job_id=job_id)
    if job.paths.result_pickle.exists():
        outcome = pickle_load(job.paths.result_pickle)[0]
        return "completed" if outcome == "success" else "failed (raised an error)"
    try:
        os.kill(int(job_id), 0)
        return "running"
    except (OSError, ValueError):
        return "failed (process ended without a result)"
