"""How tasks get GPUs, and that a task which asked for one never runs on the CPU instead.

These run without a GPU; tests/test_gpu_paths.py runs the jobs on CUDA where there is one.
"""

import json
import os
import time

import pytest
import submitit
import torch

from common.cli import main
from common.errors import UserError
from common.gpus import gpu_slots, require_gpus, visible_gpus
from common.launcher import prepare_run, run_in_gpu_slots, run_shard_task
from common.manifest_file import load_manifest
from common.models import ModelSpec, input_device
from common.rundir import RunDir

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens where no GPU is visible")


def test_gpu_slots_are_disjoint_groups_of_the_requested_size():
    assert gpu_slots(["0", "1", "2", "3"], 1) == [["0"], ["1"], ["2"], ["3"]]
    assert gpu_slots(["0", "1", "2", "3"], 2) == [["0", "1"], ["2", "3"]]
    assert gpu_slots(["2", "5", "7"], 2) == [["2", "5"]]  # the third GPU cannot hold a task of two


@pytest.mark.parametrize(("listed", "expected"), [(None, ["0", "1"]), ("3,1", ["3", "1"]), (" 1 , ", ["1"]),
                                                  ("GPU-8f6a1c2e-aa,GPU-11d0", ["GPU-8f6a1c2e-aa", "GPU-11d0"]),
                                                  ("MIG-4a2e", ["MIG-4a2e"]), ("0,1,2,3", ["0", "1"])])
def test_visible_gpus_are_named_as_cuda_visible_devices_names_them(monkeypatch, listed, expected):
    """Indices or UUIDs, as a task's CUDA_VISIBLE_DEVICES must name them to reach the same GPU;
    no more than CUDA counts (2 here)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if listed is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert visible_gpus() == expected


def test_too_few_gpus_for_a_task_names_the_fields():
    with pytest.raises(UserError, match=r"cluster\.gpus_per_task is 2, but --executor local sees 1 GPU.*"
                                        r"cluster\.gpus_per_task: 0 and model\.device: cpu"):
        gpu_slots(["0"], 2)


@no_gpu
def test_task_that_asked_for_a_gpu_and_sees_none_fails_before_writing(write_manifest):
    run = prepare_run(load_manifest(write_manifest({"cluster": {"gpus_per_task": 1}})))
    with pytest.raises(UserError, match=r"asked for 1 GPU\(s\) \(cluster\.gpus_per_task\) but sees 0 .*"
                                        r"instead of running it on the CPU.*model\.device: cpu"):
        run_shard_task(str(run.path), 0)
    assert list(run.shards_dir.iterdir()) == []  # not even a partial file
    require_gpus(0)  # a CPU task is fine


@no_gpu
def test_local_submit_asking_for_a_gpu_is_refused_before_any_task(write_manifest, capsys):
    path = write_manifest({"cluster": {"gpus_per_task": 1}})
    assert main(["submit", str(path), "--executor", "local"]) == 2
    assert "cluster.gpus_per_task is 1, but --executor local sees 0 GPU(s)" in capsys.readouterr().err
    run = RunDir.for_manifest(load_manifest(path))
    assert not run.jobs_path.exists() and list(run.shards_dir.iterdir()) == []


@no_gpu
def test_cuda_device_without_a_gpu_names_model_device():
    with pytest.raises(UserError, match=r"model\.device is cuda:0, but this process sees 0 GPU\(s\)"):
        input_device(ModelSpec(id="builtin:organism", device="cuda:0"))
    assert input_device(ModelSpec(id="builtin:organism")) == torch.device("cpu")  # auto


def test_unknown_device_is_refused_naming_the_field(write_manifest):
    with pytest.raises(UserError, match=r"token_tracking\.model\.device"):
        load_manifest(write_manifest({"token_tracking": {"model": {"device": "gpu0"}}}))


def _record_visible_gpus(out: str, seconds: float) -> None:
    start = time.time()
    time.sleep(seconds)
    with open(out, "w") as file:
        json.dump({"gpus": os.environ["CUDA_VISIBLE_DEVICES"], "parent": os.getppid(), "start": start,
                   "end": time.time()}, file)


def test_local_tasks_take_turns_on_gpu_slots(tmp_path):
    """Three tasks on two one-GPU slots: each sees only its own GPU, and no GPU runs two at once;
    each is its controller's child, where `saebatch cancel` looks for it. (CUDA_VISIBLE_DEVICES
    is only an environment variable here; no GPU is touched.)"""
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(timeout_min=2)
    outs = [str(tmp_path / f"task{k}.json") for k in range(3)]
    slots = [["3"], ["GPU-5b0e7c1d-uuid"]]  # by index or by UUID, as CUDA_VISIBLE_DEVICES names them
    jobs = list(run_in_gpu_slots(executor, _record_visible_gpus, [(out, 2.0) for out in outs], slots, poll_seconds=0.2))
    for job in jobs:
        job.result()
    records = [json.loads(open(out).read()) for out in outs]
    assert [r["gpus"] for r in records[:2]] == ["3", "GPU-5b0e7c1d-uuid"]
    assert records[2]["gpus"] in ("3", "GPU-5b0e7c1d-uuid")
    assert [r["parent"] for r in records] == [int(job.job_id) for job in jobs]
    earlier = next(r for r in records[:2] if r["gpus"] == records[2]["gpus"])
    assert records[2]["start"] >= earlier["end"]  # waited for its GPU to be free
