"""Launching with submitit's local executor, status, resume, and a task killed for real."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from common import locks
from common.cli import main
from common.launcher import prepare_run, run_shard_task, submit, wait
from common.manifest_file import load_manifest
from common.rundir import RunDir
from common.shards import ShardWriter
from common.status import shard_states
from jobs.token_tracking import SCENARIOS
from tests.helpers import REPO, save_random_sae


def assert_same_units(path_a, path_b):
    """Every dataset under units/ is equal in the two files."""
    with h5py.File(path_a) as a, h5py.File(path_b) as b:
        names = []
        a["units"].visit(names.append)
        other = []
        b["units"].visit(other.append)
        assert sorted(names) == sorted(other)
        for name in names:
            if isinstance(a["units"][name], h5py.Dataset):
                np.testing.assert_array_equal(a["units"][name][()], b["units"][name][()], err_msg=name)


def test_submit_local_runs_shards_and_reduce(write_manifest, capsys):
    path = write_manifest()
    assert main(["submit", str(path), "--executor", "local"]) == 0
    out = capsys.readouterr().out
    run = RunDir.for_manifest(load_manifest(path))
    assert f"merged: {run.merged_path}" in out and f"report: {run.report_dir / 'report.md'}" in out
    assert [s.state for s in shard_states(run)] == ["done", "done"]
    with h5py.File(run.merged_path) as merged:
        assert len(merged["units"]) == 10 and "torch_threads" not in merged.attrs
    for index in range(2):  # the threads the task asked for, as on Slurm
        with h5py.File(run.shard_path(index)) as shard:
            assert shard.attrs["torch_threads"] == load_manifest(path).cluster.cpus_per_task
    assert main(["status", str(run.path)]) == 0
    status = capsys.readouterr().out
    assert "shards: 2 done" in status and "reduce: done" in status
    assert main(["submit", str(path), "--executor", "local"]) == 0  # same manifest again: nothing to do
    assert "every shard is done and merged" in capsys.readouterr().out


def test_failed_local_shard_is_reported_and_reduce_skipped(write_manifest, tmp_path, capsys):
    template = save_random_sae(tmp_path / "saes", d_in=128, d_sae=64, layers=range(4))
    path = write_manifest({"token_tracking": {"sae": {"builtin": None, "path": template}}})
    (tmp_path / "saes" / "L2" / "sae_weights.safetensors").write_bytes(b"damaged after validation")
    assert main(["submit", str(path), "--executor", "local"]) == 1
    err = capsys.readouterr().err  # the task's own error first, then where its log is
    assert re.search(r"shard 0 \(job \d+\) failed: cannot load the SAE in .*L2: .*\n  log: .*_log\.err", err)
    run = RunDir.for_manifest(load_manifest(path))
    assert not run.merged_path.exists()
    states = shard_states(run)
    assert [s.state for s in states] == ["failed", "failed"]
    assert "log:" in states[0].detail
    assert main(["status", str(run.path)]) == 1  # failed shards need attention
    assert "saebatch submit --resume" in capsys.readouterr().out
    save_random_sae(tmp_path / "saes", d_in=128, d_sae=64, layers=[2])  # fix the cause, then resume
    assert main(["submit", "--resume", str(run.path), "--executor", "local"]) == 0
    assert run.merged_path.exists() and [s.state for s in shard_states(run)] == ["done", "done"]


def test_task_killed_mid_shard_resumes_to_the_uninterrupted_result(write_manifest, tmp_path):
    overrides = {"token_tracking": {"batch_size": 1}, "run": {"shards": 1}}
    path = write_manifest(overrides)
    run = prepare_run(load_manifest(path))
    task = subprocess.Popen([sys.executable, "-m", "common.cli", "run", str(run.path), "--shard", "0"],
                            stderr=subprocess.PIPE, text=True)
    for line in task.stderr:
        if "written (2/10)" in line:
            task.send_signal(signal.SIGKILL)
            break
    task.wait(timeout=60)
    assert task.returncode == -signal.SIGKILL
    assert not run.shard_path(0).exists()
    (state,) = shard_states(run)
    assert state.state == "partial"
    written = int(state.detail.split("/")[0])
    assert 2 <= written < 10

    assert main(["run", str(run.path), "--shard", "0"]) == 0
    assert main(["reduce", str(run.path)]) == 0
    clean = write_manifest({**overrides, "run": {"shards": 1, "dir": str(tmp_path / "clean")}}, name="clean.yaml")
    assert main(["run", str(clean), "--shard", "0"]) == 0
    assert main(["reduce", str(clean)]) == 0
    assert_same_units(run.merged_path, tmp_path / "clean" / "merged.h5")


def test_reduces_started_together_take_turns(write_manifest):
    path = write_manifest()
    assert main(["run", str(path), "--shard", "0"]) == 0 and main(["run", str(path), "--shard", "1"]) == 0
    reduces = [subprocess.Popen([sys.executable, "-m", "common.cli", "reduce", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [task.communicate(timeout=300) for task in reduces]
    assert [task.returncode for task in reduces] == [0, 0], outcomes
    run = RunDir.for_manifest(load_manifest(path))
    with h5py.File(run.merged_path) as merged:
        assert len(merged["units"]) == 10
    assert not list(run.path.glob(".reduce-*"))  # no staging folder left behind


def test_reduce_refuses_missing_shard_by_name(write_manifest, capsys):
    path = write_manifest()
    assert main(["run", str(path), "--shard", "1"]) == 0
    assert main(["reduce", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot merge this run" in err and "shard 0 missing" in err and "Traceback" not in err


def test_run_rejects_shard_outside_plan(write_manifest, capsys):
    assert main(["run", str(write_manifest()), "--shard", "2"]) == 2
    assert "--shard 2: this run has shards 0-1" in capsys.readouterr().err


def test_submit_without_slurm_says_what_to_do(write_manifest, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["submit", str(write_manifest())]) == 2
    assert "`sbatch` is not on PATH" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["status", "{manifest}"], ["reduce", "{manifest}"], ["status", "/nonexistent/run"]])
def test_commands_on_a_run_that_does_not_exist(write_manifest, args, capsys):
    assert main([a.format(manifest=write_manifest()) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and ("has no run yet" in err or "does not exist" in err)


@pytest.mark.parametrize("command", ["status", "logs", "cancel"])
def test_commands_on_a_run_with_a_damaged_plan_or_jobs_file_say_how_to_recover(write_manifest, command, capsys):
    run = prepare_run(load_manifest(write_manifest()))
    plan = run.plan_path.read_text()
    run.plan_path.write_text(plan[:40])  # cut short
    assert main([command, str(run.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run.plan_path} is damaged (JSONDecodeError") and "Traceback" not in err
    assert f"restore the file from a backup, or move {run.path} aside and submit its manifest again" in err
    run.plan_path.write_text(plan)
    run.jobs_path.write_text('[{"time": ')
    assert main([command, str(run.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run.jobs_path} is damaged (JSONDecodeError") and "Traceback" not in err
    assert "restore it, or remove it to forget the run's past submissions" in err
    run.jobs_path.unlink()  # as the message offers: status then reads the shards alone
    assert main(["status", str(run.path)]) == 1
    assert "shards: 2 missing" in capsys.readouterr().out


def test_a_task_moves_a_damaged_shard_aside_and_writes_it_again(write_manifest, capsys):
    """A shard cut short (a crash mid-copy, a full disk) or with a flipped byte is not "already
    complete": the task keeps it under another name, writes the shard again, and reduce merges."""
    path = write_manifest({"run": {"shards": 1}})
    assert main(["run", str(path), "--shard", "0"]) == 0
    run = RunDir.for_manifest(load_manifest(path))
    sound = run.shard_path(0).read_bytes()
    run.shard_path(0).write_bytes(sound[:5000])
    assert main(["run", str(path), "--shard", "0"]) == 0
    (aside,) = run.shard_path(0).parent.glob("shard_*.h5.damaged-*")
    assert aside.read_bytes() == sound[:5000]
    log = capsys.readouterr().err
    assert "truncated or corrupt" in log and "writing shard 0 again" in log
    assert main(["status", str(path)]) == 0  # all done; not merged yet
    assert f"kept aside, unusable (a task wrote its shard again; look, then delete): {aside}\n" in capsys.readouterr().out
    assert main(["status", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept_aside"] == [str(aside)]
    assert main(["reduce", str(path)]) == 0
    with h5py.File(run.merged_path) as merged:
        assert len(merged["units"]) == 10


def test_status_exits_1_when_a_shard_is_missing_or_the_merge_is_out_of_date(write_manifest, capsys):
    path = write_manifest()
    assert main(["run", str(path), "--shard", "0"]) == 0 and main(["run", str(path), "--shard", "1"]) == 0
    assert main(["reduce", str(path)]) == 0
    run = RunDir.for_manifest(load_manifest(path))
    capsys.readouterr()
    assert main(["status", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["state"] for s in report["shards"]] == ["done", "done"] and report["reduce"].startswith("done")
    assert report["needs_attention"] is False
    later = run.merged_path.stat().st_mtime + 10
    os.utime(run.shard_path(1), (later, later))  # shard 1 written again after the merge
    assert main(["status", str(path)]) == 1
    assert "out of date: shard(s) [1] were written after merged.h5; reduce again" in capsys.readouterr().out
    run.shard_path(0).unlink()
    assert main(["status", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["shards"][0]["state"] == "missing" and report["needs_attention"] is True
    assert report["reduce"] == "out of date: merged.h5 is there but shard(s) [0] are not done"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_reduce_on_a_full_disk_says_so_and_leaves_nothing_behind(write_manifest, tmp_path, capsys):
    path = write_manifest()
    assert main(["run", str(path), "--shard", "0"]) == 0 and main(["run", str(path), "--shard", "1"]) == 0
    run = RunDir.for_manifest(load_manifest(path))
    shards = sum(run.shard_path(k).stat().st_size for k in range(2))
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={shards + 200_000}", "tmpfs", str(small)], check=True)
    try:
        copy = small / run.path.name
        shutil.copytree(run.path, copy)
        capsys.readouterr()
        assert main(["reduce", str(copy)]) == 2
        err = capsys.readouterr().err
        assert f"the disk holding {copy} is full" in err and f"needs about {shards / 1e6:,.1f} MB" in err
        assert not list(copy.glob(".reduce-*")) and not (copy / "merged.h5").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_two_submissions_at_once_run_the_shards_once_and_merge_once(write_manifest):
    path = write_manifest()
    submits = [subprocess.Popen([sys.executable, "-m", "common.cli", "submit", str(path), "--executor", "local"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [task.communicate(timeout=300) for task in submits]
    assert [task.returncode for task in submits] == [0, 0], outcomes
    outputs = sorted(out for out, _ in outcomes)
    assert "another saebatch is submitting or running this run right now" in outputs[0]
    assert "merged:" in outputs[1]
    run = RunDir.for_manifest(load_manifest(path))
    submissions = json.loads((run.logs_dir / "jobs.json").read_text())
    assert len(submissions) == 1 and submissions[0]["reduce"]  # one submission, one reduce
    assert [s.state for s in shard_states(run)] == ["done", "done"]


def test_a_resumed_shard_keeps_the_threads_it_began_with(write_manifest):
    """cluster settings are not part of the run's hash: a resume under another cpus_per_task must
    not mix two thread counts (floating-point sums) in one shard."""
    path = write_manifest({"run": {"shards": 1}})
    run = prepare_run(load_manifest(path))
    plan = run.load_plan()
    with ShardWriter(run.shard_path(0), plan.run_id, plan.job, 0, list(plan.shards[0])) as partial:
        partial.set_attrs(torch_threads=2)  # begun with 2 threads, then killed before its first unit
    assert main(["run", str(path), "--shard", "0"]) == 0
    with h5py.File(run.shard_path(0)) as shard:
        assert shard.attrs["torch_threads"] == 2 and load_manifest(path).cluster.cpus_per_task == 1


def test_a_task_stopped_by_its_time_limit_is_requeued_and_continues_its_shard(write_manifest, tmp_path):
    """submitit's timeout signal (USR2) mid-shard: the checkpointable task is requeued, not failed,
    and the requeued task resumes the partial file to the uninterrupted result."""
    # timeout_min 10: submitit counts a signal after any time as the timeout, as the issue saw.
    # Four times the demo's scenarios: the shard must still be writing when the signal comes, even
    # when this process is slow to see unit 2 written on a busy machine.
    scenarios = [dict(scenario, name=f"{scenario['name']}-{copy}") for copy in range(4) for scenario in SCENARIOS]
    settings = {"batch_size": 1, "scenarios": scenarios}
    path = write_manifest({"token_tracking": settings, "run": {"shards": 1}, "cluster": {"timeout_min": 10}})
    run = prepare_run(load_manifest(path))
    submission = submit(run, "local", [0])
    (job,) = submission.shard_jobs.values()
    partial = run.shard_path(0).with_name(run.shard_path(0).name + ".partial")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and f"written (2/{len(scenarios)})" not in (
            job.paths.stderr.read_text() if job.paths.stderr.exists() else ""):
        time.sleep(0.05)
    controller = job.job_id
    workers = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    for worker in workers:  # what submitit's local controller sends its task when the time limit is near
        os.kill(int(worker), signal.SIGUSR2)
    assert wait(run, submission)
    log = job.paths.stderr.read_text()
    assert "this job is timed-out" in log and "Requeued job" in log and "resuming," in log
    assert not partial.exists()
    clean = write_manifest({"token_tracking": settings, "run": {"shards": 1, "dir": str(tmp_path / "clean")}},
                           name="clean.yaml")
    assert main(["run", str(clean), "--shard", "0"]) == 0 and main(["reduce", str(clean)]) == 0
    assert_same_units(run.merged_path, tmp_path / "clean" / "merged.h5")


def test_status_follows_the_worker_when_its_local_controller_is_killed(write_manifest):
    """submitit's local job id is its controller's pid; killed, the controller leaves its worker
    writing the shard. status names that writer (from the shard's lock) instead of a failure."""
    path = write_manifest({"token_tracking": {"batch_size": 1}, "run": {"shards": 1}})
    run = prepare_run(load_manifest(path))
    (job,) = submit(run, "local", [0]).shard_jobs.values()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "units to write" not in (job.paths.stderr.read_text()
                                                                   if job.paths.stderr.exists() else ""):
        time.sleep(0.02)
    (worker,) = Path(f"/proc/{job.job_id}/task/{job.job_id}/children").read_text().split()
    os.kill(int(worker), signal.SIGSTOP)  # hold the worker mid-shard while we look
    os.kill(int(job.job_id), signal.SIGKILL)
    job._process.wait()
    try:
        (state,) = shard_states(run)
        assert state.state == "running" and f"written by process {worker} on " in state.detail
    finally:
        os.kill(int(worker), signal.SIGCONT)
    for _ in range(600):  # the orphaned worker finishes the shard
        if run.shard_path(0).exists():
            break
        time.sleep(0.1)
    assert [s.state for s in shard_states(run)] == ["done"]


def test_the_demo_runs_what_it_can_and_ends_with_a_table(tmp_path, capsys):
    """Patching without its games and contrast: skipped, not a crash; token_tracking runs anyway."""
    code = main(["demo", "--root", str(tmp_path / "runs"), "--only", "gambling_4", "gambling_2", "token_tracking"])
    out = capsys.readouterr().out
    assert code == 1
    table = out[out.index("manifest "):].splitlines()
    assert re.match(r"manifest\s+status\s+time\s+output", table[0])
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == {"gambling_2_contrast.yaml", "gambling_4_patching.yaml", "token_tracking.yaml"}
    assert re.search(r"gambling_2_contrast\.yaml\s+failed\s+\d+ s\s+feature_contrast\.games: .* has no merged\.h5", rows["gambling_2_contrast.yaml"])
    assert "skipped: inputs missing" in rows["gambling_4_patching.yaml"]
    assert re.search(r"token_tracking\.yaml\s+done\s+\d+ s\s+.*report\.md", rows["token_tracking.yaml"])


def test_the_demo_gives_each_task_a_gpu_where_one_is_visible_and_the_cpu_with_cpu(tmp_path, capsys, monkeypatch):
    """With a GPU visible the demo asks one per task, also of a run an earlier --cpu demo made;
    --cpu then gives it back to the CPU. (The submission itself is replaced: no GPU is here.)"""
    import common.cli
    import common.gpus

    monkeypatch.setattr(common.gpus, "visible_gpus", lambda: ["0"])
    monkeypatch.setattr(common.gpus, "describe_devices", lambda: "1 x a test GPU")
    asked = []
    monkeypatch.setattr(common.cli, "_submit_run", lambda run, *_: asked.append(run.load_manifest().cluster.gpus_per_task) or 0)
    root = str(tmp_path / "runs")
    for flags in (["--cpu"], [], ["--cpu"]):
        assert main(["demo", "--root", root, "--only", "token_tracking", *flags]) == 0
    assert asked == [0, 1, 0]
    out = capsys.readouterr().out
    assert "demo on 1 x a test GPU: each task gets one GPU" in out and "demo on the CPU (--cpu)" in out



FINISH_ON_CUE = """
import sys
from pathlib import Path

from common.shards import ShardWriter

path, run_id, job, index, ids = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5].split(",")
with ShardWriter(path, run_id, job, index, ids) as shard:
    for unit_id in ids:
        with shard.unit(unit_id) as group:
            group.create_dataset("first_writer", data=[1])
    print("written", flush=True)
    sys.stdin.readline()
    shard.finish()
"""


def test_a_task_that_gets_the_lock_after_another_finished_the_shard_keeps_that_shard(write_manifest, monkeypatch):
    """Two tasks of one shard (a resubmission while the first still ran): the second, waiting for
    the lock while the first finishes, must not compute the shard again and replace it."""
    monkeypatch.setattr(locks, "PROBE_GRACE_S", 300.0)  # the second waits as long as the first takes here
    run = prepare_run(load_manifest(write_manifest()))
    plan = run.load_plan()
    first = subprocess.Popen(
        [sys.executable, "-c", FINISH_ON_CUE, str(run.shard_path(0)), plan.run_id, plan.job, "0",
         ",".join(plan.shards[0])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert first.stdout.readline().strip() == "written"
    second: list[str] = []
    task = threading.Thread(target=lambda: second.append(run_shard_task(str(run.path), 0)))
    task.start()  # finds no shard yet, then waits for the first writer's lock
    time.sleep(0.5)
    first.communicate("finish\n", timeout=60)
    task.join(timeout=300)
    assert second == [str(run.shard_path(0))]
    with h5py.File(run.shard_path(0)) as shard:
        assert all("first_writer" in shard["units"][unit_id] for unit_id in plan.shards[0])
    assert list(run.shards_dir.glob("*.damaged-*")) == [] and not (run.shards_dir / "shard_00000.h5.partial").exists()
