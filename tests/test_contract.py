"""The job contract (common.registry.Job; README, "Writing a new job"), held for every job in jobs/:
the contract's five parts with its signatures, every manifest field described, a deterministic
plan, imports of `common`, `jobs._*` and third-party packages only (never another job), and every
paper manifest validating and planning to the figures it is known for."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pytest
import yaml
from pydantic import BaseModel, Field

import jobs
from common.cli import main
from common.launcher import prepare_run
from common.manifest import Manifest
from common.manifest_file import load_manifest
from common.plan import estimating
from common.registry import available_jobs, contract_breaches, get_job
from common.rundir import RunDir
from tests.helpers import REPO

JOBS = available_jobs()
DEMO = REPO / "manifests" / "demo"
PAPER = REPO / "manifests"
JOBS_DIR = REPO / "jobs"


def job_module(name: str) -> ModuleType:
    return importlib.import_module(f"jobs.{name}")


def demo_manifests() -> dict[str, list[Path]]:
    """Job -> its demo manifests (manifests/demo/*.yaml, by their `job:`)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(DEMO.glob("*.yaml")):
        found.setdefault(yaml.safe_load(path.read_text())["job"], []).append(path)
    return found


# ---------------------------------------------------------------- the five parts, with the contract's signatures


@pytest.mark.parametrize("name", JOBS)
def test_the_job_has_the_contracts_five_parts_with_its_signatures(name):
    assert contract_breaches(job_module(name)) == []
    assert get_job(name) is job_module(name)


BROKEN_JOB = '''
"""A job that breaks the contract in every way it can."""
from pathlib import Path


class Settings:  # a plain class, not a pydantic model
    pass


def estimate(manifest):  # no units
    return None


def run_shard(manifest, shard, units):  # arguments swapped
    return None


def reduce(manifest, shard_paths, run_dir):  # the name the Protocol once had
    return None
'''
BROKEN_JOB_BREACHES = [
    "Settings is not a pydantic model class (the manifest section named after the job)",
    "plan is missing",
    "estimate(manifest) should take (manifest, units)",
    "run_shard(manifest, shard, units) should take (manifest, units, shard)",
    "reduce(manifest, shard_paths, run_dir) should take (manifest, shard_paths, out_dir)",
]


@pytest.fixture
def broken_job(tmp_path, monkeypatch) -> Iterator[str]:
    """A job module `jobs.broken_job` that the registry finds (a folder added to the package's path)."""
    (tmp_path / "broken_job.py").write_text(BROKEN_JOB)
    monkeypatch.setattr(jobs, "__path__", [*jobs.__path__, str(tmp_path)])
    yield "broken_job"
    sys.modules.pop("jobs.broken_job", None)
    vars(jobs).pop("broken_job", None)  # the attribute an import sets on the package


def test_a_job_that_breaks_the_contract_is_named_with_each_breach(broken_job):
    assert broken_job in available_jobs()
    with pytest.raises(TypeError) as refused:
        get_job(broken_job)
    assert str(refused.value) == ("job module jobs.broken_job breaks the job contract (common.registry.Job): "
                                  + "; ".join(BROKEN_JOB_BREACHES))
    assert contract_breaches(sys.modules["jobs.broken_job"]) == BROKEN_JOB_BREACHES


# ---------------------------------------------------------------- every manifest field described


def models_in(annotation: object) -> Iterator[type]:
    """The classes with fields that an annotation names: itself, or inside list[...], X | None,
    dict[str, X], Annotated[X, ...] and unions."""
    if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)
                                         or typing.is_typeddict(annotation)):
        yield annotation
    for argument in typing.get_args(annotation):
        yield from models_in(argument)


def undescribed_fields(model: type[BaseModel], path: str, seen: set[type] | None = None) -> list[str]:
    """The fields of `model`, and of every model nested in it, that have no description (or are
    not pydantic fields, which carry none), by their path in the manifest."""
    seen = set() if seen is None else seen
    seen.add(model)
    missing = []
    for name, field in model.model_fields.items():
        if not (field.description or "").strip():
            missing.append(f"{path}.{name}")
        for nested in models_in(field.annotation):
            if nested in seen:
                continue
            if not issubclass(nested, BaseModel):
                missing.append(f"{path}.{name}: {nested.__name__} is no pydantic model (its fields have no description)")
                continue
            missing += undescribed_fields(nested, f"{path}.{name}", seen)
    return missing


def field_paths(model: type[BaseModel], path: str, seen: set[type] | None = None) -> list[str]:
    """Every field's path, through nested models (what `undescribed_fields` looks at)."""
    seen = set() if seen is None else seen
    seen.add(model)
    paths = []
    for name, field in model.model_fields.items():
        paths.append(f"{path}.{name}")
        for nested in models_in(field.annotation):
            if nested not in seen and issubclass(nested, BaseModel):
                paths += field_paths(nested, f"{path}.{name}", seen)
    return paths


@pytest.mark.parametrize("name", JOBS)
def test_every_field_of_the_settings_is_described(name):
    assert undescribed_fields(job_module(name).Settings, name) == []


def test_the_fields_are_checked_through_nested_models():
    """The walk reaches the models nested in the jobs' settings, and finds a field without a
    description at any depth, inside lists, unions and Optional, and a dataclass among them."""
    assert "sae_training.sae.expansion_factor" in field_paths(job_module("sae_training").Settings, "sae_training")
    assert any(path.startswith("token_tracking.model.") for path in field_paths(job_module("token_tracking").Settings,
                                                                                  "token_tracking"))
    assert any(path.startswith("feature_correlation.corpus.") for path in field_paths(
        job_module("feature_correlation").Settings, "feature_correlation"))

    @dataclass
    class Plain:
        x: int

    class Deep(BaseModel):
        ok: int = Field(1, description="described")
        bare: int = 2

    class Inner(BaseModel):
        deep: dict[str, Deep] | None = Field(None, description="described")
        blank: str = Field("", description="  ")

    class Settings(BaseModel):
        inner: list[Inner] = Field(default_factory=list, description="described")
        plain: Plain | None = Field(None, description="described")
        top: int = 0

    assert undescribed_fields(Settings, "job") == [
        "job.inner.deep.bare", "job.inner.blank", "job.plain: Plain is no pydantic model (its fields have no description)",
        "job.top"]


# ---------------------------------------------------------------- plan is deterministic

PLAN_SCRIPT = """
import json, sys
from dataclasses import asdict
from common.manifest_file import load_manifest
from common.plan import estimating
from common.registry import get_job
plans = {}
for path in sys.argv[1:]:
    with estimating():
        manifest = load_manifest(path)
        plans[path] = [asdict(unit) for unit in get_job(manifest.job).plan(manifest)]
print(json.dumps(plans))
"""


def planned(path: Path) -> list[dict]:
    """The manifest's work units as plan.json stores them, planned before any upstream run exists
    (from the upstream manifest, as `saebatch plan` does)."""
    with estimating():
        manifest = load_manifest(path)
        units = get_job(manifest.job).plan(manifest)
    return json.loads(json.dumps([asdict(unit) for unit in units]))


@pytest.fixture(scope="module")
def plans_in_other_processes(tmp_path_factory) -> list[dict[str, list[dict]]]:
    """Every demo manifest planned in two fresh Pythons with other string hashes (a set's order
    changes with them), in a folder where no run exists."""
    folder = tmp_path_factory.mktemp("plans")
    paths = [str(path) for path in sorted(DEMO.glob("*.yaml"))]
    processes = [subprocess.Popen([sys.executable, "-c", PLAN_SCRIPT, *paths], cwd=folder, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed,
                                       "HF_HUB_OFFLINE": "1"})
                 for seed in ("1", "2")]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    return results


@pytest.mark.parametrize("name", JOBS)
def test_plan_is_deterministic(name, tmp_path, monkeypatch, plans_in_other_processes):
    """The job's demo manifest planned twice here and once in each other process: the same unit
    ids with the same payloads in the same order."""
    manifests = demo_manifests().get(name)
    assert manifests, f"job {name} has no demo manifest under manifests/demo/"
    monkeypatch.chdir(tmp_path)  # runs/ is relative: no upstream run exists here
    for path in manifests:
        first = planned(path)
        assert first, f"{path.name} plans no work units"
        assert planned(path) == first
        for other in plans_in_other_processes:
            assert other[str(path)] == first
        assert len({unit["id"] for unit in first}) == len(first)


# ---------------------------------------------------------------- a job imports no other job

FIRST_PARTY = {"common", "jobs", "tests", "benchmarks", "manifests"}


def imported_modules(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, module) of everything a module's source imports, anywhere in it (inside functions
    too): `import a.b`, `from a import b` (as a and a.b), relative imports resolved against
    `package`, and modules named by a string to importlib.import_module, __import__ or
    common.lazy.lazy_import."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if called in ("import_module", "__import__", "lazy_import"):
                yield node.lineno, node.args[0].value


def forbidden_imports(source: str, package: str = "jobs") -> list[str]:
    """What a module under jobs/ may not import: a public job, or first-party code other than
    `common` and the private helpers `jobs._*`."""
    offenders = []
    for line, module in imported_modules(source, package):
        parts = module.split(".")
        if parts[0] not in FIRST_PARTY or parts[0] == "common" or module == "jobs":
            continue
        if parts[0] == "jobs" and parts[1].startswith("_"):
            continue
        offenders.append((line, module))
    # `from jobs.x import y` reads as jobs.x and jobs.x.y: name the module once
    named = [(line, module) for line, module in offenders
             if not any(line == other_line and module.startswith(other + ".") for other_line, other in offenders)]
    return [f"line {line}: {module}" for line, module in sorted(set(named))]


def test_the_import_scan_finds_a_job_imported_in_any_form():
    source = '''
import json
import numpy as np
from common.plan import WorkUnit
from jobs import _gambling as task
from jobs._organism.rule import decide
import jobs
lazy = lazy_import("pandas")


def late():
    from jobs import gambling_games
    import jobs.token_tracking as tracking
    from jobs.sae_training import LINEAR_LOADING
    from . import feature_contrast
    from .activation_capture import Settings
    from tests.helpers import REPO
    importlib.import_module("jobs.feature_ablation")
    module = lazy_import("jobs.population_patching")
'''
    assert forbidden_imports(source) == [
        "line 12: jobs.gambling_games", "line 13: jobs.token_tracking", "line 14: jobs.sae_training",
        "line 15: jobs.feature_contrast", "line 16: jobs.activation_capture", "line 17: tests.helpers",
        "line 18: jobs.feature_ablation", "line 19: jobs.population_patching"]
    inside_a_helper_package = "from .. import gambling_games\nfrom .. import _slot_machine\nfrom .rule import decide\n"
    assert forbidden_imports(inside_a_helper_package, "jobs._organism") == ["line 1: jobs.gambling_games"]


def _job_sources() -> list:
    """Every module under jobs/: the jobs, and the private helpers (which would otherwise carry a
    job's import one step removed)."""
    return [pytest.param(path, id=str(path.relative_to(JOBS_DIR))) for path in sorted(JOBS_DIR.rglob("*.py"))]


@pytest.mark.parametrize("path", _job_sources())
def test_a_job_imports_only_common_private_helpers_and_third_party_packages(path):
    package = ".".join(path.relative_to(REPO).parent.parts)  # what its relative imports start from
    offenders = forbidden_imports(path.read_text(), package)
    assert offenders == [], (f"{path.relative_to(REPO)} imports {', '.join(offenders)}: a job imports only common, "
                             "the private helpers jobs/_*.py and third-party packages; move what two jobs share "
                             "into a private helper")


# ---------------------------------------------------------------- each paper manifest validates and plans


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A checkout's root as cloned: the shipped data (GSM8K, FOLIO), no runs/ and no data/MATH (the
    benchmark a user provides); the manifests' relative paths and run.root resolve here."""
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "data").symlink_to(REPO / "manifests" / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def pile_corpus(checkout) -> Path:
    """The corpus path is relative: a stand-in file the size of a few documents."""
    (checkout / "corpora").mkdir()
    path = checkout / "corpora" / "pile_train_00.jsonl"
    path.write_text(json.dumps({"text": "A document of The Pile."}) + "\n")
    return path


@pytest.fixture
def no_local_tokenizer(monkeypatch) -> None:
    """As on a bare login node: the model's tokenizer is not at hand."""
    for job in ("feature_correlation", "feature_contexts"):
        monkeypatch.setattr(job_module(job), "local_tokenizer", lambda spec: None)


@pytest.fixture
def math_file(checkout) -> Path:
    """MATH is the user's file: a stand-in of 133 problems."""
    (checkout / "data" / "MATH").mkdir(parents=True)
    problems = [{"problem": f"What is {i} + {i}?", "solution": f"It is $\\boxed{{{2 * i}}}$."} for i in range(133)]
    path = checkout / "data" / "MATH" / "test.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in problems))
    return path


@pytest.fixture
def games_run(checkout) -> Path:
    """A stand-in of the games run's merged.h5: its layers, the outcomes and feature shapes."""
    games = RunDir.for_manifest(load_manifest(PAPER / "gambling_games_llama31_8b.yaml")).path
    games.mkdir(parents=True)
    with h5py.File(games / "merged.h5", "w") as merged:
        merged.attrs.update(job="gambling_games", layers=list(range(25, 32)))
        for i, outcome in enumerate(["bankrupt", "stopped"] * 3):
            merged.create_group(f"units/g{i}").attrs["outcome"] = outcome
            merged[f"units/g{i}"].create_group("features/L25").attrs["shape"] = [3, 32768]
    return games


@pytest.fixture
def contrast_run(games_run) -> Path:
    """A stand-in of the contrast's merged.h5: 200 features in each of layers 25-31, the first
    1,340 of them selected."""
    contrast = RunDir.for_manifest(load_manifest(PAPER / "feature_contrast_llama31_8b.yaml")).path
    contrast.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with h5py.File(contrast / "merged.h5", "w") as merged:
        merged.attrs["job"] = "feature_contrast"
        layers = np.repeat(np.arange(25, 32), 200)
        for name, values in {"layer": layers, "feature": np.tile(np.arange(200), 7) * 100,
                             "mean_safe": rng.random(1400), "mean_bankrupt": rng.random(1400),
                             "cohens_d": rng.normal(0, 1, 1400), "selected": np.arange(1400) < 1340,
                             "active_bankrupt": rng.random(1400), "active_safe": rng.random(1400)}.items():
            merged.create_dataset(f"features/{name}", data=values)
    return contrast


REASONING_WIDTHS = {"gpt2-medium": 1024, "pythia-1.4b": 2048, "gemma-2b": 2048, "phi-2": 2560, "llama-3-8b": 4096}


@pytest.fixture
def capture_run(math_file) -> RunDir:
    """The capture run prepared, with a stand-in merged.h5 of 200,000 tokens a model and layer."""
    manifest = load_manifest(PAPER / "reasoning_capture_5models.yaml")
    capture = prepare_run(manifest)
    with h5py.File(capture.merged_path, "w") as merged:
        merged.attrs.update(job="activation_capture", text="prompt_and_solution")
        for entry in manifest.settings.models:
            for layer in entry.layers:
                merged.create_dataset(f"models/{entry.name}/L{layer}", shape=(200_000, REASONING_WIDTHS[entry.name]),
                                      dtype="float16")
    return capture


def _standin_run(name: str) -> Path:
    """A stand-in of the run of paper manifest `name`: its manifest, plan and a merged.h5 that says
    which job wrote it."""
    manifest = load_manifest(PAPER / name)
    run = RunDir.for_manifest(manifest).path
    run.mkdir(parents=True)
    (run / "manifest.yaml").write_text(manifest.to_yaml())
    (run / "plan.json").write_text("{}")
    with h5py.File(run / "merged.h5", "w") as merged:
        merged.attrs["job"] = manifest.job
    return run


@pytest.fixture
def training_run(capture_run) -> Path:
    """A stand-in of the training run, with each SAE's cfg.json (8 x the model's width)."""
    training = _standin_run("reasoning_training_5models.yaml")
    for entry in capture_run.load_manifest().settings.models:
        for layer in entry.layers:
            folder = training / "saes" / entry.name / f"L{layer}"
            folder.mkdir(parents=True)
            (folder / "cfg.json").write_text(json.dumps({
                "d_in": REASONING_WIDTHS[entry.name], "d_sae": 8 * REASONING_WIDTHS[entry.name],
                "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"}}))
    return training


@pytest.fixture
def ablation_run(training_run) -> Path:
    return _standin_run("reasoning_ablation_5models.yaml")


@pytest.fixture
def alignment_run(ablation_run) -> Path:
    return _standin_run("reasoning_alignment_5models.yaml")


@dataclass(frozen=True)
class Paper:
    """A paper manifest: the stand-ins (fixtures) of the inputs it reads, what `saebatch plan` must
    say of it, and any further check of the manifest and that output."""

    standins: tuple[str, ...]
    says: tuple[str, ...]
    check: Callable[[Manifest, str], None] | None = None


def _token_tracking_on_llama(manifest: Manifest, out: str) -> None:
    assert manifest.settings.model.id == "meta-llama/Llama-3.1-8B"
    memory = float(out.split("peak memory per task: ")[1].split()[0])
    assert 16 <= memory <= 40  # GB: 16 GB of bf16 weights plus activations and one SAE


PAPER_MANIFESTS = {
    "feature_correlation_gemma2_2b.yaml": Paper(("pile_corpus", "no_local_tokenizer"), (
        "4 work units in 4 shard(s)",
        "8,192 features in the graph (L4: 2048, L8: 2048, L12: 2048, L16: 2048)",
        "saebatch's copy of google/gemma-2-2b's architecture",
        "the corpus is counted on the nodes")),
    # 4 units of 262,144 tokens and the logit-effects unit; the 256 strongest of the 1,340 selected features
    "feature_contexts_llama31_8b.yaml": Paper(("contrast_run", "pile_corpus", "no_local_tokenizer"), (
        "5 work units in 4 shard(s)", "256 features at layers [25, 26, 27, 28, 29, 30, 31]")),
    # a unit per strength: -4, -2, -1, 1, 2 and 4
    "graph_steering_gemma2_2b.yaml": Paper(("pile_corpus", "no_local_tokenizer"), ("6 work units in 3 shard(s)",)),
    "gambling_games_llama31_8b.yaml": Paper((), (
        "6400 work units in 25 shard(s)",
        "rows a generate call (batch_size auto, on an H200), at most a shard's games",
        "saebatch's copy of meta-llama/Llama-3.1-8B's architecture")),
    "feature_contrast_llama31_8b.yaml": Paper(("games_run",), (
        "7 work units in 7 shard(s)",)),
    # 1,340 features, the unpatched unit, and 20 controls from layer 31, the one layer with unchosen features
    "population_patching_llama31_8b.yaml": Paper(("contrast_run",), (
        "1361 work units", "272,100 answers", "a call (batch_size auto, on an H200)")),
    # per model: GSM8K 532 items in 6 units, MATH 132 in 2, FOLIO 200 in 2
    # a unit per model and benchmark
    "reasoning_alignment_5models.yaml": Paper(("ablation_run",), (
        "15 work units in 15 shard(s)",)),
    "reasoning_circuits_5models.yaml": Paper(("alignment_run",), (
        "15 work units in 15 shard(s)", "127 rows per evaluated item")),
    "reasoning_capture_5models.yaml": Paper(("math_file",), (
        "50 work units in 15 shard(s)",)),
    "reasoning_training_5models.yaml": Paper(("capture_run",), (
        "15 work units in 15 shard(s)",)),
    "reasoning_ablation_5models.yaml": Paper(("training_run",), (
        "15 work units in 15 shard(s)", "rows a generate call (batch_size auto, on an H200)")),
    "token_tracking_llama31_8b.yaml": Paper((), (
        "10 work units in 2 shard(s)",
        "saebatch's copy of meta-llama/Llama-3.1-8B"), _token_tracking_on_llama),
}


def test_every_paper_manifest_has_its_figures_and_no_other():
    assert sorted(PAPER_MANIFESTS) == sorted(path.name for path in PAPER.glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(path.name for path in PAPER.glob("*.yaml")))
def test_each_paper_manifest_validates_and_plans(name, checkout, request, capsys):
    """Offline, on a fresh checkout with stand-ins of what the manifest reads (earlier runs' outputs,
    the user's data files): it validates, plans, and its plan states the known figures."""
    assert name in PAPER_MANIFESTS, f"manifests/{name}: add its stand-ins and its plan's figures to PAPER_MANIFESTS"
    paper = PAPER_MANIFESTS[name]
    for fixture in paper.standins:
        request.getfixturevalue(fixture)
    manifest = load_manifest(PAPER / name)
    assert main(["plan", str(PAPER / name)]) == 0
    out = capsys.readouterr().out
    assert [text for text in paper.says if text not in out] == [], out
    if paper.check is not None:
        paper.check(manifest, out)
