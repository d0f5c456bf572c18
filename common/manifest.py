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
import os
import reprlib
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
from common.plan import only_estimating


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

        upstream = load_manifest(path, run_root=context.get("run_root"))
        run = RunDir.for_manifest(upstream).path
        _NAMED_RUNS[run] = (upstream, path)
        return run
    return path.absolute()


# The run of an earlier step (a directory, or its manifest), saved in the manifest as the directory.
UpstreamRun = Annotated[Path, AfterValidator(_upstream_run)]

def shown(path: Path) -> str:
    """A path as a message shows it: relative to the working directory when it lies under it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# Run directory -> (manifest, its file) for every upstream run named by its manifest in this
# process: what planning reads of a run that does not exist yet.
_NAMED_RUNS: dict[Path, tuple[Manifest, Path]] = {}


def upstream_manifest(run: Path, missing: UserError) -> tuple[Manifest, str]:
    """The manifest of the upstream run at `run` and where it was read: the run directory's saved
    manifest, or, before the run exists, the manifest file this process was given for it. Without
    either, `missing` (what says the run is missing) is raised with how to plan anyway."""
    saved = run / "manifest.yaml"
    if saved.is_file():
        from common.rundir import RunDir  # rundir imports this module

        return RunDir(run).load_manifest(), shown(saved)
    if run in _NAMED_RUNS:
        manifest, path = _NAMED_RUNS[run]
        return manifest, shown(path)
    raise UserError(f"{missing} (to plan before that run exists, name it by its manifest file rather than its run "
                    "directory)")


def upstream_to_estimate(run: Path, job: str, field: str, missing: UserError) -> tuple[Manifest, str]:
    """The manifest of an upstream run that does not exist yet (and where it was read), for a plan
    that estimates in its place; outside planning, `missing` is raised (common.plan.only_estimating)."""
    only_estimating(missing)
    manifest, where = upstream_manifest(run, missing)
    if manifest.job != job:
        raise UserError(f"{field}: {where} is a {manifest.job} manifest, not {job}")
    return manifest, where


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
    from common.registry import (
        get_job,  # the registry imports jobs/, which import this module
    )

    path = Path(path)
    raw = read_yaml(path)
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


MAX_MANIFEST_BYTES = 1_000_000
MAX_NODES = 100_000  # YAML nodes once aliases are expanded: far above any manifest, far below an alias bomb


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(f"key `{key}` is given twice in one mapping (lines {seen[key]} and {line}); keep one")
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """The YAML document of a manifest file, refusing what is not one: a directory, a missing or
    huge file, bytes that are not UTF-8, duplicate keys, aliases that expand past MAX_NODES nodes,
    nesting too deep to read."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise UserError(f"manifest {path} is a directory; give the path of a YAML manifest"
                        + (f" (it holds {', '.join(found)})" if found else ""))
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist (give the path of a YAML manifest)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"manifest {path} is {path.stat().st_size:,} bytes; a manifest is a short YAML file "
                        f"(at most {MAX_MANIFEST_BYTES:,} bytes)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"manifest {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                        f"{error.start}); save it as UTF-8 YAML") from None
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        _check_size(node, path)
        return _StrictLoader(text).get_single_data() if node is not None else None
    except _DuplicateKey as error:
        raise UserError(f"manifest {path}: {error}") from None
    except yaml.YAMLError as error:
        raise UserError(f"manifest {path} is not valid YAML: {error}") from None
    except RecursionError:
        raise UserError(f"manifest {path} nests too deeply to read; a manifest is a few levels of mappings") from None


def _check_size(root: yaml.Node | None, path: Path) -> None:
    """Count the nodes the document would expand to (an alias counts its whole target again),
    without expanding it; an alias inside its own anchor is refused."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # begun, their children not all counted yet
    stack = [(root, False)] if root is not None else []
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if not children_done and id(node) in open_nodes:
            raise UserError(f"manifest {path}: an alias refers to the value it is part of (line "
                            f"{node.start_mark.line + 1}); a manifest is a tree of values")
        children = [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(child), 0) for child in children)
            if sizes[id(node)] > MAX_NODES:
                raise UserError(f"manifest {path}: its aliases expand past {MAX_NODES:,} values (an alias bomb?); "
                                "write the values out or use fewer aliases")
        else:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)


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
            lines.append(f"  {where}: {item['msg']} (got {_SHORT_REPR.repr(item.get('input'))})")
    return "\n".join(lines)


# Bounded rendering of an invalid value: never the repr of a whole (possibly huge) input.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict = 2, 4, 4
_SHORT_REPR.maxstring, _SHORT_REPR.maxother, _SHORT_REPR.maxlong = 50, 50, 30


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
