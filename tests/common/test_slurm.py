"""End to end on the real single-node Slurm: arrays through submitit, afterok reduce, failures, sbatch templates."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml

from common.cli import main
from common.launcher import load_submissions
from common.manifest_file import load_manifest
from common.rundir import RunDir
from common.status import shard_states
from tests.helpers import REPO, save_random_sae, write_manifest_file

pytestmark = pytest.mark.slurm


def test_submit_array_then_reduce_after_it(slurm_cluster, write_manifest, capsys):
    # 3 shards with arrays of at most 2 tasks: two arrays, and the reduce waits for both.
    path = write_manifest({"run": {"shards": 3}, "cluster": {"max_array_size": 2}})
    assert main(["submit", str(path), "--wait"]) == 0
    out = capsys.readouterr().out
    run = RunDir.for_manifest(load_manifest(path))
    assert f"merged: {run.merged_path}" in out
    (submission,) = load_submissions(run)
    arrays = {job.split("_")[0] for job in submission["shards"].values()}
    assert len(arrays) == 2
    with h5py.File(run.merged_path) as merged:
        assert len(merged["units"]) == 10
    assert [s.state for s in shard_states(run)] == ["done"] * 3
    for index in range(3):  # the threads the task asked for, as a local run uses them
        with h5py.File(run.shard_path(index)) as shard:
            assert shard.attrs["torch_threads"] == load_manifest(path).cluster.cpus_per_task


def test_failed_task_is_reported_reduce_cancelled_and_resume_completes(slurm_cluster, write_manifest, tmp_path, capsys):
    template = save_random_sae(tmp_path / "saes", d_in=128, d_sae=64, layers=range(4))
    path = write_manifest({"token_tracking": {"sae": {"builtin": None, "path": template}}})
    weights = tmp_path / "saes" / "L3" / "sae_weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"damaged after validation")
    result = subprocess.run([sys.executable, "-m", "common.cli", "submit", str(path), "--wait"],
                            capture_output=True, text=True, timeout=300)  # must not wait forever
    assert result.returncode == 1
    assert "failed" in result.stderr and "the reduce does not run" in result.stderr
    run = RunDir.for_manifest(load_manifest(path))
    assert not run.merged_path.exists()
    states = []
    for _ in range(60):  # submitit reads the failure from the task's output; Slurm's accounting may lag behind it
        states = [s.state for s in shard_states(run)]
        if "running" not in states:
            break
        subprocess.run(["sleep", "1"])
    assert states == ["failed", "failed"]
    reduce_job = load_submissions(run)[-1]["reduce"]
    state = ""
    for _ in range(60):  # Slurm cancels the dependent reduce (kill-on-invalid-dep)
        state = subprocess.run(["sacct", "-n", "-X", "-j", reduce_job, "-o", "State"],
                               capture_output=True, text=True).stdout.strip()
        if state and "PENDING" not in state:
            break
        subprocess.run(["sleep", "1"])
    assert state.startswith("CANCELLED")
    weights.write_bytes(good)
    assert main(["submit", "--resume", str(run.path), "--wait"]) == 0
    assert "submitting 2" in capsys.readouterr().out
    assert run.merged_path.exists()


def test_sbatch_templates_run_a_manifest_without_submitit(slurm_cluster, write_manifest, tmp_path):
    path = write_manifest()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    small = ["--cpus-per-task=1", "--mem=2G"]  # the test node is small
    array = subprocess.run(["sbatch", "--parsable", *small, "--array=0-1", str(REPO / "slurm" / "array.sbatch"), str(path)],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    subprocess.run(["sbatch", "--wait", *small, f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes",
                    str(REPO / "slurm" / "reduce.sbatch"), str(path)],
                   capture_output=True, text=True, env=env, cwd=tmp_path, check=True, timeout=300)
    run = RunDir.for_manifest(load_manifest(path))
    assert run.merged_path.exists() and (run.report_dir / "report.md").exists()
    assert [s.state for s in shard_states(run)] == ["done", "done"]


def test_feature_correlation_demo_through_slurm(slurm_cluster, tmp_path, capsys):
    data = yaml.safe_load((REPO / "manifests" / "demo" / "feature_correlation.yaml").read_text())
    data["run"]["root"] = str(tmp_path / "runs")
    path = tmp_path / "feature_correlation.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["submit", str(path), "--wait"]) == 0
    run = RunDir.for_manifest(load_manifest(path))
    assert f"merged: {run.merged_path}" in capsys.readouterr().out
    summary = json.loads((run.report_dir / "summary.json").read_text())
    with h5py.File(run.merged_path) as merged:
        assert merged.attrs["rows"] == data["feature_correlation"]["corpus"]["tokens"]
        assert len(merged["edges/r"]) == summary["within_layer_total"] + summary["cross_layer_total"] > 0
    assert (run.shards_dir / "feature_choice.json").exists()  # one first pass, shared by both shards


def test_gambling_chain_through_slurm(slurm_cluster, tmp_path, monkeypatch, capsys):
    """Games, contrast, feature cards, patching: each submitted to Slurm, each reading the earlier steps' runs."""
    for step in sorted((REPO / "manifests" / "demo").glob("gambling_*.yaml")):
        (tmp_path / step.name).write_text(step.read_text())
    monkeypatch.chdir(tmp_path)  # the manifests name each other beside themselves; runs/ lands here
    for step in ("gambling_1_games.yaml", "gambling_2_contrast.yaml", "gambling_3_contexts.yaml",
                 "gambling_4_patching.yaml"):
        assert main(["submit", step, "--wait"]) == 0, step
    run = RunDir.for_manifest(load_manifest(tmp_path / "gambling_4_patching.yaml"))
    assert f"merged: {run.merged_path}" in capsys.readouterr().out
    report = (run.report_dir / "features.csv").read_text().splitlines()
    planted = [line for line in report if ",1,402,safe," in line]
    assert planted and ",True,risky" in planted[0]  # the organism's planted cause, found through the chain
    assert "## Card of the planted feature" in (run.report_dir / "report.md").read_text()
    contexts = RunDir.for_manifest(load_manifest(tmp_path / "gambling_3_contexts.yaml"))
    with h5py.File(contexts.merged_path) as merged:  # two shards, merged: every token of the corpus counted
        tokens = yaml.safe_load((tmp_path / "gambling_3_contexts.yaml").read_text())["feature_contexts"]["corpus"]["tokens"]
        assert merged.attrs["tokens"] == tokens


