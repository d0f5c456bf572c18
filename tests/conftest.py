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
import yaml

from tests.helpers import DEMO_MANIFEST, REPO


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
        data = yaml.safe_load(DEMO_MANIFEST.read_text())
        data["run"]["root"] = str(tmp_path / "runs")
        _merge(data, overrides or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def _merge(base: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


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
