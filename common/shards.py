"""Shard files: written resumably by array tasks, checked strictly before any merge.

A task writes `shard_K.h5.partial`, one group per work unit under `/units/<id>`, flushing and
marking each unit complete as it goes. A restarted task reopens the partial file, drops any
half-written unit and skips the complete ones; a partial file it cannot read (or another run's) is
kept aside as `shard_K.h5.partial.unreadable-<time>` (`.foreign-<time>`), never deleted. When every
unit is in, the file gets its completeness mark and is renamed to `shard_K.h5`. A lock file keeps a
second process (a resubmitted task, a manual `saebatch run`) from writing the same shard at once.
Reduce merges only shards that pass `check_shards`: no missing, duplicate, foreign, truncated or
incomplete shard goes unnoticed.

Every dataset of a unit carries a digest of its values (attribute `digest`, BLAKE2b), written
when the unit completes. Reduce, and a task that finds its shard already written, read every
dataset back and compare: a flipped byte on disk is named (shard, unit, dataset), never merged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common import provenance
from common.errors import UserError
from common.locks import exclusive
from common.plan import Plan, WorkUnit

FORMAT = "saebatch-shard/1"
MERGED_FORMAT = "saebatch-merged/1"
# Shard bookkeeping that does not describe the merged data.
_SHARD_ONLY_ATTRS = {"format", "shard_index", "unit_ids", "complete", "started", "finished", "host", "devices",
                     "torch_threads", "attempts"}
# Files written in one go (merged.h5) use HDF5 1.10 object headers: about 2.7 KB less per dataset
# (readers need HDF5 >= 1.10). Partial shards keep the default format: a 1.10 file whose writer
# was killed stays marked "open for write" and cannot be reopened to resume.
LIBVER = "v110"
log = logging.getLogger(__name__)
_exit_before_next_unit: list[int] = []  # an exit code, once the task has been told to stop


def stop_before_next_unit(exit_code: int) -> None:
    """Make the shard being written exit with `exit_code` before it starts another unit."""
    _exit_before_next_unit.append(exit_code)


def partial_path(shard_path: Path) -> Path:
    """Where a shard is written until it is complete."""
    return shard_path.with_name(shard_path.name + ".partial")


def lock_path(shard_path: Path) -> Path:
    """The lock its writer holds while it writes a shard (and whose file names that writer)."""
    return shard_path.with_name(shard_path.name + ".lock")


class ShardWriter:
    """Writes the units of one shard; use as a context manager, then call `finish()`."""

    def __init__(self, path: Path, run_id: str, job: str, shard_index: int, unit_ids: list[str], locked: bool = False):
        """`locked`: the caller holds the shard's lock already (to check the finished shard under it)."""
        self.path = path
        self.locked = locked
        self.partial_path = partial_path(path)
        self.run_id, self.job, self.shard_index = run_id, job, shard_index
        self.unit_ids = list(unit_ids)
        self.file: h5py.File | None = None
        self._lock = ExitStack()

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.locked:
            self._lock.enter_context(exclusive(lock_path(self.path), f"another writer of shard {self.shard_index}",
                                               wait=False))
        self.file = self._open_partial()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self._lock.close()  # releases the lock

    def _open_partial(self) -> h5py.File:
        """The partial file, resumed when it is this shard's; one that cannot be resumed is kept aside.

        HDF5's own file locks are off: the shard's lock already keeps a second writer out, and with
        them on a reader (`saebatch status`) holding the file for a moment made this open fail.
        """
        if self.partial_path.exists():
            try:
                resumed = self._resume_partial()
                if resumed is not None:
                    return resumed
                label, why = "foreign", "belongs to another run"
            except OSError as error:  # killed while HDF5 metadata was being written
                label, why = "unreadable", f"is unreadable ({error})"
            aside = set_aside(self.partial_path, label)
            log.warning("shard %d: partial file %s; kept it as %s and starting over", self.shard_index, why, aside)
        file = h5py.File(self.partial_path, "w", locking=False)
        file.attrs.update(
            format=FORMAT, run_id=self.run_id, job=self.job, shard_index=self.shard_index,
            unit_ids=json.dumps(self.unit_ids), complete=False, started=provenance.now(),
        )
        _add_attempt(file)
        file.create_group("units")
        file.flush()  # readable from now on: a kill before the first unit loses nothing more
        return file

    def _resume_partial(self) -> h5py.File | None:
        """The partial file reopened without its half-written units, or None when it is another run's."""
        file = h5py.File(self.partial_path, "a", locking=False)
        try:
            if file.attrs.get("run_id") != self.run_id or file.attrs.get("shard_index") != self.shard_index:
                file.close()
                return None
            for unit_id in list(file.get("units", {})):
                if not file["units"][unit_id].attrs.get("complete", False):
                    log.info("shard %d: dropping half-written unit %s", self.shard_index, unit_id)
                    del file["units"][unit_id]
            log.info("shard %d: resuming, %d of %d units already written",
                     self.shard_index, len(self.done_units(file)), len(self.unit_ids))
            _add_attempt(file)
        except BaseException:
            file.close()
            raise
        return file

    @staticmethod
    def done_units(file: h5py.File) -> set[str]:
        return {uid for uid, group in file["units"].items() if group.attrs.get("complete", False)}

    def pending(self) -> list[str]:
        """Unit ids of this shard not yet written, in plan order."""
        done = self.done_units(self._file)
        return [uid for uid in self.unit_ids if uid not in done]

    def pending_batches(self, units: list[WorkUnit], size: int) -> Iterator[list[WorkUnit]]:
        """The batches of `size` that hold a unit still to write.

        Batches are cut from the shard's whole planned unit list, so that a resumed shard pads
        and batches exactly as an uninterrupted one would (GPU kernels depend on batch shape);
        write only the units that `pending()` names.
        """
        pending = set(self.pending())
        for start in range(0, len(units), size):
            batch = units[start : start + size]
            if any(unit.id in pending for unit in batch):
                yield batch

    @property
    def _file(self) -> h5py.File:
        if self.file is None:
            raise RuntimeError("ShardWriter used outside its `with` block")
        return self.file

    def shared_file(self, name: str) -> Path:
        """A file beside the shards that every shard of the run reads (e.g. a choice made once)."""
        return self.path.parent / name

    def get_attr(self, name: str, default: Any = None) -> Any:
        """An attribute set by `set_attrs` (also by an earlier attempt at this shard), else `default`."""
        return self._file.attrs.get(name, default)

    def set_attrs(self, **attrs: Any) -> None:
        """File-level attributes that make the shard readable on its own (model, SAE, ...)."""
        self._file.attrs.update(attrs)

    @contextmanager
    def unit(self, unit_id: str) -> Iterator[h5py.Group]:
        """A group to fill with one unit's data; it counts only if the block finishes."""
        if unit_id not in self.unit_ids:
            raise ValueError(f"unit {unit_id!r} is not planned for shard {self.shard_index}")
        if _exit_before_next_unit:
            log.info("shard %d: stopping before unit %s, as told", self.shard_index, unit_id)
            raise SystemExit(_exit_before_next_unit[0])
        units = self._file["units"]
        if unit_id in units:
            del units[unit_id]
        group = units.create_group(unit_id)
        try:
            yield group
        except BaseException:
            del units[unit_id]
            raise
        group.visititems(_write_digest)
        group.attrs["complete"] = True
        self._file.flush()
        done = len(self.unit_ids) - len(self.pending())
        log.info("shard %d: unit %s written (%d/%d)", self.shard_index, unit_id, done, len(self.unit_ids))

    def finish(self) -> Path:
        """Mark the shard complete and give it its final name."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"shard {self.shard_index} cannot finish; units missing: {missing}")
        self._file.attrs.update(complete=True, finished=provenance.now(), host=socket.gethostname())
        self._file.close()
        self.file = None
        os.replace(self.partial_path, self.path)
        return self.path


ASIDE_LABELS = ("damaged", "unreadable", "foreign")


def set_aside(path: Path, label: str) -> Path:
    """Rename `path` to `<name>.<label>-<time>` beside it (never over an earlier one): a file that
    cannot be used is kept for a person to look at, not deleted."""
    assert label in ASIDE_LABELS, label
    stem = f"{path.name}.{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = path.with_name(stem), 1
    while aside.exists():
        aside, n = path.with_name(f"{stem}-{n}"), n + 1
    os.replace(path, aside)
    return aside


def kept_aside(shards_dir: Path) -> list[Path]:
    """The shard files `set_aside` kept in `shards_dir`, oldest name first: `status` lists them, as
    nothing else will remove them."""
    return sorted(path for label in ASIDE_LABELS for path in shards_dir.glob(f"shard_*.h5*.{label}-*"))


def _add_attempt(file: h5py.File) -> None:
    """Record that a task (re)opened the shard, when and on which host: the run's timeline shows
    a shard that was stopped and resumed, and where each part of it ran."""
    attempts = json.loads(file.attrs.get("attempts", "[]"))
    attempts.append({"start": provenance.now(), "host": socket.gethostname()})
    file.attrs["attempts"] = json.dumps(attempts)


def digest(dataset: h5py.Dataset) -> str:
    """BLAKE2b of a dataset's dtype, shape and values (strings by their bytes)."""
    values = np.asarray(dataset[()])
    hashed = hashlib.blake2b(f"{dataset.dtype}{dataset.shape}".encode(), digest_size=16)
    if values.dtype == object:
        for item in values.flat:
            data = item if isinstance(item, bytes) else str(item).encode()
            hashed.update(len(data).to_bytes(8, "little") + data)
    else:
        hashed.update(np.ascontiguousarray(values).tobytes())
    return hashed.hexdigest()


