"""The feature correlation graph (jobs/feature_correlation.py): where each layer's features sit
side by side, and the report's figures of it: r among each layer's strongest features and between
consecutive layers, the edges of every layer pair, and the features' degrees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.lazy import lazy_import

if TYPE_CHECKING:
    import pandas as pd

    from common.comoments import CoMoments
    from common.report import Report
else:
    pd = lazy_import("pandas")


@dataclass(frozen=True)
class Layout:
    """Where each layer's features sit in the side-by-side feature set."""

    layers: list[int]
    features: dict[int, np.ndarray]  # layer -> SAE feature ids

    def block(self, layer: int) -> slice:
        start = sum(len(self.features[other]) for other in self.layers[: self.layers.index(layer)])
        return slice(start, start + len(self.features[layer]))

    def pairs(self) -> list[tuple[int, int]]:
        """Every layer with itself, then every pair of layers, lower first."""
        return [(a, b) for i, a in enumerate(self.layers) for b in self.layers[i:]]


def feature_ends(edges: pd.DataFrame, layer: int) -> np.ndarray:
    """The feature ids of `layer` at either end of each edge (with repeats: one per edge)."""
    return np.concatenate([edges.feature_a[edges.layer_a == layer], edges.feature_b[edges.layer_b == layer]])


LABELLED = 48  # at most this many feature ids on a heatmap axis (8 pt); more rows: every n-th id


def heatmaps(report: Report, per_panel: int, layout: Layout, stats: CoMoments, edges: pd.DataFrame) -> None:
    """Per layer, r among the features of its strongest within-layer edges, similar ones together."""
    fig, axes = _panels(len(layout.layers), min(per_panel, max(map(len, layout.features.values()))))
    for ax, layer in zip(axes, layout.layers):
        block, ids = layout.block(layer), layout.features[layer]
        within = edges[(edges.layer_a == layer) & (edges.layer_b == layer)]
        strongest = pd.unique(within[["feature_a", "feature_b"]].to_numpy().ravel())  # strongest |r| first
        if len(strongest) < 2:  # too few edges: the most active features instead
            strongest = ids[np.argsort(-stats.active[block], kind="stable")]
        shown = block.start + np.searchsorted(ids, strongest[:per_panel])
        r = np.nan_to_num(stats.pearson(shown, shown))
        order = _similar_together(r)
        labels = ids[shown - block.start][order]
        image = _draw_r(ax, r[np.ix_(order, order)], labels, labels)
        ax.set_xlabel(f"layer {layer} feature")
        ax.set_ylabel(f"layer {layer} feature")
        ax.set_title(f"layer {layer}: {len(within):,} edges")
    fig.colorbar(image, ax=axes, shrink=0.6, label="Pearson r")
    report.figure(fig, "heatmaps", f"Pearson r among each layer's (up to) {per_panel} features with the "
                  "strongest within-layer edges (grouped by similarity; labels are SAE feature ids)")


def cross_layer(report: Report, per_panel: int, layout: Layout, stats: CoMoments, edges: pd.DataFrame) -> None:
    """For each pair of consecutive layers, r between the features of their strongest cross-layer
    edges: rows the lower layer's, columns the upper's, ordered so matching features form a diagonal."""
    pairs = [(a, b) for a, b in zip(layout.layers, layout.layers[1:])
             if ((edges.layer_a == a) & (edges.layer_b == b)).any()]
    if not pairs:
        return
    fig, axes = _panels(len(pairs), min(per_panel, max(map(len, layout.features.values()))))
    for ax, (a, b) in zip(axes, pairs):
        between = edges[(edges.layer_a == a) & (edges.layer_b == b)]
        lower, upper = edge_ends(between, per_panel)
        rows = layout.block(a).start + np.searchsorted(layout.features[a], lower)
        cols = layout.block(b).start + np.searchsorted(layout.features[b], upper)
        r = np.nan_to_num(stats.pearson(rows, cols))
        row_order = _similar_together(r)
        # each column beside the row it correlates with most: matched features on the diagonal
        col_order = np.lexsort((-r.max(axis=0), np.argsort(row_order)[np.argmax(r, axis=0)]))
        image = _draw_r(ax, r[np.ix_(row_order, col_order)], layout.features[a][rows - layout.block(a).start][row_order],
                        layout.features[b][cols - layout.block(b).start][col_order])
        ax.set_ylabel(f"layer {a} feature")
        ax.set_xlabel(f"layer {b} feature")
        ax.set_title(f"layer {a} vs {b}: {len(between):,} edges")
    fig.colorbar(image, ax=axes, shrink=0.6, label="Pearson r")
    report.figure(fig, "cross_layer", f"Cross-layer: Pearson r between the (up to) {per_panel} features of "
                  "each pair of consecutive layers with the strongest edges between them (rows: the lower layer; labels "
                  "are SAE feature ids); every layer pair's edge count is in the matrix above")


