"""Cancelling a run: its array tasks and reduce on Slurm (scancel), or the local processes.

A local job's id is the process id of submitit's controller, which runs the task in a worker
process; a shard's lock file names the process writing it. `cancel_run` first notes the
cancellation in logs/jobs.json (so a submitter waiting for GPU slots starts nothing more, and
`status` says "cancelled"), then stops each job, then waits until `status` no longer sees them
active. Cancelled shards are failed shards: `saebatch submit --resume` runs them again, continuing
their partial files.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.launcher import mark_cancelled
from common.locks import held_by
from common.provenance import now
from common.rundir import RunDir
from common.shards import lock_path
from common.status import (
    ACTIVE,
    active_reduce,
    local_task_alive,
    process_alive,
    shard_states,
    submissions_by_job,
)
from common.tasklog import job_paths

log = logging.getLogger(__name__)

GRACE_SECONDS = 5.0  # after SIGINT, before SIGKILL


@dataclass
class Stopped:
    """One task `cancel` dealt with, and how."""

    task: str  # "shard 3" or "reduce"
    job_id: str | None
    how: str
    ok: bool = True


def cancel_run(run: RunDir, settle_seconds: float = 60.0) -> list[Stopped]:
    """Cancel every pending or running task of the run; [] when nothing is active."""
    states = shard_states(run)
    targets = [(f"shard {s.index}", s.job_id) for s in states if s.state in ACTIVE and s.job_id]
    writers = {s.index: held_by(lock_path(run.shard_path(s.index))) for s in states if s.state in ACTIVE}
    reduce = active_reduce(run)
    if reduce:
        targets.append(("reduce", reduce))
    if not targets and not any(writers.values()):
        return []
    submitted = submissions_by_job(run)
    slurm = [(task, job) for task, job in targets if submitted.get(job, {}).get("executor") == "slurm"]
    local = [(task, job, submitted.get(job, {}).get("host")) for task, job in targets if (task, job) not in slurm]
    if slurm and shutil.which("scancel") is None:  # before anything is marked cancelled
        raise UserError(f"Slurm's `scancel` is not on PATH: cancel from a node with Slurm's commands, "
                        f"or run `scancel {' '.join(job for _, job in slurm)}` there")
    mark_cancelled(run, [job for _, job in targets])
    done = _scancel(slurm) + _stop_local_jobs(local)
    scancelled = {task for task, _ in slurm}
    for index in writers:  # a worker left writing after its controller went, or `saebatch run`
        task, writer = f"shard {index}", held_by(lock_path(run.shard_path(index)))  # who holds it now
        # A scancelled task runs on until Slurm kills it (submitit ignores the SIGTERM): stopped here
        # when it runs here (a one-node cluster), else left to Slurm.
        if writer and (task not in scancelled or _local_pid(writer) is not None):
            done.append(_stop_writer(task, writer))
    _settle(run, [job for _, job in targets], settle_seconds)
    _note_in_logs(run, [stopped.job_id for stopped in done if stopped.ok and stopped.job_id])
    return done


def _note_in_logs(run: RunDir, job_ids: list[str]) -> None:
    """End each stopped task's log (those it began) with who stopped it, when, from where."""
    note = f"\nsaebatch cancel: this task was stopped at {now()} (by process {os.getpid()} on {socket.gethostname()})\n"
    for job_id in job_ids:
        path = job_paths(run.submitit_dir, job_id).stderr
        if path.exists():  # never create it: a log that exists says the task started
            with open(path, "a") as task_log:
                task_log.write(note)


def _scancel(jobs: list[tuple[str, str]]) -> list[Stopped]:
    if not jobs:
        return []
    ids = [job for _, job in jobs]
    try:
        result = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise UserError(f"cannot run scancel ({error}): cancel from a node with Slurm's commands, "
                        f"or run `scancel {' '.join(ids)}` there") from None
    problem = result.stderr.strip()
    if problem:
        log.warning("scancel: %s", problem)
    if result.returncode == 0:
        return [Stopped(task, job, "scancel") for task, job in jobs]
    named = {job for job in ids if re.search(rf"\b{re.escape(job)}\b", problem)}  # the jobs it failed for
    how = f"scancel failed: {problem or f'exit status {result.returncode}'}"
    return [Stopped(task, job, how, ok=False) if job in (named or ids) else Stopped(task, job, "scancel")
            for task, job in jobs]


def _stop_local_jobs(jobs: list[tuple[str, str, str | None]]) -> list[Stopped]:
    """Stop submitit's local jobs (task, controller pid, host) by stopping their workers, all at
    once (each controller, seeing its worker end, exits without requeueing)."""
    stopped, pids = [], []
    for task, job_id, host in jobs:
        if host and host != socket.gethostname():
            stopped.append(Stopped(task, job_id, f"a local task on {host}: run `saebatch cancel` there", ok=False))
            continue
        pid = int(job_id)
        if not local_task_alive(pid):
            stopped.append(Stopped(task, job_id, "its process had already ended"))
            continue
        workers = _children(pid)
        for worker in workers:
            _interrupt(worker)
        pids += [pid, *workers]
        shown = f", worker {', '.join(map(str, workers))}" if workers else ""
        stopped.append(Stopped(task, job_id, f"stopped local task (controller {pid}{shown})"))
    _finish_off(pids)
    return stopped


def _stop_writer(task: str, writer: str) -> Stopped:
    """Stop the process that a shard's lock names ("process <pid> on <host>"), if it is here."""
    pid = _local_pid(writer)
    if pid is None:
        return Stopped(task, None, f"it is written by {writer}: stop that process there", ok=False)
    if not process_alive(pid):
        return Stopped(task, None, f"its writer {pid} had already ended")
    _interrupt(pid)
    _finish_off([pid])
    return Stopped(task, None, f"stopped process {pid}, which was writing it")


def _local_pid(writer: str) -> int | None:
    """The process id a lock names ("process <pid> on <host>") when it runs on this host."""
    found = re.fullmatch(r"process (\d+) on (\S+)", writer.strip())
    return int(found[1]) if found and found[2] == socket.gethostname() else None


def _interrupt(pid: int) -> None:
    """SIGINT: Python raises KeyboardInterrupt, the shard file is closed and the traceback logged.
    Where SIGINT is ignored (a task started from a shell's background job inherits that), SIGKILL;
    a shard killed mid-unit resumes all the same."""
    _kill(pid, signal.SIGKILL if _ignores_sigint(pid) else signal.SIGINT)


def _kill(pid: int, sig: int) -> None:
    """Signal a process; one that has ended meanwhile is stopped already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _finish_off(pids: list[int]) -> None:
    """Give the interrupted processes a grace to end, then SIGKILL what is left."""
    if _wait_gone(pids, GRACE_SECONDS):
        return
    for pid in pids:
        if process_alive(pid):
            _kill(pid, signal.SIGKILL)
    _wait_gone(pids, GRACE_SECONDS)


def _ignores_sigint(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.MULTILINE)
    return bool(ignored and int(ignored[1], 16) & (1 << (signal.SIGINT - 1)))


def _settle(run: RunDir, job_ids: list[str], seconds: float) -> None:
    """Wait until `status` no longer sees the cancelled jobs pending or running (Slurm's
    accounting lags scancel by a moment)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        states = shard_states(run)
        if not any(s.state in ACTIVE and s.job_id in job_ids for s in states) and active_reduce(run) not in job_ids:
            return
        time.sleep(1.0)
    log.warning("some cancelled jobs still look active; `saebatch status %s` will show when they end", run.path)


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(process_alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return not any(process_alive(pid) for pid in pids)
