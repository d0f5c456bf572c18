"""Manifests: the YAML description of one run, validated before anything is submitted.

A manifest has four top-level keys:

    job: token_tracking          # which module in jobs/
    run: {shards: 2}             # where the run lives and how it is split (RunSettings)
    cluster: {partition: gpu}    # Slurm resources, ignored by the science (ClusterSettings)
    token_tracking: {...}        # the job's own section, typed by that job's `Settings`

Unknown keys fail at once with the list of valid keys and their defaults, so a typo never
silently becomes a default. The resolved manifest (every default filled) is saved in the run
directory, and its hash names the run.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticUndefined

from common.errors import UserError


class StrictModel(BaseModel):
    """Base for every manifest section: unknown keys are errors, not defaults."""

    model_config = ConfigDict(extra="forbid")


def _absolute(path: Path) -> Path:
    return path.expanduser().absolute()


# A path in a manifest, made absolute against the directory the command runs in, so that the
# saved manifest means the same thing wherever a task later runs.
AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


def _upstream_run(path: Path, info: ValidationInfo) -> Path:
    """The run directory of a run this one reads: given as the directory, or as the manifest that
    made it (a relative manifest path is read beside this manifest; its run is looked up under
    the run root that `load_manifest` was told to use, if any, as `saebatch demo` does)."""
    context = info.context or {}
    path = path.expanduser()
    if not path.is_absolute():
        path = Path(context.get("manifest_dir", Path.cwd())) / path
    if path.is_file():
        from common.rundir import RunDir  # rundir imports this module

        return RunDir.for_manifest(load_manifest(path, run_root=context.get("run_root"))).path
    return path.absolute()


# The run of an earlier step (a directory, or its manifest), saved in the manifest as the directory.
UpstreamRun = Annotated[Path, AfterValidator(_upstream_run)]


class RunSettings(StrictModel):
    """Where a run lives and how its work is split."""

    root: AbsolutePath = Field(
        Path("runs"), description="folder holding run directories `<job>-<hash>/`"
    )
    dir: AbsolutePath | None = Field(
        None, description="explicit run directory instead of `<root>/<job>-<hash>`"
    )
    shards: int = Field(1, ge=1, description="number of array tasks; each writes one shard")


class ClusterSettings(StrictModel):
    """Slurm resources for the array tasks and the reduce job (not part of the run's hash)."""

    partition: str | None = Field(None, description="Slurm partition (None: cluster default)")
    account: str | None = Field(None, description="Slurm account")
    qos: str | None = Field(None, description="Slurm quality of service")
    constraint: str | None = Field(None, description="Slurm node constraint, e.g. 'a100|h100'")
    gpus_per_task: int = Field(1, ge=0, description="GPUs per array task")
    cpus_per_task: int = Field(4, ge=1, description="CPU cores per array task")
    mem_gb: float = Field(32, gt=0, description="memory per array task in GB")
    timeout_min: int = Field(120, ge=1, description="wall-clock limit per array task")
    array_parallelism: int = Field(64, ge=1, description="array tasks running at once at most")
    max_array_size: int | None = Field(
        None, ge=1, description="split arrays above this size (None: ask Slurm's MaxArraySize)"
    )
    setup: list[str] = Field(
        default_factory=list, description="shell lines run before each task (module load ...)"
    )
    python: str | None = Field(
        None,
        description="command that starts python on the node, e.g. "
        "'apptainer exec --nv --bind /scratch image.sif python' (None: this python, or `image`'s)",
    )
    image: AbsolutePath | None = Field(
        None,
        description="Apptainer image the tasks run in (a .sif file or sandbox folder built from "
        "containers/): tasks start `apptainer exec --nv --bind <run root>,<bind> <image> python`",
    )
    bind: list[str] = Field(
        default_factory=list, description="more paths bound into the image (data, HF cache), e.g. ['/scratch']"
    )
    additional: dict[str, str | int | bool] = Field(
        default_factory=dict, description="extra #SBATCH options, e.g. {reservation: x}"
    )
    reduce_cpus: int = Field(2, ge=1, description="CPU cores for the reduce job")
    reduce_mem_gb: float = Field(16, gt=0, description="memory for the reduce job in GB")
    reduce_timeout_min: int = Field(60, ge=1, description="wall-clock limit for the reduce job")

    @model_validator(mode="after")
    def _one_python(self) -> ClusterSettings:
        if self.image is not None and self.python is not None:
            raise ValueError("give `image` (the launcher then runs apptainer) or `python`, not both")
        return self


SettingsT = TypeVar("SettingsT", bound=BaseModel)


class Manifest(StrictModel, Generic[SettingsT]):
    """A whole manifest; `settings` is the job's section (its YAML key is the job's name)."""

    job: str
    run: RunSettings = Field(default_factory=RunSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    settings: SettingsT

    def run_id(self) -> str:
        """Short hash of everything that determines the results (not where or how it runs)."""
        science = self.model_dump(mode="json", exclude={"cluster": True, "run": {"root", "dir"}})
        blob = json.dumps(science, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def to_yaml(self) -> str:
        """The resolved manifest, every default filled, in the layout a user writes."""
        data = self.model_dump(mode="json")
        data[self.job] = data.pop("settings")
        return yaml.safe_dump(data, sort_keys=False)


def load_manifest(path: str | Path, run_root: Path | None = None) -> Manifest:
    """Read and validate a manifest file; every problem is a UserError naming the field.

    `run_root` replaces the manifest's run.root (and that of the runs it reads, given by manifest).
    """
    from common.registry import get_job  # the registry imports jobs/, which import this module

    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist (give the path of a YAML manifest)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"manifest {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("job"), str):
        raise UserError(
            f"manifest {path}: the top level must be a mapping with a `job:` key naming the job "
            "(run `saebatch jobs` for the list)"
        )
    job_name = raw["job"]
    job = get_job(job_name)
    allowed = {"job", "run", "cluster", job_name}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(
            f"manifest {path}: unknown top-level key(s) {', '.join(unknown)}; valid keys are "
            f"job, run, cluster and `{job_name}` (the job's own section)"
        )
    data = {k: v for k, v in raw.items() if k != job_name}
    data["settings"] = raw.get(job_name) or {}
    if run_root is not None:
        data["run"] = {**(data.get("run") or {}), "root": str(run_root)}
    context = {"manifest_dir": path.parent.absolute(), "run_root": run_root}
    try:
        return Manifest[job.Settings].model_validate(data, context=context)
    except ValidationError as error:
        raise UserError(f"manifest {path} is invalid:\n{_describe(error, job_name, job.Settings)}") from None


def _describe(error: ValidationError, job_name: str, settings_cls: type[BaseModel]) -> str:
    """One line per problem: the dotted field path, what is wrong, and for typos the valid keys."""
    lines = []
    for item in error.errors():
        loc = [job_name if part == "settings" else part for part in item["loc"]]
        where = ".".join(str(part) for part in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _model_at(Manifest[settings_cls], item["loc"][:-1])
            close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields) if parent else [], n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            valid = _valid_keys(parent) if parent else ""
            lines.append(f"  {where}: unknown key.{hint} Valid keys here: {valid}")
        elif item["type"] == "missing":
            lines.append(f"  {where}: required field is missing")
        else:
            got = repr(item.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            lines.append(f"  {where}: {item['msg']} (got {got})")
    return "\n".join(lines)


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by following `loc` (field names, list indices) from cls."""
    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _valid_keys(cls: type[BaseModel]) -> str:
    parts = []
    for name, field in cls.model_fields.items():
        if field.default is not PydanticUndefined:
            parts.append(f"{name} (default: {_short(field.default)})")
        elif field.default_factory is not None:
            parts.append(f"{name} (default: {_short(field.default_factory())})")
        else:
            parts.append(f"{name} (required)")
    return ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, (list, dict)) and len(value) > 3:
        return f"<{len(value)} entries>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
