"""The top-activating token positions of many features over a token stream, exactly and in flat memory.

Per feature: its `k` largest activations, each with its corpus position and a context window
(token ids and the feature's activation on each), a histogram of its non-zero activations on
fixed log-spaced bins, the count of tokens it is active on, and the sum of its activations.

The order is total: a larger activation first, and among equal ones the earlier corpus position.
Positions are added in corpus order, and a stable sort of [kept, new] keeps equal values in that
order; so the top k of the whole stream is the top k of the tops of its parts, merged in corpus
order (`merge`), however the stream was cut. The counts and the histogram add up exactly; the
float64 sums are added in corpus order. Nothing grows with the stream: memory is O(features x k x
context) on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import h5py
import numpy as np

from common.lazy import lazy_import
from common.sparse import COMPRESSION

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

# Bin edges of the activation histograms, the same for every feature and run (so that counts add
# up across shards): 20 bins per decade from 1e-3 to 1e3; a value below the first edge counts in
# the first bin, one above the last edge in the last.
HISTOGRAM_EDGES = np.logspace(-3, 3, 121)
EMPTY = -1  # the position and token id of an empty slot (fewer than k active tokens) or context cell


@dataclass
class TopActivations:
    """Running statistics of `features` features; tensors are (features, k) and (features, k, width)."""

    value: torch.Tensor              # (F, k) activations, largest first; -inf in empty slots
    position: torch.Tensor           # (F, k) corpus positions of the token, int64
    context: torch.Tensor            # (F, k, width) token ids around it (EMPTY outside its window)
    context_activation: torch.Tensor  # (F, k, width) the feature's activation on each of them
    histogram: torch.Tensor          # (F, bins) counts of positive activations, int64
    active: torch.Tensor             # (F,) tokens with a positive activation, int64
    total: torch.Tensor              # (F,) sum of the positive activations, float64 (mean when active: total / active)
    tokens: int = 0

    @classmethod
    def zeros(cls, features: int, k: int, width: int, device: torch.device | str = "cpu") -> TopActivations:
        bins = len(HISTOGRAM_EDGES) - 1
        return cls(value=torch.full((features, k), -torch.inf, device=device),
                   position=torch.full((features, k), EMPTY, dtype=torch.long, device=device),
                   context=torch.full((features, k, width), EMPTY, dtype=torch.int32, device=device),
                   context_activation=torch.zeros((features, k, width), device=device),
                   histogram=torch.zeros((features, bins), dtype=torch.long, device=device),
                   active=torch.zeros(features, dtype=torch.long, device=device),
                   total=torch.zeros(features, dtype=torch.float64, device=device))

    def add(self, values: torch.Tensor, positions: torch.Tensor, context: torch.Tensor, context_rows: torch.Tensor) -> None:
        """Add (rows, F) activations of consecutive tokens, later in the stream than any added before.

        `positions` (rows,) are their corpus positions, ascending; `context` (rows, width) the token
        ids of each row's context window and `context_rows` (rows, width) the row of each of those
        tokens (EMPTY where the window has none).
        """
        values = values.float()
        features, k = self.value.shape
        active = values > 0
        self.tokens += len(values)
        self.active += active.sum(dim=0)
        self.total += values.clamp(min=0).sum(dim=0, dtype=torch.float64)  # a signed feature's negatives are inactive
        rows, columns = torch.nonzero(active, as_tuple=True)
        edges = torch.as_tensor(HISTOGRAM_EDGES, dtype=torch.float32, device=values.device)
        bins = (torch.bucketize(values[rows, columns], edges, right=True) - 1).clamp(0, len(edges) - 2)
        self.histogram.view(-1).index_add_(0, columns * (len(edges) - 1) + bins, torch.ones_like(bins))

        candidates = torch.cat([self.value, values.masked_fill(~active, -torch.inf).T], dim=1)  # (F, k + rows)
        order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :k]
        new = order >= k
        kept = order.clamp(max=k - 1)
        row = (order - k).clamp(min=0)
        feature = torch.arange(features, device=values.device)[:, None, None]
        rows_around = context_rows.to(values.device)[row]  # (F, k, width)
        around = values[rows_around.clamp(min=0), feature.expand_as(rows_around)].masked_fill(rows_around < 0, 0)
        self.value = candidates.gather(1, order)
        self.position = torch.where(new, positions.to(values.device)[row], self.position.gather(1, kept))
        wide = kept[..., None].expand_as(self.context)
        self.context = torch.where(new[..., None], context.to(values.device, torch.int32)[row],
                                   self.context.gather(1, wide))
        self.context_activation = torch.where(new[..., None], around, self.context_activation.gather(1, wide))

    def merge(self, later: TopActivations) -> TopActivations:
        """These statistics and those of a later part of the stream, as if added in one pass."""
        k = self.value.shape[1]
        candidates = torch.cat([self.value, later.value], dim=1)
        order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :k]
        wide = order[..., None].expand(-1, -1, self.context.shape[2])
        return TopActivations(
            value=candidates.gather(1, order),
            position=torch.cat([self.position, later.position], dim=1).gather(1, order),
            context=torch.cat([self.context, later.context], dim=1).gather(1, wide),
            context_activation=torch.cat([self.context_activation, later.context_activation], dim=1).gather(1, wide),
            histogram=self.histogram + later.histogram, active=self.active + later.active,
            total=self.total + later.total, tokens=self.tokens + later.tokens)

    def write(self, group: h5py.Group) -> None:
        group.attrs["tokens"] = self.tokens
        for name in ("value", "position", "context", "context_activation", "histogram", "active", "total"):
            data = getattr(self, name).cpu().numpy()
            group.create_dataset(name, data=data, **(COMPRESSION if data.ndim > 1 else {}))

    @classmethod
    def read(cls, group: h5py.Group) -> TopActivations:
        arrays = {name: torch.from_numpy(group[name][()]) for name in
                  ("value", "position", "context", "context_activation", "histogram", "active", "total")}
        return cls(**arrays, tokens=int(group.attrs["tokens"]))


def context_windows(lengths: list[int], before: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows that are the content tokens of consecutive windows of these `lengths`: each row's
    context as (rows, before + 1 + after) indices into the rows, and whether each cell is inside the
    row's own window (a context never reaches into a neighbouring window)."""
    offsets = np.arange(-before, after + 1)
    parts, inside = [], []
    start = 0
    for length in lengths:
        around = np.arange(length)[:, None] + offsets
        inside.append((around >= 0) & (around < length))
        parts.append(start + around)
        start += length
    if not parts:
        return np.zeros((0, len(offsets)), dtype=np.int64), np.zeros((0, len(offsets)), dtype=bool)
    return np.concatenate(parts), np.concatenate(inside)
