"""Launching a run: plan it, submit its shards as an array, then the reduce that merges them.

With Slurm, the shards go out as one array (split above MaxArraySize) and the reduce as a job
with `afterok:<array ids>` and `kill-on-invalid-dep=yes`, so a failed shard cancels it. The local
executor has no dependencies: it waits for the shards, then runs the reduce if all succeeded.
The task callables are small and import the science lazily, so submitting stays fast.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import submitit
from submitit.core.utils import FailedJobError
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from common.atomic import write_text_atomic
from common.containers import check_image, python_command
from common.errors import UserError
from common.gpus import describe_devices, gpu_slots, require_gpus, visible_gpus
from common.locks import exclusive
from common.manifest import ClusterSettings, Manifest
from common.plan import Plan, make_plan
from common.progress import ProgressBoard
from common.provenance import now
from common.registry import Job, get_job
from common.rundir import RunDir
from common.shards import (
    ShardWriter,
    check_shards,
    lock_path,
    set_aside,
    shard_problem,
    stop_before_next_unit,
)
from common.timeline import add_timeline, reduce_span

log = logging.getLogger(__name__)

Executor = Literal["slurm", "local"]


# ---------------------------------------------------------------- planning and the run directory


def plan_manifest(manifest: Manifest) -> tuple[Job, Plan]:
    """Validate the manifest against the model/SAEs (no GPU) and fix its work units and shards."""
    job = get_job(manifest.job)
    units = job.plan(manifest)
    return job, make_plan(manifest.run_id(), manifest.job, units, manifest.run.shards)


def prepare_run(manifest: Manifest) -> RunDir:
    """Validate and plan a manifest, then create (or reopen) its run directory."""
    _, plan = plan_manifest(manifest)
    run = RunDir.for_manifest(manifest)
    run.create(manifest, plan)
    if run.load_plan() != plan:
        raise UserError(
            f"{run.path} was planned differently by another version of saebatch; "
            "set run.dir to a new folder to start this manifest afresh"
        )
    return run


# ---------------------------------------------------------------- what runs on the nodes


def run_shard_task(run_path: str, shard_index: int) -> str:
    """Write shard `shard_index` of the run at `run_path`, resuming a partial file if present."""
    from common.logs import setup_logging

    setup_logging()
    run = RunDir(Path(run_path))
    manifest, plan = run.load_manifest(), run.load_plan()
    if not 0 <= shard_index < len(plan.shards):
        raise UserError(f"--shard {shard_index}: this run has shards 0-{len(plan.shards) - 1}")
    path = run.shard_path(shard_index)
    if not path.exists():
        require_gpus(manifest.cluster.gpus_per_task)  # without its GPUs a task writes nothing, not even a lock
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(lock_path(path), f"another writer of shard {shard_index}", wait=False):
        # Checked under the lock: a writer that finished while this task waited (PROBE_GRACE_S at most) is not redone.
        if path.exists():
            problem = shard_problem(plan, shard_index, path, verify=True)
            if problem is None:
                log.info("shard %d is already complete: %s", shard_index, path)
                return str(path)
            aside = set_aside(path, "damaged")
            log.warning("%s\nkept it as %s; writing shard %d again", problem, aside, shard_index)
        return _write_shard(manifest, plan, path, shard_index)


def _write_shard(manifest: Manifest, plan: Plan, path: Path, shard_index: int) -> str:
    """Write (or resume) shard `shard_index` at `path`; the caller holds its lock."""
    units = plan.shard_units(shard_index)
    require_gpus(manifest.cluster.gpus_per_task)  # (a damaged shard set aside: checked here)
    with ShardWriter(path, plan.run_id, plan.job, shard_index, [u.id for u in units], locked=True) as shard:
        remaining = shard.pending()
        # The shard's CPU threads: what the task asked for, on Slurm as locally, and on a resume what
        # the shard began with, so that its floating-point sums never mix two thread counts.
        threads = int(shard.get_attr("torch_threads", manifest.cluster.cpus_per_task))
        if remaining:
            devices = describe_devices()
            log.info("shard %d: %d of %d units to write, on %s, %d CPU thread(s)", shard_index, len(remaining),
                     len(units), devices, threads)
            shard.set_attrs(devices=devices, torch_threads=threads)
            with torch_threads(threads):
                get_job(manifest.job).run_shard(manifest, units, shard)
        done = shard.finish()
    log.info("shard %d complete: %s", shard_index, done)
    return str(done)


class ShardTask(submitit.helpers.Checkpointable):
    """`run_shard_task` as the callable submitit runs: checkpointable, so that a task stopped by its
    time limit or by preemption is requeued (submitit's signal handler resubmits the same call),
    and the requeued task resumes the shard's partial file."""

    def __call__(self, run_path: str, shard_index: int) -> str:
        return run_shard_task(run_path, shard_index)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's signal handler, which then requeues the task and exits. That exit
        is lost when the signal lands in a garbage-collection callback (seen under load: the task
        went on writing its shard), so the shard also stops before its next unit, with the exit
        code that tells submitit's local controller to run the task again."""
        stop_before_next_unit(LOCAL_REQUEUE_RETURN_CODE)
        return super().checkpoint(*args, **kwargs)


def _require_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f"the disk holding {folder} is full: {free / 1e6:,.1f} MB free, and the merge needs about "
                        f"{needed / 1e6:,.1f} MB (the size of the shards). Free space there, then `saebatch reduce "
                        f"{folder}`")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to `threads` for the block (not as many as the node has cores: more
    threads than the task's cores make the pool spin against itself), then as they were."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reduce_task(run_path: str) -> str:
    """Check every shard, then merge into merged.h5 and report/ (replacing them only when done)."""
    from common.logs import setup_logging

    setup_logging()
    began = now()
    run = RunDir(Path(run_path))
    manifest, plan = run.load_manifest(), run.load_plan()
    shard_paths = [run.shard_path(k) for k in range(len(plan.shards))]
    check_shards(plan, shard_paths)
    needed = sum(path.stat().st_size for path in shard_paths)  # merged.h5 holds what the shards hold
    with exclusive(run.reduce_lock, "another reduce of this run", wait=True):
        _require_space(run.path, needed)
        staging = Path(tempfile.mkdtemp(prefix=".reduce-", dir=run.path))
        try:
            get_job(manifest.job).reduce(manifest, shard_paths, staging)
            add_timeline(RunDir(staging).report_dir, shard_paths, reduce_span(began))
            for written in staging.iterdir():  # merged.h5, report/, and what else the job writes
                target = run.path / written.name
                if target.is_dir():
                    shutil.rmtree(target)
                written.replace(target)
        except OSError:
            _require_space(run.path, needed)  # HDF5 rarely says "disk full" itself
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        run.record_provenance("reduced")
    log.info("merged: %s; report: %s", run.merged_path, run.report_dir / "report.md")
    return str(run.merged_path)


# ---------------------------------------------------------------- submission


@dataclass
class Submission:
    """The submitit job objects of one submission (the local ones hold their processes)."""

    executor: Executor
    shard_jobs: dict[int, Any]  # shard index -> submitit Job
    reduce_job: Any | None = None
    board: ProgressBoard | None = None  # the live progress, when submitting already waits (GPU slots)


def make_executor(kind: Executor, run: RunDir, cluster: ClusterSettings, name: str, for_reduce: bool = False):
    """A submitit executor with the manifest's cluster settings (site defaults, then overrides);
    on Slurm its tasks start the Python of `python_command` (the image's, when one is named)."""
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise UserError("Slurm's `sbatch` is not on PATH: submit from a login node, "
                        "or use `--executor local` to run on this machine")
    if kind == "local":  # the local executor itself: it takes the GPUs `run_in_gpu_slots` hands each task
        local = submitit.LocalExecutor(folder=run.submitit_dir)
        local.update_parameters(timeout_min=cluster.reduce_timeout_min if for_reduce else cluster.timeout_min)
        return local
    executor = submitit.AutoExecutor(folder=run.submitit_dir, cluster=kind,
                                     slurm_python=python_command(cluster, run.path.parent))
    params: dict[str, object] = {
        "name": name,
        "timeout_min": cluster.reduce_timeout_min if for_reduce else cluster.timeout_min,
        "cpus_per_task": cluster.reduce_cpus if for_reduce else cluster.cpus_per_task,
        "mem_gb": cluster.reduce_mem_gb if for_reduce else cluster.mem_gb,
        "slurm_array_parallelism": cluster.array_parallelism,
        "slurm_setup": ["export HDF5_USE_FILE_LOCKING=FALSE", *cluster.setup],
        "slurm_additional_parameters": dict(cluster.additional),
    }
    if cluster.gpus_per_task and not for_reduce:
        params["gpus_per_node"] = cluster.gpus_per_task
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key):
            params[f"slurm_{key}"] = getattr(cluster, key)
    executor.update_parameters(**params)
    return executor


