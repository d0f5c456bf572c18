"""Exact streaming statistics of two sets of features seen on the same tokens.

Counts, means, co-moments and variances are kept in float64 and merged with the pairwise formulas
of Chan, Golub and LeVeque (1979), so any split of the tokens into batches and shards, merged in
any order, gives the statistics of the whole to rounding. A batch's own co-moment is computed from
sparse products, X^T Y - n mean_x mean_y^T, at a cost near L0^2 per token instead of F^2; its
float64 sums over one batch stay far from cancellation for activations of SAE magnitudes.

Binary co-activation counts (both features above zero) are kept beside them, for the mutual
information of active/inactive and for the minimum support an edge needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse


@dataclass
class CoMoments:
    """Statistics of features `a` (Fa of them) and `b` (Fb) over n tokens."""

    n: int
    mean_a: np.ndarray     # (Fa,) float64
    mean_b: np.ndarray     # (Fb,)
    m2_a: np.ndarray       # (Fa,) sum of squared deviations
    m2_b: np.ndarray       # (Fb,)
    comoment: np.ndarray   # (Fa, Fb) sum of (a - mean_a)(b - mean_b)
    active_a: np.ndarray   # (Fa,) int64 tokens where a > 0
    active_b: np.ndarray   # (Fb,)
    coactive: np.ndarray   # (Fa, Fb) int64 tokens where both are > 0

    @classmethod
    def empty(cls, fa: int, fb: int) -> CoMoments:
        zeros = np.zeros
        return cls(0, zeros(fa), zeros(fb), zeros(fa), zeros(fb), zeros((fa, fb)),
                   zeros(fa, dtype=np.int64), zeros(fb, dtype=np.int64), zeros((fa, fb), dtype=np.int64))

    @classmethod
    def of_batch(cls, a: sparse.spmatrix | np.ndarray, b: sparse.spmatrix | np.ndarray) -> CoMoments:
        """The statistics of one batch: rows are tokens, columns features (sparse or dense)."""
        a = sparse.csr_matrix(a, dtype=np.float64)
        b = sparse.csr_matrix(b, dtype=np.float64)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"a has {a.shape[0]} tokens but b has {b.shape[0]}")
        n = a.shape[0]
        if n == 0:
            return cls.empty(a.shape[1], b.shape[1])
        mean_a = np.asarray(a.sum(0)).ravel() / n
        mean_b = np.asarray(b.sum(0)).ravel() / n
        m2_a = np.asarray(a.multiply(a).sum(0)).ravel() - n * mean_a**2
        m2_b = np.asarray(b.multiply(b).sum(0)).ravel() - n * mean_b**2
        comoment = (a.T @ b).toarray() - n * np.outer(mean_a, mean_b)
        on_a, on_b = (a > 0).astype(np.int64), (b > 0).astype(np.int64)
        return cls(n, mean_a, mean_b, m2_a, m2_b, comoment,
                   np.asarray(on_a.sum(0)).ravel(), np.asarray(on_b.sum(0)).ravel(), (on_a.T @ on_b).toarray())

    def merge(self, other: CoMoments) -> CoMoments:
        """The statistics of both token sets together (Chan et al.'s pairwise update)."""
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        n = self.n + other.n
        delta_a, delta_b = other.mean_a - self.mean_a, other.mean_b - self.mean_b
        weight = self.n * other.n / n
        return CoMoments(
            n,
            self.mean_a + delta_a * other.n / n,
            self.mean_b + delta_b * other.n / n,
            self.m2_a + other.m2_a + weight * delta_a**2,
            self.m2_b + other.m2_b + weight * delta_b**2,
            self.comoment + other.comoment + weight * np.outer(delta_a, delta_b),
            self.active_a + other.active_a,
            self.active_b + other.active_b,
            self.coactive + other.coactive,
        )

    def pearson(self) -> np.ndarray:
        """Pearson r per feature pair; NaN where a feature never varies."""
        scale = np.sqrt(np.outer(self.m2_a, self.m2_b))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = self.comoment / scale
        r[scale <= 0] = np.nan
        return np.clip(r, -1.0, 1.0)

    def mutual_information(self) -> np.ndarray:
        """Mutual information (bits) between the active/inactive states of each feature pair."""
        n = self.n
        both = self.coactive.astype(np.float64)
        only_a = self.active_a[:, None] - both
        only_b = self.active_b[None, :] - both
        neither = n - both - only_a - only_b
        p_a = self.active_a[:, None] / n
        p_b = self.active_b[None, :] / n
        total = np.zeros_like(both)
        for count, marginal_a, marginal_b in (
            (both, p_a, p_b), (only_a, p_a, 1 - p_b), (only_b, 1 - p_a, p_b), (neither, 1 - p_a, 1 - p_b),
        ):
            joint = count / n
            with np.errstate(invalid="ignore", divide="ignore"):
                term = joint * np.log2(joint / (marginal_a * marginal_b))
            total += np.where(joint > 0, term, 0.0)
        return np.maximum(total, 0.0)
