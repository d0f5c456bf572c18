"""How long a plan takes on one H200, and what a whole chain of runs costs.

Each job's `estimate` states its work in device-independent terms (`Work`: tokens forwarded
through a model of a given size, tokens generated at a batch size, SAE training tokens at a
width, bytes read); this module alone knows the hardware and turns that work into seconds with
the table of rates below. Each rate says where it comes from: a measurement on an H200, or an
assumption. When benchmarks/gpu_paper_scale.py measures the jobs' own paths on a GPU, put its
figures here (it writes prose rows to benchmarks/RESULTS.md, not a table this module can read).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from common.launcher import plan_manifest
from common.manifest import load_manifest
from common.models import (
    DTYPE_BYTES,
    ModelSpec,
    load_config,
    parameter_count,
    text_config,
)
from common.plan import estimating

if TYPE_CHECKING:
    from common.manifest import Manifest
    from common.plan import Estimate, Plan

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


# ---------------------------------------------------------------- sizing a plan, and a chain of them


@dataclass
class PlanSize:
    """A manifest planned for its cost: the estimate of every shard (runtime on one H200 each) and
    of the whole run (output), and what was assumed in place of inputs not there yet."""

    path: str
    manifest: Manifest
    plan: Plan
    total: Estimate
    shards: list[Estimate]
    assumed: list[str] = field(default_factory=list)

    @property
    def shard_seconds(self) -> list[float]:
        return [work_seconds(estimate.work) for estimate in self.shards]

    @property
    def seconds(self) -> float:
        return sum(self.shard_seconds)

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.manifest.cluster.gpus_per_task / 3600

    @property
    def gpu_work_without_gpu(self) -> bool:
        """Timed as on an H200, but the tasks ask for no GPU (they would take far longer)."""
        on_gpu = any(work.kind not in ("load", "cpu_read") for estimate in self.shards for work in estimate.work)
        return on_gpu and not self.manifest.cluster.gpus_per_task

    @property
    def peak_memory(self) -> int:
        return max(estimate.task_memory_bytes for estimate in self.shards)

    @property
    def sources(self) -> list[str]:
        return rate_sources([work for estimate in self.shards for work in estimate.work])


def size_manifest(path: str) -> PlanSize:
    """Load, validate and plan a manifest (estimating in place of inputs that do not exist yet),
    then estimate each shard and the whole run."""
    with estimating() as assumed:
        manifest = load_manifest(path)
        job, plan = plan_manifest(manifest)
        shards = [job.estimate(manifest, plan.shard_units(index)) for index in range(len(plan.shards))]
        total = job.estimate(manifest, list(plan.units))
    return PlanSize(path, manifest, plan, total, shards, list(assumed))


def hours(seconds: float) -> str:
    """A duration for people: whole seconds under 90 s, whole minutes under 90 min, else hours to
    one decimal."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def runtime_lines(size: PlanSize) -> list[str]:
    """What `saebatch plan` says of a manifest's runtime: the total, the longest shard against the
    time limit, and the rates and assumptions behind the figures."""
    cluster = size.manifest.cluster
    longest = max(size.shard_seconds)
    if cluster.gpus_per_task:
        kind = f"{size.gpu_hours:.2f} GPU-hours"
    elif size.gpu_work_without_gpu:
        kind = "times on an H200, but the tasks ask for no GPU (cluster.gpus_per_task: 0): CPUs take far longer"
    else:
        kind = "CPU tasks, no GPU"
    lines = [(f"estimated runtime: {hours(longest)} for the longest shard, {hours(size.seconds)} for all "
              f"{len(size.shards)} together: {kind} (estimate: rates and assumptions below)")]
    if longest > cluster.timeout_min * 60:
        lines.append(f"  note: the longest shard's estimate exceeds cluster.timeout_min ({cluster.timeout_min} min): "
                     "raise it or use more shards (run.shards); a task stopped by its limit is requeued and resumes")
    lines += ["runtime rates:", *(f"  - {source}" for source in size.sources)]
    if size.assumed:
        lines += [("estimated in place of inputs that do not exist yet (upstream runs, data files; these figures "
                   "stay estimates until they exist):"),
                  *(f"  - {statement}" for statement in size.assumed)]
    return lines


def chain_report(sizes: list[PlanSize]) -> str:
    """Each step of a chain in brief (what it assumes that no earlier step stated, its estimate's
    notes), then a table of shards, runtime, GPU-hours and output summed over the steps; steps
    marked * rest on inputs that do not exist yet."""
    lines, stated = [], set()
    for step, size in enumerate(sizes, start=1):
        lines.append(f"step {step}: {size.plan.job} ({size.path}), run {size.plan.run_id}: "
                     f"{len(size.plan.units):,} units in {len(size.plan.shards)} shard(s); longest shard "
                     f"{hours(max(size.shard_seconds))}; {human_bytes(size.total.output_bytes)} output")
        lines += [f"  assumed: {statement}" for statement in size.assumed if statement not in stated]
        lines += [f"  note: {note}" for note in size.total.notes]
        stated |= set(size.assumed)
    rows = [(str(step), size.plan.job + ("*" if size.assumed else "") + ("!" if size.gpu_work_without_gpu else ""),
             str(len(size.plan.shards)), hours(size.seconds), f"{size.gpu_hours:.2f}", human_bytes(size.total.output_bytes))
            for step, size in enumerate(sizes, start=1)]
    rows.append(("total", "", str(sum(len(size.plan.shards) for size in sizes)), hours(sum(s.seconds for s in sizes)),
                 f"{sum(size.gpu_hours for size in sizes):.2f}", human_bytes(sum(s.total.output_bytes for s in sizes))))
    lines += ["", _table(["step", "job", "shards", "task time", "GPU-hours", "output"], rows)]
    if any(size.assumed for size in sizes):
        lines.append("* estimated: an input (an upstream run, a data file) does not exist yet; see 'assumed' above")
    if any(size.gpu_work_without_gpu for size in sizes):
        lines.append("! timed as on an H200, but its tasks ask for no GPU (cluster.gpus_per_task: 0): no GPU-hours "
                     "counted, and CPUs take far longer")
    sources = list(dict.fromkeys(source for size in sizes for source in size.sources))
    lines += ["(estimate: task time as on one H200; GPU-hours = task time x cluster.gpus_per_task; from these rates)",
              *(f"  - {source}" for source in sources)]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _table(header: list[str], rows: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell; numbers (all but the first two columns) right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(cell.ljust(width) if index < 2 else cell.rjust(width)
                                for index, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
                      for row in [tuple(header), *rows])
