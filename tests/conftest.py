"""Shared fixtures: seeded RNGs, the built-in tiny model, manifests written to tmp, the Slurm cluster."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, write_manifest_file


@pytest.fixture(autouse=True)
def seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may reach the hub in tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def write_manifest(tmp_path: Path):
    """Write the demo manifest with `overrides` merged in (nested dicts merge) into tmp_path."""

    def write(overrides: dict | None = None, name: str = "manifest.yaml") -> Path:
        return write_manifest_file(tmp_path, overrides, name=name)

    return write


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The single-node Slurm of slurm/single_node_cluster.sh (idempotent), started as root."""
    if os.geteuid() != 0:
        if shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
            return
        pytest.skip("Slurm is not running and starting it needs root (slurm/single_node_cluster.sh)")
    result = subprocess.run(["bash", str(REPO / "slurm" / "single_node_cluster.sh")], capture_output=True, text=True)
    if result.returncode != 0:  # as root it must start: a broken set-up script is a failure, not a skip
        pytest.fail(f"slurm/single_node_cluster.sh failed: {result.stderr.strip()[-800:]}")
