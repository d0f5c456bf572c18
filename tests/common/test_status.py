"""common/status.py on real run directories: each shard's state from its files, its writer's lock
and its job (local jobs: their processes and result files), the merge's state, and when a run needs
attention (what `saebatch status` exits 1 for)."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import submitit
from submitit.core.utils import cloudpickle_dump

from common.cancel import cancel_run
from common.launcher import Submission, _record, mark_cancelled, prepare_run
from common.manifest_file import load_manifest
from common.rundir import RunDir
from common.shards import ShardWriter, partial_path
from common.status import (
    ShardState,
    needs_attention,
    reduce_state,
    reduce_status,
    shard_states,
)
from tests.helpers import REPO

PARTIAL_UNREADABLE = "partial file unreadable now (being written, or damaged: a rerun keeps it aside and starts afresh)"


@pytest.fixture
def run(write_manifest) -> RunDir:
    """The demo's token_tracking run prepared (10 units in 3 shards: 4, 3 and 3), nothing run yet."""
    run = prepare_run(load_manifest(write_manifest({"run": {"shards": 3}})))
    assert [len(ids) for ids in run.load_plan().shards] == [4, 3, 3]
    return run


def write_shard(run: RunDir, index: int, units: int | None = None) -> Path:
    """Write shard `index` as a task does (ShardWriter, a group per unit): its first `units` units,
    finished (renamed to its final name) when that is all of them, else left partial."""
    plan = run.load_plan()
    ids = list(plan.shards[index])
    with ShardWriter(run.shard_path(index), plan.run_id, plan.job, index, ids) as shard:
        for unit_id in ids[:units]:
            with shard.unit(unit_id) as group:
                group.create_dataset("values", data=np.arange(3))
        if units is None or units == len(ids):
            return shard.finish()
    return partial_path(run.shard_path(index))


def write_merge(run: RunDir) -> None:
    """What a reduce leaves: merged.h5 and report/report.md."""
    with h5py.File(run.merged_path, "w") as merged:
        merged.attrs["job"] = "token_tracking"
    run.report_dir.mkdir()
    (run.report_dir / "report.md").write_text("# report\n")


def states_of(run: RunDir) -> list[tuple[str, str]]:
    return [(state.state, state.detail) for state in shard_states(run)]


def test_a_run_never_submitted_has_every_shard_missing(run):
    states = shard_states(run)
    assert [(s.index, s.state, s.job_id, s.detail) for s in states] == [(k, "missing", None, "never run") for k in range(3)]
    assert reduce_state(run, states) == "not submitted"
    assert needs_attention(states, "not submitted")


def test_shards_written_whole_in_part_or_damaged(run):
    write_shard(run, 0)
    write_shard(run, 1, units=1)  # a task stopped after its first unit
    shutil.copy(run.shard_path(0), run.shard_path(2))  # a file that says it is shard 0
    assert states_of(run) == [
        ("done", str(run.shard_path(0))),
        ("partial", "1/3 units written"),
        ("corrupt", f"shard 2 foreign: {run.shard_path(2)} says it is shard 0"),
    ]
    states = shard_states(run)
    assert needs_attention(states, reduce_state(run, states))
    run.shard_path(2).write_bytes(b"cut off")
    partial_path(run.shard_path(1)).write_bytes(b"killed while HDF5 wrote its metadata")
    _, partial, (corrupt, detail) = states_of(run)
    assert partial == ("partial", PARTIAL_UNREADABLE)
    assert corrupt == "corrupt" and detail.startswith(f"shard 2 truncated or corrupt: {run.shard_path(2)} (")


def test_a_partial_shard_resumed_to_the_end_is_done(run):
    write_shard(run, 0, units=2)
    assert states_of(run)[0] == ("partial", "2/4 units written")
    write_shard(run, 0)  # the requeued task writes the two units left and finishes
    assert states_of(run)[0] == ("done", str(run.shard_path(0)))
    assert not partial_path(run.shard_path(0)).exists()


WRITER = """
import sys
from pathlib import Path

import numpy as np

from common.shards import ShardWriter

path, run_id, job, index, ids = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5].split(",")
with ShardWriter(path, run_id, job, index, ids) as shard:
    with shard.unit(ids[0]) as group:
        group.create_dataset("values", data=np.arange(3))
    print("written", flush=True)
    sys.stdin.readline()  # holds the shard until told
"""


def test_a_shard_being_written_is_running_and_names_its_writer(run):
    """Another process writes shard 1 (with HDF5's file locks off, as tasks run on Slurm and in
    the image); no job of it is known (a `saebatch run` by hand, or a killed local controller)."""
    plan = run.load_plan()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(run.shard_path(1)), plan.run_id, plan.job, "1", ",".join(plan.shards[1])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HDF5_USE_FILE_LOCKING": "FALSE"})
    try:
        assert writer.stdout.readline().strip() == "written"
        state = shard_states(run)[1]
        assert (state.state, state.job_id) == ("running", None)
        assert state.detail == f"1/3 units written; written by process {writer.pid} on {socket.gethostname()}"
        states = shard_states(run)
        assert not needs_attention(states[1:2], "not submitted")  # a running shard is not one to resubmit
    finally:
        writer.communicate("go\n", timeout=60)
    assert writer.returncode == 0
    assert states_of(run)[1] == ("partial", "1/3 units written")  # the writer gone, its lock with it


