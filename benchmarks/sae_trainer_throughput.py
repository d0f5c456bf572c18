"""SAE training throughput and quality: the project's trainer against sae-lens's own trainer.

    .venv/bin/python benchmarks/sae_trainer_throughput.py

The same activations, architecture and hyper-parameters both ways, in one process, same torch
thread count:

- data: 200,000 synthetic SAE-like activations, d_in 512 (10% held out by our trainer's seed):
  each token a non-negative combination of 8 of 4,096 random unit directions (drawn with
  power-law frequencies, magnitudes uniform in [0.5, 2.5]), plus a shared offset and Gaussian
  noise, scaled to mean squared norm d_in;
- architecture: ReLU SAE, d_sae = 8 x 512 = 4,096, b_dec subtracted from the input;
- training: 3 epochs, batch 1,024 (525 steps; at batch 4,096 the 129 steps this CPU affords in
  a minute or two leave both SAEs far from trained), Adam lr 4e-3, L1 coefficient 1.4 (L0 near 15,
  against the data's 8); all settable by flags;
- ours: `common.sae_trainer.train_sae` with activation relu and decorrelation 0 (like for like:
  sae-lens has no decorrelation term), then again with the seed's decorrelation 0.01;
- baseline: `tests/sae_lens_reference.py`: `sae_lens.SAETrainer` + `StandardTrainingSAE` (ReLU +
  L1 weighted by the decoder row norms, as ours), fed exactly our training tokens in our batch
  order, with our learning-rate schedule (1% linear warm-up, linear decay to 0 over the last 20%),
  Adam with the same lr and batch size, no L1 warm-up, wandb off, no checkpoints.

The two trainers run the same algorithm (loss, initial weights, gradient clipping, Adam,
schedule), and from the same initial weights they reach the same SAE (tests/common/test_sae_trainer.py),
so what the like-for-like row compares is the loop: sae-lens also counts every feature's firing at
every step for its dead-feature statistics (a pass over the batch x d_sae activations). sae-lens
runs twice: from our initial weights (like for like) and from its own initialisation (b_dec = 0
instead of the data mean).

Time counts the training loop only: the span `train_sae` reports as tokens_per_second for ours,
`trainer.fit()` for sae-lens. Both SAEs are measured with `common.sae_quality.evaluate` on the
same held-out tokens (our trainer's validation split; ours by `train_sae` itself). Rows go to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import Row, record

from common.sae_quality import evaluate
from common.sae_trainer import TrainingConfig, train_sae
from tests.sae_lens_reference import train_with_sae_lens

D_IN, EXPANSION, DIRECTIONS, ACTIVE = 512, 8, 4096, 8
CPU = torch.device("cpu")


def activations(tokens: int, seed: int = 0, d_in: int = D_IN, n_directions: int = DIRECTIONS) -> torch.Tensor:
    """(tokens, d_in) float32: sparse non-negative mixtures of random unit directions, mean squared norm d_in."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_directions, d_in, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    frequency = 1.0 / torch.arange(1, n_directions + 1).float() ** 0.7
    frequency = frequency[torch.randperm(n_directions, generator=generator)]
    offset = 0.2 * torch.randn(d_in, generator=generator)
    parts = []
    for start in range(0, tokens, 8192):
        n = min(8192, tokens - start)
        active = torch.multinomial(frequency, n * ACTIVE, replacement=True, generator=generator).view(n, ACTIVE)
        magnitude = 0.5 + 2.0 * torch.rand(n, ACTIVE, generator=generator)
        x = (magnitude[..., None] * directions[active]).sum(1)
        parts.append(x + offset + 0.05 * torch.randn(n, d_in, generator=generator))
    x = torch.cat(parts)
    return x * math.sqrt(d_in / x.pow(2).sum(1).mean().item())


def cell(tokens_per_second: float, metrics: dict[str, float]) -> str:
    return (f"{tokens_per_second:,.0f} tok/s (L0 {metrics['l0']:.1f}, EV {metrics['explained_variance']:.3f}, "
            f"dead {100 * metrics['dead_fraction']:.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200_000, help="tokens drawn (10%% held out)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--l1", type=float, default=1.4)
    parser.add_argument("--skip-decorrelation", action="store_true")
    parser.add_argument("--no-record", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()

    x = activations(args.tokens)
    config = TrainingConfig(activation="relu", expansion_factor=EXPANSION, l1_coefficient=args.l1, decorrelation=0.0,
                            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    threads = torch.get_num_threads()
    # warm-up (first-call allocations and kernel selection), not timed: a few steps each way
    warm = x[: args.batch_size * 4 + args.batch_size // 2]
    train_sae(warm, config.model_copy(update={"epochs": 1}), "synthetic", "synthetic", CPU, desc="warm-up ours")
    train_with_sae_lens(warm, config.model_copy(update={"epochs": 1}), "ours")

    trained = train_sae(x, config, "synthetic", "synthetic", CPU, desc="ours, relu")
    validation = trained.validation
    train_tokens = (len(x) - len(validation)) // config.batch_size * config.batch_size * config.epochs
    our_rate, our_metrics = trained.tokens_per_second, trained.metrics
    print(f"scale {trained.scale:.5f}; ours {train_tokens / our_rate:.1f} s {our_metrics}")
    theirs = {}
    for init in ("ours", "sae-lens"):
        sae, seconds, held_out = train_with_sae_lens(x, config, init)
        theirs[init] = (train_tokens / seconds, evaluate(sae, held_out, config.batch_size))
        print(f"sae-lens, {init} init: {seconds:.1f} s {theirs[init][1]}")

    label = (f"SAE training, relu, d_in {D_IN} x {EXPANSION} (d_sae {config.d_sae(D_IN)}), synthetic, "
             f"{len(x) - len(validation):,} train tokens x {config.epochs} epochs, batch {config.batch_size}, "
             f"lr {config.lr:g}, L1 {config.l1_coefficient:g}")
    ours_cell = cell(our_rate, our_metrics) + ", decorrelation 0"
    rows = [Row(f"{label}: tokens/s (held-out L0, EV, dead), like for like",
                ours_cell, cell(*theirs["ours"]) + ", sae-lens SAETrainer from our initial weights",
                f"{our_rate / theirs['ours'][0]:.2f}x"),
            Row(f"{label}: tokens/s (held-out L0, EV, dead), sae-lens's own init",
                ours_cell, cell(*theirs["sae-lens"]) + ", sae-lens SAETrainer from its own init (b_dec 0)",
                f"{our_rate / theirs['sae-lens'][0]:.2f}x")]
    if not args.skip_decorrelation:
        decorrelated = train_sae(x, config.model_copy(update={"decorrelation": 0.01}), "synthetic", "synthetic", CPU,
                                 desc="ours, decorrelation")
        dec_rate, dec_metrics = decorrelated.tokens_per_second, decorrelated.metrics
        print(f"decorrelation 0.01: {train_tokens / dec_rate:.1f} s {dec_metrics}")
        rows.append(Row(f"{label}: cost of the decorrelation penalty 0.01 (tokens/s, L0, EV, dead)",
                        cell(dec_rate, dec_metrics) + ", ours, decorrelation 0.01",
                        cell(our_rate, our_metrics) + ", ours, decorrelation 0",
                        f"{dec_rate / our_rate:.2f}x"))
    for row in rows:
        row.machine += f", {threads} torch threads"
        print(" | ".join(row.cells()[:4]))
    if not args.no_record:
        record(rows)


if __name__ == "__main__":
    main()
