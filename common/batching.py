"""How many rows a batched generation runs at once (`batch_size: auto`), and the memory they hold.

A row's memory peaks either in its prompt's forward (the MLP's activations, beside the KV cache
that forward fills, which reserves room for the answer at once: common/kv_cache.py) or at the last
decode step (that cache, and the step's float32 logits with their sampling noise) or in another
phase of the job that peaks on its own, plus what a job adds per row (an edit's SAE codes, say).
`auto` fills 85% of the GPU memory free once the model and SAEs are loaded; `saebatch plan`, which
runs where no GPU is, assumes an H200's memory. The model is of a generation on CUDA, the one device
whose memory `auto` measures; tests/common/test_batching.py checks it against a generation's peak on
the CPU, tests/test_gpu_paths.py on CUDA.
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
# the float32 logits, their noise's uniforms and three float32 temporaries of perturbing them, on CUDA where the
# noise's int64 hash is one compiled kernel (common/generation.py); on a CPU its operations hold 16 bytes more
STEP_BYTES_PER_LOGIT = 20

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


def forward_bytes(config: Architecture, dtype: str, tokens: int) -> int:
    """A row's activations at the peak of a forward of `tokens` tokens (in its MLP), the KV cache aside."""
    return tokens * (3 * config.intermediate_size + 4 * config.hidden_size) * DTYPE_BYTES[dtype]


def generation_memory(config: Architecture, dtype: str, fixed: int, prompt_tokens: int, new_tokens: int,
                      prompt_cached: bool = True, extra_per_row: int = 0, other_phase: int = 0) -> GenerationMemory:
    """The memory model of generating `new_tokens` after prompts of `prompt_tokens` in `dtype`.

    `prompt_cached`: each row runs its own prompt's forward, which fills its cache (`prefill`, or
    `sample` without a prefix). False: the rows share a prefix (`prompt_prefix`) run once for one row
    and then copied into every row's cache, so that no row's forward is longer than a token.
    Either way a row's cache holds prompt and answer from its first forward on. `other_phase`: a
    row's bytes in another phase of the job, which peaks on its own (`forward_bytes` for a forward
    of every row's prompt without a cache, say)."""
    cache = kv_cache_bytes(config, dtype, 1, prompt_tokens + new_tokens)
    prompt = (forward_bytes(config, dtype, prompt_tokens) + cache) if prompt_cached else 0
    last_step = cache + config.vocab_size * STEP_BYTES_PER_LOGIT
    return GenerationMemory(fixed, max(prompt, last_step, other_phase) + extra_per_row)


def planned_rows(batch_size: BatchSize, memory: GenerationMemory, rows_per_item: int = 1) -> int:
    """The rows a plan assumes run at once: the manifest's items of `rows_per_item` rows each, or
    the rows that fit an H200 (fewer than an item's where one item's rows do not fit)."""
    if batch_size != "auto":
        return batch_size * rows_per_item
    return memory.rows_fitting(H200_BYTES - memory.fixed)


def rows_note(rows: list[int], batch_size: BatchSize) -> str:
    """What a plan says of the rows its generate calls run at once (a range over its units)."""
    low, high = min(rows), max(rows)
    return (f"{low:,}" if low == high else f"{low:,}-{high:,}") + " rows a generate call" \
        + (" (batch_size auto, on an H200)" if batch_size == "auto" else "")


def rows_now(batch_size: BatchSize, memory: GenerationMemory, device: torch.device, rows_per_item: int = 1) -> int:
    """The rows to run at once on `device` now (the model and SAEs already on it): the manifest's
    items of `rows_per_item` rows each, or the rows that fit the free memory."""
    if batch_size != "auto":
        return batch_size * rows_per_item
    if device.type != "cuda":
        log.info("batch_size auto: %d rows on %s (its memory is not measured)", CPU_ROWS, device)
        return CPU_ROWS
    free = free_gpu_bytes(device)
    rows = memory.rows_fitting(free)
    log.info("batch_size auto: %d rows (%.1f GiB free on %s, %.1f MiB per row, planned peak %.1f GiB)",
             rows, free / 2**30, device, memory.per_row / 2**20, memory.peak(rows) / 2**30)
    return rows


def free_gpu_bytes(device: torch.device) -> int:
    """The bytes `device` can still give this process. PyTorch's allocator keeps what an earlier
    unit's work freed, which the driver counts as taken (a job's second unit would size its batch
    from a fraction); it gives it back first, as cached blocks with gaps in use could not hold a
    batch's large tensors anyway."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return free
