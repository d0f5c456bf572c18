"""Seeing what runs: live progress, `saebatch logs`, `cancel` and `runs`, and every report's
timeline, on real local runs of the demo manifest (the built-in model organism)."""

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import h5py
import pytest

import common.cancel
import common.progress
from common.cancel import _interrupt, cancel_run
from common.cli import main
from common.errors import UserError
from common.launcher import (
    Submission,
    cancelled_jobs,
    load_submissions,
    prepare_run,
    submit,
    wait,
)
from common.locks import held_by
from common.manifest_file import load_manifest
from common.progress import ProgressBoard, TaskView, eta_seconds
from common.rundir import RunDir
from common.shards import ShardWriter, lock_path
from common.status import ShardState, process_alive, shard_states
from common.tasklog import TaskProgress, job_paths, screen_lines
from tests.helpers import REPO, write_manifest_file


def run_of(path: Path) -> RunDir:
    return RunDir.for_manifest(load_manifest(path))


def timeline_rows(run: RunDir) -> list[tuple[str, ...]]:
    report = (run.report_dir / "report.md").read_text()
    section = report[report.index("## Timeline"):]
    return re.findall(r"^\| (shard \d+|reduce) \| (\S+) \| ([\d-]+ [\d:]+) \| ([\d-]+ [\d:]+) \| ([^|]+) \| (\d+) \|$",
                      section, re.MULTILINE)


# A task's log as submitit keeps it: tqdm's rewrites with carriage returns, log lines glued to a bar.
LOG = ("2026-01-31 12:00:00,000 INFO common.launcher: shard 3: 4 of 6 units to write, on cpu, 1 CPU thread(s)\n"
       "\rshard 3:   0%|          | 0/4 [00:00<?, ?scenario/s]2026-01-31 12:00:02,000 INFO common.saes: loading\n"
       "\rshard 3:  25%|##5       | 1/4 [00:04<00:12,  4.00s/scenario]"
       "2026-01-31 12:00:10,000 INFO common.shards: shard 3: unit s2 written (3/6)\n"
       "2026-01-31 12:00:14,000 INFO common.shards: shard 3: unit s3 written (4/6)\n"
       "\rshard 3:  50%|#####     | 2/4 [00:08<00:08,  4.00s/scenario]")


def test_a_task_log_gives_units_pace_and_the_latest_bar():
    progress = TaskProgress()
    for start in range(0, len(LOG), 37):  # read in pieces, as a growing file is
        progress.feed(LOG[: start + 37])
    assert (progress.done, progress.total, progress.initial) == (4, 6, 2)
    assert progress.bar == "shard 3: 50% 2/4 [00:08<00:08,  4.00s/scenario]"
    last = datetime(2026, 1, 31, 12, 0, 14).timestamp()
    assert eta_seconds(progress, now=last) == pytest.approx(8.0)  # 2 units left at 4 s each
    assert eta_seconds(progress, now=last + 3) == pytest.approx(5.0)
    assert screen_lines(LOG)[1].startswith("shard 3:   0%|") and screen_lines(LOG)[-1].startswith("shard 3:  50%")


class EndedJob:
    """A submitit job that has ended, for the board: its files under `folder`."""

    def __init__(self, folder: Path, job_id: str):
        self.job_id, self.paths = job_id, job_paths(folder, job_id)
        folder.mkdir(parents=True, exist_ok=True)

    def done(self) -> bool:
        return True

    def succeed(self) -> None:
        from submitit.core.utils import cloudpickle_dump

        cloudpickle_dump(("success", "written"), self.paths.result_pickle)


def test_a_result_file_that_shows_late_is_waited_for(tmp_path, monkeypatch):
    view = TaskView("shard 0", 5)
    view.attach(job := EndedJob(tmp_path, "7_0"))
    view.poll()  # ended, no result yet: a shared file system may show it late
    assert view.state == "running"
    job.succeed()
    view.poll()
    assert (view.state, view.progress.done) == ("done", 5)
    monkeypatch.setattr(common.progress, "RESULT_GRACE_SECONDS", 0.0)
    view.attach(EndedJob(tmp_path, "8_0"))  # none after the grace: it failed
    view.poll()
    assert view.state == "failed" and view.status(time.time()) == "failed: ended without a result"


