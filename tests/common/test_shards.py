"""Shards: resumable writing, and a strict check before any merge."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from common import shards
from common.atomic import publish_once
from common.errors import UserError
from common.plan import WorkUnit, make_plan
from common.shards import (
    ShardWriter,
    check_shards,
    merge_shards,
    shard_problem,
    stop_before_next_unit,
)
from tests.helpers import REPO


def write_shard(path, plan, index, unit_ids=None, finish=True):
    ids = list(plan.shards[index]) if unit_ids is None else unit_ids
    with ShardWriter(path, plan.run_id, plan.job, index, list(plan.shards[index])) as shard:
        for uid in ids:
            with shard.unit(uid) as group:
                group.create_dataset("x", data=np.arange(3) + int(uid[1:]))
        if finish:
            shard.finish()


@pytest.fixture
def plan():
    return make_plan("run1", "job", [WorkUnit(f"u{i}") for i in range(6)], 3)


def test_restart_skips_written_units_and_drops_half_written(tmp_path, plan):
    path = tmp_path / "shard_00000.h5"
    write_shard(path, plan, 0, unit_ids=["u0"], finish=False)
    partial = tmp_path / "shard_00000.h5.partial"
    with h5py.File(partial, "a") as f:  # a unit whose writer died mid-way
        f["units"].create_group("u1").create_dataset("x", data=[0])
    with ShardWriter(path, "run1", "job", 0, ["u0", "u1"]) as shard:
        assert shard.pending() == ["u1"]
        with shard.unit("u1") as group:
            group.create_dataset("x", data=np.arange(3) + 1)
        shard.finish()
    assert not partial.exists()
    with h5py.File(path) as f:
        assert f.attrs["complete"] and list(f["units"]) == ["u0", "u1"]
        np.testing.assert_array_equal(f["units/u1/x"][()], [1, 2, 3])


def test_a_task_told_to_stop_exits_before_its_next_unit_and_keeps_those_written(tmp_path, monkeypatch):
    """What a requeued task does when submitit's own exit was lost (common.launcher.ShardTask)."""
    monkeypatch.setattr(shards, "_exit_before_next_unit", [])
    with ShardWriter(tmp_path / "s.h5", "run1", "job", 0, ["u0", "u1"]) as shard:
        with shard.unit("u0") as group:
            group.create_dataset("x", data=[1])
        stop_before_next_unit(144)
        with pytest.raises(SystemExit) as stopped, shard.unit("u1"):
            pytest.fail("a unit started after the task was told to stop")
        assert stopped.value.code == 144 and shard.pending() == ["u1"]
    with ShardWriter(tmp_path / "s.h5", "run1", "job", 0, ["u0", "u1"]) as shard:
        monkeypatch.setattr(shards, "_exit_before_next_unit", [])  # the requeued task
        assert shard.pending() == ["u1"]


def test_failed_unit_leaves_no_group(tmp_path, plan):
    with ShardWriter(tmp_path / "s.h5", "run1", "job", 0, ["u0", "u1"]) as shard:
        with pytest.raises(RuntimeError):
            with shard.unit("u0") as group:
                group.create_dataset("x", data=[1])
                raise RuntimeError("GPU fell over")
        assert shard.pending() == ["u0", "u1"]
        with pytest.raises(RuntimeError, match="units missing"):
            shard.finish()


def test_unreadable_partial_is_kept_aside_and_the_shard_starts_over(tmp_path, plan, caplog):
    path = tmp_path / "shard_00000.h5"
    (tmp_path / "shard_00000.h5.partial").write_bytes(b"not hdf5 at all")
    write_shard(path, plan, 0)
    assert shard_problem(plan, 0, path) is None
    (aside,) = tmp_path.glob("shard_00000.h5.partial.unreadable-*")
    assert aside.read_bytes() == b"not hdf5 at all"
    assert "shard 0: partial file is unreadable (" in caplog.text and f"kept it as {aside}" in caplog.text


def test_another_runs_partial_is_kept_aside(tmp_path, plan):
    path = tmp_path / "shard_00000.h5"
    with ShardWriter(path, "other_run", "job", 0, ["u0"]) as shard:
        with shard.unit("u0") as group:
            group.create_dataset("x", data=[7])
    write_shard(path, plan, 0)
    (aside,) = tmp_path.glob("shard_00000.h5.partial.foreign-*")
    with h5py.File(aside) as kept:
        assert kept.attrs["run_id"] == "other_run" and list(kept["units"]) == ["u0"]