def _write_digest(_name: str, item: h5py.Group | h5py.Dataset) -> None:
    if isinstance(item, h5py.Dataset):
        item.attrs["digest"] = digest(item)


def damaged_datasets(file: h5py.File, path: Path) -> list[str]:
    """The datasets of the file's units whose values no longer match their digest, or cannot be read."""
    damaged: list[str] = []

    def check(name: str, item: h5py.Group | h5py.Dataset) -> None:
        if not isinstance(item, h5py.Dataset) or "digest" not in item.attrs:  # shards from before digests
            return
        try:
            if digest(item) != item.attrs["digest"]:
                damaged.append(f"{path}: unit {name.split('/')[0]}, dataset {name}: values differ from their digest")
        except (OSError, ValueError, IndexError) as error:  # a corrupt compressed chunk or index
            damaged.append(f"{path}: unit {name.split('/')[0]}, dataset {name}: unreadable ({error})")

    file["units"].visititems(check)
    return damaged


def shard_problem(plan: Plan, index: int, path: Path, verify: bool = False) -> str | None:
    """What is wrong with the file that should hold shard `index`, or None if it is sound; with
    `verify`, every dataset is also read back against its digest."""
    if not path.exists():
        hint = " (a partial file exists: the task did not finish)" if partial_path(path).exists() else ""
        return f"shard {index} missing: {path}{hint}"
    try:
        with h5py.File(path, "r") as file:
            attrs = dict(file.attrs)
            units = {uid: bool(g.attrs.get("complete", False)) for uid, g in file.get("units", {}).items()}
            damaged = damaged_datasets(file, path) if verify and "units" in file else []
    except (OSError, KeyError, ValueError) as error:
        return f"shard {index} truncated or corrupt: {path} ({error})"
    if damaged:
        shown = "\n    ".join(damaged[:10]) + (f"\n    ... {len(damaged) - 10} more" if len(damaged) > 10 else "")
        return f"shard {index} corrupt: {len(damaged)} dataset(s) damaged on disk:\n    {shown}"
    if attrs.get("format") != FORMAT or attrs.get("run_id") != plan.run_id:
        return f"shard {index} foreign: {path} belongs to run {attrs.get('run_id')!r}, not {plan.run_id}"
    if attrs.get("shard_index") != index:
        return f"shard {index} foreign: {path} says it is shard {attrs.get('shard_index')}"
    if not attrs.get("complete", False):
        return f"shard {index} incomplete: {path} has no completeness mark"
    expected = list(plan.shards[index])
    absent = [uid for uid in expected if not units.get(uid, False)]
    if absent:
        return f"shard {index} incomplete: {path} lacks units {absent}"
    extra = [uid for uid in units if uid not in expected]
    if extra:
        duplicated = [uid for uid in extra if uid in {u for ids in plan.shards for u in ids}]
        kind = "duplicate: holds units planned for other shards" if duplicated else "foreign: holds unplanned units"
        return f"shard {index} {kind}: {extra}"
    return None


