"""Tests and intervals on paired observations (the same item, or the same seeded trial, under two
conditions): pairing removes what the two share (a trial's noise), so an unpaired interval or test
would overstate the uncertainty."""

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


def proportion_difference_interval(first: np.ndarray, second: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Interval of P(first) - P(second) for paired booleans: Agresti and Min's (2005), the Wald
    interval of the paired difference with half a pair added to each of the four cells, so it keeps
    a width when every pair agrees (where the plain Wald interval shrinks to a point)."""
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    pairs = len(first) + 2.0
    only_first, only_second = (first & ~second).sum() + 0.5, (~first & second).sum() + 0.5
    difference = (only_first - only_second) / pairs
    spread = z * np.sqrt((only_first + only_second) - (only_first - only_second) ** 2 / pairs) / pairs
    return float(max(difference - spread, -1.0)), float(min(difference + spread, 1.0))


def mean_difference_interval(differences: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean paired difference; NaNs when the differences do not vary
    (no spread to measure) or are fewer than two."""
    differences = np.asarray(differences, float)
    if len(differences) < 2 or np.ptp(differences) == 0:
        return np.nan, np.nan
    interval = stats.ttest_1samp(differences, 0.0).confidence_interval(confidence)
    return float(interval.low), float(interval.high)
