"""SAE training on one GPU at the seed's width, each configuration in float32 and in bf16, in one run.

    python benchmarks/sae_trainer_gpu.py           # a CUDA GPU: about a minute and a half on an H200
    python benchmarks/sae_trainer_gpu.py --smoke   # the same code at toy widths on the CPU; records nothing

Data: synthetic sparse activations (benchmarks/sae_trainer_throughput.py's generator at d_in 4,096:
non-negative mixtures of 8 of 4,096 unit directions, Zipf-like frequencies, noise and an offset),
so that explained variance, L0 and dead features mean something. The SAEs are 8x (32,768
features), batch 4,096, as issue 22 measured: ReLU, ReLU with the seed's decorrelation 0.01, and
TopK k 64. Each is trained by `common.sae_trainer.train_sae` from the same data, seed and batches
at `precision: float32` and `precision: bf16`; tokens/s is the rate train_sae reports (the
training loop alone), quality is measured on the same held-out tokens in float32 and checked
against the tolerances of the CPU test of bf16 against float32
(tests/common/test_sae_trainer.py::test_bf16_training_reaches_the_quality_of_float32): explained
variance within 0.02, L0 within 10%, dead features within 3 points; the script exits 1 if a
configuration misses them. A row per configuration goes to benchmarks/RESULTS.md: bf16 as ours,
float32 as the baseline, the check's verdict beside the speed-up. One more row
prices streaming: the ReLU SAE in bf16 trained from an HDF5 file of the float16 activations with a
shuffle buffer of a quarter of them, against the same float16 activations held on the GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import h5py
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sae_trainer_throughput as data  # noqa: E402
from results import Row, gpu_machine, record  # noqa: E402

from common.sae_trainer import TrainedSae, TrainingConfig, train_sae  # noqa: E402

CONFIGURATIONS = {
    "ReLU, decorrelation 0": {"activation": "relu", "decorrelation": 0.0, "l1_coefficient": 1.4},
    "ReLU, decorrelation 0.01 (the seed's)": {"activation": "relu", "decorrelation": 0.01, "l1_coefficient": 1.4},
    "TopK k 64": {"activation": "topk", "k": 64, "decorrelation": 0.0},
}


TOLERANCES = "EV +-0.02, L0 +-10%, dead +-3 points"


def quality_misses(ours: TrainedSae, baseline: TrainedSae) -> list[str]:
    """The held-out metrics on which `ours` strays from `baseline` beyond TOLERANCES (none: equal quality)."""
    a, b = ours.metrics, baseline.metrics
    within = {"EV": abs(a["explained_variance"] - b["explained_variance"]) <= 0.02,
              "L0": abs(a["l0"] - b["l0"]) <= 0.1 * b["l0"],
              "dead": abs(a["dead_fraction"] - b["dead_fraction"]) <= 0.03}
    return [name for name, ok in within.items() if not ok]


def verdict(misses: list[str]) -> str:
    return f"quality {'pass' if not misses else 'FAIL (' + ', '.join(misses) + ')'} ({TOLERANCES})"


def cell(trained: TrainedSae) -> str:
    m = trained.metrics
    return (f"{trained.tokens_per_second:,.0f} tok/s (held out: EV {m['explained_variance']:.3f}, L0 {m['l0']:.1f}, "
            f"dead {100 * m['dead_fraction']:.1f}%), {trained.precision}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy widths on the CPU, to check the script; records nothing")
    parser.add_argument("--tokens", type=int, default=270_000, help="tokens drawn (10%% held out)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU is visible: this benchmark measures GPUs (use --smoke to check it on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda:0")
    d_in, directions, tokens = (64, 256, 20_000) if args.smoke else (4096, 4096, args.tokens)
    x = data.activations(tokens, d_in=d_in, n_directions=directions).to(device)
    batch = 256 if args.smoke else 4096
    rows, failed = [], []
    for name, settings in CONFIGURATIONS.items():
        config = TrainingConfig(expansion_factor=8, epochs=2, lr=4e-3, batch_size=batch,
                                **settings | ({"k": 8} if args.smoke and "k" in settings else {}))
        train_sae(x[: batch * 3], config.model_copy(update={"epochs": 1}), "synthetic", "synthetic", device,
                  desc="warm-up")  # first-call allocations and kernel selection, not timed
        trained = {precision: train_sae(x, config.model_copy(update={"precision": precision}), "synthetic",
                                        "synthetic", device, desc=f"{name}, {precision}")
                   for precision in ("float32", "bf16")}
        misses = quality_misses(trained["bf16"], trained["float32"])
        if misses:
            failed.append(name)
        row = Row(f"SAE training on GPU, d_in {d_in:,} x 8 (d_sae {8 * d_in:,}), batch {batch:,}, "
                  f"{name}, synthetic sparse activations ({tokens:,} tokens x 2 epochs): bf16 autocast "
                  "against float32, same data, seed and batches",
                  ours=cell(trained["bf16"]), baseline=cell(trained["float32"]),
                  ratio=f"{trained['bf16'].tokens_per_second / trained['float32'].tokens_per_second:.1f}x; "
                        f"{verdict(misses)}")
        print(f"{row.benchmark}\n  ours: {row.ours}\n  baseline: {row.baseline}\n  ratio: {row.ratio}", flush=True)
        rows.append(row)
    rows.append(streaming_row(x, batch, "cpu" if args.smoke else "cuda:0"))
    if not args.smoke:
        for row in rows:
            row.machine = gpu_machine()
        record(rows)
    if failed:
        print(f"bf16 misses float32's quality ({TOLERANCES}): {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def streaming_row(x: torch.Tensor, batch: int, device: str) -> Row:
    """bf16 ReLU from an HDF5 file, a quarter of the tokens in the shuffle buffer, against the same
    float16 tokens in GPU memory."""
    config = TrainingConfig(expansion_factor=8, epochs=2, lr=4e-3, batch_size=batch, precision="bf16",
                            **CONFIGURATIONS["ReLU, decorrelation 0"])
    held = x.half()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "activations.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("L0", data=held.cpu().numpy(), chunks=(4096, x.shape[1]))
        in_memory = train_sae(held, config.model_copy(update={"shuffle_buffer_tokens": len(x)}), "synthetic",
                              "synthetic", torch.device(device), desc="in GPU memory")
        with h5py.File(path, "r") as f:
            streamed = train_sae(f["L0"], config.model_copy(update={"shuffle_buffer_tokens": len(x) // 4}),
                                 "synthetic", "synthetic", torch.device(device), desc="streamed")
    row = Row(f"SAE training streamed from HDF5 (float16 activations, d_in {x.shape[1]:,} x 8, batch {batch:,}, "
              f"ReLU, bf16, {len(x):,} tokens x 2 epochs): shuffle buffer of a quarter of the tokens, read back "
              "each epoch, against all of them held on the device",
              ours=cell(streamed), baseline=cell(in_memory),
              ratio=f"{streamed.tokens_per_second / in_memory.tokens_per_second:.2f}x")
    print(f"{row.benchmark}\n  ours: {row.ours}\n  baseline: {row.baseline}\n  ratio: {row.ratio}", flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