def _sleeping(*argv: str):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *argv])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def sleeper():
    """A process that lives through the test: a local job still running (its command names
    submitit, as its controller's `python -m submitit.local._local` does)."""
    yield from _sleeping("submitit.local._local")


@pytest.fixture
def stranger():
    """A live process that is no submitit task: what a local job's process id may be given to."""
    yield from _sleeping()


def _local_job(run: RunDir, job_id: str) -> submitit.LocalJob:
    return submitit.LocalJob(folder=run.submitit_dir, job_id=job_id)


def test_the_state_of_a_shards_local_job(run, sleeper):
    """Local job ids are process ids: a live process is running, a result file says how it ended,
    a process gone without one failed, and a job `saebatch cancel` stopped reads as cancelled."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    gone, errored, completed = (str(pid_max + k) for k in (1, 2, 3))  # no process has these ids
    run.submitit_dir.mkdir(parents=True)
    cloudpickle_dump(("error", "Traceback (most recent call last):\nValueError: no\n"),
                     _local_job(run, errored).paths.result_pickle)
    cloudpickle_dump(("success", "shard_00002.h5"), _local_job(run, completed).paths.result_pickle)
    _record(run, Submission("local", {0: _local_job(run, str(sleeper.pid)), 1: _local_job(run, gone),
                                      2: _local_job(run, completed)}, reduce_job=_local_job(run, str(sleeper.pid))))
    write_shard(run, 0, units=3)
    states = shard_states(run)
    assert [s.job_id for s in states] == [str(sleeper.pid), gone, completed]
    assert [(s.state, s.detail) for s in states] == [
        ("running", "3/4 units written"),
        ("failed", f"failed (process ended without a result); log: {_local_job(run, gone).paths.stderr}"),
        ("missing", "completed"),  # it says it finished, but its shard is not there
    ]
    assert reduce_state(run, states) == f"running (job {sleeper.pid})"
    assert reduce_status(run, states)[0] == "running"
    assert needs_attention(states, reduce_state(run, states))

    _record(run, Submission("local", {1: _local_job(run, errored)}))  # shard 1 resubmitted; its task raised
    state = shard_states(run)[1]
    assert (state.state, state.job_id) == ("failed", errored)
    assert state.detail == f"failed (raised an error); log: {_local_job(run, errored).paths.stderr}"
    assert reduce_state(run, shard_states(run)) == "not submitted"  # the latest submission has no reduce

    mark_cancelled(run, [errored])
    state = shard_states(run)[1]
    assert state.state == "failed" and state.detail.startswith("failed (cancelled by saebatch cancel at ")


def test_a_local_jobs_reused_process_id_ends_it_and_another_hosts_job_stays_running(run, stranger, monkeypatch):
    """A local job's process id, once its process has ended, may belong to an unrelated process; a
    job started on another machine cannot be looked up here, so it counts as running (no resubmit
    starts a second writer of its shard)."""
    run.submitit_dir.mkdir(parents=True)
    _record(run, Submission("local", {0: _local_job(run, str(stranger.pid))}, reduce_job=_local_job(run, str(stranger.pid))))
    states = shard_states(run)
    assert (states[0].state, states[0].detail) == (
        "failed", f"failed (process ended without a result); log: {_local_job(run, str(stranger.pid)).paths.stderr}")
    assert reduce_state(run, states) == f"failed (process ended without a result) (job {stranger.pid})"

    here = socket.gethostname()
    monkeypatch.setattr(socket, "gethostname", lambda: "another-node")  # status asked from another machine
    states = shard_states(run)
    unknown = f"unknown (a local task on {here}: ask there)"
    assert (states[0].state, states[0].detail) == ("running", f"{unknown}; no partial file yet")  # not resubmitted
    assert reduce_state(run, states) == f"{unknown} (job {stranger.pid})"


@pytest.fixture
def sacct_lagging(tmp_path, monkeypatch) -> None:
    """An `sacct` that lists no job yet, as Slurm's accounting database does for a moment after
    sbatch (minutes on a busy cluster): the lag cannot be timed in a test, so it is stood in for;
    sbatch, squeue and scancel are the test cluster's own."""
    bin_dir = tmp_path / "lagging-sacct"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text("#!/bin/bash\necho 'JobID|State|NodeList'\n")
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def _sbatch_held(*options: str) -> str:
    """Queue a held job on the test cluster (it stays pending) and return its id."""
    queued = subprocess.run(["sbatch", "--parsable", "--hold", "--output=/dev/null", *options, "--wrap", "sleep 600"],
                            capture_output=True, text=True, check=True)
    return queued.stdout.strip().split(";")[0]