def slurm_max_array_size() -> int:
    """The cluster's MaxArraySize (arrays must have fewer tasks than this)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 1001
    for line in out.splitlines():
        if line.strip().startswith("MaxArraySize"):
            return int(line.split("=")[1])
    return 1001


def submit(run: RunDir, executor_kind: Executor, shards: list[int], after: Sequence[str] = ()) -> Submission:
    """Submit `shards` as array task(s) and the reduce after them (and after jobs in `after`)."""
    manifest, plan = run.load_manifest(), run.load_plan()
    name = f"saebatch-{plan.job}-{plan.run_id}"
    if manifest.cluster.image is not None:
        if executor_kind == "slurm":
            check_image(manifest.cluster.image)  # before anything is queued
        else:
            log.info("--executor local runs in this Python; cluster.image is used on Slurm only")
    slots = gpu_slots(visible_gpus(), manifest.cluster.gpus_per_task) \
        if executor_kind == "local" and manifest.cluster.gpus_per_task else None  # before anything runs
    executor = make_executor(executor_kind, run, manifest.cluster, name)
    if shards and slots is not None:  # recorded as each task starts: `status` sees the waves as they run
        return _submit_in_gpu_slots(run, executor, shards, slots)
    submission = Submission(executor_kind, {}, None)
    array_ids: list[str] = []
    recorded = False
    if shards:
        limit = manifest.cluster.max_array_size or (slurm_max_array_size() - 1 if executor_kind == "slurm" else len(shards))
        for start in range(0, len(shards), limit):
            chunk = shards[start : start + limit]
            with _refused_by_slurm(run, submission, f"the array of shards {_ranges(chunk)}", _SHARD_SETTINGS):
                jobs = executor.map_array(ShardTask(), [str(run.path)] * len(chunk), chunk)
            submission.shard_jobs.update(zip(chunk, jobs))
            _record(run, submission, update_last=recorded)  # at once: status, cancel and --resume see it
            recorded = True
            array_ids.append(jobs[0].job_id.split("_")[0])
            log.info("submitted shards %s as %s", _ranges(chunk), array_ids[-1])
    if executor_kind == "slurm":
        reduce_executor = make_executor("slurm", run, manifest.cluster, name + "-reduce", for_reduce=True)
        dependencies = [*array_ids, *after]
        if dependencies:
            reduce_executor.update_parameters(slurm_additional_parameters={
                **manifest.cluster.additional,
                "dependency": "afterok:" + ":".join(dependencies),
                "kill-on-invalid-dep": "yes",
            })
        with _refused_by_slurm(run, submission, "the reduce", _REDUCE_SETTINGS):
            submission.reduce_job = reduce_executor.submit(reduce_task, str(run.path))
        log.info("submitted reduce as %s (afterok:%s)", submission.reduce_job.job_id, ":".join(dependencies) or "-")
    _record(run, submission, update_last=recorded)
    return submission


# The cluster settings that decide whether sbatch accepts the shards' arrays, and the reduce.
_SHARD_SETTINGS = "partition, account, qos, constraint, additional, gpus_per_task, cpus_per_task, mem_gb, " \
                  "timeout_min, max_array_size, array_parallelism"
_REDUCE_SETTINGS = "partition, account, qos, constraint, additional, reduce_cpus, reduce_mem_gb, reduce_timeout_min"


@contextmanager
def _refused_by_slurm(run: RunDir, submission: Submission, what: str, settings: str) -> Iterator[None]:
    """sbatch refusing `what` (a QOS limit, a bad partition) as a UserError quoting it, which says
    what this submission queued before (already in logs/jobs.json, so status and cancel see it)."""
    try:
        yield
    except FailedJobError as error:
        queued = sorted({job.job_id.split("_")[0] for job in submission.shard_jobs.values()})
        before = (f"Shards {_ranges(sorted(submission.shard_jobs))} were queued before it (job(s) "
                  f"{', '.join(queued)}; `saebatch status {run.path}` shows them, `saebatch cancel` stops them). "
                  if queued else "Nothing of this submission was queued. ")
        raise UserError(f"sbatch refused {what}: {str(error).strip() or 'no message'}\n{before}Check the manifest's "
                        f"cluster settings ({settings}) against what the cluster allows (sinfo, sacctmgr show qos), "
                        f"then `saebatch submit --resume {run.path}`") from None


def _submit_in_gpu_slots(run: RunDir, executor, shards: list[int], slots: list[list[str]]) -> Submission:
    """Start the shards locally a GPU slot at a time, showing the progress of those started while
    later ones wait; a `saebatch cancel` meanwhile stops the rest from starting."""
    plan = run.load_plan()
    board = ProgressBoard()
    submission = Submission("local", {}, None, board=board)
    for k in shards:
        board.add(f"shard {k}", len(plan.shards[k]))
    _record(run, submission)
    calls = [(str(run.path), k) for k in shards]
    started = run_in_gpu_slots(executor, ShardTask(), calls, slots, stop=lambda: was_cancelled(run),
                               idle=lambda: board.refresh(_named(submission.shard_jobs)))
    for shard, job in zip(shards, started):
        submission.shard_jobs[shard] = job
        _record(run, submission, update_last=True)
    if len(submission.shard_jobs) < len(shards):
        log.warning("cancelled: shard(s) %s were not started", _ranges(shards[len(submission.shard_jobs):]))
    return submission


def run_in_gpu_slots(executor, function, calls: list[tuple], slots: list[list[str]], poll_seconds: float = 1.0,
                     idle: Callable[[], None] | None = None, stop: Callable[[], bool] | None = None) -> Iterator[Any]:
    """Start `function(*call)` for each call on the local executor, each with a slot of GPUs to
    itself (its CUDA_VISIBLE_DEVICES): as many at once as there are slots, the next one as soon
    as a slot is free. Yields the submitit jobs in the order of `calls` as they start; calls
    `idle()` while it waits for a slot, and starts no more once `stop()` is true."""
    running: dict[int, Any] = {}  # slot index -> the job holding it
    python = executor.python
    for call in calls:
        free = [k for k in range(len(slots)) if k not in running or running[k].done()]
        while not free:
            if idle is not None:
                idle()
            time.sleep(poll_seconds)
            free = [k for k in range(len(slots)) if running[k].done()]
        if stop is not None and stop():
            return
        slot = free[0]
        gpus = ",".join(slots[slot])
        # Set in the task's command, not by submitit's `visible_gpus`, which takes indices only (a
        # machine may name its GPUs by UUID); `env` execs the Python, so the task is still the
        # controller's child, which `saebatch cancel` interrupts.
        executor.python = f"env CUDA_VISIBLE_DEVICES={shlex.quote(gpus)} {python}"
        try:
            running[slot] = executor.submit(function, *call)
        finally:
            executor.python = python
        log.info("local task %s runs on GPU(s) %s", running[slot].job_id, gpus)
        yield running[slot]


def wait(run: RunDir, submission: Submission, poll_seconds: float = 1.0) -> bool:
    """Wait for a submission, showing each task's progress live; name failed shards; run the
    local reduce. True when merged."""
    plan = run.load_plan()
    board = submission.board or ProgressBoard()
    with board:
        for shard in sorted(submission.shard_jobs):
            board.add(f"shard {shard}", len(plan.shards[shard]))
        board.follow(_named(submission.shard_jobs), poll_seconds)
        failed = [shard for shard, job in sorted(submission.shard_jobs.items())
                  if board.views[f"shard {shard}"].state == "failed"]
        # Shards still waiting for a GPU slot when a cancel landed: never started, so not done.
        unstarted = [name for name, view in board.views.items() if view.state == "waiting"]
        if not failed and not unstarted:
            if submission.executor == "local":
                cluster = run.load_manifest().cluster
                executor = make_executor("local", run, cluster, "reduce", for_reduce=True)
                submission.reduce_job = executor.submit(reduce_task, str(run.path))
                _record(run, submission, update_last=True)
            board.add("reduce", None)
            board.follow({"reduce": submission.reduce_job}, poll_seconds)
    if failed:
        _report_failed(run, submission, failed)
    if unstarted:
        log.error("%s: cancelled before starting (saebatch cancel)%s", ", ".join(unstarted), "" if failed else
                  f"; the reduce does not run. `saebatch submit --resume {run.path}` runs them")
    if failed or unstarted:
        return False
    assert submission.reduce_job is not None  # submitted above (local) or with the shards (Slurm)
    try:
        submission.reduce_job.result()
    except Exception as error:
        log.error("reduce (job %s) failed: %s\n  log: %s", submission.reduce_job.job_id,
                  task_error(error), submission.reduce_job.paths.stderr)
        return False
    return True


def _report_failed(run: RunDir, submission: Submission, failed: list[int]) -> None:
    """Name each failed shard with its own error (or its cancellation) and its log."""
    cancelled = cancelled_jobs(run)
    for shard in failed:
        job = submission.shard_jobs[shard]
        if job.job_id in cancelled:
            log.error("shard %d (job %s) was cancelled (saebatch cancel, %s)", shard, job.job_id, cancelled[job.job_id])
            continue
        try:
            job.result()
            why = "it ended without a result"
        except Exception as error:  # submitit raises several types; all mean "this shard failed"
            why = task_error(error)
        log.error("shard %d (job %s) failed: %s\n  log: %s", shard, job.job_id, why, job.paths.stderr)
    fix = "" if all(submission.shard_jobs[k].job_id in cancelled for k in failed) else "Fix the cause, then "
    log.error("%d shard(s) failed: %s; the reduce does not run. %s`saebatch submit --resume %s`",
              len(failed), _ranges(failed), fix, run.path)


def _named(shard_jobs: dict[int, Any]) -> dict[str, Any]:
    return {f"shard {k}": job for k, job in sorted(shard_jobs.items())}


def task_error(error: Exception) -> str:
    """The task's own exception, type and message, from what submitit raises in the client: its
    text wraps the task's traceback between dashed lines, then lists log paths."""
    text = str(error).strip()
    trace = re.search(r"^-{10,}\n(.*?)\n-{10,}$", text, re.S | re.M)
    lines = (trace.group(1) if trace else text).splitlines()
    last = max((i for i, line in enumerate(lines) if line and not line[0].isspace()
                and not line.startswith("Traceback")), default=None)
    if trace is None or last is None:
        return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    cause = "\n    ".join(line for line in lines[last:] if line.strip())
    return re.sub(r"^common\.errors\.UserError: ", "", cause)


