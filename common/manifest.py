"""Manifests: the YAML description of one run, as the models that validate it.

A manifest has four top-level keys:

    job: token_tracking          # which module in jobs/
    run: {shards: 2}             # where the run lives and how it is split (RunSettings)
    cluster: {partition: gpu}    # Slurm resources, ignored by the science (ClusterSettings)
    token_tracking: {...}        # the job's own section, typed by that job's `Settings`

Unknown keys fail at once, so a typo never silently becomes a default. Validating reads no other
manifest: the run directory is a function of the manifest alone (`Manifest.run_path`), and the
runs a manifest names by their manifest files are resolved after validation, where the file is
read (common.manifest_file). The resolved manifest (every default filled) is saved in the run
directory, and its hash names the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)


class StrictModel(BaseModel):
    """Base for every manifest section: unknown keys are errors, not defaults."""

    model_config = ConfigDict(extra="forbid")


def _absolute(path: Path) -> Path:
    return path.expanduser().absolute()


# A path in a manifest, made absolute against the directory the command runs in, so that the
# saved manifest means the same thing wherever a task later runs.
AbsolutePath = Annotated[Path, AfterValidator(_absolute)]

SYSTEM_FOLDERS = tuple(Path(p) for p in ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys", "/usr"))


def _run_folder(path: Path) -> Path:
    """A folder runs may be written to: not a system folder, not a symlink loop, and writable
    (its nearest existing parent), checked before anything is submitted."""
    path = _absolute(path)
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError) as error:  # Python 3.11 raises RuntimeError on a symlink loop
        raise ValueError(f"{path} cannot be resolved ({error}); a symlink loop? Give a real folder") from None
    system = next((folder for folder in SYSTEM_FOLDERS if resolved == folder or folder in resolved.parents), None)
    if resolved == Path("/") or system is not None:
        raise ValueError(f"{path} is in the system folder {system or '/'}; give a folder of your own (scratch or "
                         "project space)")
    existing = next(folder for folder in (resolved, *resolved.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{existing} is a file, not a folder; give a folder for the runs")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing} is not writable by you; give a folder you can write to")
    return path


# Where runs are written.
RunFolder = Annotated[Path, AfterValidator(_run_folder)]


def _beside_manifest(path: Path, info: ValidationInfo) -> Path:
    """A path as its manifest means it: a relative one is read beside the manifest (the folder the
    validation context names as `manifest_dir`; without one, the working directory)."""
    path = path.expanduser()
    if not path.is_absolute():
        path = Path((info.context or {}).get("manifest_dir", Path.cwd())) / path
    return path.absolute()


class _UpstreamMark:
    """Marks the fields that name an upstream run, so that they can be found after validation."""


# The run of an earlier step, a field of a job's section: its directory, or the manifest that made
# it. Validation only places the path beside the manifest; loading the file then puts the run's
# directory in place of a manifest (common.manifest_file), and the saved manifest keeps that.
UpstreamRun = Annotated[Path, AfterValidator(_beside_manifest), _UpstreamMark()]


def upstream_runs(settings: BaseModel) -> dict[str, Path]:
    """The upstream runs a job's section names, by field (the UpstreamRun fields that are set)."""
    return {name: getattr(settings, name) for name, field in type(settings).model_fields.items()
            if _marked(field.annotation, field.metadata) and getattr(settings, name) is not None}


def _marked(annotation: Any, metadata: typing.Iterable[Any]) -> bool:
    """Whether an annotation (with its metadata) is UpstreamRun, alone or inside `X | None`."""
    return any(isinstance(item, _UpstreamMark) for item in metadata) or any(
        _marked(arg, getattr(arg, "__metadata__", ())) for arg in typing.get_args(annotation))


def shown(path: Path) -> str:
    """A path as a message shows it: relative to the working directory when it lies under it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class RunSettings(StrictModel):
    """Where a run lives and how its work is split."""

    root: RunFolder = Field(
        Path("runs"), description="folder holding run directories `<job>-<hash>/`"
    )
    dir: RunFolder | None = Field(
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
        "'apptainer exec --nv --bind /scratch image.sif python3' (None: this python, or `image`'s)",
    )
    image: AbsolutePath | None = Field(
        None,
        description="Apptainer image the tasks run in (a .sif file or sandbox folder built from "
        "containers/): tasks start `apptainer exec --nv --bind <run root>,<bind> <image> python3 -s -P`",
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

    def run_path(self) -> Path:
        """Where the run lives: run.dir, or `<run.root>/<job>-<run id>`; the manifest alone decides."""
        return self.run.dir or self.run.root / f"{self.job}-{self.run_id()}"

    def to_yaml(self) -> str:
        """The resolved manifest, every default filled, in the layout a user writes."""
        data = self.model_dump(mode="json")
        data[self.job] = data.pop("settings")
        return yaml.safe_dump(data, sort_keys=False)
