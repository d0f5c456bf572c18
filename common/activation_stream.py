"""Training activations streamed from storage: a seeded order of batches that never needs more
than a shuffle buffer of rows in memory, and can be replayed from any step without reading.

A source is an HDF5 dataset (tokens, d_in), read a slice at a time, or a tensor in memory. The
training rows are cut, in file order, into blocks of one batch each. Each epoch:

- when the shuffle buffer holds every training row, they are read once (and kept for every
  epoch) and each epoch's batches are a random permutation of them, as an in-memory trainer draws;
- otherwise the blocks are drawn in a random order, `buffer_tokens // batch_size` at a time; the
  rows of those blocks are read (contiguous slices) and permuted, and cut into batches.

Blocks are whole batches, so every buffer but the one holding the shorter last block divides into
batches, and an epoch has `training rows // batch_size` steps either way. The order is drawn from
the caller's generator and depends on nothing read, so a resumed run replays it up to its
checkpoint's step and reads only what it still trains on.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    import h5py

Source = Union["h5py.Dataset", torch.Tensor]
READ_SPAN = 65536  # rows: the longest slice read at once
GAP_READ = 64      # rows: a gap this short inside a slice is read through


def read_rows(source: Source, rows: torch.Tensor) -> torch.Tensor:
    """The source's rows at the ascending positions `rows`, read as contiguous slices of at most
    READ_SPAN rows; a gap of up to GAP_READ rows (held-out tokens) is read and dropped rather than
    split into another slice."""
    parts = []
    for start, end in _slices(rows):
        first = int(rows[start])
        span = torch.as_tensor(source[first : int(rows[end - 1]) + 1])
        parts.append(span[rows[start:end] - first])
    return torch.cat(parts) if parts else torch.as_tensor(source[0:0])


def _slices(rows: torch.Tensor) -> Iterator[tuple[int, int]]:
    """(start, end) indices into `rows` of each slice read."""
    bounds = [0, *(torch.nonzero(rows.diff() > GAP_READ + 1).flatten() + 1).tolist(), len(rows)]
    for start, stop in zip(bounds, bounds[1:]):
        while start < stop:
            end = start + int(torch.searchsorted(rows[start:stop], rows[start] + READ_SPAN))
            yield start, end
            start = end


def training_moments(source: Source, rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The mean row and the mean squared norm of the rows at `rows`, in float64, one slice at a time."""
    total = torch.zeros(source.shape[1], dtype=torch.float64)
    squares = 0.0
    for start in range(0, len(rows), READ_SPAN):
        part = read_rows(source, rows[start : start + READ_SPAN]).double()
        total += part.sum(0).cpu()
        squares += float(part.pow(2).sum())
    return total / len(rows), squares / len(rows)


@dataclass(frozen=True)
class Buffer:
    """A shuffle buffer: the positions of its rows in the source (ascending) and, for each of its
    steps, which of its rows make that step's batch."""

    rows: torch.Tensor
    batches: torch.Tensor   # (steps, batch_size) indices into `rows`
    first_step: int


@dataclass(frozen=True)
class DataOrder:
    """The batches of every epoch over the training rows `rows` (ascending source positions)."""

    rows: torch.Tensor
    batch_size: int
    epochs: int
    buffer_tokens: int

    @property
    def steps(self) -> int:
        return len(self.rows) // self.batch_size * self.epochs

    @property
    def in_memory(self) -> bool:
        return len(self.rows) <= self.buffer_tokens

    def buffers(self, generator: torch.Generator) -> Iterator[Buffer]:
        """Every epoch's buffers in order; draws from `generator` as it goes."""
        step, size = 0, self.batch_size
        blocks = self.rows.split(size)
        per_buffer = max(1, self.buffer_tokens // size)
        for _ in range(self.epochs):
            if self.in_memory:
                chosen = [torch.randperm(len(self.rows), generator=generator)]
                positions = [self.rows]
            else:
                order = torch.randperm(len(blocks), generator=generator).tolist()
                groups = [sorted(order[i : i + per_buffer]) for i in range(0, len(order), per_buffer)]
                positions = [torch.cat([blocks[b] for b in group]) for group in groups]
                chosen = [torch.randperm(len(rows), generator=generator) for rows in positions]
            for rows, permutation in zip(positions, chosen, strict=True):
                steps = len(rows) // size
                yield Buffer(rows, permutation[: steps * size].view(steps, size), step)
                step += steps


class Batches:
    """The scaled float32 training batches of sources that share rows (the layers of one model),
    from step `start` on: each buffer read from every source once, the next one read in the
    background while this one trains; a buffer that holds every row is read once for all epochs."""

    def __init__(self, sources: list[Source], order: DataOrder, generator: torch.Generator, start: int,
                 device: torch.device, scales: list[float]):
        self.sources, self.order, self.generator = sources, order, generator
        self.start, self.device, self.scales = start, device, scales

    def _read(self, buffer: Buffer) -> list[torch.Tensor]:
        return [read_rows(source, buffer.rows).to(self.device) for source in self.sources]

    def _needed(self) -> Iterator[Buffer]:
        """The buffers holding a step from `start` on (the order is drawn for the skipped ones too)."""
        return (b for b in self.order.buffers(self.generator) if b.first_step + len(b.batches) > self.start)

    def __iter__(self) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(step, one batch per source) for every step from `start`."""
        kept: list[torch.Tensor] | None = None
        with ThreadPoolExecutor(max_workers=1) as reader:
            needed = self._needed()
            buffer = next(needed, None)
            reading = reader.submit(self._read, buffer) if buffer is not None else None
            while buffer is not None and reading is not None:
                data = kept if kept is not None else reading.result()
                kept = data if self.order.in_memory else None
                upcoming = next(needed, None)
                if upcoming is not None and kept is None:
                    reading = reader.submit(self._read, upcoming)
                for offset, batch in enumerate(buffer.batches):
                    step = buffer.first_step + offset
                    if step >= self.start:
                        rows = batch.to(self.device)
                        yield step, [part[rows].float() * scale for part, scale in zip(data, self.scales, strict=True)]
                buffer = upcoming
