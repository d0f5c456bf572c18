"""Tests on paired observations (the same item, or the same seeded trial, under two conditions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from common.lazy import lazy_import

if TYPE_CHECKING:
    from scipy import stats
else:
    stats = lazy_import("scipy.stats")


def mcnemar(before: np.ndarray, after: np.ndarray) -> float:
    """Exact McNemar p-value of paired booleans (two-sided binomial test on the discordant pairs)."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    lost, gained = int((before & ~after).sum()), int((~before & after).sum())
    return 1.0 if lost + gained == 0 else float(stats.binomtest(lost, lost + gained, 0.5).pvalue)


def signed_rank(differences: np.ndarray) -> float:
    """Wilcoxon signed-rank p-value of paired differences (zeros dropped); NaN when all are zero."""
    differences = np.asarray(differences, float)
    return float(stats.wilcoxon(differences).pvalue) if np.any(differences != 0) else np.nan
