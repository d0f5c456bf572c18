"""Exact streaming statistics of one set of features seen together on the same rows (tokens).

Two stages, both in float64:

- `SparseSums` adds rows as they stream by, on the GPU when they come from one: counts, sums,
  squares, the products X^T X and the co-activation counts (both features above zero). Each row's
  non-zero pairs are scattered into dense accumulators, at a cost near L0^2 per row instead of
  F^2 (an SAE has an L0 near 100 of 16k features). A shard keeps one per work unit, stored sparse.
- `CoMoments` holds means and centred co-moments, merged with the pairwise formulas of Chan,
  Golub and LeVeque (1979), so any split of the rows into units and shards, merged in any order,
  gives the statistics of the whole to rounding.

Features of several layers are concatenated into one set: a layer pair is a block of the matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import h5py
import numpy as np

from common.lazy import lazy_import, no_grad
from common.sparse import COMPRESSION

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

# Features of a block: a range, or an array of indices.
Index = slice | np.ndarray


@dataclass
class CoMoments:
    """Statistics of F features over n rows."""

    n: int
    mean: np.ndarray       # (F,) float64
    m2: np.ndarray         # (F,) sum of squared deviations
    comoment: np.ndarray   # (F, F) sum of (x_i - mean_i)(x_j - mean_j)
    active: np.ndarray     # (F,) int64 rows where the feature is > 0
    coactive: np.ndarray   # (F, F) int64 rows where both are > 0

    @classmethod
    def empty(cls, features: int) -> CoMoments:
        zeros = np.zeros
        return cls(0, zeros(features), zeros(features), zeros((features, features)),
                   zeros(features, dtype=np.int64), zeros((features, features), dtype=np.int64))

    def merge(self, other: CoMoments) -> CoMoments:
        """The statistics of both row sets together (Chan et al.'s pairwise update)."""
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        weight = self.n * other.n / n
        comoment = self.comoment + other.comoment
        torch.from_numpy(comoment).addr_(torch.from_numpy(delta), torch.from_numpy(delta), alpha=weight)  # in place
        return CoMoments(
            n,
            self.mean + delta * other.n / n,
            self.m2 + other.m2 + weight * delta**2,
            comoment,
            self.active + other.active,
            self.coactive + other.coactive,
        )

    def variance(self) -> np.ndarray:
        """Population variance per feature (NaN without rows)."""
        return self.m2 / self.n if self.n else np.full_like(self.m2, np.nan)

    def pearson(self, rows: Index = slice(None), cols: Index = slice(None)) -> np.ndarray:
        """Pearson r of the block rows x cols; NaN where a feature never varies."""
        sd_rows, sd_cols = np.sqrt(np.maximum(self.m2[rows], 0)), np.sqrt(np.maximum(self.m2[cols], 0))
        with np.errstate(invalid="ignore", divide="ignore"):  # one block-sized array, divided in place
            r = _block(self.comoment, rows, cols) / sd_rows[:, None]
            r /= sd_cols[None, :]
        r[sd_rows == 0, :] = np.nan
        r[:, sd_cols == 0] = np.nan
        return np.clip(r, -1.0, 1.0, out=r)

    def mutual_information(self, rows: Index = slice(None), cols: Index = slice(None)) -> np.ndarray:
        """Mutual information (bits) between the active/inactive states of the block's pairs."""
        return mutual_information(self.n, _block(self.coactive, rows, cols), self.active[rows][:, None],
                                  self.active[cols][None, :])


def _block(matrix: np.ndarray, rows: Index, cols: Index) -> np.ndarray:
    """matrix[rows x cols]: slices make a view, index arrays their outer product's copy."""
    if isinstance(rows, slice) and isinstance(cols, slice):
        return matrix[rows, cols]
    return matrix[np.ix_(np.arange(len(matrix))[rows], np.arange(len(matrix))[cols])]


def mutual_information(n: int, both: np.ndarray, active_a: np.ndarray, active_b: np.ndarray) -> np.ndarray:
    """Bits shared by two binary variables over n rows, from their counts (arrays broadcast)."""
    both = both.astype(np.float64)
    only_a, only_b = active_a - both, active_b - both
    neither = n - both - only_a - only_b
    p_a, p_b = active_a / n, active_b / n
    total = np.zeros(np.broadcast(both, p_a, p_b).shape)
    for count, marginal_a, marginal_b in (
        (both, p_a, p_b), (only_a, p_a, 1 - p_b), (only_b, 1 - p_a, p_b), (neither, 1 - p_a, 1 - p_b),
    ):
        joint = count / n
        with np.errstate(invalid="ignore", divide="ignore"):
            term = joint * np.log2(joint / (marginal_a * marginal_b))
        total += np.where(joint > 0, term, 0.0)
    return np.maximum(total, 0.0)


@dataclass
class SparseSums:
    """Raw sums of F features over the rows added so far, kept on the device they were made on.

    The products and co-activation counts of each pair i <= j (the matrices are symmetric) sit in
    one packed upper triangle of F (F + 1) / 2 entries, float64 (counts are exact up to 2^53).
    Sparse rows add their non-zero pairs by scatter-adds; rows too dense for that (pooled
    sequences, say) add dense products instead.
    """

    # A scatter-add costs about as much as 30 dense multiply-adds: rows whose non-zeros exceed this
    # share of F are cheaper as dense products.
    DENSE_SHARE = 1 / 32

    n: int
    total: torch.Tensor    # (F,) float64
    squares: torch.Tensor  # (F,)
    active: torch.Tensor   # (F,) int64
    pairs: torch.Tensor    # (F (F + 1) / 2, 2): sum of x_i x_j and rows where both are > 0

    @classmethod
    def zeros(cls, features: int, device: torch.device | str = "cpu") -> SparseSums:
        def zeros(*shape, dtype=torch.float64):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(0, zeros(features), zeros(features), zeros(features, dtype=torch.int64),
                   zeros(features * (features + 1) // 2, 2))

    @property
    def features(self) -> int:
        return len(self.total)

    def _packed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Where pair (i, j), i <= j, sits: row i of the triangle starts after i rows of F, F-1, ..."""
        return i * self.features - i * (i - 1) // 2 + (j - i)

    def _row_starts(self) -> list[int]:
        """Where each row of the packed triangle starts (and, last, where the triangle ends)."""
        rows = torch.arange(self.features + 1)
        return self._packed(rows, rows).tolist()

    @no_grad
    def add(self, rows: torch.Tensor) -> None:
        """Add rows (rows x F, mostly zeros); the cost grows with the non-zeros per row squared."""
        if rows.ndim != 2 or rows.shape[1] != self.features:
            raise ValueError(f"rows have shape {tuple(rows.shape)}, the sums {self.features} features")
        x = rows.to(self.total.device)
        self.n += len(x)
        width = int((x != 0).sum(dim=1).max()) if len(x) else 0
        if width > self.DENSE_SHARE * self.features:
            self._add_dense(x.to(torch.float64))
        elif width > 0:
            self._add_sparse(x, width)

    def _add_sparse(self, x: torch.Tensor, width: int) -> None:
        # Each row's non-zeros, padded with some of its zeros, in ascending columns: grid cell
        # (p, q), p <= q, then holds a pair i <= j. The zeros add nothing anywhere below.
        columns = x.abs().topk(width, dim=1).indices.sort(dim=1).values
        values = x.gather(1, columns).to(torch.float64)
        on = (values > 0).to(torch.float64)
        flat = columns.reshape(-1)
        self.total.index_add_(0, flat, values.reshape(-1))
        self.squares.index_add_(0, flat, (values * values).reshape(-1))
        self.active.index_add_(0, flat, on.reshape(-1).to(torch.int64))
        p, q = torch.triu_indices(width, width, device=x.device)
        chunk = max(1, 2**24 // len(p))  # rows per scatter: about 16M pairs
        for start in range(0, len(x), chunk):
            v, o, c = values[start : start + chunk], on[start : start + chunk], columns[start : start + chunk]
            pair = torch.stack([v[:, p] * v[:, q], o[:, p] * o[:, q]], dim=-1)
            self.pairs.index_add_(0, self._packed(c[:, p], c[:, q]).reshape(-1), pair.reshape(-1, 2))

    def _add_dense(self, x: torch.Tensor) -> None:
        on = (x > 0).to(torch.float64)
        self.total += x.sum(dim=0)
        self.squares += (x * x).sum(dim=0)
        self.active += on.sum(dim=0).to(torch.int64)
        starts = self._row_starts()
        block = max(1, 2**24 // self.features)  # triangle rows per product: about 16M entries
        for first in range(0, self.features, block):
            last = min(first + block, self.features)
            products = x[:, first:last].T @ x[:, first:]
            counts = on[:, first:last].T @ on[:, first:]
            for i in range(first, last):  # row i of the triangle: columns i.. of the product's row
                self.pairs[starts[i] : starts[i + 1], 0] += products[i - first, i - first :]
                self.pairs[starts[i] : starts[i + 1], 1] += counts[i - first, i - first :]

    def _nonzero_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, products, counts) of the pairs i <= j whose sums are not zero, on the CPU."""
        nonzero = (self.pairs != 0).any(dim=1).nonzero().squeeze(1)
        pairs = self.pairs[nonzero].cpu().numpy()
        where = nonzero.cpu().numpy()
        starts = np.asarray(self._row_starts())
        i = np.searchsorted(starts, where, side="right") - 1
        return i, where - starts[i] + i, pairs[:, 0], pairs[:, 1].astype(np.int64)

    def comoments(self) -> CoMoments:
        """Means and centred co-moments of these rows (sums over one unit stay far from cancelling)."""
        if self.n == 0:
            return CoMoments.empty(self.features)
        packed = self.pairs.cpu()
        starts = self._row_starts()
        products, counts = (self._symmetric(packed[:, k], starts) for k in (0, 1))
        mean = self.total.cpu() / self.n
        products.addr_(mean, mean, alpha=-self.n)  # X^T X - n mean mean^T, in place
        m2 = self.squares.cpu() - self.n * mean**2
        return CoMoments(self.n, mean.numpy(), m2.numpy(), products.numpy(), self.active.cpu().numpy(),
                         counts.to(torch.int64).numpy())

    def _symmetric(self, packed: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """The F x F matrix of a packed upper triangle: row by row, then its blocked transpose added."""
        matrix = torch.zeros(self.features, self.features, dtype=torch.float64)
        for i in range(self.features):
            matrix[i, i:] = packed[starts[i] : starts[i + 1]]
        diagonal = matrix.diagonal().clone()
        matrix += matrix.T.contiguous()
        matrix.diagonal().sub_(diagonal)
        return matrix

    def write(self, group: h5py.Group) -> None:
        """Store in `group`: per feature, and the pairs ever active together (i <= j)."""
        group.attrs.update(n=self.n, feature_count=self.features)
        for name, sums in (("total", self.total), ("squares", self.squares), ("active", self.active)):
            group.create_dataset(name, data=sums.cpu().numpy())
        i, j, products, counts = self._nonzero_pairs()
        index = np.uint16 if self.features <= 65536 else np.uint32
        for name, values in (("pair_i", i.astype(index)), ("pair_j", j.astype(index)),
                             ("products", products), ("coactive", counts)):
            group.create_dataset(name, data=values, **COMPRESSION)

    @classmethod
    def read(cls, group: h5py.Group) -> SparseSums:
        sums = cls.zeros(int(group.attrs["feature_count"]))
        sums.n = int(group.attrs["n"])
        for name in ("total", "squares", "active"):
            getattr(sums, name).copy_(torch.from_numpy(group[name][()]))
        where = sums._packed(*(torch.from_numpy(group[name][()].astype(np.int64)) for name in ("pair_i", "pair_j")))
        sums.pairs[where, 0] = torch.from_numpy(group["products"][()])
        sums.pairs[where, 1] = torch.from_numpy(group["coactive"][()].astype(np.float64))
        return sums
