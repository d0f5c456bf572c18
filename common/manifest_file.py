"""Reading a manifest file: safe YAML, validated against the job it names, then the runs it names.

Every problem is a UserError naming the field (or the file) and the fix, before anything runs.
Validation reads no other manifest; after it, each upstream run named by its manifest file is put
in place as that run's directory, the form the saved manifest keeps (and its hash covers). The
upstream manifest is remembered, so that a chain is planned before its earlier runs exist
(common.upstream reads it).
"""

from __future__ import annotations

import difflib
import reprlib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from common.errors import UserError
from common.manifest import Manifest, shown, upstream_runs
from common.registry import get_job

# Run directory -> (manifest, its file) of every upstream run named by its manifest in this
# process: what planning reads of a run that does not exist yet.
_NAMED_RUNS: dict[Path, tuple[Manifest, Path]] = {}


def load_manifest(path: str | Path, run_root: Path | None = None) -> Manifest:
    """Read and validate a manifest file, then resolve the upstream runs it names by manifest.

    `run_root` replaces the manifest's run.root (and that of the runs it names by manifest, as
    `saebatch demo` does).
    """
    return _load(Path(path), run_root, ())


def named_manifest(run: Path) -> tuple[Manifest, Path] | None:
    """The manifest, and its file, by which this process was given the run at `run` (None: not so)."""
    return _NAMED_RUNS.get(run)


def _load(path: Path, run_root: Path | None, naming: tuple[Path, ...]) -> Manifest:
    """`load_manifest` of `path`; `naming` holds the manifest files that led to it, outermost first."""
    manifest = _validated(path, run_root)
    naming = (*naming, path)
    runs = {}
    for field, upstream in upstream_runs(manifest.settings).items():
        if not upstream.is_file():
            continue  # not a manifest: the run's directory, as given
        if upstream.resolve() in {step.resolve() for step in naming}:
            chain = " -> ".join(shown(step) for step in (*naming, upstream))
            raise UserError(f"{manifest.job}.{field}: {shown(upstream)} leads back to itself ({chain}); name the run "
                            "of an earlier step")
        named = _load(upstream, run_root, naming)
        runs[field] = named.run_path()
        _NAMED_RUNS[runs[field]] = (named, upstream)
    return manifest.model_copy(update={"settings": manifest.settings.model_copy(update=runs)}) if runs else manifest


def _validated(path: Path, run_root: Path | None) -> Manifest:
    """The manifest file read and validated against its job's Settings; nothing else is read."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("job"), str):
        raise UserError(
            f"manifest {path}: the top level must be a mapping with a `job:` key naming the job "
            "(run `saebatch jobs` for the list)"
        )
    job_name = raw["job"]
    job = get_job(job_name)
    allowed = {"job", "run", "cluster", job_name}
    unknown = sorted(set(raw) - allowed, key=str)  # YAML reads `1:` and `yes:` as keys that are no strings
    if unknown:
        not_strings = [key for key in unknown if not isinstance(key, str)]
        raise UserError(
            f"manifest {path}: unknown top-level key(s) {', '.join(map(str, unknown))}; valid keys are "
            f"job, run, cluster and `{job_name}` (the job's own section)"
            + (f"; keys must be strings (YAML read {', '.join(map(repr, not_strings))} as "
               f"{', '.join(sorted({type(key).__name__ for key in not_strings}))}: quote them)" if not_strings else "")
        )
    data = {k: v for k, v in raw.items() if k != job_name}
    data["settings"] = raw.get(job_name) or {}
    if run_root is not None:
        data["run"] = {**(data.get("run") or {}), "root": str(run_root)}
    try:
        # ignore: the job's Settings specialises the generic model at run time, which mypy cannot follow
        return Manifest[job.Settings].model_validate(  # type: ignore[name-defined]
            data, context={"manifest_dir": path.parent.absolute()})
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
            parent = _model_at(Manifest[settings_cls], item["loc"][:-1])  # type: ignore[valid-type]  # see _validated
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
            parts.append(f"{name} (default: {_short(field.get_default(call_default_factory=True))})")
        else:
            parts.append(f"{name} (required)")
    return ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, (list, dict)) and len(value) > 3:
        return f"<{len(value)} entries>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
