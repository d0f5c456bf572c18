"""`saebatch submit` when the scheduler refuses part of a submission, when a shard is written outside
any job it could wait for, and when a merge is out of date."""

import os
import socket
import stat
import subprocess
import sys

import pytest
import submitit

from common.cli import main
from common.launcher import Submission, _record, load_submissions, prepare_run
from common.manifest_file import load_manifest
from common.rundir import RunDir
from common.shards import lock_path
from common.status import reduce_state, shard_states
from tests.helpers import REPO, run_all

QOS_REFUSAL = ("sbatch: error: QOSMaxSubmitJobPerUserLimit\n"
               "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy")


def fake_sbatch(folder, accepted: int):
    """A stand-in sbatch that queues its first `accepted` jobs and then refuses, as a QOS submit limit
    does: the test cluster has no QOS limits to reach, the one thing its real sbatch cannot show
    (test_slurm.py has sbatch refuse a reduce for real)."""
    script = folder / "sbatch"
    script.write_text(f"""#!/bin/bash
n=$(cat "{folder}/calls" 2>/dev/null || echo 0); echo $((n + 1)) > "{folder}/calls"
if [ "$n" -ge {accepted} ]; then printf '%s\\n' "{QOS_REFUSAL}" >&2; exit 1; fi
echo "Submitted batch job $((101 + n))"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize(("accepted", "refused", "queued"), [
    (1, "the array of shards 2", {"0": "101_0", "1": "101_1"}),
    (2, "the reduce", {"0": "101_0", "1": "101_1", "2": "102"}),
])
def test_a_refused_sbatch_is_a_clear_error_and_what_was_queued_is_recorded(
        write_manifest, tmp_path, monkeypatch, capsys, accepted, refused, queued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_sbatch(bin_dir, accepted)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    path = write_manifest({"run": {"shards": 3}, "cluster": {"max_array_size": 2}})
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"sbatch refused {refused}: {QOS_REFUSAL}" in err
    assert "cluster settings (partition, account, qos, constraint, additional, " in err and "Traceback" not in err
    assert "Shards 0-1" in err or "Shards 0-2" in err
    run = RunDir.for_manifest(load_manifest(path))
    (submission,) = load_submissions(run)
    assert submission["shards"] == queued and submission["reduce"] is None


HOLD_LOCK = """
import sys
from pathlib import Path
from common.locks import exclusive
with exclusive(Path(sys.argv[1]), "a writer of the shard", wait=False):  # as `saebatch run --shard K` holds it
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_shard_written_outside_any_slurm_job_is_refused_before_anything_is_queued(
        slurm_cluster, write_manifest, capsys):
    run = prepare_run(load_manifest(write_manifest()))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_path(run.shard_path(0)))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["submit", "--resume", str(run.path)]) == 2
    finally:
        holder.communicate("done\n", timeout=60)
    err = capsys.readouterr().err
    assert (f"shard 0 is running, written by process {holder.pid} on {socket.gethostname()}, which is no Slurm "
            f"job of this run, so the reduce cannot wait for it: wait for it to finish, or stop it (saebatch "
            f"cancel {run.path}), then submit again") in err
    assert load_submissions(run) == []  # shard 1 was not queued either (each queued array is recorded at once)


def test_a_local_task_is_never_made_a_slurm_dependency(slurm_cluster, write_manifest, capsys):
    run = prepare_run(load_manifest(write_manifest()))
    # A live local controller of shard 0 (its command names submitit, as `python -m submitit.local._local` does).
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "submitit.local._local"])
    try:
        _record(run, Submission("local", {0: submitit.LocalJob(folder=run.submitit_dir, job_id=str(controller.pid))}))
        assert main(["submit", "--resume", str(run.path)]) == 2
    finally:
        controller.kill()
        controller.wait()
    assert f"shard 0 is running, written by local task {controller.pid}, which is no Slurm job" in capsys.readouterr().err
    assert [entry["executor"] for entry in load_submissions(run)] == ["local"]  # nothing queued on Slurm


def test_submit_merges_again_when_the_merge_is_out_of_date(write_manifest, capsys):
    path = write_manifest()
    run = run_all(path)
    earlier = run.shard_path(1).stat().st_mtime - 10
    os.utime(run.merged_path, (earlier, earlier))  # shard 1 written again after the merge
    assert reduce_state(run, shard_states(run)).startswith("out of date")
    assert main(["submit", str(path), "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert "submitting 0" in out and f"merged: {run.merged_path}" in out
    assert reduce_state(run, shard_states(run)) == f"done: {run.merged_path}"
