"""benchmarks/gpu_checks.sh stops in seconds where its steps could not run (a GPU's time is short):
an unknown step, no GPU, or packages too old to run the jobs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_checks.sh"


def gpu_checks(out: Path, *steps: str, python: str = sys.executable,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out), *steps], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": python, **(env or {})})


def test_an_unknown_step_is_refused_naming_the_steps(tmp_path):
    result = gpu_checks(tmp_path / "out", "tests", "paper:", "bogus")
    assert result.returncode == 2
    assert result.stderr == ("unknown step 'paper:': choose from tests, chains, trainer, paper, paper:<jobs>, contexts, "
                             "demo\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens where no GPU is visible")
def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path):
    result = gpu_checks(tmp_path / "out", "tests")
    assert result.returncode == 2
    assert result.stderr == f"no CUDA GPU is visible to {sys.executable} (torch sees none): these checks need one\n"
    assert not (tmp_path / "out" / "summary.txt").exists()


def test_transformers_too_old_to_run_the_jobs_stops_it_before_any_step(tmp_path):
    """An image's older transformers ignores the decode loop's `cache=` (every generation would
    fail, step after step): found from its version, before the first step."""
    metadata = tmp_path / "site" / "transformers-5.17.0.dist-info"  # found before the installed one
    metadata.mkdir(parents=True)
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.17.0\n")
    sees_a_gpu = tmp_path / "python"  # the script's GPU check passes; everything else is this Python
    sees_a_gpu.write_text(f'#!/bin/bash\n[[ "$1 $2" == "-c "*cuda.is_available* ]] && exit 0\nexec {sys.executable} "$@"\n')
    sees_a_gpu.chmod(0o755)
    path = os.pathsep.join([str(metadata.parent), str(REPO), os.environ.get("PYTHONPATH", "")])  # keeps an install there
    result = gpu_checks(tmp_path / "out", "tests", python=str(sees_a_gpu), env={"PYTHONPATH": path})
    assert result.returncode == 2
    assert "transformers 5.17.0 is too old: saebatch needs >= 5.24 (pip install -c containers/constraints.txt -e .)" \
        in result.stderr
    assert "the packages above cannot run the checks" in result.stderr
    assert not (tmp_path / "out" / "summary.txt").exists() and "== tests" not in result.stdout
