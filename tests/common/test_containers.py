"""Running tasks in a container image: the python command, the version check, the sbatch text.

The image itself is built and run by containers/smoke.sh (in .ci/run); these tests check what
the launcher does with `cluster.image`.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from common.containers import check_image, environment_versions, python_command
from common.errors import UserError
from common.launcher import make_executor, prepare_run
from common.manifest import ClusterSettings
from common.manifest_file import load_manifest
from tests.helpers import REPO

GOLDEN = Path(__file__).parent.parent / "golden" / "array_in_image.sbatch"
REGENERATE = "SAEBATCH_REGENERATE_GOLDEN"  # set to 1 to rewrite the golden file from the current code


def sandbox(folder: Path, versions: dict | None) -> Path:
    """An image as an Apptainer sandbox folder, with the versions file install.sh writes."""
    if versions is not None:
        (folder / "opt" / "saebatch").mkdir(parents=True)
        (folder / "opt" / "saebatch" / "versions.json").write_text(json.dumps(versions))
    else:
        folder.mkdir(parents=True)
    return folder


def test_an_image_with_this_environments_versions_is_accepted(tmp_path):
    check_image(sandbox(tmp_path / "image", environment_versions()))


def test_an_image_with_other_versions_is_refused_with_the_fix(tmp_path):
    ours = environment_versions()
    image = sandbox(tmp_path / "image", {**ours, "cloudpickle": "2.2.1"})
    with pytest.raises(UserError, match=rf"cloudpickle 2.2.1 in the image, {ours['cloudpickle']} here.*"
                                        r"pip install cloudpickle==2.2.1"):
        check_image(image)
    older_python = sandbox(tmp_path / "old", {**ours, "python": "3.9"})
    with pytest.raises(UserError, match=r"python 3.9 in the image.*a Python environment of the image's Python"):
        check_image(older_python)
    with pytest.raises(UserError, match="has no /opt/saebatch/versions.json; it was not built by containers/install.sh"):
        check_image(sandbox(tmp_path / "bare", None))
    with pytest.raises(UserError, match="missing.sif does not exist; build it first"):
        check_image(tmp_path / "missing.sif")


def test_tasks_start_the_images_python_through_apptainer(tmp_path):
    cluster = ClusterSettings(image=tmp_path / "saebatch.sif", bind=["/scratch", "/data/hf"])
    assert python_command(cluster, tmp_path / "runs") == (
        f"apptainer exec --nv --bind {tmp_path}/runs,/scratch,/data/hf {tmp_path}/saebatch.sif python3 -s -P")
    assert python_command(ClusterSettings(python="/opt/py/bin/python"), tmp_path) == "/opt/py/bin/python"
    assert python_command(ClusterSettings(), tmp_path) is None
    with pytest.raises(ValueError, match="give `image` .* or `python`, not both"):
        ClusterSettings(image=tmp_path / "x.sif", python="python")


def test_submit_refuses_a_mismatched_image_before_queueing_anything(write_manifest, tmp_path, capsys):
    from common.cli import main

    image = sandbox(tmp_path / "image", {**environment_versions(), "submitit": "1.4.0"})
    manifest = write_manifest({"cluster": {"image": str(image)}})
    assert main(["submit", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "submitit 1.4.0 in the image" in err and "pip install submitit==1.4.0" in err
    run = prepare_run(load_manifest(manifest))
    assert not (run.logs_dir / "jobs.json").exists()  # nothing was submitted


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs Slurm's sbatch on PATH (slurm/single_node_cluster.sh)")
def test_generated_sbatch_runs_the_task_in_the_image(write_manifest, tmp_path):
    """The array script submitit writes for a manifest with cluster.image, against tests/golden/.
    Regenerate it after an intended change:
        SAEBATCH_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/common/test_containers.py"""
    from submitit.slurm.slurm import _make_sbatch_string

    manifest = write_manifest({"run": {"shards": 2}, "cluster": {
        "image": "/images/saebatch.sif", "bind": ["/scratch"], "partition": "gpu", "gpus_per_task": 1,
        "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 90, "setup": ["module load apptainer"]}})
    run = prepare_run(load_manifest(manifest))
    executor = make_executor("slurm", run, load_manifest(manifest).cluster, "saebatch-token_tracking")._executor
    text = _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder,
                               **{**executor.parameters, "map_count": 2})
    text = text.replace(str(tmp_path), "<tmp>").replace(run.path.name, "<run>")
    if os.environ.get(REGENERATE) == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), f"sbatch text changed; if intended, regenerate: {REGENERATE}=1 pytest {__file__}"
    assert "apptainer exec --nv --bind <tmp>/runs,/scratch /images/saebatch.sif python3 -s -P -u -m submitit.core._submit" in text
    assert "export HDF5_USE_FILE_LOCKING=FALSE" in text and "module load apptainer" in text


@pytest.mark.parametrize("template", ["array.sbatch", "reduce.sbatch"])
def test_the_sbatch_templates_create_the_run_root_before_apptainer_binds_it(template, tmp_path):
    """apptainer refuses to bind a path that does not exist, and a new run root does not until the
    first task writes it, inside the image: the templates create it first. This machine has no
    apptainer; the stand-in on PATH fails as apptainer would and records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "apptainer"
    stand_in.write_text("#!/bin/bash\n"
                        f"echo \"$@\" > {tmp_path}/called\n"
                        "while [ \"$1\" != --bind ]; do shift; done\n"
                        "[ -d \"${2%%,*}\" ] || { echo \"mount source ${2%%,*} doesn't exist\" >&2; exit 255; }\n")
    stand_in.chmod(0o755)
    root = tmp_path / "new" / "runs"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "IMAGE": "/images/saebatch.sif",
           "BIND": f"{root},/scratch", "SLURM_ARRAY_TASK_ID": "0"}
    done = subprocess.run(["bash", str(REPO / "slurm" / template), "m.yaml"], env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert root.is_dir()
    called = (tmp_path / "called").read_text().split()
    assert called[called.index("--bind") + 1] == f"{root},/scratch"
    assert called[called.index("--env") + 1] == "PYTHONNOUSERSITE=1"   # ~/.local stays off the image's path
    assert called[called.index("/images/saebatch.sif") + 1] == "saebatch"
