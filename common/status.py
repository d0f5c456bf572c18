"""Where a run stands: each shard done, running, pending, failed, partial or missing.

Read from the run directory (shard files) and the scheduler (the jobs recorded in
logs/jobs.json, asked through submitit, which reads `sacct` on Slurm, and `squeue` for the jobs
`sacct` does not list yet).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from common.launcher import cancelled_jobs, load_submissions
from common.locks import held_by
from common.rundir import RunDir
from common.shards import lock_path, partial_path, shard_problem

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
    # Who holds the shard's lock when no pending or running job of it is known (`saebatch run
    # --shard K`, slurm/array.sbatch, a local worker whose controller was killed): no job to wait for.
    writer: str | None = None


def shard_states(run: RunDir) -> list[ShardState]:
    plan = run.load_plan()
    # The job of each shard's latest submission; all are created before any is asked, so that
    # submitit answers them with one `sacct` call.
    latest_ids = {int(shard): (submission["executor"], job_id, submission.get("host"))
                  for submission in load_submissions(run) for shard, job_id in submission["shards"].items()}
    latest = {shard: _job(run, executor, job_id) for shard, (executor, job_id, _) in latest_ids.items()}
    queued = _queued_in_slurm(job for index, job in latest.items() if not run.shard_path(index).exists())
    cancelled = cancelled_jobs(run)
    states = []
    for index in range(len(plan.shards)):
        path = run.shard_path(index)
        job = latest.get(index)
        job_id = job.job_id if job is not None else None
        if path.exists():
            problem = shard_problem(plan, index, path)
            states.append(ShardState(index, "corrupt" if problem else "done", job_id, problem or str(path)))
            continue
        scheduler = _cancelled(_scheduler_state(job, latest_ids[index][2], queued), job.job_id, cancelled) \
            if job is not None else None
        progress = _partial_progress(partial_path(path), len(plan.shards[index]))
        writer = held_by(lock_path(path))
        if writer is not None and scheduler not in ("pending", "running"):  # e.g. its local controller was killed
            states.append(ShardState(index, "running", job_id, f"{progress or ''}; written by {writer}", writer))
        elif scheduler in ("pending", "running"):
            states.append(ShardState(index, scheduler, job_id, progress or ""))
        elif scheduler is not None and scheduler.startswith("unknown"):  # may still run there: never resubmitted
            states.append(ShardState(index, "running", job_id, f"{scheduler}; {progress or 'no partial file yet'}"))
        elif scheduler is not None and scheduler.startswith("failed") and job is not None:  # (only a job has a state)
            states.append(ShardState(index, "failed", job_id, f"{scheduler}; log: {job.paths.stderr}"))
        elif progress is not None:
            states.append(ShardState(index, "partial", job_id, progress))
        else:
            states.append(ShardState(index, "missing", job_id, "never run" if job_id is None else scheduler or ""))
    return states


def reduce_state(run: RunDir, states: list[ShardState]) -> str:
    """'done: <merged.h5>', 'out of date: <why>' (a merge older than a shard, or with a shard now
    missing), or the reduce job's state."""
    return reduce_status(run, states)[1]


def reduce_status(run: RunDir, states: list[ShardState]) -> tuple[str, str]:
    """(state, what `reduce_state` says): the state is done, out of date, not submitted, or the
    reduce job's (pending, running, completed, failed, unknown)."""
    if run.merged_path.exists() and (run.report_dir / "report.md").exists():
        not_done = [s.index for s in states if s.state != "done"]
        merged_at = run.merged_path.stat().st_mtime
        newer = [s.index for s in states if s.state == "done" and run.shard_path(s.index).stat().st_mtime > merged_at]
        if not_done:
            return "out of date", f"out of date: merged.h5 is there but shard(s) {not_done} are not done"
        if newer:
            return "out of date", f"out of date: shard(s) {newer} were written after merged.h5; reduce again"
        return "done", f"done: {run.merged_path}"
    latest = _latest_reduce(run)
    if latest is None:
        return "not submitted", "not submitted"
    job_id, state = latest
    state = state or "unknown"
    return state.split(" (")[0], f"{state} (job {job_id})"


def needs_attention(states: list[ShardState], reduce: str) -> bool:
    """True when a shard is missing, failed, partial (and not running) or corrupt, or the merge is
    out of date: what `saebatch status` exits 1 for."""
    return any(s.state in RESUBMIT for s in states) or reduce.startswith(("out of date", "failed"))


def active_reduce(run: RunDir) -> str | None:
    """The job id of the latest reduce if it is still pending or running."""
    latest = _latest_reduce(run)
    return latest[0] if latest and latest[1] in ACTIVE else None


