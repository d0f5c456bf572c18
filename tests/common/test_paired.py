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
