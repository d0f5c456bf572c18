"""One TopK SAE training step (loss, backward) from the k features per token against the dense
computation, as the width grows at k 32, and as k grows at 131,072 features, on the CPU.

    .venv/bin/python benchmarks/topk_training.py

Both ways compute the same loss and gradients (tests/common/test_sae_trainer.py checks it): ours is
`common.topk_training.topk_terms` (k decoder rows summed, the encoder's backward a sparse product);
the baseline, the trainer's previous TopK path, builds the dense (batch x d_sae) features and
multiplies them by the decoder, with autograd's dense backward. d_in 256, batch 1,024, float32;
each way's median of 5 steps after 2 warm-up steps. Each row also splits ours into the encoder's
dense forward and top-k (x @ W_enc over every feature: what any TopK SAE pays, growing with the
width) and the rest, which should grow with k and not with the width. Rows go to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import Row, record  # noqa: E402

from common.sae_settings import TrainingConfig  # noqa: E402
from common.topk_training import topk_terms  # noqa: E402

D_IN, BATCH = 256, 1024
SHAPES = [(4096, 32), (16384, 32), (65536, 32), *((131072, k) for k in (16, 32, 64, 128))]  # (d_sae, k)


def dense_step(W_enc, b_enc, W_dec, b_dec, x, k: int) -> None:
    z = (x - b_dec) @ W_enc + b_enc
    top = z.topk(k)
    features = torch.zeros_like(z).scatter(1, top.indices, top.values.relu())
    (features @ W_dec + b_dec - x).pow(2).sum(1).mean().backward()


def sparse_step(W_enc, b_enc, W_dec, b_dec, x, k: int) -> None:
    topk_terms(W_enc, b_enc, W_dec, b_dec, x, TrainingConfig(activation="topk", k=k, decorrelation=0.0)) \
        .reconstruction.backward()


@torch.no_grad()
def encoder_forward(W_enc, b_enc, W_dec, b_dec, x, k: int) -> None:
    ((x - b_dec) @ W_enc + b_enc).topk(k)


def median_seconds(step, parameters, x, k: int) -> float:
    times = []
    for repeat in range(7):
        for p in parameters:
            p.grad = None
        started = time.perf_counter()
        step(*parameters, x, k)
        if repeat >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, D_IN, generator=g)
    rows = []
    for width, k in SHAPES:
        parameters = [torch.randn(D_IN, width, generator=g) * 0.05, torch.zeros(width),
                      torch.randn(width, D_IN, generator=g) * 0.05, torch.zeros(D_IN)]
        parameters = [p.requires_grad_(True) for p in parameters]
        ours, dense = median_seconds(sparse_step, parameters, x, k), median_seconds(dense_step, parameters, x, k)
        encoder = median_seconds(encoder_forward, parameters, x, k)
        rows.append(Row(f"TopK SAE training step (loss and backward), d_in {D_IN} x d_sae {width:,}, batch {BATCH:,}, "
                        f"k {k}, float32: from the k features per token against the dense features",
                        ours=f"{ours * 1e3:.1f} ms a step: {encoder * 1e3:.1f} ms the encoder's dense forward and "
                             f"top-k, {(ours - encoder) * 1e3:.1f} ms the rest",
                        baseline=f"{dense * 1e3:.1f} ms a step (dense features, autograd's backward)",
                        ratio=f"{dense / ours:.1f}x"))
        print(f"d_sae {width}, k {k}: ours {ours * 1e3:.1f} ms ({encoder * 1e3:.1f} ms encoder forward), "
              f"dense {dense * 1e3:.1f} ms", flush=True)
    record(rows)


if __name__ == "__main__":
    main()
