"""The run directory: the one place that knows every output path of a run.

    runs/<job>-<run id>/   (Manifest.run_path: run.dir, or run.root/<job>-<run id>)
        manifest.yaml      resolved manifest (every default filled)
        provenance.json    code and package versions, host, times
        plan.json          work units and their shards
        shards/            shard_00000.h5 ... (shard_00000.h5.partial while being written)
        checkpoints/       a unit's state while it is computed, where a requeued task resumes
        logs/              jobs.json (what was submitted when) and submitit/ (each task's logs)
        merged.h5          written by reduce
        report/            written by reduce
        .submit.lock       held by the one submission of the run at a time (.reduce.lock: the reduce)

A job's reduce may write more beside merged.h5; those names are the job's own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from common import provenance
from common.atomic import write_text_atomic
from common.errors import UserError
from common.manifest import Manifest
from common.manifest_file import load_manifest
from common.plan import Plan


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path).absolute()

    manifest_path = property(lambda self: self.path / "manifest.yaml")
    provenance_path = property(lambda self: self.path / "provenance.json")
    plan_path = property(lambda self: self.path / "plan.json")
    shards_dir = property(lambda self: self.path / "shards")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    logs_dir = property(lambda self: self.path / "logs")
    jobs_path = property(lambda self: self.path / "logs" / "jobs.json")
    jobs_lock = property(lambda self: self.path / "logs" / ".jobs.lock")
    submitit_dir = property(lambda self: self.path / "logs" / "submitit")
    merged_path = property(lambda self: self.path / "merged.h5")
    report_dir = property(lambda self: self.path / "report")
    submit_lock = property(lambda self: self.path / ".submit.lock")
    reduce_lock = property(lambda self: self.path / ".reduce.lock")

    def shard_path(self, index: int) -> Path:
        return self.shards_dir / f"shard_{index:05d}.h5"

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> RunDir:
        return cls(manifest.run_path())

    @classmethod
    def of_shard(cls, shard_path: Path) -> RunDir:
        """The run whose shards/ holds the shard file at `shard_path` (see `shard_path`)."""
        return cls(Path(shard_path).parent.parent)

    def exists(self) -> bool:
        return self.manifest_path.is_file() and self.plan_path.is_file()

    def create(self, manifest: Manifest, plan: Plan) -> None:
        """Create the run directory, or reuse it when it holds this very manifest (then with the
        manifest's cluster settings, so that a resubmission with more memory or time gets them).

        The directory is built under a temporary name and renamed into place, so array tasks
        that start together agree on one run. A directory holding a different run (or anything
        else) is never written into.
        """
        if not self.path.exists() or not any(self.path.iterdir()):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the run from the group
            staged = RunDir(staging)
            staged.shards_dir.mkdir()
            staged.logs_dir.mkdir()
            staged.provenance_path.write_text(
                json.dumps({"run_id": manifest.run_id(), "created": provenance.collect()}, indent=1)
            )
            plan.save(staged.plan_path)
            staged.manifest_path.write_text(manifest.to_yaml())
            try:
                os.rename(staging, self.path)
                return
            except OSError:  # another task created it first
                shutil.rmtree(staging)
        if not self.exists():
            raise UserError(
                f"{self.path} exists and is not a saebatch run directory; it is left untouched. "
                "Set run.dir to a new or empty folder."
            )
        existing = self.load_manifest()
        if existing.run_id() != manifest.run_id():
            raise UserError(
                f"{self.path} holds run {existing.run_id()} of a different manifest "
                f"(this manifest is run {manifest.run_id()}); it is left untouched. "
                "Set run.dir to a new folder, or remove that one if you no longer need it."
            )
        if existing.cluster != manifest.cluster:  # not part of the run id: the latest submission's resources
            write_text_atomic(self.manifest_path, manifest.to_yaml())

    def load_manifest(self) -> Manifest:
        return load_manifest(self.manifest_path)

    def load_plan(self) -> Plan:
        return Plan.load(self.plan_path)

    def record_provenance(self, event: str) -> None:
        """Add what ran `event` (e.g. 'reduced') to provenance.json."""
        data = json.loads(self.provenance_path.read_text())
        data[event] = provenance.collect()
        write_text_atomic(self.provenance_path, json.dumps(data, indent=1))


def open_run(path: str | Path) -> RunDir:
    """A run directory given either the directory itself or a manifest whose run exists."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist (give a run directory under runs/ or a manifest file)")
    if path.is_dir():
        run = RunDir(path)
        if not run.exists():
            raise UserError(
                f"{path} is not a run directory (no manifest.yaml/plan.json); give a run "
                "directory under runs/ or a manifest file"
            )
        return run
    run = RunDir.for_manifest(load_manifest(path))
    if not run.exists():
        raise UserError(
            f"manifest {path} has no run yet (expected {run.path}); "
            f"start it with `saebatch submit {path}` or `saebatch run {path} --shard K`"
        )
    return run
