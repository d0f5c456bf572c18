"""What graph_steering reads and computes besides the forwards: the target and its neighbours in a
feature_correlation run, the steering directions, and the interval of a (clustered) mean.

The regression of a neighbour g on the target t, from the graph's exact co-moments:
beta_g = cov(t, g) / var(t) = r_tg * sd_g / sd_t. Steering t by delta moves g by beta_g * delta,
in expectation over the text the graph was computed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h5py
import numpy as np

from common.errors import UserError
from common.lazy import lazy_import
from common.saes import check_editable
from common.upstream import open_merged

if TYPE_CHECKING:
    import torch
    from scipy import stats
else:
    torch = lazy_import("torch")
    stats = lazy_import("scipy.stats")

Scale = Literal["active_mean", "sd", "activation"]
SCALES = {"active_mean": "the target's mean activation where it is active", "sd": "the target's standard deviation",
          "activation": "SAE activation units"}


@dataclass(frozen=True)
class Neighbour:
    """A feature joined to the target by an edge, and its regression slope on the target."""

    layer: int
    feature: int
    r: float
    beta: float


@dataclass(frozen=True)
class TargetInGraph:
    """The target's statistics in the graph and its neighbours in the same and later layers."""

    layer: int
    feature: int
    mean: float
    sd: float
    active_mean: float     # mean activation on the rows where it is active
    threshold: float
    neighbours: tuple[Neighbour, ...]

    def unit(self, scale: Scale) -> float:
        """Activation per unit of strength."""
        return {"active_mean": self.active_mean, "sd": self.sd, "activation": 1.0}[scale]


def open_graph(run: Path, field: str) -> h5py.File:
    """The merged.h5 of a feature_correlation run (`field` names it in errors)."""
    return open_merged(run, "feature_correlation", field, "run the correlation graph first")


def target_in_graph(graph: h5py.File, layer: int, feature: int, most: int | None, field: str) -> TargetInGraph:
    """The target's statistics and its neighbours (strongest |r| first, at most `most`), or a
    UserError naming `field`.target when the graph does not hold it."""
    layers = [int(x) for x in graph.attrs["layers"]]
    if layer not in layers:
        raise UserError(f"{field}.target.layer: layer {layer} is not in the correlation graph, which holds layers "
                        f"{layers}; steer a feature of those, or add layer {layer} to the correlation run's `layers`")
    ids = graph[f"layers/L{layer}/features"][()]
    where = np.flatnonzero(ids == feature)
    if not len(where):
        raise UserError(f"{field}.target.feature: feature {feature} of layer {layer} is not among the {len(ids)} features "
                        f"the correlation graph keeps there; choose one it keeps, or keep every feature "
                        "(features.top: null in the correlation manifest) and run it again")
    i = int(where[0])
    variance, mean = float(graph[f"layers/L{layer}/variance"][i]), float(graph[f"layers/L{layer}/mean"][i])
    active = int(graph[f"layers/L{layer}/active"][i])
    if not variance > 0:
        raise UserError(f"{field}.target.feature: feature {feature} of layer {layer} never varies on the correlation "
                        "run's text (never active), so nothing regresses on it; choose a feature that is active there")
    rows = int(graph.attrs["rows"])
    sd = variance**0.5
    edges = {name: graph[f"edges/{name}"][()] for name in ("layer_a", "feature_a", "layer_b", "feature_b", "r")}
    found = []
    for end, other in (("a", "b"), ("b", "a")):  # the target at either end, the other end in its layer or later
        mine = (edges[f"layer_{end}"] == layer) & (edges[f"feature_{end}"] == feature) & (edges[f"layer_{other}"] >= layer)
        for k in np.flatnonzero(mine):
            g_layer, g_feature = int(edges[f"layer_{other}"][k]), int(edges[f"feature_{other}"][k])
            g_ids = graph[f"layers/L{g_layer}/features"][()]
            g_sd = float(graph[f"layers/L{g_layer}/variance"][int(np.flatnonzero(g_ids == g_feature)[0])]) ** 0.5
            r = float(edges["r"][k])
            found.append(Neighbour(g_layer, g_feature, r, r * g_sd / sd))
    found.sort(key=lambda n: (-abs(n.r), n.layer, n.feature))
    return TargetInGraph(layer, feature, mean, sd, mean * rows / active, float(graph.attrs["threshold"]),
                         tuple(found[:most] if most is not None else found))


def directions(saes: dict, target: TargetInGraph, corrected: bool) -> dict[int, torch.Tensor]:
    """Per layer, the residual change of one unit of target activation (d_model,): the target's
    decoder row; corrected, plus each neighbour's row times its slope, at the neighbour's layer.
    A change of SAE features by c adds decode(c) - decode(0) (c @ W_dec for a plain linear decoder)."""
    coefficients: dict[int, dict[int, float]] = {target.layer: {target.feature: 1.0}}
    for g in target.neighbours if corrected else ():
        coefficients.setdefault(g.layer, {})[g.feature] = coefficients.get(g.layer, {}).get(g.feature, 0.0) + g.beta
    result = {}
    for layer, chosen in sorted(coefficients.items()):
        sae = saes[layer]
        check_editable(sae.cfg.normalize_activations, f"at layer {layer}")
        change = torch.zeros((1, sae.cfg.d_sae), dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        for feature, value in chosen.items():
            change[0, feature] = value
        result[layer] = (sae.decode(change) - sae.decode(torch.zeros_like(change)))[0].float()
    return result


def mean_interval(values: np.ndarray, clusters: np.ndarray | None = None, level: float = 0.95) -> tuple[float, ...]:
    """(mean, low, high, p) of the mean of `values`: Student's t interval and the two-sided p of a
    zero mean, with `clusters` (a label per value) cluster-robust (the rows of a cluster are not
    independent: the tokens of one text), with clusters - 1 degrees of freedom. Without clusters,
    each value is its own: the one-sample t-test. NaN where fewer than two clusters."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.arange(len(values)) if clusters is None else np.unique(clusters, return_inverse=True)[1]
    groups = int(labels.max()) + 1 if len(values) else 0
    mean = float(values.mean()) if len(values) else np.nan
    if groups < 2:
        return mean, np.nan, np.nan, np.nan
    sums, counts = np.bincount(labels, values, groups), np.bincount(labels, None, groups)
    residuals = sums - mean * counts
    se = float(np.sqrt(groups / (groups - 1) * (residuals**2).sum()) / counts.sum())
    half = float(stats.t.ppf(0.5 + level / 2, groups - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, groups - 1)) if se > 0 else (1.0 if mean == 0 else 0.0)
    return mean, mean - half, mean + half, p
