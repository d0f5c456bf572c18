"""sae-lens's own trainer run the way ours runs: the independent reference for our trainer
(tests/common/test_sae_trainer.py) and its baseline (benchmarks/sae_trainer_throughput.py)."""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig

from common.activation_stream import Batches, DataOrder, training_moments
from common.sae_trainer import TrainingConfig, initial_weights, split_tokens


def train_with_sae_lens(activations: torch.Tensor, config: TrainingConfig,
                        init: Literal["ours", "sae-lens"]) -> tuple[StandardTrainingSAE, float, torch.Tensor]:
    """A ReLU SAE trained by `sae_lens.SAETrainer` + `StandardTrainingSAE` (L1 weighted by the
    decoder norms, like ours) on our trainer's training tokens, scaled as ours scales them, in our
    batch order, with our learning-rate schedule and no L1 warm-up; from our initial weights
    (init "ours") or from sae-lens's own (b_dec = 0). wandb off, no checkpoints.

    Returns the SAE (it takes scaled activations), the seconds `trainer.fit()` took, and our
    held-out tokens scaled likewise (L0, explained variance and dead features do not depend on the scale)."""
    split = split_tokens(len(activations), config)
    mean, mean_square = training_moments(activations, split.train_rows)
    d_in = activations.shape[1]
    scale = math.sqrt(d_in / mean_square)
    # drawn even for sae-lens's own start: the generator must reach the batch orders as ours does
    ours = initial_weights(mean, scale, config, split.generator, torch.device("cpu"))
    order = DataOrder(split.train_rows, config.batch_size, config.epochs, config.shuffle_buffer_tokens)
    steps = order.steps
    with torch.random.fork_rng():  # sae-lens draws its own start from torch's global generator
        torch.manual_seed(config.seed)
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=d_in, d_sae=config.d_sae(d_in), dtype="float32", device="cpu", apply_b_dec_to_input=True,
            normalize_activations="none", l1_coefficient=config.l1_coefficient, l1_warm_up_steps=0, lp_norm=1.0))
    if init == "ours":
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(ours, name))
    trainer_config = SAETrainerConfig(
        total_training_samples=steps * config.batch_size, train_batch_size_samples=config.batch_size, lr=config.lr,
        lr_end=config.lr, lr_scheduler_name="constant", lr_warm_up_steps=max(1, steps // 100),
        lr_decay_steps=steps - int(steps * 0.8), device="cpu", logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0, save_final_checkpoint=False)
    batches = (xs[0] for _, xs in Batches([activations], order, split.generator, 0, torch.device("cpu"), [scale]))
    trainer = SAETrainer(trainer_config, sae, batches)
    began = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - began
    sae.eval()
    return sae, seconds, activations[split.validation_rows].float() * scale
