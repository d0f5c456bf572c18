"""Launching with submitit's local executor, status, resume, and a task killed for real."""

import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from common.cli import main
from common.launcher import prepare_run
from common.manifest import load_manifest
from common.rundir import RunDir
from common.status import shard_states
from tests.helpers import save_random_sae


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
        assert len(merged["units"]) == 10
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
    run = RunDir.for_manifest(load_manifest(path))
    assert not run.merged_path.exists()
    states = shard_states(run)
    assert [s.state for s in states] == ["failed", "failed"]
    assert "log:" in states[0].detail
    assert main(["status", str(run.path)]) == 0
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