def edge_ends(between: pd.DataFrame, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The feature ids at both ends of the strongest edges (`between` is sorted by |r|), at most `most`
    per side, taking an edge only when both its ends fit: every feature shown has a partner shown."""
    lower: dict[int, None] = {}
    upper: dict[int, None] = {}
    for a, b in zip(between.feature_a.tolist(), between.feature_b.tolist(), strict=True):
        if (a in lower or len(lower) < most) and (b in upper or len(upper) < most):
            lower.setdefault(a)
            upper.setdefault(b)
    return np.fromiter(lower, dtype=np.int64), np.fromiter(upper, dtype=np.int64)


def edge_matrix(report: Report, layout: Layout, counts: pd.DataFrame) -> None:
    """Edges of every layer and layer pair at a glance, as a share of the pairs that could have one."""
    import matplotlib.pyplot as plt

    n = len(layout.layers)
    share, number = np.full((n, n), np.nan), np.zeros((n, n), dtype=int)
    for row in counts.itertuples():
        i, j = layout.layers.index(row.layer_a), layout.layers.index(row.layer_b)
        share[i, j] = share[j, i] = row.edges / row.pairs if row.pairs else np.nan
        number[i, j] = number[j, i] = row.edges
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.2, 1.1 * n + 1.2))
    image = ax.imshow(100 * share, cmap="Blues", vmin=0)
    for (i, j), edges_ij in np.ndenumerate(number):
        dark = share[i, j] > 0.6 * np.nanmax(share)  # False for NaN (a layer of one feature has no pairs)
        ax.text(j, i, f"{edges_ij:,}" + ("" if np.isnan(share[i, j]) else f"\n{100 * share[i, j]:.1f}%"),
                ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ticks = [f"layer {layer}" for layer in layout.layers]
    ax.set_xticks(range(n), ticks)
    ax.set_yticks(range(n), ticks)
    fig.colorbar(image, ax=ax, shrink=0.8, label="edges, % of feature pairs")
    report.figure(fig, "edge_matrix", "Edges within each layer (diagonal) and between each pair of layers: the count, "
                  "and its share of the feature pairs of that block")


def _panels(count: int, features: int) -> tuple:
    """A figure with `count` square heatmap panels, two per row (three from five on), each large
    enough for `features` rows of 8 pt labels (LABELLED of them at most); spare axes hidden."""
    import matplotlib.pyplot as plt

    columns = min(count, 2 if count <= 4 else 3)
    rows = -(-count // columns)
    side = max(3.5, 0.14 * min(features, LABELLED) + 1.2)
    fig, axes = plt.subplots(rows, columns, figsize=(side * columns + 1.2, side * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, list(axes.ravel()[:count])


def _similar_together(r: np.ndarray) -> np.ndarray:
    """An order of the rows of `r` with similar rows side by side (average linkage of the rows as vectors)."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    return leaves_list(linkage(r, "average")) if len(r) > 2 else np.arange(len(r))


def _draw_r(ax, r: np.ndarray, row_labels: np.ndarray, col_labels: np.ndarray):
    """r as a heatmap on a fixed -1..1 scale, the feature ids as 8 pt tick labels (every n-th beyond LABELLED)."""
    image = ax.imshow(r, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    for set_ticks, labels, rotation in ((ax.set_xticks, col_labels, 90), (ax.set_yticks, row_labels, 0)):
        step = -(-len(labels) // LABELLED)
        set_ticks(range(0, len(labels), step), labels[::step], fontsize=8, rotation=rotation)
    return image


def degrees(report: Report, layout: Layout, edges: pd.DataFrame) -> None:
    """How many edges (within and across layers) each feature has, per layer, as a survival curve."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in layout.layers:
        degree = np.zeros(len(layout.features[layer]), dtype=np.int64)
        np.add.at(degree, np.searchsorted(layout.features[layer], feature_ends(edges, layer)), 1)
        ax.step(*degree_survival(degree), where="post",
                label=f"layer {layer} ({int((degree == 0).sum())} without edges)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("degree d (edges of a feature, within and across layers)")
    ax.set_ylabel("share of features with degree >= d")
    ax.legend(fontsize=7)
    report.figure(fig, "degrees", "Degree distribution of the graph per layer (log-log survival curve)")


def degree_survival(degree: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each degree d >= 1 that occurs, and the share of all features with degree d or more."""
    seen, counts = np.unique(degree[degree > 0], return_counts=True)
    return seen, counts[::-1].cumsum()[::-1] / len(degree)
