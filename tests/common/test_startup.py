"""The CLI answers without importing the heavy packages (seconds each on 2 cores), which only the
tasks and the reduce need; and what binds them lazily behaves as the real import would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from common.lazy import lazy_import, no_grad
from tests.helpers import REPO

HEAVY = ("torch", "transformers", "sae_lens", "pandas", "scipy.stats", "matplotlib.pyplot")
PROBE = """
import contextlib, io, json, sys
from common.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:  # --help
        code = exit.code
print(json.dumps({"code": code, "imported": [name for name in %r if name in sys.modules]}))
""" % (HEAVY,)  # noqa: UP031 (a code template: .format would double its braces)


def imported_by(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("args", [
    ["--help"],
    ["jobs"],
    ["plan", "manifests/token_tracking_llama31_8b.yaml"],
    ["plan", "manifests/gambling_games_llama31_8b.yaml"],
], ids=" ".join)
def test_the_cli_answers_without_importing_heavy_packages(args):
    assert imported_by(*args) == {"code": 0, "imported": []}


@pytest.mark.parametrize("manifest", ["feature_correlation.yaml", "reasoning_1_capture.yaml"])
def test_a_demo_plan_reads_the_organisms_tokenizer_and_nothing_heavier(manifest):
    """The organism's tokenizer is loaded (and its files checked) at planning: transformers' tokenizer
    code is imported, but not torch or anything else heavy."""
    assert imported_by("plan", f"manifests/demo/{manifest}")["imported"] in ([], ["transformers"])


def test_status_of_a_run_imports_no_heavy_package(tmp_path):
    from common.launcher import prepare_run
    from common.manifest_file import load_manifest

    run = prepare_run(load_manifest(REPO / "manifests/demo/token_tracking.yaml", run_root=tmp_path))
    result = imported_by("status", str(run.path))
    assert result == {"code": 1, "imported": []}  # 1: every shard is still missing


def test_a_lazy_module_is_imported_at_its_first_attribute_and_is_the_module(tmp_path, monkeypatch):
    (tmp_path / "saebatch_probe_module.py").write_text("import sys\nsys.probe_loaded = True\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = lazy_import("saebatch_probe_module")
    assert "saebatch_probe_module" not in sys.modules and not hasattr(sys, "probe_loaded")
    assert probe.VALUE == 42 and sys.probe_loaded
    assert vars(probe)["VALUE"] == 42  # later reads are plain attribute reads
    assert lazy_import("saebatch_probe_module") is sys.modules["saebatch_probe_module"]
    monkeypatch.delattr(sys, "probe_loaded")
    monkeypatch.delitem(sys.modules, "saebatch_probe_module")


def test_no_grad_runs_the_function_without_gradients_and_keeps_its_name():
    weight = torch.ones(3, requires_grad=True)

    @no_grad
    def doubled(x: torch.Tensor) -> torch.Tensor:
        return 2 * x * weight

    assert not doubled(torch.ones(3)).requires_grad and (2 * weight).requires_grad
    assert doubled.__name__ == "doubled"