def check_shards(plan: Plan, shard_paths: list[Path]) -> None:
    """Raise a UserError naming every missing, truncated, foreign, incomplete or duplicate shard.

    `shard_paths[k]` is where shard k should be; stray shard files beside them are reported too.
    """
    problems = [p for k, path in enumerate(shard_paths) if (p := shard_problem(plan, k, path, verify=True))]
    if shard_paths:
        known = {p.name for p in shard_paths}
        for stray in sorted(shard_paths[0].parent.glob("shard_*.h5")):
            if stray.name not in known:
                problems.append(f"stray shard file not in the plan: {stray} (move it away)")
    if problems:
        raise UserError("cannot merge this run:\n  " + "\n  ".join(problems))


def merge_shards(shard_paths: list[Path], out_path: Path) -> None:
    """Copy every unit of the (checked) shards into one file, with the shards' shared attributes."""
    with h5py.File(out_path, "w", libver=LIBVER) as out:
        units = out.create_group("units")
        for path in shard_paths:
            with h5py.File(path, "r") as shard:
                if path == shard_paths[0]:
                    out.attrs.update({k: v for k, v in shard.attrs.items() if k not in _SHARD_ONLY_ATTRS})
                for unit_id in shard["units"]:
                    shard.copy(shard["units"][unit_id], units, name=unit_id)
        out.attrs.update(format=MERGED_FORMAT, n_shards=len(shard_paths), merged=provenance.now())
