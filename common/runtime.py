"""How long work takes on one H200.

Each job's `estimate` states its work in device-independent terms (`Work`: tokens forwarded
through a model of a given size, tokens generated at a batch size, SAE training tokens at a
width, bytes read); this module alone knows the hardware and turns that work into seconds with
the table of rates below (common.sizing adds them up for a plan and a chain). Each rate says where
it comes from: a measurement on an H200, or an assumption. When benchmarks/gpu_paper_scale.py
measures the jobs' own paths on a GPU, put its figures here (it writes prose rows to
benchmarks/RESULTS.md, not a table this module can read).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from common.models import (
    DTYPE_BYTES,
    ModelSpec,
    load_config,
    parameter_count,
    text_config,
)

# ---------------------------------------------------------------- the rates (one H200)

LLAMA31_8B_PARAMETERS = 8_030_261_248  # meta-llama/Llama-3.1-8B, the model the decode rate was measured on
DECODE_STEP_S = 0.120  # per decode step at 512 rows (issue 21: job's path, 85.6 answers/s of 50 tokens)
DECODE_ROWS = 512
DECODE_PER_ROW_SHARE = 0.64  # of that step: per-row text work that does not grow with the model (issue 21)
BF16_FLOPS = 790e12  # H200 dense bf16/fp16 peak, as issue 22 bounds the trainer with
FP32_FLOPS = 67e12  # H200 fp32 peak without TF32 (NVIDIA's data sheet)
MODEL_FLOPS_UTILISATION = 0.4  # assumed share of the peak that batched forwards reach: not measured here
HBM_BYTES_PER_S = 4.8e12  # H200 memory bandwidth (data sheet): a decode step reads every weight once
LOAD_BYTES_PER_S = 2e9  # assumed: weights read from the node's HF cache into the GPU
CPU_READ_BYTES_PER_S = 100e6  # assumed: compressed HDF5 read and reduced by one CPU task
CHARS_PER_TOKEN = 4  # assumed, where a text's tokens are not counted: English with these models' tokenizers
SAE_REFERENCE_WIDTH = 4096 * 32768  # d_in x d_sae of the measured SAE training rates (batch 4,096, float32)
SAE_TRAINING_TOKENS_PER_S = {  # issue 22: `train_sae` as sae_training calls it, random activations
    "relu": 28_968,
    "relu+decorrelation": 19_248,  # decorrelation 0.01 (its cost does not depend on the coefficient)
    "topk": 29_791,  # k = 64
}

Kind = Literal["load", "forward", "gradient", "decode", "sae_training", "cpu_read"]

RATE_SOURCES: dict[Kind, str] = {
    "decode": (f"generation: {DECODE_STEP_S * 1000:.0f} ms per decode step of {DECODE_ROWS} rows, measured on one "
               "H200 with random-weight Llama-3.1-8B in bf16 on the jobs' generation path before their own decode "
               "loop (issue 21: 85.6 answers/s of 50 tokens; an upper bound until benchmarks/gpu_paper_scale.py "
               f"measures the loop); {DECODE_PER_ROW_SHARE:.0%} of it is per-row work taken as the same for any model, "
               f"the rest scaled by parameters, and never less than reading the weights once at "
               f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s. Every answer is taken to run to max_new_tokens (an upper bound)"),
    "forward": (f"forwards (prompts, capture): 2 x parameters FLOP per token at {MODEL_FLOPS_UTILISATION:.0%} of "
                f"the H200's peak ({BF16_FLOPS / 1e12:.0f} TFLOP/s bf16/fp16, {FP32_FLOPS / 1e12:.0f} fp32): an "
                "assumption, not a measurement"),
    "gradient": "gradients: 6 x parameters FLOP per token (forward and backward) at the same assumed share of peak",
    "sae_training": ("SAE training: tokens/s measured on one H200 at d_in 4,096 x 32,768, batch 4,096 (issue 22: ReLU "
                     "28,968; with decorrelation 19,248; TopK 29,791), scaled by d_in x d_sae; jumprelu and the "
                     "linear `none` taken at ReLU's rate"),
    "load": (f"loading: weights (and sae_training's stored activations) read at an assumed "
             f"{LOAD_BYTES_PER_S / 1e9:.0f} GB/s, once per shard"),
    "cpu_read": f"CPU work: stored features read and reduced at an assumed {CPU_READ_BYTES_PER_S / 1e6:.0f} MB/s per task",
}


@dataclass(frozen=True)
class ModelSize:
    """What the rates need of a model: its name, weights and dtype."""

    name: str
    parameters: int
    dtype: str = "bfloat16"

    @property
    def weight_bytes(self) -> int:
        return self.parameters * DTYPE_BYTES[self.dtype]

    @property
    def peak_flops(self) -> float:
        return FP32_FLOPS if self.dtype == "float32" else BF16_FLOPS


@functools.lru_cache(maxsize=64)
def _model_size(spec_json: str) -> ModelSize:
    spec = ModelSpec.model_validate_json(spec_json)
    return ModelSize(spec.name, parameter_count(text_config(load_config(spec)[0])), spec.dtype)


def model_size(spec: ModelSpec) -> ModelSize:
    """The model's size from its config (no weights loaded; remembered per spec)."""
    return _model_size(spec.model_dump_json())