def load_submissions(run: RunDir) -> list[dict]:
    """logs/jobs.json: every submission of the run, oldest first ([] before the first)."""
    if not run.jobs_path.exists():
        return []
    try:
        return json.loads(run.jobs_path.read_text())
    except ValueError as error:  # truncated, or not UTF-8
        raise UserError(
            f"{run.jobs_path} is damaged ({type(error).__name__}: {error}): restore it, or remove it to forget "
            "the run's past submissions: status then judges each shard by its file alone, and cancel stops only "
            "tasks already writing a shard (scancel any still queued yourself)"
        ) from None


def _record(run: RunDir, submission: Submission, update_last: bool = False) -> None:
    """Append the submission to logs/jobs.json, which `status`, `--resume` and `cancel` read (local
    job ids are process ids: the host says where they live)."""
    reduce_id = submission.reduce_job.job_id if submission.reduce_job is not None else None
    entry = {"time": now(), "executor": submission.executor, "host": socket.gethostname(), "reduce": reduce_id,
             "shards": {str(k): job.job_id for k, job in submission.shard_jobs.items()}}
    with _jobs_file(run) as history:
        if update_last and history:
            history[-1] |= {"reduce": reduce_id, "shards": entry["shards"]}
        else:
            history.append(entry)


def mark_cancelled(run: RunDir, job_ids: list[str]) -> None:
    """Note in logs/jobs.json that `saebatch cancel` stopped these jobs, before it stops them: a
    waiting submitter then starts nothing more, and `status` says cancelled, not why it failed."""
    stamp = now()
    with _jobs_file(run) as history:
        for entry in history:
            mine = {*entry["shards"].values(), entry.get("reduce")} & set(job_ids)
            if mine:
                entry["cancelled"] = entry.get("cancelled", {}) | dict.fromkeys(sorted(mine), stamp)


def cancelled_jobs(run: RunDir) -> dict[str, str]:
    """Job id -> when `saebatch cancel` stopped it, over every submission of the run."""
    return {job: stamp for entry in load_submissions(run) for job, stamp in entry.get("cancelled", {}).items()}


def was_cancelled(run: RunDir) -> bool:
    """Whether the latest submission of the run has been cancelled."""
    history = load_submissions(run)
    return bool(history and history[-1].get("cancelled"))


@contextmanager
def _jobs_file(run: RunDir) -> Iterator[list[dict]]:
    """logs/jobs.json to change in place, one process at a time (the submitter and `cancel`)."""
    with exclusive(run.jobs_lock, "another update of jobs.json", wait=True):
        history = load_submissions(run)
        yield history
        write_text_atomic(run.jobs_path, json.dumps(history, indent=1))


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ",".join(parts)
