"""Streaming co-moments: any sharding, merged in any order, equals numpy on the whole data."""

import itertools
import random

import h5py
import numpy as np
import pytest
import torch

from common.comoments import CoMoments, SparseSums


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
    """Two layers' worth of features side by side: 24 then 17; feature 24 copies feature 3."""
    rng = np.random.default_rng(0)
    a = sae_like(rng, 1200, 24)
    b = sae_like(rng, 1200, 17)
    b[:, 0] = a[:, 3] * 2 + 0.1 * rng.random(1200) * (a[:, 3] > 0)  # a strongly correlated pair
    return np.hstack([a, b])


def sums_of(rows: np.ndarray, batch: int = 64) -> SparseSums:
    sums = SparseSums.zeros(rows.shape[1])
    for start in range(0, len(rows), batch):
        sums.add(torch.from_numpy(rows[start : start + batch]))
    return sums


@pytest.fixture(params=["sparse", "dense"])
def mode(request, monkeypatch):
    """Scatter-adds of non-zero pairs, or dense products (as for pooled rows)."""
    monkeypatch.setattr(SparseSums, "DENSE_SHARE", 2.0 if request.param == "sparse" else 0.0)
    return request.param


@pytest.mark.parametrize("seed", range(5))
def test_any_sharding_in_any_order_equals_corrcoef(data, seed, mode):
    order = random.Random(seed)
    pieces = [sums_of(data[s], order.randint(1, 100)).comoments() for s in split(len(data), order, order.randint(2, 9))]
    order.shuffle(pieces)
    merged = CoMoments.empty(data.shape[1])
    for piece in pieces:
        merged = merged.merge(piece) if order.random() < 0.5 else piece.merge(merged)
    live = np.r_[0:23, 24:40]  # without the two silent features (23 and 40)
    expected = np.corrcoef(data[:, live].T)
    r = merged.pearson()
    np.testing.assert_allclose(r[np.ix_(live, live)], expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(merged.pearson(slice(0, 24), slice(24, 41))[:-1, :-1], expected[:23, 23:], rtol=0, atol=1e-10)
    assert np.isnan(r[23]).all() and np.isnan(r[:, 40]).all()  # a feature that never varies has no r
    np.testing.assert_allclose(merged.mean, data.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged.variance(), data.var(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(merged.coactive, (data > 0).astype(int).T @ (data > 0).astype(int))
    assert merged.n == len(data) and r[3, 24] > 0.95


def test_tree_merge_equals_sequential_merge(data):
    pieces = [sums_of(data[i : i + 100]).comoments() for i in range(0, 1200, 100)]
    sequential = pieces[0]
    for piece in pieces[1:]:
        sequential = sequential.merge(piece)
    while len(pieces) > 1:
        pieces = [pieces[i].merge(pieces[i + 1]) if i + 1 < len(pieces) else pieces[i] for i in range(0, len(pieces), 2)]
    np.testing.assert_allclose(pieces[0].comoment, sequential.comoment, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(pieces[0].coactive, sequential.coactive)


def test_sparse_and_dense_rows_mix_in_one_sum(data, monkeypatch):
    """Dense rows (pooled windows) and sparse ones (tokens) may meet in one unit."""
    sparse_rows = data[:600]
    dense_rows = data[600:] + 0.01  # every feature active
    sums = SparseSums.zeros(data.shape[1])
    for start in range(0, 600, 100):
        sums.add(torch.from_numpy(sparse_rows[start : start + 100]))
        sums.add(torch.from_numpy(dense_rows[start : start + 100]))
    both = np.vstack([sparse_rows, dense_rows])
    np.testing.assert_allclose(sums.comoments().pearson(), np.corrcoef(both.T), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(sums.comoments().coactive, (both > 0).astype(int).T @ (both > 0).astype(int))


def test_sums_survive_hdf5_exactly(data, tmp_path):
    sums = sums_of(data[:500])
    with h5py.File(tmp_path / "sums.h5", "w") as file:
        sums.write(file.create_group("unit"))
    with h5py.File(tmp_path / "sums.h5", "r") as file:
        back = SparseSums.read(file["unit"])
        stored = file["unit/products"].size
    for name in ("total", "squares", "active", "pairs"):
        torch.testing.assert_close(getattr(back, name), getattr(sums, name), rtol=0, atol=0)
    coactive = (data[:500] > 0).astype(int).T @ (data[:500] > 0).astype(int)
    assert back.n == 500 and stored == np.triu(coactive > 0).sum()  # the pairs i <= j seen together


def test_mutual_information_equals_direct_count(data):
    stats = sums_of(data[:700]).comoments().merge(sums_of(data[700:]).comoments())
    mi = stats.mutual_information(slice(0, 24), slice(24, 41))
    for i, j in itertools.product([0, 3, 23], [0, 5, 16]):
        x, y = data[:, i] > 0, data[:, 24 + j] > 0
        direct = 0.0
        for u, v in itertools.product([True, False], repeat=2):
            joint = np.mean((x == u) & (y == v))
            if joint > 0:
                direct += joint * np.log2(joint / (np.mean(x == u) * np.mean(y == v)))
        assert mi[i, j] == pytest.approx(direct, abs=1e-12)
    assert mi[3, 0] > 0.5 and mi[-1].max() < 1e-12  # the copied pair shares its bits; a silent feature none


def test_empty_sums_and_mismatched_rows():
    empty = SparseSums.zeros(3).comoments()
    batch = sums_of(np.eye(3)).comoments()
    assert empty.merge(batch) is batch and batch.merge(empty) is batch
    assert np.isnan(SparseSums.zeros(3).comoments().variance()).all()
    with pytest.raises(ValueError, match=r"rows have shape \(4, 2\), the sums 3 features"):
        SparseSums.zeros(3).add(torch.ones((4, 2)))


def test_negative_values_add_to_products_but_not_to_coactivation(mode):
    rows = np.array([[1.5, -2.0, 0.0], [0.5, 0.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 4.0, 2.0]])
    sums = sums_of(rows, batch=3)
    stats = sums.comoments()
    np.testing.assert_allclose(stats.comoment, (rows - rows.mean(0)).T @ (rows - rows.mean(0)), rtol=1e-12, atol=1e-12)
    positive = (rows > 0).astype(int)
    np.testing.assert_array_equal(stats.coactive, positive.T @ positive)
    np.testing.assert_array_equal(stats.active, positive.sum(0))
