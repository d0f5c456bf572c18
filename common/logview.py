"""What `saebatch logs` prints: a task's stdout, stderr and exception, or every task's last lines.

Each shard's latest job (logs/jobs.json) names its submitit files under logs/submitit/; the
reduce's too. A shard run by `saebatch run` has no job and no log: it printed to its terminal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import UserError
from common.rundir import RunDir
from common.status import (
    latest_reduce_job,
    reduce_state,
    reduce_status,
    shard_states,
    submissions_by_job,
)
from common.tasklog import exception_summary, job_paths, tail, task_exception

if TYPE_CHECKING:
    from submitit.core.utils import JobPaths

SUMMARY_LINES = 3
TASK_LINES = 40


def task_report(run: RunDir, shard: int | None, lines: int | None) -> str:
    """The logs of shard `shard` (None: the reduce) in full detail."""
    lines = TASK_LINES if lines is None else lines
    if shard is None:
        latest = latest_reduce_job(run)
        if latest is None:
            return (f"the latest submission of {run.path} has no reduce "
                    f"(`saebatch reduce {run.path}` runs it here)")
        job_id, executor = latest
        head = f"reduce of {run.path}: {reduce_state(run, shard_states(run))}"
    else:
        states = shard_states(run)
        if not 0 <= shard < len(states):
            raise UserError(f"--shard {shard}: this run has shards 0-{len(states) - 1}")
        state = states[shard]
        if state.job_id is None:
            return (f"shard {shard} of {run.path}: {state.state}; it was never submitted, so it has no log "
                    f"(`saebatch run` prints to its own terminal)")
        job_id, executor = state.job_id, submissions_by_job(run).get(state.job_id, {}).get("executor", "?")
        head = f"shard {shard} of {run.path}: {state.state}, job {job_id} ({executor})"
    paths = job_paths(run.submitit_dir, job_id)
    out = [head]
    for name, path in (("stdout", paths.stdout), ("stderr", paths.stderr)):
        shown = tail(path, lines)
        where = f"{path}" if path.exists() else f"{path} (not written: the task has not started)"
        out += [f"--- {name}: {where}" + (f" (last {len(shown)} lines)" if shown else ""), *shown]
    error = task_exception(paths)
    if error:
        out += [f"--- exception (from {paths.result_pickle.name}):", error]
    return "\n".join(out)


def summary_report(run: RunDir, lines: int | None) -> str:
    """Every shard's state, log and last lines (its exception first when it raised one), then the reduce's."""
    lines = SUMMARY_LINES if lines is None else lines
    folder = run.submitit_dir
    states = shard_states(run)
    out = [f"run {run.path}"]
    for s in states:
        if s.job_id is None:
            out.append(f"shard {s.index:<4} {s.state:8s} never submitted: no log")
            continue
        why = s.detail.split("; log:")[0] if s.state == "failed" else ""
        out += _task_lines(f"shard {s.index:<4} {s.state:8s} job {s.job_id}", job_paths(folder, s.job_id), lines, why)
    latest = latest_reduce_job(run)
    state, reduce = reduce_status(run, states)
    if latest is None:
        out.append(f"reduce     {reduce}")
    else:
        out += _task_lines(f"reduce     {state:8s} job {latest[0]}",
                           job_paths(folder, latest[0]), lines, reduce if state == "failed" else "")
    out.append(f"(one task in full: saebatch logs {run.path} --shard K, or --reduce)")
    return "\n".join(out)


def _task_lines(head: str, paths: JobPaths, lines: int, why: str = "") -> list[str]:
    """A task's head line, then what ended it (its exception, else what the scheduler says), then its log's end."""
    error = task_exception(paths)
    shown = [f"    ! {exception_summary(error) if error else why}"] if error or why else []
    shown += [f"    | {line}" for line in tail(paths.stderr, lines)]
    where = str(paths.stderr) if paths.stderr.exists() else "no log yet"
    return [f"{head}  {where}", *shown]