def test_set_aside_never_replaces_an_earlier_copy(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("first")
    kept = shards.set_aside(first, "damaged")
    first.write_text("second")
    kept_again = shards.set_aside(first, "damaged")
    assert kept != kept_again and (kept.read_text(), kept_again.read_text()) == ("first", "second")
    assert not second.exists()


HOLD_OPEN = """
import sys, h5py
with h5py.File(sys.argv[1], sys.argv[2]):  # HDF5's file locking on: the default, as `h5dump` or an old status
    print("open", flush=True)
    sys.stdin.readline()
"""


def _hold_open(path, mode):
    """A process that keeps `path` open with HDF5's file locks until it is sent a line."""
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(path), mode], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "open"
    return holder


def test_a_reader_holding_the_partial_open_does_not_cost_the_resuming_writer_its_units(tmp_path, plan, monkeypatch):
    """`saebatch status` reads partial files while tasks run; the task resumed meanwhile keeps its units."""
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    path = tmp_path / "shard_00000.h5"
    write_shard(path, plan, 0, unit_ids=["u0"], finish=False)
    reader = _hold_open(shards.partial_path(path), "r")
    try:
        with ShardWriter(path, plan.run_id, plan.job, 0, list(plan.shards[0])) as shard:
            assert shard.pending() == ["u1"]
    finally:
        reader.communicate("done\n", timeout=60)
    assert list(tmp_path.glob("*.unreadable-*")) == []


def test_status_reads_a_partial_that_a_writer_holds_with_hdf5_locks(tmp_path, plan, monkeypatch):
    from common.status import _partial_progress

    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    path = tmp_path / "shard_00000.h5"
    write_shard(path, plan, 0, unit_ids=["u0"], finish=False)
    writer = _hold_open(shards.partial_path(path), "a")
    try:
        assert _partial_progress(shards.partial_path(path), 2) == "1/2 units written"
    finally:
        writer.communicate("done\n", timeout=60)


def shard_paths(tmp_path, plan):
    paths = [tmp_path / f"shard_{k:05d}.h5" for k in range(len(plan.shards))]
    for k, path in enumerate(paths):
        write_shard(path, plan, k)
    return paths


def test_sound_shards_pass(tmp_path, plan):
    check_shards(plan, shard_paths(tmp_path, plan))


def test_missing_truncated_and_foreign_shards_are_named(tmp_path, plan):
    paths = shard_paths(tmp_path, plan)
    paths[0].unlink()
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    other = make_plan("run2", "job", [WorkUnit(f"u{i}") for i in range(6)], 3)
    write_shard(paths[2], other, 2)
    with pytest.raises(UserError) as error:
        check_shards(plan, paths)
    text = str(error.value)
    assert "shard 0 missing" in text
    assert "shard 1 truncated or corrupt" in text
    assert "shard 2 foreign" in text and "run2" in text


def test_duplicate_and_incomplete_and_stray_shards_are_named(tmp_path, plan):
    paths = shard_paths(tmp_path, plan)
    with h5py.File(paths[1], "a") as f:  # shard 1 also holds a unit of shard 0
        f["units"].create_group("u0").attrs["complete"] = True
    with h5py.File(paths[2], "a") as f:
        f.attrs["complete"] = False
    (tmp_path / "shard_00007.h5").write_bytes(paths[0].read_bytes())
    with pytest.raises(UserError) as error:
        check_shards(plan, paths)
    text = str(error.value)
    assert "shard 1 duplicate: holds units planned for other shards: ['u0']" in text
    assert "shard 2 incomplete" in text
    assert "stray shard file not in the plan" in text and "shard_00007.h5" in text


def test_partial_shard_is_reported_as_unfinished(tmp_path, plan):
    paths = shard_paths(tmp_path, plan)
    paths[2].unlink()
    write_shard(paths[2], plan, 2, unit_ids=["u4"], finish=False)
    with pytest.raises(UserError, match=r"shard 2 missing: .*\(a partial file exists"):
        check_shards(plan, paths)


def test_second_writer_of_a_shard_is_refused(tmp_path):
    path = tmp_path / "shard_00000.h5"
    with ShardWriter(path, "run1", "job", 0, ["u0"]):
        with pytest.raises(UserError, match="another writer of shard 0 is running right now"):
            with ShardWriter(path, "run1", "job", 0, ["u0"]):
                pass
    with ShardWriter(path, "run1", "job", 0, ["u0"]) as shard:  # free again once the first is done
        assert shard.pending() == ["u0"]