def test_a_slurm_job_sacct_does_not_list_yet_is_asked_of_squeue_and_cancel_stops_it(slurm_cluster, run, sacct_lagging):
    """Right after submitting, a shard whose job sacct does not list yet is pending (read from
    squeue), not missing: `submit` would queue it a second time and `cancel` would leave it queued.
    A job neither knows is missing."""
    array, single = _sbatch_held("--array=0-1"), _sbatch_held()
    try:
        def slurm_job(job_id: str) -> submitit.SlurmJob:
            return submitit.SlurmJob(folder=run.submitit_dir, job_id=job_id)

        gone = "99999999"  # no job of the test cluster's has this id
        _record(run, Submission("slurm", {0: slurm_job(f"{array}_0"), 1: slurm_job(f"{array}_1"), 2: slurm_job(gone)},
                                reduce_job=slurm_job(single)))
        states = shard_states(run)
        assert [(s.state, s.job_id) for s in states] == [
            ("pending", f"{array}_0"), ("pending", f"{array}_1"), ("missing", gone)]
        assert reduce_state(run, states) == f"pending (job {single})"

        stopped = cancel_run(run, settle_seconds=30)
        assert sorted((s.task, s.job_id, s.how) for s in stopped) == [
            ("reduce", single, "scancel"), ("shard 0", f"{array}_0", "scancel"), ("shard 1", f"{array}_1", "scancel")]
        listing = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i %T", f"--jobs={array},{single}"],
                                 capture_output=True, text=True).stdout.split()
        listed = dict(zip(listing[::2], listing[1::2]))  # the array as one line, or a line per task
        assert set(listed.values()) == {"CANCELLED"} and single in listed and any(j.startswith(array) for j in listed)
        assert all(s.detail.startswith("failed (cancelled by saebatch cancel at ") for s in shard_states(run)[:2])
    finally:
        subprocess.run(["scancel", array, single], capture_output=True)


def test_only_shards_without_a_file_are_asked_of_squeue(run, sacct_lagging, tmp_path, monkeypatch):
    """A finished shard's job is not looked up again (`saebatch runs` reads every run's status):
    squeue is asked, once, of the jobs of the shards still to write alone."""
    asked = tmp_path / "squeue-calls"
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "squeue").write_text(f'#!/bin/bash\necho "$@" >> "{asked}"\n')
    (spy / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{spy}:{os.environ['PATH']}")
    jobs = {shard: submitit.SlurmJob(folder=run.submitit_dir, job_id=f"4242_{shard}") for shard in range(3)}
    _record(run, Submission("slurm", jobs))
    for index in range(3):
        write_shard(run, index)
    assert [s.state for s in shard_states(run)] == ["done"] * 3 and not asked.exists()
    run.shard_path(1).unlink()
    assert [s.state for s in shard_states(run)] == ["done", "missing", "done"]
    assert asked.read_text() == "--noheader --array --states=all --format=%i %T --jobs=4242_1\n"


def test_the_merge_is_done_until_a_shard_changes_or_goes(run):
    for index in range(3):
        write_shard(run, index)
    states = shard_states(run)
    assert [s.state for s in states] == ["done"] * 3
    assert reduce_state(run, states) == "not submitted" and not needs_attention(states, "not submitted")

    run.merged_path.write_bytes(b"")  # a merged.h5 without its report is no finished merge
    assert reduce_state(run, states) == "not submitted"
    write_merge(run)
    assert reduce_state(run, states) == f"done: {run.merged_path}"
    assert reduce_status(run, states)[0] == "done" and not needs_attention(states, reduce_state(run, states))

    later = run.merged_path.stat().st_mtime + 10
    os.utime(run.shard_path(1), (later, later))  # shard 1 written again after the merge
    reduce = reduce_state(run, shard_states(run))
    assert reduce == "out of date: shard(s) [1] were written after merged.h5; reduce again"
    assert needs_attention(shard_states(run), reduce)

    run.shard_path(2).unlink()
    states = shard_states(run)
    assert reduce_state(run, states) == "out of date: merged.h5 is there but shard(s) [2] are not done"
    assert reduce_status(run, states)[0] == "out of date" and needs_attention(states, reduce_state(run, states))


@pytest.mark.parametrize(("state", "reduce", "attention"), [
    ("done", "done: merged.h5", False), ("running", "not submitted", False), ("pending", "pending (job 7)", False),
    ("missing", "done: merged.h5", True), ("failed", "not submitted", True), ("partial", "not submitted", True),
    ("corrupt", "not submitted", True), ("done", "out of date: shard(s) [0] were written after merged.h5", True),
    ("done", "failed (job 7)", True)])
def test_what_needs_attention(state, reduce, attention):
    assert needs_attention([ShardState(0, "done", None, ""), ShardState(1, state, None, "")], reduce) is attention
