"""Shared fixtures: seeded RNGs, the built-in tiny model, manifests written to tmp, the Slurm cluster."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from common.rundir import RunDir
from tests.helpers import REPO, run_all, write_manifest_file


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` compare CUDA with the CPU: without a GPU they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none): run `python -m pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


def _run_in(folder: Path, name: str) -> RunDir:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # run.root "runs" is relative to where saebatch runs
        return run_all(folder / name)


@dataclass
class GamblingChain:
    """The demo's gambling chain, run in a copy of the demo folder (each step names the previous
    step's manifest); `contexts` and `patching` run on first use, as only their tests need them."""

    folder: Path
    games: RunDir
    contrast: RunDir

    @cached_property
    def contexts(self) -> RunDir:
        return _run_in(self.folder, "gambling_3_contexts.yaml")

    @cached_property
    def patching(self) -> RunDir:
        assert self.contexts  # the patching report links its features to the contexts' cards
        return _run_in(self.folder, "gambling_4_patching.yaml")


def _copy_chain(pattern: str, folder: Path, config: pytest.Config) -> None:
    """The demo's steps matching `pattern`, copied into `folder`. For the GPU tests (`-m gpu` on a
    machine with one) their tasks ask for the GPU, as `saebatch demo` does there: on the CPU, one
    task at a time, the chains would take most of a GPU session's minutes."""
    on_gpu = torch.cuda.is_available() and config.getoption("markexpr") == "gpu"
    for step in sorted((REPO / "manifests" / "demo").glob(pattern)):
        if on_gpu:
            data = yaml.safe_load(step.read_text())
            data["cluster"]["gpus_per_task"] = 1  # `device: auto` then takes it; not part of the run id
            (folder / step.name).write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            shutil.copy(step, folder / step.name)


@pytest.fixture(scope="session")
def gambling_chain(tmp_path_factory, pytestconfig) -> GamblingChain:
    folder = tmp_path_factory.mktemp("gambling_chain")
    _copy_chain("gambling_*.yaml", folder, pytestconfig)
    return GamblingChain(folder, _run_in(folder, "gambling_1_games.yaml"), _run_in(folder, "gambling_2_contrast.yaml"))


@dataclass
class ReasoningChain:
    """The demo's reasoning chain (capture -> training -> ablation), run in a copy of the demo folder;
    `alignment`, `circuits` and `contexts` run on first use, as only their tests need them."""

    folder: Path
    capture: RunDir
    training: RunDir
    ablation: RunDir

    @cached_property
    def alignment(self) -> RunDir:
        return _run_in(self.folder, "reasoning_4_alignment.yaml")

    @cached_property
    def circuits(self) -> RunDir:
        assert self.alignment  # the circuits read its matches across the two organisms
        return _run_in(self.folder, "reasoning_5_circuits.yaml")

    @cached_property
    def contexts(self) -> RunDir:
        assert self.circuits  # the contexts are those of its primitives
        return _run_in(self.folder, "reasoning_6_contexts.yaml")


@pytest.fixture(scope="session")
def reasoning_chain(tmp_path_factory, pytestconfig) -> ReasoningChain:
    folder = tmp_path_factory.mktemp("reasoning_chain")
    _copy_chain("reasoning_*.yaml", folder, pytestconfig)
    return ReasoningChain(folder, *(_run_in(folder, f"reasoning_{name}.yaml")
                                    for name in ("1_capture", "2_training", "3_ablation")))
