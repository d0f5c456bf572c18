"""How many rows a batched generation runs at once (`batch_size: auto`), and the memory they hold.

A row's memory peaks either in its prompt's forward (the MLP's activations, and the KV cache of
the prompt when that forward fills it) or at the last decode step (the KV cache over prompt and
answer, and the step's float32 logits with their sampling noise: the int64 hashing of
common/generation.py) or in another phase of the job that peaks on its own, plus what a job adds
per row (an edit's SAE codes, say). `auto` fills 85% of the
GPU memory free once the model and SAEs are loaded; `saebatch plan`, which runs where no GPU is,
assumes an H200's memory. tests/test_gpu_paths.py checks the model against a generation's peak.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from common.lazy import lazy_import
from common.models import DTYPE_BYTES, kv_cache_bytes

if TYPE_CHECKING:
    import torch

    from common.models import Architecture
else:
    torch = lazy_import("torch")

log = logging.getLogger(__name__)

H200_BYTES = 139 * 2**30  # what torch reports as an H200's total memory
USABLE_SHARE = 0.85  # of the free memory: the rest is left to the allocator's fragmentation and CUDA's workspaces
CPU_ROWS = 64
MAX_ROWS = 4096
STEP_BYTES_PER_LOGIT = 40  # logits in float32, their noise hashed in int64 (three tensors alive), the perturbed scores

BatchSize = Annotated[int, Field(ge=1)] | Literal["auto"]
AUTO_HELP = (f"or 'auto': as many as fit in the GPU memory free once the model and SAEs are loaded (on a CPU, "
             f"{CPU_ROWS} rows)")


@dataclass(frozen=True)
class GenerationMemory:
    """Bytes of a batched generation: `fixed` (weights, SAEs) and `per_row`."""

    fixed: int
    per_row: int

    def rows_fitting(self, free: int) -> int:
        """The rows that fit in `free` bytes (the fixed part already deducted)."""
        return max(1, min(MAX_ROWS, int(free * USABLE_SHARE) // self.per_row))

    def peak(self, rows: int) -> int:
        return self.fixed + rows * self.per_row


def generation_memory(config: Architecture, dtype: str, fixed: int, prompt_tokens: int, new_tokens: int,
                      prompt_cached: bool = True, extra_per_row: int = 0, other_phase: int = 0) -> GenerationMemory:
    """The memory model of generating `new_tokens` after prompts of `prompt_tokens` in `dtype`;
    `prompt_cached`: each row's prompt forward fills its cache (not so for a shared prefix, whose
    forward is one row's, and then copied into every row's cache); `other_phase`: a row's bytes in
    another phase of the job, which peaks on its own."""
    forward = prompt_tokens * (3 * config.intermediate_size + 4 * config.hidden_size) * DTYPE_BYTES[dtype]
    prompt = forward + (kv_cache_bytes(config, dtype, 1, prompt_tokens) if prompt_cached else 0)
    last_step = kv_cache_bytes(config, dtype, 1, prompt_tokens + new_tokens) + config.vocab_size * STEP_BYTES_PER_LOGIT
    return GenerationMemory(fixed, max(prompt, last_step, other_phase) + extra_per_row)


def planned_rows(batch_size: BatchSize, memory: GenerationMemory, rows_per_item: int = 1) -> int:
    """The batch a plan assumes: the manifest's number, or the items of `rows_per_item` rows that fit an H200."""
    if batch_size != "auto":
        return batch_size
    return max(1, memory.rows_fitting(H200_BYTES - memory.fixed) // rows_per_item)


def rows_now(batch_size: BatchSize, memory: GenerationMemory, device: torch.device, rows_per_item: int = 1) -> int:
    """The batch to run on `device` now (the model and SAEs already on it), in items of `rows_per_item` rows."""
    if batch_size != "auto":
        return batch_size
    if device.type != "cuda":
        log.info("batch_size auto: %d rows on %s (its memory is not measured)", CPU_ROWS, device)
        return max(1, CPU_ROWS // rows_per_item)
    free, _ = torch.cuda.mem_get_info(device)
    items = max(1, memory.rows_fitting(free) // rows_per_item)
    log.info("batch_size auto: %d rows (%.1f GiB free on %s, %.1f MiB per row, planned peak %.1f GiB)",
             items * rows_per_item, free / 2**30, device, memory.per_row / 2**20,
             memory.peak(items * rows_per_item) / 2**30)
    return items