def test_a_character_cut_between_two_reads_is_read_whole(tmp_path):
    job = EndedJob(tmp_path, "9_0")
    job.done = lambda: False
    bar = "shard 0:  40%|██████    | 2/5 [00:10<00:15,  5.00s/it]".encode()
    cut = bar.index("█".encode()) + 1  # inside the first "█", three bytes in UTF-8
    view = TaskView("shard 0", 5)
    view.attach(job)
    job.paths.stderr.write_bytes(bar[:cut])
    assert "\ufffd" not in view._read()
    with open(job.paths.stderr, "ab") as log_file:
        log_file.write(bar[cut:])
    assert view._read() == bar.decode()
    assert view.progress.bar == "shard 0: 40% 2/5 [00:10<00:15,  5.00s/it]"


def test_a_cancel_before_every_shard_started_runs_no_reduce(write_manifest, tmp_path, caplog):
    run = prepare_run(load_manifest(write_manifest()))
    finished = EndedJob(run.logs_dir / "submitit", "11")
    finished.succeed()
    board = ProgressBoard(interactive=False)
    board.add("shard 0", 5)
    board.add("shard 1", 5)  # waiting for a GPU slot when the cancel came: never started
    assert not wait(run, Submission("local", {0: finished}, None, board=board), poll_seconds=0.01)
    assert "shard 1: cancelled before starting" in caplog.text and not (run.logs_dir / "jobs.json").exists()


def slurm_run(write_manifest, monkeypatch) -> RunDir:
    """A run whose two shards jobs.json says Slurm runs now (as array 123)."""
    run = prepare_run(load_manifest(write_manifest()))
    run.jobs_path.write_text(json.dumps([{"time": "2026-01-31T12:00:00", "executor": "slurm", "host": "login",
                                          "reduce": None, "shards": {"0": "123_0", "1": "123_1"}}]))
    monkeypatch.setattr(common.cancel, "shard_states",
                        lambda run: [ShardState(k, "running", f"123_{k}", "") for k in (0, 1)])
    monkeypatch.setattr(common.cancel, "active_reduce", lambda run: None)
    return run


def test_a_slurm_cancel_without_scancel_marks_nothing(write_manifest, tmp_path, monkeypatch):
    run = slurm_run(write_manifest, monkeypatch)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(UserError, match=r"`scancel` is not on PATH.*scancel 123_0 123_1"):
        cancel_run(run, settle_seconds=0)
    assert cancelled_jobs(run) == {}


def test_a_slurm_cancel_says_which_jobs_scancel_refused(write_manifest, tmp_path, monkeypatch):
    run = slurm_run(write_manifest, monkeypatch)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "scancel").write_text("#!/bin/sh\necho 'scancel: error: Kill job error on job id 123_1: "
                                    "Access/permission denied' >&2\nexit 1\n")
    (folder / "scancel").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    logs = [EndedJob(run.logs_dir / "submitit", f"123_{k}").paths.stderr for k in (0, 1)]
    for log_file in logs:
        log_file.write_text("started\n")
    # shard 0's task, on its node, still holds its lock a moment after scancel returns: Slurm ends it
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\nf = open(sys.argv[1], 'a+')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nf.write(f'process {os.getpid()} on node7')\n"
                               "f.flush()\nprint(flush=True)\ntime.sleep(60)",
                               str(lock_path(run.shard_path(0)))], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()
        assert held_by(lock_path(run.shard_path(0))).endswith("on node7")
        done = cancel_run(run, settle_seconds=0)
    finally:
        holder.kill()
        holder.wait()
    assert [(d.task, d.job_id, d.ok) for d in done] == [("shard 0", "123_0", True), ("shard 1", "123_1", False)]
    assert done[1].how.startswith("scancel failed: scancel: error: Kill job error on job id 123_1")
    assert "this task was stopped" in logs[0].read_text() and logs[1].read_text() == "started\n"
    ended = subprocess.Popen(["true"])
    ended.wait()
    _interrupt(ended.pid)  # a process gone meanwhile is stopped: no ProcessLookupError


