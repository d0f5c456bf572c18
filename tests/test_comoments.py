"""Streaming co-moments: any sharding, merged in any order, equals numpy on the whole data."""

import itertools
import random

import numpy as np
import pytest
from scipy import sparse

from common.comoments import CoMoments


def sae_like(rng: np.random.Generator, n: int, features: int, density: float = 0.15) -> np.ndarray:
    """Non-negative, mostly zero activations of SAE magnitudes; the last feature never fires."""
    values = rng.gamma(2.0, 1.5, size=(n, features)) * (rng.random((n, features)) < density)
    values[:, -1] = 0.0
    return values


def split(n: int, rng: random.Random, parts: int) -> list[slice]:
    cuts = sorted(rng.sample(range(1, n), parts - 1))
    edges = [0, *cuts, n]
    return [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    a = sae_like(rng, 1200, 24)
    b = sae_like(rng, 1200, 17)
    b[:, 0] = a[:, 3] * 2 + 0.1 * rng.random(1200) * (a[:, 3] > 0)  # a strongly correlated pair
    return a, b


@pytest.mark.parametrize("seed", range(5))
def test_any_sharding_in_any_order_equals_corrcoef(data, seed):
    a, b = data
    order = random.Random(seed)
    pieces = [CoMoments.of_batch(sparse.csr_matrix(a[s]), sparse.csr_matrix(b[s]))
              for s in split(len(a), order, order.randint(2, 9))]
    order.shuffle(pieces)
    merged = CoMoments.empty(24, 17)
    for piece in pieces:
        merged = merged.merge(piece) if order.random() < 0.5 else piece.merge(merged)
    expected = np.corrcoef(a[:, :-1].T, b[:, :-1].T)[:23, 23:]
    r = merged.pearson()
    np.testing.assert_allclose(r[:-1, :-1], expected, rtol=0, atol=1e-10)
    assert np.isnan(r[-1]).all() and np.isnan(r[:, -1]).all()  # a feature that never varies has no r
    np.testing.assert_allclose(merged.mean_a, a.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged.m2_b, ((b - b.mean(0)) ** 2).sum(0), rtol=1e-12, atol=1e-9)
    assert merged.n == len(a) and r[3, 0] > 0.95


def test_tree_merge_equals_sequential_merge(data):
    a, b = data
    pieces = [CoMoments.of_batch(a[i : i + 100], b[i : i + 100]) for i in range(0, 1200, 100)]
    sequential = pieces[0]
    for piece in pieces[1:]:
        sequential = sequential.merge(piece)
    while len(pieces) > 1:
        pieces = [pieces[i].merge(pieces[i + 1]) if i + 1 < len(pieces) else pieces[i] for i in range(0, len(pieces), 2)]
    np.testing.assert_allclose(pieces[0].comoment, sequential.comoment, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(pieces[0].coactive, sequential.coactive)


def test_within_layer_is_the_symmetric_correlation_matrix(data):
    a, _ = data
    stats = CoMoments.of_batch(a[:500], a[:500]).merge(CoMoments.of_batch(a[500:], a[500:]))
    r = stats.pearson()
    np.testing.assert_allclose(r[:-1, :-1], np.corrcoef(a[:, :-1].T), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(stats.coactive, stats.coactive.T)
    np.testing.assert_array_equal(np.diag(stats.coactive), (a > 0).sum(0))


def test_mutual_information_equals_direct_count(data):
    a, b = data
    stats = CoMoments.of_batch(a[:700], b[:700]).merge(CoMoments.of_batch(a[700:], b[700:]))
    mi = stats.mutual_information()
    for i, j in itertools.product([0, 3, 23], [0, 5, 16]):
        x, y = a[:, i] > 0, b[:, j] > 0
        direct = 0.0
        for u, v in itertools.product([True, False], repeat=2):
            joint = np.mean((x == u) & (y == v))
            if joint > 0:
                direct += joint * np.log2(joint / (np.mean(x == u) * np.mean(y == v)))
        assert mi[i, j] == pytest.approx(direct, abs=1e-12)
    assert mi[3, 0] > 0.5 and mi[-1].max() < 1e-12  # the copied pair shares its bits; a silent feature none


def test_empty_batches_and_mismatched_tokens():
    empty = CoMoments.of_batch(np.zeros((0, 3)), np.zeros((0, 2)))
    batch = CoMoments.of_batch(np.eye(3), np.ones((3, 2)))
    assert empty.merge(batch) is batch and batch.merge(empty) is batch
    with pytest.raises(ValueError, match="a has 3 tokens but b has 2"):
        CoMoments.of_batch(np.eye(3), np.ones((2, 2)))