def test_pending_batches_are_cut_from_the_whole_plan(tmp_path):
    units = [WorkUnit(f"u{i}") for i in range(5)]
    with ShardWriter(tmp_path / "s.h5", "run1", "job", 0, [u.id for u in units]) as shard:
        for uid in ("u0", "u1", "u3"):
            with shard.unit(uid):
                pass
        batches = [[u.id for u in batch] for batch in shard.pending_batches(units, 2)]
    assert batches == [["u2", "u3"], ["u4"]]  # u3 is recomputed with u2, as in the first run


def test_merged_file_keeps_data_attributes_not_shard_bookkeeping(tmp_path, plan):
    paths = shard_paths(tmp_path, plan)
    for path in paths:
        with h5py.File(path, "a") as f:
            f.attrs["model"] = "tiny"
    merge_shards(paths, tmp_path / "merged.h5")
    with h5py.File(tmp_path / "merged.h5") as merged:
        assert merged.attrs["format"] == "saebatch-merged/1" and merged.attrs["model"] == "tiny"
        assert merged.attrs["run_id"] == "run1" and merged.attrs["n_shards"] == 3
        assert not {"shard_index", "complete", "unit_ids", "host"} & set(merged.attrs)
        assert sorted(merged["units"]) == [f"u{i}" for i in range(6)]
        np.testing.assert_array_equal(merged["units/u4/x"][()], [4, 5, 6])


def test_the_first_published_choice_is_the_one_every_shard_reads(tmp_path):
    shared = tmp_path / "choice.json"
    assert publish_once(shared, "first") == "first"
    assert publish_once(shared, "second") == "first"
    assert shared.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["choice.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert shared.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as a plain write would leave it


KINDS = {  # a dataset of each kind the jobs write, each with values found nowhere else in the file
    "float64": dict(data=np.linspace(1234.5, 2345.5, 64)),
    "int64_counts": dict(data=np.arange(7_000_000, 7_000_064, dtype=np.int64)),
    "gzip_float32": dict(data=np.linspace(-3, 3, 4096, dtype=np.float32).reshape(64, 64), compression="gzip",
                         chunks=(64, 64)),
    "int_index": dict(data=np.arange(900_000, 900_128, dtype=np.int32)),
    "strings": dict(data=[f"reply number {i} of the distinctive corpus" for i in range(16)],
                    dtype=h5py.string_dtype()),
}


def _flip_a_byte_of(path, dataset: str) -> None:
    """Flip one byte inside `dataset`'s stored values, found where HDF5 put them."""
    with h5py.File(path, "r") as file:
        item = file[dataset]
        if item.dtype.kind == "O":
            offset, needle = None, b"reply number 7 of the distinctive corpus"
        elif item.chunks:
            offset, needle = item.id.get_chunk_info(0).byte_offset + 40, None
        else:
            offset, needle = item.id.get_offset() + 13, None
    data = bytearray(path.read_bytes())
    offset = data.index(needle) + 6 if offset is None else offset
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_flipped_byte_in_any_dataset_kind_is_caught_and_named(tmp_path, kind):
    plan = make_plan("run1", "job", [WorkUnit("u0")], 1)
    path = tmp_path / "shard_00000.h5"
    with ShardWriter(path, "run1", "job", 0, ["u0"]) as shard:
        with shard.unit("u0") as group:
            for name, spec in KINDS.items():
                group.create_dataset(f"data/{name}", **spec)
        shard.finish()
    check_shards(plan, [path])  # sound as written
    assert shard_problem(plan, 0, path) is None
    _flip_a_byte_of(path, f"units/u0/data/{kind}")
    with pytest.raises(UserError, match=rf"shard 0 corrupt: 1 dataset\(s\) damaged on disk:\n    {path}: unit u0, "
                                        rf"dataset u0/data/{kind}: (values differ from their digest|unreadable)"):
        check_shards(plan, [path])


def test_a_partial_file_is_readable_before_its_first_unit(tmp_path):
    """A writer killed (no close, no flush of its own) right after it started leaves a readable file."""
    path = tmp_path / "shard_00000.h5"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from pathlib import Path; from common.shards import ShardWriter\n"
        f"writer = ShardWriter(Path({str(path)!r}), 'run1', 'job', 0, ['u0']).__enter__()\n"
        "os._exit(9)")], cwd=REPO)
    assert killed.returncode == 9
    with h5py.File(tmp_path / "shard_00000.h5.partial", "r") as file:
        assert file.attrs["run_id"] == "run1" and list(file["units"]) == []