def latest_reduce_job(run: RunDir) -> tuple[str, str] | None:
    """(job id, executor) of the reduce of the run's latest submission; None when it has none (an
    older submission's reduce is out of date: its shards were submitted again since)."""
    submissions = load_submissions(run)
    if not submissions or not submissions[-1].get("reduce"):
        return None
    return submissions[-1]["reduce"], submissions[-1]["executor"]


def submissions_by_job(run: RunDir) -> dict[str, dict]:
    """Job id (a shard's or a reduce's) -> its submission in logs/jobs.json (executor, host, ...)."""
    return {job: entry for entry in load_submissions(run)
            for job in [*entry["shards"].values(), entry.get("reduce")] if job}


def _latest_reduce(run: RunDir) -> tuple[str, str | None] | None:
    """(job id, scheduler state) of the latest submission's reduce."""
    latest = latest_reduce_job(run)
    if latest is None:
        return None
    job_id, executor = latest
    host = load_submissions(run)[-1].get("host")
    job = _job(run, executor, job_id)
    return job_id, _cancelled(_scheduler_state(job, host, _queued_in_slurm([job])), job_id, cancelled_jobs(run))


def _cancelled(state: str | None, job_id: str, cancelled: dict[str, str]) -> str | None:
    """A job that `saebatch cancel` stopped reads as cancelled, not as whatever its end looked like
    (a local task killed leaves no result; Slurm says CANCELLED)."""
    if job_id in cancelled and (state is None or state.startswith("failed")):
        return f"failed (cancelled by saebatch cancel at {cancelled[job_id]})"
    return state


def _partial_progress(partial: Path, n_units: int) -> str | None:
    """'k/n units written' for a partial shard file, or None when there is none."""
    if not partial.exists():
        return None
    try:
        with h5py.File(partial, "r", locking=False) as file:  # HDF5's lock would make its writer's open fail
            written = sum(bool(g.attrs.get("complete", False)) for g in file["units"].values())
    except (OSError, KeyError):  # caught mid-write, or cut off mid-write
        return "partial file unreadable now (being written, or damaged: a rerun keeps it aside and starts afresh)"
    return f"{written}/{n_units} units written"


def _job(run: RunDir, executor: str, job_id: str) -> Any:
    import submitit

    job_cls = submitit.SlurmJob if executor == "slurm" else submitit.LocalJob
    return job_cls(folder=run.submitit_dir, job_id=job_id)


def _queued_in_slurm(jobs: Iterable[Any]) -> dict[str, str]:
    """Job id -> state, from `squeue`, of the Slurm jobs `sacct` does not list. Slurm's accounting
    database learns of a job a moment after sbatch (minutes on a busy cluster, never while slurmdbd
    is down); meanwhile its shard must not read as missing, for `submit` to queue it twice or
    `cancel` to leave it running. A job neither knows (long gone) is not in the answer."""
    import submitit

    unknown = [job.job_id for job in jobs if isinstance(job, submitit.SlurmJob) and job.state.split()[0] == "UNKNOWN"]
    if not unknown or shutil.which("squeue") is None:
        return {}
    try:  # --array: a line per array task; --states=all: ended ones too; exit status 1 when it knows none
        listing = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%i %T",
                                  f"--jobs={','.join(unknown)}"],
                                 capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split(maxsplit=1) for line in listing.splitlines() if len(line.split()) == 2)


def _scheduler_state(job: Any, host: str | None = None, queued: dict[str, str] | None = None) -> str | None:
    """'pending', 'running', 'failed (<STATE>)', 'completed', 'unknown (...)' or None when nothing
    is known; `host` is where a local job was started (its id is a process id there), `queued`
    what squeue says of Slurm jobs sacct does not list."""
    import submitit
    from submitit.core.utils import pickle_load

    if isinstance(job, submitit.SlurmJob):
        state = job.state.split()[0]
        if state == "UNKNOWN":
            state = (queued or {}).get(job.job_id, state)
        if state in _PENDING:
            return "pending"
        if state in _RUNNING:
            return "running"
        if state == "COMPLETED":
            return "completed"
        return None if state == "UNKNOWN" else f"failed ({state})"
    if job.paths.result_pickle.exists():  # a local job: its result file, else its process
        outcome = pickle_load(job.paths.result_pickle)[0]
        return "completed" if outcome == "success" else "failed (raised an error)"
    if host is not None and host != socket.gethostname():
        return f"unknown (a local task on {host}: ask there)"
    if local_task_alive(int(job.job_id)):
        return "running"
    return "failed (process ended without a result)"


def local_task_alive(pid: int) -> bool:
    """Whether `pid` is still a local job's submitit process: once the job ends, its process id may
    be given to an unrelated process, which must not keep the job running."""
    return process_alive(pid) and "submitit" in _command(pid)


def process_alive(pid: int) -> bool:
    """Whether the process runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "submitit"  # no /proc to check with: trust the recorded id
