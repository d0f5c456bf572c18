"""Run directories: one per manifest; a different run's folder is never written into."""

import pytest

from common.errors import UserError
from common.launcher import prepare_run
from common.manifest_file import load_manifest
from common.rundir import RunDir, open_run
from common.shards import partial_path


def test_run_dir_is_named_by_job_and_hash_and_holds_resolved_manifest(write_manifest, tmp_path):
    manifest = load_manifest(write_manifest())
    run = prepare_run(manifest)
    assert run.path == tmp_path / "runs" / f"token_tracking-{manifest.run_id()}"
    assert load_manifest(run.manifest_path) == manifest
    assert run.load_plan().run_id == manifest.run_id()
    assert (run.path / "provenance.json").is_file() and run.shards_dir.is_dir()
    assert prepare_run(manifest).path == run.path  # same manifest: same run, reused


def test_a_resubmission_brings_its_cluster_settings_to_the_run(write_manifest):
    """The cluster section is no part of the run id: the same run reopened with more memory and
    another GPU count keeps its results and plan, and its tasks get the new resources."""
    first = prepare_run(load_manifest(write_manifest({"cluster": {"mem_gb": 8, "gpus_per_task": 0}})))
    plan = first.plan_path.read_bytes()
    again = prepare_run(load_manifest(write_manifest({"cluster": {"mem_gb": 32, "gpus_per_task": 1}})))
    assert again.path == first.path and again.plan_path.read_bytes() == plan
    assert (again.load_manifest().cluster.mem_gb, again.load_manifest().cluster.gpus_per_task) == (32, 1)


def test_folder_of_another_run_is_never_overwritten(write_manifest, tmp_path):
    first = prepare_run(load_manifest(write_manifest({"run": {"dir": str(tmp_path / "out")}})))
    before = first.manifest_path.read_bytes()
    other = load_manifest(write_manifest({"run": {"dir": str(tmp_path / "out")}, "token_tracking": {"layers": "0-1"}}))
    with pytest.raises(UserError, match=r"holds run .* of a different manifest .* left untouched"):
        prepare_run(other)
    assert first.manifest_path.read_bytes() == before


def test_non_run_folder_is_refused(write_manifest, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a saebatch run directory"):
        prepare_run(load_manifest(write_manifest({"run": {"dir": str(tmp_path / "out")}})))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_open_run_accepts_dir_or_manifest(write_manifest, tmp_path):
    path = write_manifest()
    with pytest.raises(UserError, match="has no run yet"):
        open_run(path)
    run = prepare_run(load_manifest(path))
    assert open_run(path).path == run.path == open_run(run.path).path
    with pytest.raises(UserError, match="not a run directory"):
        open_run(tmp_path)


def test_partial_path_is_beside_the_shard():
    shard = RunDir("/r").shard_path(3)
    assert shard.name == "shard_00003.h5"
    assert partial_path(shard) == shard.with_name("shard_00003.h5.partial")


def test_every_output_path_of_a_run_lies_in_its_directory():
    run = RunDir("/r")
    owned = {
        run.manifest_path: "manifest.yaml", run.provenance_path: "provenance.json", run.plan_path: "plan.json",
        run.shards_dir: "shards", run.shard_path(3): "shards/shard_00003.h5", run.checkpoints_dir: "checkpoints",
        run.logs_dir: "logs", run.jobs_path: "logs/jobs.json", run.jobs_lock: "logs/.jobs.lock",
        run.submitit_dir: "logs/submitit", run.merged_path: "merged.h5", run.report_dir: "report",
        run.submit_lock: ".submit.lock", run.reduce_lock: ".reduce.lock",
    }
    assert {str(path.relative_to(run.path)): name for path, name in owned.items()} == {n: n for n in owned.values()}
    assert RunDir.of_shard(run.shard_path(3)).path == run.path


def test_the_run_directory_of_a_manifest_is_its_run_path(write_manifest, tmp_path):
    manifest = load_manifest(write_manifest())
    named = tmp_path / "runs" / f"token_tracking-{manifest.run_id()}"
    assert RunDir.for_manifest(manifest).path == manifest.run_path() == named
    chosen = load_manifest(write_manifest({"run": {"dir": str(tmp_path / "mine")}}))
    assert RunDir.for_manifest(chosen).path == chosen.run_path() == tmp_path / "mine"