def test_logs_takes_a_shard_or_the_reduce_not_both(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["logs", "runs/x", "--shard", "0", "--reduce"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_a_local_run_shows_progress_then_its_logs_timeline_and_listing(write_manifest, tmp_path, capsys):
    path = write_manifest()
    assert main(["submit", str(path), "--executor", "local"]) == 0
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if "common.progress:" in line]
    for shard in (0, 1):  # not a terminal: a line per change, never a bar
        assert any(re.search(rf"shard {shard}: 5/5 units, done$", line) for line in progress), err
        assert any(re.search(rf"shard {shard}: \d/5 units, running \d\d:\d\d", line) for line in progress), err
    assert progress[-1].endswith("reduce: done") and "\r" not in err and len(progress) < 40
    run = run_of(path)
    (submission,) = load_submissions(run)

    assert main(["logs", str(run.path)]) == 0
    out = capsys.readouterr().out
    for shard in (0, 1):
        job = submission["shards"][str(shard)]
        assert re.search(rf"^shard {shard}\s+done\s+job {job}\s+{re.escape(str(run.logs_dir))}/submitit/{job}_0_log\.err$",
                         out, re.MULTILINE)
        assert re.search(rf"^    \| .* shard {shard} complete: {re.escape(str(run.shard_path(shard)))}$", out, re.MULTILINE)
    assert re.search(rf"^reduce\s+done\s+job {submission['reduce']}", out, re.MULTILINE)

    assert main(["logs", str(run.path), "--shard", "1", "--tail", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"shard 1 of {run.path}: done, job {submission['shards']['1']} (local)")
    stderr_part = out[out.index("--- stderr:"):].splitlines()
    assert "(last 4 lines)" in stderr_part[0] and len(stderr_part) == 5 and "--- exception" not in out
    assert main(["logs", str(run.path), "--shard", "2"]) == 2
    assert "--shard 2: this run has shards 0-1" in capsys.readouterr().err
    assert main(["logs", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err

    rows = timeline_rows(run)
    assert [row[0] for row in rows] == ["shard 0", "shard 1", "reduce"]
    assert {row[1] for row in rows} == {socket.gethostname()} and all(row[5] == "1" for row in rows)
    starts, ends = ([datetime.fromisoformat(row[i]) for row in rows] for i in (2, 3))
    assert all(s <= e for s, e in zip(starts, ends)) and starts[2] >= max(ends[:2])  # the merge after the shards
    assert (run.report_dir / "timeline.png").stat().st_size > 1000
    with h5py.File(run.merged_path) as merged:  # shard bookkeeping stays out of the merged file
        assert "attempts" not in merged.attrs and "host" not in merged.attrs

    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["run"], listed["job"], listed["state"], listed["shards_done"], listed["shards"]) == \
        (str(run.path), "token_tracking", "merged", 2, 2)


@pytest.mark.slow
def test_runs_lists_each_state_newest_first(write_manifest, tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["runs", str(root)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    root.mkdir()
    assert main(["runs", str(root)]) == 0
    assert "no runs under" in capsys.readouterr().out
    halves = write_manifest({"run": {"shards": 2}}, name="halves.yaml")
    assert main(["run", str(halves), "--shard", "0"]) == 0
    whole = write_manifest({"run": {"shards": 1}, "token_tracking": {"top_features": 3}}, name="whole.yaml")
    assert main(["run", str(whole), "--shard", "0"]) == 0
    corrupt = write_manifest({"run": {"shards": 1}, "token_tracking": {"top_features": 4}}, name="corrupt.yaml")
    prepare_run(load_manifest(corrupt)).shard_path(0).write_bytes(b"not HDF5")
    busy = write_manifest({"run": {"shards": 1}, "token_tracking": {"top_features": 2}}, name="busy.yaml")
    plan = prepare_run(load_manifest(busy)).load_plan()
    capsys.readouterr()
    with ShardWriter(run_of(busy).shard_path(0), plan.run_id, plan.job, 0, list(plan.shards[0])):
        assert main(["runs", str(root), "--json"]) == 0  # the lock is held: a writer is at work
        states = {Path(line["run"]).name: line for line in json.loads(capsys.readouterr().out)}
    assert states[run_of(busy).path.name]["state"] == "running"
    assert (states[run_of(halves).path.name]["state"], states[run_of(halves).path.name]["shards_done"]) == ("incomplete", 1)
    assert states[run_of(whole).path.name]["state"] == "done"
    assert states[run_of(corrupt).path.name]["state"] == "failed"

    assert main(["reduce", str(whole)]) == 0
    capsys.readouterr()
    assert main(["runs", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert re.match(r"run\s+job\s+state\s+shards\s+age$", table[0])
    assert re.match(rf"{re.escape(str(run_of(whole).path))}\s+token_tracking\s+merged\s+1/1\s+\d+ s$", table[1])
    assert len(table) == 5


@pytest.mark.slow
def test_cancel_stops_a_local_run_and_resume_continues_it(tmp_path, capsys):
    # The demo's correlation graph over 4x its tokens: 8 units of 8,192 tokens a shard, seconds each.
    path = write_manifest_file(tmp_path, {"feature_correlation": {"corpus": {"tokens": 131072}}},
                               base=REPO / "manifests" / "demo" / "feature_correlation.yaml")
    submitter = subprocess.Popen([sys.executable, "-m", "common.cli", "submit", str(path), "--executor", "local"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = run_of(path)
    deadline = time.monotonic() + 240
    logs: list[Path] = []
    while time.monotonic() < deadline:  # until each task has written a unit
        shards = load_submissions(run)[-1]["shards"] if run.jobs_path.exists() else {}
        logs = [run.logs_dir / "submitit" / f"{job}_0_log.err" for job in shards.values()]
        if len(logs) == 2 and all(log.exists() and "written (1/8)" in log.read_text() for log in logs):
            break
        time.sleep(0.2)
    jobs = load_submissions(run)[-1]["shards"]
    assert main(["cancel", str(run.path)]) == 0
    out = capsys.readouterr().out
    for shard in (0, 1):
        assert re.search(rf"shard {shard}\s+job {jobs[str(shard)]}\s+stopped local task \(controller {jobs[str(shard)]}, "
                         rf"worker \d+\)", out), out
    _, err = submitter.communicate(timeout=120)
    assert submitter.returncode == 1
    assert "was cancelled (saebatch cancel" in err and "Fix the cause" not in err
    assert not any(process_alive(int(job)) for job in jobs.values())
    states = shard_states(run)
    assert [s.state for s in states] == ["failed", "failed"]
    assert all("cancelled by saebatch cancel" in s.detail for s in states)
    assert main(["status", str(run.path)]) == 1
    assert main(["cancel", str(run.path)]) == 0
    assert "nothing to cancel" in capsys.readouterr().out
    assert main(["logs", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert out.count("    ! failed (cancelled by saebatch cancel at") == 2
    assert out.count("    | saebatch cancel: this task was stopped at") == 2

    # Resume through the API, with the board drawing bars as on a terminal.
    screen = io.StringIO()
    submission = submit(run, "local", [0, 1])
    submission.board = ProgressBoard(stream=screen, interactive=True)
    assert wait(run, submission)
    drawn = screen.getvalue()
    assert re.search(r"shard 0: 100%\|[█#]+\| 8/8 units, done", drawn) and "reduce: done" in drawn
    assert "\x1b[A" in drawn  # one line per task, redrawn in place
    resumed = [job_log.read_text() for job_log in sorted((run.logs_dir / "submitit").glob("*_0_log.err"))
               if job_log.stem.split("_")[0] in {j.job_id for j in submission.shard_jobs.values()}]
    assert len(resumed) == 2 and all(re.search(r"resuming, [1-7] of 8 units already written", text) for text in resumed)
    rows = timeline_rows(run)
    assert [row[5] for row in rows[:2]] == ["2", "2"]  # each shard: the cancelled attempt and the resumed one
    assert os.path.exists(run.merged_path)
