"""Paired tests of common/paired.py against scipy and the exact binomial."""

import numpy as np
import pytest
from scipy import stats

from common.paired import mcnemar


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    before = np.array([True] * 10 + [False] * 2 + [True] * 5)
    after = np.array([False] * 10 + [True] * 2 + [True] * 5)
    assert mcnemar(before, after) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar(before, before) == 1.0
    assert mcnemar(before, after) == pytest.approx(stats.binomtest(10, 12).pvalue)


def test_the_paired_proportion_interval_is_agresti_and_min_s():
    """17 pairs: 10 stopped under the first condition only, 2 under the second only, 5 under both.
    Half a pair in each cell: (10.5 - 2.5) / 19 = 0.421, with the paired variance of Agresti and
    Min (2005); and it keeps a width where every pair agrees, where Wald's would be a point."""
    from common.paired import proportion_difference_interval

    first = np.array([True] * 10 + [False] * 2 + [True] * 5)
    second = np.array([False] * 10 + [True] * 2 + [True] * 5)
    low, high = proportion_difference_interval(first, second)
    half = 1.96 * np.sqrt(13 - 8**2 / 19) / 19
    assert (low, high) == pytest.approx((8 / 19 - half, 8 / 19 + half))
    all_first = proportion_difference_interval(np.ones(40, bool), np.zeros(40, bool))
    assert 0.85 < all_first[0] < all_first[1] == 1.0  # clipped at 1, yet wide
    # pairs that share their noise: a narrower interval than the same rates unpaired would get
    rng = np.random.default_rng(0)
    noise = rng.random(400)
    stops_first, stops_second = noise < 0.6, noise < 0.4  # the same draw, two thresholds
    paired = np.subtract(*proportion_difference_interval(stops_first, stops_second)[::-1])
    unpaired = 2 * 1.96 * np.sqrt((0.6 * 0.4 + 0.4 * 0.6) / 400)
    assert paired < 0.6 * unpaired


def test_the_mean_difference_interval_is_the_paired_t_interval():
    from common.paired import mean_difference_interval

    differences = np.array([3.0, -1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    half = stats.t.ppf(0.975, 7) * differences.std(ddof=1) / np.sqrt(8)
    assert mean_difference_interval(differences) == pytest.approx((differences.mean() - half, differences.mean() + half))
    assert np.isnan(mean_difference_interval(np.full(5, 2.0))).all()  # no spread: no interval