def test_reasoning_chain_through_slurm(slurm_cluster, tmp_path, monkeypatch, capsys):
    """Capture, training, ablation, alignment, circuits, the primitives' contexts: each submitted to
    Slurm, each reading the previous steps' runs."""
    for step in sorted((REPO / "manifests" / "demo").glob("reasoning_*.yaml")):
        (tmp_path / step.name).write_text(step.read_text())
    monkeypatch.chdir(tmp_path)
    steps = sorted(path.name for path in tmp_path.glob("reasoning_*.yaml"))
    assert len(steps) == 6
    for step in steps:
        assert main(["submit", step, "--wait"]) == 0, step
    training = RunDir.for_manifest(load_manifest(tmp_path / "reasoning_2_training.yaml"))
    assert (training.path / "saes" / "organism" / "L2" / "cfg.json").is_file()
    run = RunDir.for_manifest(load_manifest(tmp_path / "reasoning_3_ablation.yaml"))
    assert f"merged: {run.merged_path}" in capsys.readouterr().out
    report = (run.report_dir / "report.md").read_text()
    assert "**organism**: drop" in report and "criterion met" in report
    circuits = RunDir.for_manifest(load_manifest(tmp_path / "reasoning_5_circuits.yaml"))
    assert {"circuit_graph_organism.png", "circuit_graph_organism_b.png"} <= {p.name for p in circuits.report_dir.iterdir()}
    with h5py.File(circuits.merged_path) as merged:
        assert merged["clusters/causal"][()].any()


