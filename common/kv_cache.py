"""A KV cache whose decode steps write into room reserved for them, instead of copying the cache.

transformers' DynamicCache grows by `torch.cat`: every step copies every layer's whole cache. At
512 rows of an 8B model with a 185-token prompt that is about 25 GB of memory traffic a step,
around half an H200 decode step's floor (issue 21). `reserved_cache` keeps the DynamicCache API
that generation uses (`batch_select_indices` as rows leave, `batch_repeat_interleave` for a shared
prefix) on layers that, whenever they must grow, allocate room for `room` more tokens and then
write each step's keys and values in place. Sliding-window layers (Gemma-2) keep their own class.

Import it where a model runs: it loads transformers (seconds), which the CLI's planning avoids.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def reserved_cache(model, room: int) -> DynamicCache:
    """An empty cache for `model` whose full-attention layers reserve `room` tokens as they grow."""
    cache = DynamicCache(config=model.config)
    cache.layers = [ReservedLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class ReservedLayer(DynamicLayer):
    """A DynamicLayer over buffers with room past their first `length` tokens, which `keys` and
    `values` view."""

    def __init__(self, room: int):
        super().__init__()
        self.room, self.length = room, 0
        self.buffers: tuple[torch.Tensor, ...] | None = None  # (keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.buffers is None or self.length + new > self.buffers[0].shape[-2]:
            self._allocate(self.length + new + self.room, key_states, value_states)
        assert self.buffers is not None  # allocated just above if it was not
        for buffer, states in zip(self.buffers, (key_states, value_states), strict=True):
            buffer[..., self.length : self.length + new, :] = states
        self.length += new
        self._show()
        return self.keys, self.values

    def _allocate(self, capacity: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        fresh = tuple(states.new_empty((*states.shape[:-2], capacity, states.shape[-1])) for states in (keys, values))
        if self.buffers is not None:
            for old, buffer in zip(self.buffers, fresh, strict=True):
                buffer[..., : self.length, :] = old[..., : self.length, :]
        self.buffers = fresh

    def _show(self) -> None:
        assert self.buffers is not None  # shown once allocated
        self.keys, self.values = (buffer[..., : self.length, :] for buffer in self.buffers)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length > 0 and self.buffers is not None:  # a length: the buffers hold it
            self.buffers = tuple(buffer[indices] for buffer in self.buffers)
            self._show()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length > 0 and self.buffers is not None:  # a length: the buffers hold it
            self.buffers = tuple(buffer.repeat_interleave(repeats, dim=0) for buffer in self.buffers)
            self._show()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.buffers[0].device) if self.buffers else beam_idx)

    def offload(self) -> None:
        if self.buffers is not None:
            self.buffers = tuple(buffer.to("cpu", non_blocking=True) for buffer in self.buffers)
            self._show()

    def prefetch(self) -> None:
        if self.buffers is not None and self.buffers[0].device != self.device:
            self.buffers = tuple(buffer.to(self.device, non_blocking=True) for buffer in self.buffers)
            self._show()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the (negative) number of tokens to remove, not {tokens_to_remove}")
        if tokens_to_remove < 0 and self.length > 0:
            self.length = max(0, self.length + tokens_to_remove)
            self._show()

    def reset(self) -> None:
        super().reset()
        self.length, self.buffers = 0, None
