"""The run of an earlier step, read by a later step that plans ahead of it.

A step names the run it reads by its directory or by its manifest (common.manifest.UpstreamRun);
loading the step's manifest puts the run's directory in its place. While planning
(common.plan.estimating), a run that does not exist yet is read from its manifest instead.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from common.errors import UserError
from common.manifest import Manifest, shown
from common.manifest_file import named_manifest
from common.plan import only_estimating
from common.rundir import RunDir


def upstream_to_estimate(run: Path, job: str, field: str, missing: UserError) -> tuple[Manifest, str]:
    """The manifest of an upstream run that does not exist yet (and where it was read), for a plan
    that estimates in its place; outside planning, `missing` is raised (common.plan.only_estimating)."""
    only_estimating(missing)
    manifest, where = upstream_manifest(run, missing)
    if manifest.job != job:
        raise UserError(f"{field}: {where} is a {manifest.job} manifest, not {job}")
    return manifest, where


def upstream_manifest(run: Path, missing: UserError) -> tuple[Manifest, str]:
    """The manifest of the upstream run at `run` and where it was read: the run directory's saved
    manifest, or, before the run exists, the manifest file this process was given for it. Without
    either, `missing` (what says the run is missing) is raised with how to plan anyway."""
    saved = RunDir(run)
    if saved.manifest_path.is_file():
        return saved.load_manifest(), shown(saved.manifest_path)
    named = named_manifest(run)
    if named is not None:
        manifest, path = named
        return manifest, shown(path)
    raise UserError(f"{missing} (to plan before that run exists, name it by its manifest file rather than its run "
                    "directory)")


def open_merged(run: Path, job: str, field: str, missing: str) -> h5py.File:
    """The merged.h5 of the upstream run at `run`, which `job` must have written (`field` names it
    in errors; `missing` says what to run when it is not there yet, e.g. "run the games first")."""
    merged = run / "merged.h5"
    if not merged.is_file():
        raise UserError(f"{field}: {run} has no merged.h5; {missing} (saebatch submit <its manifest>) and wait for "
                        "its reduce")
    data = h5py.File(merged, "r")
    written = data.attrs.get("job")
    if written != job:
        data.close()
        raise UserError(f"{field}: {merged} was written by {written!r}, not {job}")
    return data