def sae_size(d_in: int, d_sae: int, layers: int = 1, dtype: str = "float32") -> ModelSize:
    """SAE encoders as a 'model' for forward work: d_in x d_sae multiply-adds per token and layer."""
    return ModelSize(f"{layers} SAE(s) {d_in} x {d_sae}", d_in * d_sae * layers, dtype)


@dataclass(frozen=True)
class Work:
    """One kind of work a shard does, in terms no device enters.

    amount: bytes (load, cpu_read), tokens (forward, gradient), generated tokens (decode: `rows`
    sequences advance together, so amount / rows steps), or training tokens over every epoch
    (sae_training, at `width` = d_in x d_sae and `variant`, a key of SAE_TRAINING_TOKENS_PER_S).
    """

    kind: Kind
    amount: float
    model: ModelSize | None = None
    rows: int = 1
    width: int = 0
    variant: str = ""
    label: str = ""


def seconds(work: Work) -> float:
    """The work's time on one H200, from the rates above."""
    if work.kind == "load":
        return work.amount / LOAD_BYTES_PER_S
    if work.kind == "cpu_read":
        return work.amount / CPU_READ_BYTES_PER_S
    if work.kind == "sae_training":
        return work.amount * work.width / (SAE_TRAINING_TOKENS_PER_S[work.variant] * SAE_REFERENCE_WIDTH)
    model = work.model
    if model is None:
        raise ValueError(f"{work.kind} work needs the model it runs on")
    if work.kind in ("forward", "gradient"):
        flop_per_token = (2 if work.kind == "forward" else 6) * model.parameters
        return work.amount * flop_per_token / (MODEL_FLOPS_UTILISATION * model.peak_flops)
    if work.kind == "decode":
        return work.amount / work.rows * decode_step_seconds(work.rows, model)
    raise ValueError(f"unknown kind of work {work.kind!r}; known: {', '.join(RATE_SOURCES)}")


def decode_step_seconds(rows: int, model: ModelSize) -> float:
    """One decode step of `rows` sequences: the measured step's per-row share as it is, the rest
    scaled by the model's parameters, and never faster than reading every weight once."""
    per_row = DECODE_STEP_S * DECODE_PER_ROW_SHARE / DECODE_ROWS
    per_row_parameter = DECODE_STEP_S * (1 - DECODE_PER_ROW_SHARE) / DECODE_ROWS / LLAMA31_8B_PARAMETERS
    return rows * per_row + max(model.weight_bytes / HBM_BYTES_PER_S, rows * model.parameters * per_row_parameter)


def sae_variant(activation: str, decorrelation: float) -> str:
    """The measured rate an SAE configuration is timed at."""
    if decorrelation > 0:
        return "relu+decorrelation"
    return "topk" if activation == "topk" else "relu"


def work_seconds(work: tuple[Work, ...]) -> float:
    """A shard's time: its kinds of work one after another."""
    return sum(seconds(item) for item in work)


def rate_sources(works: list[Work]) -> list[str]:
    """The sources of the rates this work is timed with, in a fixed order."""
    kinds = {item.kind for item in works}
    return [source for kind, source in RATE_SOURCES.items() if kind in kinds]
