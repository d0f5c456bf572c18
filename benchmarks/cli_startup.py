"""How fast the CLI answers: `--help`, `jobs`, `plan` of paper manifests and `status`, against the
same commands of an earlier saebatch that imported torch, transformers and sae-lens up front.

    .venv/bin/python benchmarks/cli_startup.py [--baseline-ref 863d990] [--repeats 5]

The baseline is the commit `--baseline-ref` (the last one that imported every heavy package at
start), extracted with `git archive` into a temporary folder and run with the same Python. Each
command runs `--repeats` times, ours and the baseline's in turn (one warm-up run each first:
the file cache, and the sae-lens release list that ours keeps in the user's cache), and the
median wall time is reported. Rows go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results import REPO, Row, record  # noqa: E402

COMMANDS = {
    "saebatch --help": ["--help"],
    "saebatch jobs": ["jobs"],
    "saebatch plan (token_tracking, Llama-3.1-8B)": ["plan", "manifests/token_tracking_llama31_8b.yaml"],
    "saebatch plan (gambling_games, Llama-3.1-8B)": ["plan", "manifests/gambling_games_llama31_8b.yaml"],
    "saebatch status (a run of 2 shards)": ["status", "{run}"],
}


def seconds(tree: Path, args: list[str]) -> float:
    """Wall time of `python -m common.cli ARGS` run from `tree` (exit 1 of status is expected)."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=tree, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{tree}: saebatch {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - began


def prepared_run(root: Path) -> Path:
    """A run directory of the demo's token_tracking manifest, created but never run."""
    code = ("import sys; from pathlib import Path; from common.launcher import prepare_run; "
            "from common.manifest_file import load_manifest; "
            "print(prepare_run(load_manifest('manifests/demo/token_tracking.yaml', run_root=Path(sys.argv[1]))).path)")
    done = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-ref", default="863d990", help="the commit to compare with (default 863d990)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each command and side (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        baseline = Path(folder) / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline_ref], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        run = prepared_run(Path(folder) / "runs")
        rows = []
        for name, command in COMMANDS.items():
            command = [part.format(run=run) for part in command]
            times: dict[Path, list[float]] = {REPO: [], baseline: []}
            for tree in times:  # warm-up
                seconds(tree, command)
            for _ in range(args.repeats):
                for tree in times:
                    times[tree].append(seconds(tree, command))
            ours, theirs = statistics.median(times[REPO]), statistics.median(times[baseline])
            print(f"{name}: {ours:.2f} s against {theirs:.2f} s ({theirs / ours:.1f}x)")
            rows.append(Row(f"CLI start-up: {name}", ours=f"{ours:.2f} s",
                            baseline=f"{theirs:.2f} s (commit {args.baseline_ref}, heavy imports up front)",
                            ratio=f"{theirs / ours:.1f}x"))
    record(rows)


if __name__ == "__main__":
    main()
