"""Exact top-k contexts, histograms and counts over a token stream, against a direct computation."""

import numpy as np
import pytest
import torch

from common.top_activations import EMPTY, HISTOGRAM_EDGES, TopActivations, context_windows

K, BEFORE, AFTER = 5, 2, 1


def stream(seed: int, tokens: int = 400, features: int = 6):
    """Sparse activations with many exact ties (small integers and halves), in windows of random
    lengths, with their token ids."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 4, size=(tokens, features)) * (rng.random((tokens, features)) < 0.3) / 2
    values[:, -1] = 0  # a feature never active
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(int(rng.integers(1, 30)), tokens - sum(lengths)))
    return torch.tensor(values, dtype=torch.float32), lengths, rng.integers(0, 1000, size=tokens)


def add_windows(top: TopActivations, values, lengths, ids, windows: slice, start: int) -> int:
    """Add the windows `windows` (their rows begin at `start`); returns the row after them."""
    chosen = lengths[windows]
    rows = sum(chosen)
    around, inside = context_windows(chosen, BEFORE, AFTER)
    part = ids[start : start + rows]
    context = np.where(inside, part[np.clip(around, 0, rows - 1)], EMPTY)
    top.add(values[start : start + rows], torch.arange(start, start + rows), torch.from_numpy(context),
            torch.from_numpy(np.where(inside, around, EMPTY)))
    return start + rows


def direct(values: np.ndarray, lengths: list[int], ids: np.ndarray) -> dict:
    """Per feature, the top K (activation, position) by sorting every active token, and its context."""
    window_of = np.repeat(np.arange(len(lengths)), lengths)
    out = {"value": [], "position": [], "context": []}
    for f in range(values.shape[1]):
        active = [(-values[t, f], t) for t in range(len(values)) if values[t, f] > 0]
        chosen = [t for _, t in sorted(active)[:K]]
        out["position"].append(chosen + [EMPTY] * (K - len(chosen)))
        out["value"].append([values[t, f] for t in chosen] + [-np.inf] * (K - len(chosen)))
        contexts = [[ids[u] if 0 <= u < len(values) and window_of[u] == window_of[t] else EMPTY
                     for u in range(t - BEFORE, t + AFTER + 1)] for t in chosen]
        out["context"].append(contexts + [[EMPTY] * (BEFORE + 1 + AFTER)] * (K - len(chosen)))
    return {name: np.array(rows) for name, rows in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_top_k_is_the_direct_sort_with_ties_to_the_earlier_token(seed):
    values, lengths, ids = stream(seed)
    top = TopActivations.zeros(values.shape[1], K, BEFORE + 1 + AFTER)
    start = 0
    for first in range(0, len(lengths), 3):  # batches of three windows
        start = add_windows(top, values, lengths, ids, slice(first, first + 3), start)
    expected = direct(values.numpy(), lengths, ids)
    assert np.array_equal(top.position.numpy(), expected["position"])
    assert np.array_equal(top.value.numpy(), expected["value"])
    assert np.array_equal(top.context.numpy(), expected["context"])
    # the feature's activation on each context token, 0 outside the window
    rows = np.where(top.context.numpy() != EMPTY, top.position.numpy()[..., None] + np.arange(-BEFORE, AFTER + 1), -1)
    feature = np.arange(values.shape[1])[:, None, None]
    assert np.array_equal(top.context_activation.numpy(), np.where(rows >= 0, values.numpy()[rows, feature], 0))
    assert top.tokens == len(values)
    assert top.active.tolist() == (values > 0).sum(0).tolist()
    assert np.allclose(top.total.numpy(), values.double().sum(0).numpy())


def test_a_signed_features_mean_when_active_is_over_its_positive_activations():
    """A linear SAE's (or AbsTopK's) features go negative: those tokens are not active, and
    their values stay out of the total that the mean when active divides by the active count."""
    values = torch.tensor([[2.0], [-1.5], [-0.5], [1.0]])
    top = TopActivations.zeros(1, K, 1)
    context = torch.arange(4)[:, None]
    top.add(values, torch.arange(4), context, context)
    assert top.active.tolist() == [2]
    assert top.total.tolist() == [3.0]   # mean when active: 1.5, not (2 - 1.5 - 0.5 + 1) / 2 = 0.5


def test_merging_parts_in_corpus_order_equals_one_pass():
    values, lengths, ids = stream(3)
    whole = TopActivations.zeros(values.shape[1], K, BEFORE + 1 + AFTER)
    add_windows(whole, values, lengths, ids, slice(None), 0)
    parts, start = [], 0
    for windows in (slice(0, 4), slice(4, 5), slice(5, None)):
        part = TopActivations.zeros(values.shape[1], K, BEFORE + 1 + AFTER)
        start = add_windows(part, values, lengths, ids, windows, start)
        parts.append(part)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for name in ("value", "position", "context", "context_activation", "histogram", "active", "total"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    assert merged.tokens == whole.tokens


def test_histogram_counts_each_active_token_in_its_fixed_log_bin():
    values = torch.tensor([[0.0005], [0.001], [0.0013], [0.5], [999.0], [5000.0], [0.0]])
    top = TopActivations.zeros(1, 2, 1)
    top.add(values, torch.arange(7), torch.zeros((7, 1), dtype=torch.long), torch.arange(7)[:, None])
    bins = np.clip(np.searchsorted(HISTOGRAM_EDGES, values[:6, 0].numpy(), side="right") - 1, 0, len(HISTOGRAM_EDGES) - 2)
    expected = np.bincount(bins, minlength=len(HISTOGRAM_EDGES) - 1)
    assert top.histogram[0].tolist() == expected.tolist()
    assert top.histogram[0, 0] == 2 and top.histogram[0, -1] == 2  # below and above the edges: the end bins
    assert top.histogram.sum() == 6
