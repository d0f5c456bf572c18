"""common/registry.py: which modules are jobs, an unknown job refused naming the known ones, and
the check of the job contract (tests/test_contract.py holds every job to it)."""

import importlib
import inspect
import sys
from types import ModuleType

import pytest
from pydantic import BaseModel

import jobs
from common.errors import UserError
from common.registry import FUNCTIONS, Job, available_jobs, contract_breaches, get_job
from tests.helpers import REPO


def test_the_jobs_are_the_modules_of_jobs_not_starting_with_an_underscore():
    folder = REPO / "jobs"
    modules = [path.stem for path in folder.glob("*.py")]
    packages = [path.name for path in folder.iterdir() if (path / "__init__.py").is_file()]
    assert "_gambling" in modules and "_organism" in packages  # private helpers, a module and a package
    assert available_jobs() == sorted(name for name in modules + packages
                                      if not name.startswith("_") and name != "__init__")


@pytest.fixture
def more_jobs(tmp_path, monkeypatch):
    """A folder added to the `jobs` package's path, as a module dropped into jobs/ would be found."""
    monkeypatch.setattr(jobs, "__path__", [*jobs.__path__, str(tmp_path)])
    added = set()

    def add(name: str, source: str = "", package: bool = False) -> None:
        path = tmp_path / name / "__init__.py" if package else tmp_path / f"{name}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(source)
        added.add(f"jobs.{name}")

    yield add
    for name in added:
        sys.modules.pop(name, None)
        vars(jobs).pop(name.removeprefix("jobs."), None)  # the attribute an import sets on the package


def test_a_module_or_package_added_to_jobs_is_a_job_and_a_private_one_is_not(more_jobs):
    before = available_jobs()
    more_jobs("new_job")
    more_jobs("packaged_job", package=True)
    more_jobs("_new_helper")
    more_jobs("_helper_package", package=True)
    assert available_jobs() == sorted([*before, "new_job", "packaged_job"])


def test_an_unknown_job_is_refused_naming_the_known_ones():
    with pytest.raises(UserError) as refused:
        get_job("gambling_game")
    assert str(refused.value) == f"unknown job 'gambling_game' in `job:`; available jobs: {', '.join(available_jobs())}"
    for private in ("_gambling", "_organism", "__init__"):  # importable, but no job
        with pytest.raises(UserError, match=f"unknown job '{private}'"):
            get_job(private)


@pytest.mark.parametrize("name", available_jobs())
def test_a_known_job_is_its_module(name):
    assert get_job(name) is importlib.import_module(f"jobs.{name}")


def test_the_contracts_parameters_are_the_ones_the_readme_states():
    parameters = {name: list(inspect.signature(getattr(Job, name)).parameters)[1:] for name in FUNCTIONS}
    assert parameters == {"plan": ["manifest"], "estimate": ["manifest", "units"],
                          "run_shard": ["manifest", "units", "shard"], "reduce": ["manifest", "shard_paths", "out_dir"]}
    readme = (REPO / "README.md").read_text()
    for name, names in parameters.items():
        assert f"`{name}({', '.join(names)})" in readme


class Settings(BaseModel):
    x: int = 1


def plan(manifest):
    return []


def estimate(manifest, units):
    return None


def run_shard(manifest, units, shard):
    return None


def reduce(manifest, shard_paths, out_dir):
    return None


def module(**changes) -> ModuleType:
    """A module with the contract's five parts, then `changes` (None removes a name)."""
    made = ModuleType("jobs.made_here")
    parts = {"Settings": Settings, "plan": plan, "estimate": estimate, "run_shard": run_shard, "reduce": reduce}
    for name, value in {**parts, **changes}.items():
        if value is not None:
            setattr(made, name, value)
    return made


def test_a_module_with_the_five_parts_keeps_the_contract():
    assert contract_breaches(module()) == []


SETTINGS_BREACH = "Settings is not a pydantic model class (the manifest section named after the job)"


@pytest.mark.parametrize(("changes", "breaches"), [
    ({"Settings": None}, [SETTINGS_BREACH]),
    ({"Settings": Settings()}, [SETTINGS_BREACH]),  # an instance, not the class
    ({"Settings": type("Settings", (), {})}, [SETTINGS_BREACH]),
    ({"plan": None}, ["plan is missing"]),
    ({"reduce": "reduce"}, ["reduce is missing"]),  # not callable
    ({"plan": lambda manifest, strict=False: []}, ["plan(manifest, strict) should take (manifest)"]),
    ({"estimate": lambda manifest: None}, ["estimate(manifest) should take (manifest, units)"]),
    ({"run_shard": lambda manifest, shard, units: None},
     ["run_shard(manifest, shard, units) should take (manifest, units, shard)"]),
    ({"reduce": lambda manifest, shard_paths, run_dir: None},
     ["reduce(manifest, shard_paths, run_dir) should take (manifest, shard_paths, out_dir)"]),
    ({"run_shard": lambda *args: None}, ["run_shard(args) should take (manifest, units, shard)"]),
    ({"Settings": dict, "plan": None, "estimate": None},
     [SETTINGS_BREACH, "plan is missing", "estimate is missing"]),
], ids=["no_settings", "settings_instance", "settings_plain_class", "no_plan", "reduce_not_callable",
        "extra_parameter", "missing_parameter", "swapped_parameters", "renamed_parameter", "star_args", "several"])
def test_each_breach_of_the_contract_is_named(changes, breaches):
    assert contract_breaches(module(**changes)) == breaches


def test_get_job_refuses_a_module_that_breaks_the_contract(more_jobs):
    more_jobs("half_a_job", "def plan(manifest):\n    return []\n")
    with pytest.raises(TypeError) as refused:
        get_job("half_a_job")
    assert str(refused.value) == (
        "job module jobs.half_a_job breaks the job contract (common.registry.Job): " + "; ".join(
            [SETTINGS_BREACH, "estimate is missing", "run_shard is missing", "reduce is missing"]))
