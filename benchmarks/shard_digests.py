"""What the per-dataset digests of shards cost: writing a shard, and checking it before a merge.

    .venv/bin/python benchmarks/shard_digests.py

A shard of 40 units shaped like feature_correlation's (per unit: float64 co-moment blocks, int64
counts, a gzip-compressed float32 matrix; 3.4 MB a unit before compression) is written twice in one
run: through `ShardWriter`, which digests every dataset as its unit completes, and with plain h5py
(the same datasets, no digest: the baseline). Then `check_shards` is timed with the digests
verified (what reduce does) and without (the structural check alone). Rows go to RESULTS.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results import Row, record  # noqa: E402

from common.plan import WorkUnit, make_plan  # noqa: E402
from common.shards import ShardWriter, shard_problem  # noqa: E402

UNITS = 40


def unit_data(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {"comoments": rng.standard_normal((256, 256)), "counts": rng.integers(0, 10**6, 128 * 1024),
            "features": rng.standard_normal((512, 512)).astype(np.float32)}


def write(group: h5py.Group, data: dict[str, np.ndarray]) -> None:
    group.create_dataset("comoments", data=data["comoments"])
    group.create_dataset("counts", data=data["counts"])
    group.create_dataset("features", data=data["features"], compression="gzip", chunks=(128, 512))


def with_digests(path: Path, units: list[dict]) -> float:
    began = time.perf_counter()
    with ShardWriter(path, "bench", "bench", 0, [f"u{i}" for i in range(len(units))]) as shard:
        for i, data in enumerate(units):
            with shard.unit(f"u{i}") as group:
                write(group, data)
        shard.finish()
    return time.perf_counter() - began


def plain(path: Path, units: list[dict]) -> float:
    began = time.perf_counter()
    with h5py.File(path, "w") as file:
        for i, data in enumerate(units):
            write(file.create_group(f"units/u{i}"), data)
            file.flush()  # as ShardWriter flushes each unit
    return time.perf_counter() - began


def main() -> None:
    units = [unit_data(i) for i in range(UNITS)]
    plan = make_plan("bench", "bench", [WorkUnit(f"u{i}") for i in range(UNITS)], 1)
    with tempfile.TemporaryDirectory() as folder:
        digested, baseline = Path(folder) / "shard_00000.h5", Path(folder) / "plain.h5"
        plain(baseline, units[:2]), with_digests(Path(folder) / "warm.h5", units[:2])  # warm up
        ours, theirs = with_digests(digested, units), plain(baseline, units)
        size = digested.stat().st_size
        began = time.perf_counter()
        assert shard_problem(plan, 0, digested, verify=True) is None
        verified = time.perf_counter() - began
        began = time.perf_counter()
        assert shard_problem(plan, 0, digested) is None
        structural = time.perf_counter() - began
    label = f"shard digests, {UNITS} units of feature_correlation's shape ({size / 1e6:.0f} MB)"
    record([
        Row(f"{label}: writing the shard", f"{ours:.2f} s (digest of every dataset)", f"{theirs:.2f} s (plain h5py)",
            f"{theirs / ours:.2f}x"),
        Row(f"{label}: checking it before a merge", f"{verified:.2f} s (every dataset read back against its digest, "
            f"{size / 1e6 / verified:.0f} MB/s)", f"{structural:.3f} s (structure only)",
            f"{structural / verified:.3f}x"),
    ])
    print(f"write {ours:.2f} s with digests, {theirs:.2f} s plain; check {verified:.2f} s verified, "
          f"{structural:.3f} s structural")


if __name__ == "__main__":
    main()