def test_a_task_signalled_at_its_time_limit_is_requeued_and_finishes_its_shard(slurm_cluster, write_manifest):
    """Slurm's warning signal before the time limit (USR2, as `--signal` sends it), mid-shard: with
    timeout_min 10 submitit counts it as a timeout; the checkpointable task is requeued, not
    failed, and the requeued task resumes its partial file."""
    path = write_manifest({"token_tracking": {"batch_size": 1}, "run": {"shards": 1}, "cluster": {"timeout_min": 10}})
    task = subprocess.Popen([sys.executable, "-m", "common.cli", "submit", str(path), "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = RunDir.for_manifest(load_manifest(path))
    log = None
    for _ in range(1200):  # until the task has begun its shard
        submissions = load_submissions(run) if (run.logs_dir / "jobs.json").exists() else []
        if submissions:
            job_id = submissions[0]["shards"]["0"]
            log = next((run.logs_dir / "submitit").glob(f"{job_id}*_log.err"), None)
            if log is not None and "units to write" in log.read_text():
                break
        subprocess.run(["sleep", "0.1"])
    assert log is not None
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    out, err = task.communicate(timeout=600)
    assert task.returncode == 0, (out, err)
    text = log.read_text()
    assert "this job is timed-out" in text and "Requeued job" in text and "resuming," in text
    with h5py.File(run.merged_path) as merged:
        assert len(merged["units"]) == 10


def test_cancel_scancels_the_array_and_its_reduce_and_resume_finishes(slurm_cluster, tmp_path, capsys):
    """`saebatch cancel` mid-shard: scancel of the array tasks and the reduce; the shards show
    failed (cancelled), `logs` shows where each stopped, and `submit --resume --wait` finishes them
    from their partial files with the progress logged as it goes."""
    path = write_manifest_file(tmp_path, {"feature_correlation": {"corpus": {"tokens": 131072}}},
                               base=REPO / "manifests" / "demo" / "feature_correlation.yaml")
    assert main(["submit", str(path)]) == 0
    run = RunDir.for_manifest(load_manifest(path))
    (submission,) = load_submissions(run)
    logs = [run.logs_dir / "submitit" / f"{job}_0_log.err" for job in submission["shards"].values()]
    for _ in range(3000):  # until each task has written a unit of its shard
        if all(log.exists() and "written (1/8)" in log.read_text() for log in logs):
            break
        subprocess.run(["sleep", "0.1"], check=False)
    capsys.readouterr()
    assert main(["cancel", str(run.path)]) == 0
    out = capsys.readouterr().out
    for task, job in [("shard 0", submission["shards"]["0"]), ("shard 1", submission["shards"]["1"]),
                      ("reduce", submission["reduce"])]:
        assert re.search(rf"{task}\s+job {job}\s+scancel$", out, re.MULTILINE), out
    states = shard_states(run)
    assert [s.state for s in states] == ["failed", "failed"]
    assert all("cancelled by saebatch cancel" in s.detail for s in states)
    reduce = subprocess.run(["sacct", "-n", "-X", "-j", submission["reduce"], "-o", "State"],
                            capture_output=True, text=True, check=False).stdout.strip()
    assert reduce.startswith("CANCELLED")
    assert main(["cancel", str(run.path)]) == 0
    assert "nothing to cancel" in capsys.readouterr().out
    assert main(["logs", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^shard 0\s+failed\s+job {submission['shards']['0']}\s", out, re.MULTILINE)
    assert out.count("    ! failed (cancelled by saebatch cancel at") == 3  # the shards and the reduce
    assert out.count("    | saebatch cancel: this task was stopped at") == 2  # the shards began their logs

    assert main(["submit", "--resume", str(run.path), "--wait"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"common\.progress: shard 1: 8/8 units, done", err) and "reduce: done" in err
    assert run.merged_path.exists()
    report = (run.report_dir / "report.md").read_text()
    assert re.search(r"^\| shard 0 \| \S+ \| [\d-]+ [\d:]+ \| [\d-]+ [\d:]+ \| [^|]+ \| 2 \|$", report, re.MULTILINE)


def test_a_reduce_that_sbatch_refuses_leaves_the_queued_array_recorded(slurm_cluster, write_manifest, capsys):
    """sbatch refuses the reduce (more memory than any node has) after the array is queued: a plain
    error quoting sbatch, and the array in jobs.json, where status and cancel find it."""
    path = write_manifest({"cluster": {"reduce_mem_gb": 100_000}})
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused the reduce: " in err and "reduce_mem_gb" in err and "Traceback" not in err
    run = RunDir.for_manifest(load_manifest(path))
    (submission,) = load_submissions(run)
    assert sorted(submission["shards"]) == ["0", "1"] and submission["reduce"] is None
    assert f"Shards 0-1 were queued before it (job(s) {submission['shards']['0'].split('_')[0]};" in err
    states: list[str] = []
    for _ in range(30):  # sacct lists a job a moment after sbatch queued it (till then: missing)
        states = [s.state for s in shard_states(run)]
        if "missing" not in states:
            break
        time.sleep(1)
    assert all(state in ("pending", "running", "done") for state in states), states
    assert main(["cancel", str(run.path)]) == 0
    assert all(s.state in ("failed", "done") for s in shard_states(run))
