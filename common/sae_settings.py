"""How an SAE is trained: the manifest's settings, kept apart from the trainer (common/sae_trainer.py)
so that validating and planning a manifest imports neither torch nor sae-lens."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.manifest import StrictModel

Activation = Literal["relu", "jumprelu", "topk", "none"]
Precision = Literal["auto", "float32", "tf32", "bf16"]


class TrainingConfig(StrictModel):
    """How one SAE is trained (the loss is defined in common/sae_trainer.py's docstring)."""

    activation: Activation = Field("relu", description="relu, jumprelu, topk, or none (linear: not sparse)")
    expansion_factor: int = Field(8, ge=1, description="d_sae = expansion_factor * d_in")
    l1_coefficient: float = Field(1e-4, ge=0, description="weight of the L1 sparsity term (ignored by topk)")
    decorrelation: float = Field(0.01, ge=0, description="weight of the mean squared feature correlation")
    k: int = Field(32, ge=1, description="topk: active features per token")
    aux_k: int = Field(0, ge=0, description="topk: dead features that reconstruct the residual in the AuxK loss (Gao "
                       "et al. 2024, who use d_in / 2); 0: no AuxK")
    aux_coefficient: float = Field(1 / 32, ge=0, description="topk with aux_k: weight of the AuxK loss")
    dead_after_tokens: int = Field(1_000_000, ge=1, description="a feature silent for this many training tokens is "
                                   "dead (for AuxK and resampling)")
    resample_every: int = Field(0, ge=0, description="steps between restarts of dead features (Bricken et al. 2023: "
                                "each takes the direction of an input the SAE reconstructs badly); 0: never")
    jumprelu_init_threshold: float = Field(0.05, ge=0, description="jumprelu: initial threshold, in pre-activation "
                                           "units (activations scaled to mean squared norm d_in)")
    jumprelu_bandwidth: float = Field(0.05, gt=0, description="jumprelu: width of the STE kernel, same units")
    epochs: int = Field(20, ge=1, description="passes over the training tokens")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (1% warm-up, linear decay over the last 20%)")
    batch_size: int = Field(4096, ge=2, description="tokens per step")
    shuffle_buffer_tokens: int = Field(2**19, ge=1, description="training tokens in memory at once (on the training "
                                       "device): the activations are streamed from storage a buffer of whole batches "
                                       "at a time and shuffled within it; a buffer that holds every training token "
                                       "is read once and shuffled whole each epoch")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="tokens held out for the reported metrics")
    log_every: int = Field(10, ge=1, description="steps between points of the loss curves")
    seed: int = Field(0, description="seed of the initialisation, split and batch order")
    checkpoint_every: int = Field(500, ge=0, description="checkpoints of the training state, from which a requeued "
                                  "task resumes to the same SAE, fall on multiples of this many steps; 0: none")
    checkpoint_minutes: float = Field(10, ge=0, description="a checkpoint is written at the first multiple of "
                                      "checkpoint_every steps this many minutes after the last (at GPU speed 500 "
                                      "steps take seconds, and a wide SAE's checkpoint is gigabytes); 0: at every "
                                      "multiple. Keep it under half of cluster.timeout_min")
    precision: Precision = Field("auto", description="the matmuls' precision: float32; tf32 (a GPU's tensor cores on "
                                 "float32); bf16 (autocast: bfloat16 matmuls, the decorrelation's too, with float32 "
                                 "weights, Adam state and reductions); auto: bf16 on a GPU (Ampere or later), else float32")

    def d_sae(self, d_in: int) -> int:
        return self.expansion_factor * d_in
