"""Streaming co-moments (the feature_correlation job's accumulator) against collect-then-corrcoef.

    .venv/bin/python benchmarks/feature_correlation_streaming.py

SAE codes shaped like one Gemma Scope 16k layer: 16,384 features, 80 active per token,
feature frequencies falling off as a power law, drawn from a fixed seed in batches of 2,048
tokens (16 distinct batches, repeated beyond 32,768 tokens). Both paths receive the same batches and end with the full Pearson r matrix:

- ours: `SparseSums.add` per batch (the job's code), then the co-moments and r;
- baseline: the seed's way, every batch kept, then a correlation matrix of the concatenated float64
  codes (`torch.corrcoef`: numpy's threaded OpenBLAS crashes on a 16k x 16k product here).

Time counts the statistics only (drawing the codes is left out). Each path runs in its own
process, which reports its peak resident memory above what it held before the first batch, at 1x
and 10x the tokens. At 1x the two r matrices are compared. Rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import Row, record  # noqa: E402

from common.comoments import SparseSums  # noqa: E402

FEATURES, L0, BATCH, POOL = 16384, 80, 2048, 16


def batches(tokens: int, seed: int = 0):
    """SAE-like codes: each token draws L0 features from a power-law frequency profile.

    Drawing is slow, so POOL distinct batches are drawn once and then repeated in turn.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, FEATURES + 1, dtype=torch.float64) ** -0.8
    pool = []
    for start in range(0, tokens, BATCH):
        rows = min(BATCH, tokens - start)
        if len(pool) < POOL:
            active = torch.multinomial(weights.expand(rows, -1), L0, replacement=False, generator=generator)
            codes = torch.zeros(rows, FEATURES)
            codes.scatter_(1, active, torch.rand(rows, L0, generator=generator) * 3 + 0.1)
            pool.append(codes)
            yield codes
        else:
            yield pool[(start // BATCH) % POOL][:rows]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(path: str, tokens: int, save_r: str | None) -> dict:
    """One path over `tokens` tokens; seconds, peak memory above the start, and optionally r."""
    codes = list(batches(tokens)) if path == "naive" else None  # the naive path's input is its whole set
    start_rss = peak_rss_bytes()
    adding = 0.0
    if path == "streaming":
        sums = SparseSums.zeros(FEATURES)
        for batch in batches(tokens):
            began = time.perf_counter()
            sums.add(batch)
            adding += time.perf_counter() - began
        began = time.perf_counter()
        r = sums.comoments().pearson()
    else:
        began = time.perf_counter()
        data = torch.cat(codes).to(torch.float64)
        del codes
        r = torch.corrcoef(data.T).numpy()
    finishing = time.perf_counter() - began
    if save_r:
        np.save(save_r, r[:2000, :2000])  # a corner is enough to compare
    return {"seconds": adding + finishing, "adding": adding, "finishing": finishing,
            "peak_above_start": max(0, peak_rss_bytes() - start_rss)}


def naive_bytes(tokens: int) -> int:
    """The naive path's footprint: the codes and their centred copy in float64, and three F x F."""
    return 2 * tokens * FEATURES * 8 + 3 * FEATURES**2 * 8


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def run(path: str, tokens: int, save_r: str | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", path, "--tokens", str(tokens)]
    if save_r:
        command += ["--save-r", save_r]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens of the 1x run (10x is ten times that)")
    parser.add_argument("--worker", choices=["streaming", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--save-r", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.save_r)))
        return

    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for scale in (1, 10):
            tokens = args.tokens * scale
            ours = run("streaming", tokens, f"{folder}/ours.npy" if scale == 1 else None)
            print(f"{tokens} tokens, streaming: {ours}", flush=True)
            label = f"feature_correlation accumulation, {tokens:,} tokens ({scale}x) of SAE-like codes ({FEATURES:,} features, L0 {L0})"
            speed = (f"{tokens / ours['seconds']:,.0f} tok/s ({ours['seconds']:.1f} s: adding {ours['adding']:.1f} s, "
                     f"r from the sums {ours['finishing']:.1f} s)")
            memory = f"{ours['peak_above_start'] / 1e9:.2f} GB"
            if naive_bytes(tokens) > 0.8 * available_bytes():
                print(f"{tokens} tokens, collect + corrcoef: skipped, needs about {naive_bytes(tokens) / 1e9:.0f} GB", flush=True)
                missing = f"does not fit: needs about {naive_bytes(tokens) / 1e9:.0f} GB of {available_bytes() / 1e9:.0f} GB free"
                rows += [Row(f"{label}: tokens per second", speed, missing, "-"),
                         Row(f"{label}: peak memory above the start", memory, missing, "-")]
                continue
            naive = run("naive", tokens, f"{folder}/naive.npy" if scale == 1 else None)
            print(f"{tokens} tokens, collect + corrcoef: {naive}", flush=True)
            if scale == 1:
                a, b = np.load(f"{folder}/ours.npy"), np.load(f"{folder}/naive.npy")
                both = ~np.isnan(a) & ~np.isnan(b)
                speed += f"; max r difference {np.abs(a[both] - b[both]).max():.1e} over {both.sum():,} pairs"
            rows.append(Row(f"{label}: tokens per second", speed,
                            f"{tokens / naive['seconds']:,.0f} tok/s ({naive['seconds']:.1f} s, collect then corrcoef)",
                            f"{naive['seconds'] / ours['seconds']:.1f}x"))
            rows.append(Row(f"{label}: peak memory above the start", memory, f"{naive['peak_above_start'] / 1e9:.2f} GB",
                            f"{naive['peak_above_start'] / ours['peak_above_start']:.2f}x"))
    record(rows)
    for row in rows:
        print(" | ".join(row.cells()[:4]))


if __name__ == "__main__":
    main()
