"""Circuits of reasoning features (seed 003: "implement circuit discovery (feature clustering)",
"stable reasoning primitives identified", "add visualization of discovered circuits").

    saebatch submit manifests/demo/reasoning_5_circuits.yaml --executor local

Reads a feature_ablation run (through it the SAEs, the models, their layers and the capture's
benchmarks) and, optionally, a feature_alignment run of the same ablation (which features of one
model match which of another). A work unit is one model on one benchmark:

1. Attribution on the first `attribution_items` items, per item (jobs._reasoning.ablation): the
   model's `important` features are those with the highest mean |attribution| over all its layers
   (a feature that helps on some items and hurts on others, as the organisms' risk appetite does
   between bets and stops, takes part as much as one that always helps).
2. Two similarities between them, over those items: co-activation (Pearson r of their activations
   at every token of prompt and reference solution, exact co-moments) and attribution (Pearson r
   of their per-item attributions: features that carry the same items). Their mix
   (`coactivation_weight`) gives the distance 1 - similarity; average-linkage clustering cut at
   `cut` gives the clusters, numbered by their total importance (C1 the largest).
3. The causal test, on the other items: the first `max_clusters` clusters of `min_size` or more
   features are each zero-ablated as a group while the model answers greedily, beside
   `control_sets` random groups matched to each (per feature one of its layer with a similar
   activation count, never one of the important features: feature_ablation's null), all
   conditions of an item decoded together.

Reduce reports per cluster the accuracy drop against its matched null (McNemar, and where the
drop falls among the control groups'); a cluster is causal when McNemar's test against its
strongest control group, adjusted over the unit's clusters (Benjamini-Hochberg), is below `alpha`
and it drops more than `min_drop` and more than every control group. A causal cluster is a
candidate reasoning primitive when it replicates: a causal cluster of the same model on another
benchmark shares `overlap` of its features (Jaccard), or, with an alignment run, `overlap` of its
features' matches in another model fall in one causal cluster of that model on the same benchmark. Pictures: per model the circuit
graph (clusters as nodes sized by their drop, placed at their mean layer, edges by co-activation
between features of different layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from pydantic import Field

from common.batching import AUTO_HELP, BatchSize, planned_rows, rows_note, rows_now
from common.comoments import SparseSums
from common.errors import UserError
from common.layers import capture_residuals
from common.lazy import lazy_import, no_grad
from common.manifest import Manifest, StrictModel, UpstreamRun
from common.models import input_device, load_config, load_model, load_tokenizer, text_config
from common.plan import Estimate, WorkUnit
from common.report import Report
from common.runtime import Work, model_size
from common.saes import load_sae
from common.shards import LIBVER, ShardWriter
from jobs import _feature_cards as cards
from jobs._reasoning import (
    DEVICE_FIELD,
    ModelEntry,
    benchmark_size,
    check_prompt_lengths,
    read_upstream,
    teacher_forced,
    units_per_model,
)
from jobs._reasoning.ablation import (
    ablate_and_generate,
    attribution,
    control_sets,
    generation_memory_of,
    rescore,
    summarise,
    top_features,
)
from jobs._reasoning.chain import Chain, planted_feature, read_chain, settings_of
from jobs._reasoning.problems import load_benchmark

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from scipy import stats
    from scipy.cluster import hierarchy
    from scipy.spatial import distance
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")
    hierarchy = lazy_import("scipy.cluster.hierarchy")
    stats = lazy_import("scipy.stats")
    distance = lazy_import("scipy.spatial.distance")

FIELD = "circuit_discovery"


class Settings(StrictModel):
    """The `circuit_discovery:` section of a manifest."""

    ablation: UpstreamRun = Field(description="the feature_ablation run (its directory or manifest): models, SAEs "
                                  "and benchmarks")
    alignment: UpstreamRun | None = Field(None, description="a feature_alignment run of the same ablation: a "
                                          "cluster whose features' matches in another model fall in one causal "
                                          "cluster there replicates across models (None: across benchmarks only)")
    models: list[str] | None = Field(None, description="models (None: every model of the ablation)")
    important: int = Field(32, ge=2, description="per model and benchmark, its most important features (mean "
                           "|attribution| per item, over all its layers) that are clustered")
    attribution_items: int = Field(64, ge=3, description="first items of each benchmark: attribution and "
                                   "similarities (not evaluated)")
    evaluated_items: int | None = Field(None, ge=1, description="items answered under ablation, taken after the "
                                        "attribution items (None: all the rest)")
    coactivation_weight: float = Field(0.5, ge=0, le=1, description="similarity = w x co-activation r + (1 - w) x "
                                       "attribution r")
    cut: float = Field(0.7, gt=0, lt=2, description="the clustering tree is cut at this distance (1 - similarity): "
                       "lower gives tighter clusters")
    min_size: int = Field(1, ge=1, description="clusters with fewer features are not ablated")
    max_clusters: int = Field(6, ge=1, description="clusters ablated per model and benchmark, largest total "
                              "importance first")
    control_sets: int = Field(10, ge=1, description="random groups matched to each cluster: its null")
    control_seed: int = Field(0, description="seed of the control groups")
    batch_size: BatchSize = Field(8, description="items answered together (each runs as 1 + clusters x "
                                  "(1 + control_sets) rows), " + AUTO_HELP)
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the causal test")
    min_drop: float = Field(0.02, ge=0, le=1, description="a causal cluster costs at least this accuracy")
    overlap: float = Field(0.5, gt=0, le=1, description="replication: the share of features two clusters have in "
                           "common (Jaccard; across models, the share of matches in one cluster)")
    device: str = DEVICE_FIELD
    contexts: UpstreamRun | None = Field(None, description=cards.CONTEXTS_HELP)
    contexts_model: str | None = Field(None, description=cards.CONTEXTS_MODEL_HELP)


def read(s: Settings) -> Chain:
    return read_chain(s.ablation, f"{FIELD}.ablation")


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """A unit per (model, benchmark); checks the alignment run, the item counts and the contexts."""
    s = manifest.settings
    chain = read(s)
    _check_alignment(s)
    cards.check_contexts(s.contexts, f"{FIELD}.contexts")
    for spec in chain.benchmarks:
        items = benchmark_size(spec, f"{FIELD}: the benchmark {spec.name}").items
        if items <= s.attribution_items:
            raise UserError(f"{FIELD}.attribution_items: {spec.name} has {items} items; clustering takes the first "
                            f"{s.attribution_items} and leaves none to ablate. Lower attribution_items")
    models = studied(s, chain)
    for entry in models:
        if s.important > sum(chain.sae_widths(entry)):
            raise UserError(f"{FIELD}.important: {s.important} is more than the {sum(chain.sae_widths(entry))} SAE "
                            f"features of {entry.name}; lower it")
    cards.check_contexts_model(s.contexts, s.contexts_model, [entry.name for entry in models], f"{FIELD}.contexts_model")
    return [WorkUnit(f"{entry.name}.{spec.name}", {"model": entry.name, "benchmark": index})
            for entry in models for index, spec in enumerate(chain.benchmarks)]


def studied(s: Settings, chain: Chain) -> list[ModelEntry]:
    """The models studied: `models`, each one the ablation tested, or all of those."""
    tested = {entry.name: entry for entry in chain.models}
    unknown = [name for name in s.models or [] if name not in tested]
    if unknown:
        raise UserError(f"{FIELD}.models: {unknown} were not tested by the ablation; choose among {list(tested)}")
    return [tested[name] for name in s.models or tested]


def _check_alignment(s: Settings) -> None:
    """The alignment run, when named, read the same ablation run."""
    if s.alignment is None:
        return
    theirs = settings_of(s.alignment, "feature_alignment", f"{FIELD}.alignment").ablation
    if Path(theirs).resolve() != Path(s.ablation).resolve():
        raise UserError(f"{FIELD}.alignment: that run aligned the features of {theirs}, not of {s.ablation}; name the "
                        "alignment of this ablation, or leave `alignment` out")


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    chain = read(s)
    entries = {entry.name: entry for entry in chain.models}
    rows = 1 + s.max_clusters * (1 + s.control_sets)
    work, out, memory = [], 0, 0
    calls: list[int] = []  # rows a generate call, per unit
    for unit in units:
        entry, spec = entries[unit.payload["model"]], chain.benchmarks[unit.payload["benchmark"]]
        size = benchmark_size(spec, f"{FIELD}: the benchmark {spec.name}")
        model = model_size(entry.model)
        evaluated = _evaluated(size.items, s)
        needs = generation_memory_of(load_config(entry.model)[0], entry.model.dtype, chain.sae_widths(entry),
                                     int(2 * size.prompt_tokens), spec.max_new_tokens)  # the longest prompt: twice the mean
        at_once = planned_rows(s.batch_size, needs, rows)
        calls.append(at_once)
        memory = max(memory, needs.peak(at_once))
        tokens = s.attribution_items * (size.prompt_tokens + size.solution_tokens)
        work += [Work("load", model.weight_bytes, label=unit.id),
                 Work("gradient", tokens, model, label=f"{unit.id}: attribution"),
                 Work("forward", tokens, model, label=f"{unit.id}: co-activation"),
                 Work("forward", evaluated * rows * size.prompt_tokens, model, label=f"{unit.id}: prompts"),
                 Work("decode", evaluated * rows * spec.max_new_tokens, model, rows=max(1, min(evaluated * rows, at_once)),
                      label=f"{unit.id}: {evaluated * rows:,} answers of up to {spec.max_new_tokens} tokens")]
        out += evaluated * rows * (spec.max_new_tokens * 4 + 64) + 3 * s.important**2 * 8  # texts, flags, r
    return Estimate(output_bytes=out, task_memory_bytes=memory, work=tuple(work),
                    notes=(f"at most {s.max_clusters} clusters ablated per unit, each beside {s.control_sets} control "
                           f"groups: {rows} rows per evaluated item", rows_note(calls, s.batch_size)))


def _evaluated(items: int, s: Settings) -> int:
    rest = items - s.attribution_items
    return rest if s.evaluated_items is None else min(rest, s.evaluated_items)


# ---------------------------------------------------------------- the work (GPU)


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    chain = read(s)
    for entry, units_left in units_per_model(studied(s, chain), units, shard.pending()):
        spec = entry.placed(s.device)
        model, tokenizer = load_model(spec, attn_implementation=None), load_tokenizer(spec)
        device = input_device(spec)
        d_model = text_config(model.config).hidden_size
        saes = {layer: load_sae(chain.sae_spec(entry), layer, d_model, device) for layer in entry.layers}
        for unit in units_left:
            bench = load_benchmark(chain.benchmarks[unit.payload["benchmark"]], f"{FIELD}: its benchmark")
            check_prompt_lengths(bench, tokenizer, text_config(model.config), entry.name, f"{FIELD}.ablation")
            ranking = bench.items[: s.attribution_items]
            evaluated = bench.items[s.attribution_items :][: s.evaluated_items]
            per_item, active = attribution(model, tokenizer, bench, ranking, saes, device)
            importance = {layer: np.abs(values).mean(axis=0) for layer, values in per_item.items()}
            important = top_features(importance, s.important)
            coactivation = coactivation_r(model, tokenizer, bench, ranking, saes, important, device)
            attributions = np.stack([per_item[layer][:, f] for layer, f in important], axis=1)  # (items, important)
            tree = linkage(coactivation, _pearson(attributions), s.coactivation_weight)
            clusters = cluster_labels(tree, s.cut, np.abs(attributions).mean(axis=0))
            ablations = {}
            for number in clusters_to_ablate(clusters, s.min_size, s.max_clusters):
                ablations[f"C{number}"] = important[clusters == number]
                for name, chosen in control_sets(active, important[clusters == number], s.control_sets, s.control_seed,
                                                 f"{unit.id}.C{number}", excluded=important).items():
                    ablations[f"C{number}/{name}"] = chosen
            needs = generation_memory_of(load_config(spec)[0], spec.dtype, [sae.cfg.d_sae for sae in saes.values()],
                                         max((len(tokenizer(bench.prompt(item)).input_ids) for item in evaluated),
                                             default=1), bench.spec.max_new_tokens)
            at_once = rows_now(s.batch_size, needs, device, rows_per_item=1 + len(ablations))
            outcomes = ablate_and_generate(model, tokenizer, bench, evaluated, saes, ablations, at_once, device,
                                           desc=unit.id)
            with shard.unit(unit.id) as group:
                group.attrs.update(model=entry.name, benchmark=bench.spec.name, rows_at_once=at_once)
                group.create_dataset("item", data=np.asarray([item.index for item in evaluated], dtype=np.int64))
                for name, values in {"layer": important[:, 0], "feature": important[:, 1], "attribution": attributions,
                                     "cluster": clusters}.items():
                    group.create_dataset(f"important/{name}", data=values)
                group.create_dataset("coactivation_r", data=coactivation)
                group.create_dataset("linkage", data=tree)
                _write_outcomes(group, ablations, outcomes)
        del model, saes


def _write_outcomes(group: h5py.Group, ablations: dict[str, np.ndarray], outcomes: dict) -> None:
    """Each ablated group's features, and per condition the generated texts (reduce reads the
    answers from them again), whether each item was answered correctly (and, but for the control
    groups, the answer read)."""
    for name, chosen in ablations.items():
        group.create_dataset(f"{name}/layer", data=chosen[:, 0])
        group.create_dataset(f"{name}/feature", data=chosen[:, 1])
    for condition, (texts, answers, correct) in outcomes.items():
        group.create_dataset(f"{condition}/text", data=texts, dtype=h5py.string_dtype(), compression="gzip")
        group.create_dataset(f"{condition}/correct", data=np.asarray(correct, dtype=bool))
        if "control_" not in condition:
            group.create_dataset(f"{condition}/answer", data=[a or "" for a in answers], dtype=h5py.string_dtype())


@no_grad
def coactivation_r(model, tokenizer, bench, items: list, saes: dict, features: np.ndarray,
                   device: torch.device) -> np.ndarray:
    """Pearson r between the `features` ([layer, feature] rows) over every token of the items'
    prompts and reference solutions (special tokens and padding left out): exact co-moments."""
    sums = SparseSums.zeros(len(features))
    for start in range(0, len(items), 8):
        ids, mask, _, positions = teacher_forced(tokenizer, bench, items[start : start + 8], device)
        with capture_residuals(model, sorted(saes), stop=True) as residuals:
            model(input_ids=ids, attention_mask=mask)
        taken = positions.bool()
        codes = {layer: saes[layer].encode(residuals[layer][taken].to(saes[layer].dtype))
                 for layer in sorted(set(features[:, 0].tolist()))}
        sums.add(torch.stack([codes[layer][:, feature] for layer, feature in features.tolist()], dim=1).double().cpu())
    return sums.comoments().pearson()


def _pearson(columns: np.ndarray) -> np.ndarray:
    """Pearson r between columns (NaN where one is constant)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(columns, rowvar=False)


def linkage(coactivation: np.ndarray, attribution_r: np.ndarray, weight: float) -> np.ndarray:
    """The average-linkage tree of the features under distance 1 - similarity, where similarity
    mixes the two correlations (an undefined r, of a feature constant on the items, counts as 0)."""
    similarity = weight * np.nan_to_num(coactivation) + (1 - weight) * np.nan_to_num(attribution_r)
    apart = np.clip(1 - similarity, 0, 2)
    np.fill_diagonal(apart, 0)
    return hierarchy.linkage(distance.squareform((apart + apart.T) / 2, checks=False), method="average")


def cluster_labels(tree: np.ndarray, cut: float, importance: np.ndarray) -> np.ndarray:
    """Each feature's cluster (the tree cut at `cut`), numbered 1, 2, ... by the cluster's total
    importance, largest first (ties: the cluster of the more important first feature)."""
    raw = hierarchy.fcluster(tree, t=cut, criterion="distance")
    order = sorted(set(raw.tolist()), key=lambda c: (-importance[raw == c].sum(), int(np.flatnonzero(raw == c)[0])))
    return np.array([order.index(c) + 1 for c in raw], dtype=np.int64)


def clusters_to_ablate(clusters: np.ndarray, min_size: int, most: int) -> list[int]:
    """The clusters ablated: the first `most` (by number) with at least `min_size` features."""
    return [int(c) for c in np.unique(clusters) if (clusters == c).sum() >= min_size][:most]


# ---------------------------------------------------------------- reduce


@dataclass
class Unit:
    """What reduce reads of one (model, benchmark) unit."""

    model: str
    benchmark: str
    features: pd.DataFrame   # the important features: layer, feature, importance, cluster
    coactivation: np.ndarray
    outcomes: pd.DataFrame   # per item and cluster: baseline, ablated, control_00, ...

    def members(self, cluster: int) -> set[tuple[int, int]]:
        part = self.features[self.features["cluster"] == cluster]
        return set(zip(part["layer"].tolist(), part["feature"].tolist(), strict=True))


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    chain = read(s)
    units = []
    with h5py.File(out_dir / "merged.h5", "w", libver=LIBVER) as out:
        out.attrs.update(job=FIELD, format="saebatch-circuits/1", ablation=str(s.ablation),
                         alignment=str(s.alignment or ""), cut=s.cut, coactivation_weight=s.coactivation_weight)
        benchmarks = {spec.name: spec for spec in chain.benchmarks}
        for path in shard_paths:
            with h5py.File(path, "r") as shard:
                for unit_id in shard["units"]:
                    shard.copy(shard["units"][unit_id], out, name=f"units/{unit_id}")
                    group = out[f"units/{unit_id}"]
                    spec = benchmarks[str(group.attrs["benchmark"])]
                    rescore(group, partial(load_benchmark, spec, f"{FIELD}: its benchmark"), f"{FIELD}: its benchmark")
                    units.append(_read_unit(group))
    clusters = cluster_table(units, s)
    clusters = replicate(clusters, units, s.overlap,
                         AlignmentMatches.of_run(s.alignment) if s.alignment is not None else None)
    with h5py.File(out_dir / "merged.h5", "a") as out:
        for column in clusters.columns:
            values = clusters[column].to_numpy()
            out.create_dataset(f"clusters/{column}", data=values.astype("S") if values.dtype == object else values)
    book = cards.cards_of(s.contexts, f"{FIELD}.contexts", manifest)
    _report(Report(out_dir / "report", "Reasoning circuits: clusters of SAE features and their causal tests"), s,
            units, clusters, book, chain)


def _read_unit(group: h5py.Group) -> Unit:
    attribution = group["important/attribution"][()]
    features = pd.DataFrame({"layer": group["important/layer"][()], "feature": group["important/feature"][()],
                             "importance": np.abs(attribution).mean(axis=0), "cluster": group["important/cluster"][()]})
    model, bench = str(group.attrs["model"]), str(group.attrs["benchmark"])
    parts = []
    for name in sorted((n for n in group if n.startswith("C")), key=lambda n: int(n[1:])):
        controls = sorted(n for n in group[name] if n.startswith("control_"))
        parts.append(pd.DataFrame({"model": model, "benchmark": bench, "cluster": int(name[1:]),
                                   "item": group["item"][()], "baseline": group["baseline/correct"][()],
                                   "ablated": group[f"{name}/correct"][()],
                                   **{c: group[f"{name}/{c}/correct"][()] for c in controls}}))
    outcomes = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return Unit(model, bench, features, group["coactivation_r"][()], outcomes)


def cluster_table(units: list[Unit], s: Settings) -> pd.DataFrame:
    """Every cluster of every unit: its features and importance and, when ablated, its causal test.
    `q` is McNemar's p against the strongest control group, adjusted over the unit's tested
    clusters (Benjamini-Hochberg); causal: q below alpha, and a drop above min_drop and above every
    control group's (the test is two-sided: a control that costs more also differs)."""
    rows = []
    for unit in units:
        for number, part in unit.features.groupby("cluster", sort=True):
            rows.append({"model": unit.model, "benchmark": unit.benchmark, "cluster": int(number), "size": len(part),
                         "importance": float(part["importance"].sum()),
                         "layers": " ".join(f"L{layer}" for layer in sorted(set(part["layer"].tolist()))),
                         "features": ", ".join(f"L{a} F{b}" for a, b in zip(part["layer"], part["feature"],
                                                                            strict=True))})
    tests = []
    for unit in (u for u in units if len(u.outcomes)):
        summary = summarise(unit.outcomes, ["model", "benchmark", "cluster"], s.alpha, s.min_drop)
        tests.append(summary.assign(q=stats.false_discovery_control(summary["p_ablated_vs_control"].to_numpy())))
    keep = ["model", "benchmark", "cluster", "items", "baseline", "ablated", "drop", "drop_low", "drop_high",
            "control_drop", "control_drop_max", "null_p_drop", "p_ablated", "p_ablated_vs_control", "q"]
    tested = (pd.concat(tests, ignore_index=True)[keep] if tests
              else pd.DataFrame({c: pd.Series(dtype=float) for c in keep}).astype({"model": str, "benchmark": str,
                                                                                 "cluster": np.int64}))
    table = pd.DataFrame(rows).merge(tested, on=["model", "benchmark", "cluster"], how="left")
    table["tested"] = table["items"].notna()
    table["causal"] = (table["tested"] & (table["q"] < s.alpha) & (table["drop"] > s.min_drop)
                       & (table["drop"] > table["control_drop_max"]))
    return table


class AlignmentMatches:
    """Each feature's best match in another model, as a feature_alignment run measured it (Pearson
    r at the anchor tokens, any layer of the other model): a match needs r above the run's
    threshold. (Its permutation p-values exist only for its `important` features, so they are not
    asked for here; its report gives the null's share of features above the threshold.)"""

    def __init__(self, blocks: dict[tuple[str, int], np.ndarray], r: dict[tuple[str, int, str, int], np.ndarray],
                 threshold: float):
        self.blocks, self.r, self.threshold = blocks, r, threshold

    @classmethod
    def of_run(cls, run: Path) -> AlignmentMatches:
        with h5py.File(read_upstream(run, "feature_alignment", f"{FIELD}.alignment"), "r") as merged:
            blocks = {(model, int(layer[1:])): merged[f"blocks/{model}/{layer}/features"][()]
                      for model in merged["blocks"] for layer in merged[f"blocks/{model}"]}
            r = {}
            for name, values in merged["r"].items():
                a, b = name.split("__")
                (model_a, layer_a), (model_b, layer_b) = a.rsplit(".L", 1), b.rsplit(".L", 1)
                r[(model_a, int(layer_a), model_b, int(layer_b))] = values[()]
                r[(model_b, int(layer_b), model_a, int(layer_a))] = values[()].T
            return cls(blocks, r, float(merged.attrs["threshold"]))

    def compared(self, model: str, layer: int, feature: int) -> bool:
        """Whether the alignment compared this feature (its `features_per_layer` of the layer)."""
        ids = self.blocks.get((model, layer))
        return ids is not None and feature in ids

    def match(self, model: str, layer: int, feature: int, other: str) -> tuple[int, int] | None:
        """(layer, feature) of the best match in `other` when its r exceeds the threshold; None when
        there is none (or the alignment did not compare this feature)."""
        if not self.compared(model, layer, feature):
            return None
        row = int(np.flatnonzero(self.blocks[(model, layer)] == feature)[0])
        best, found = self.threshold, None
        for (mine, at, them, theirs), values in self.r.items():
            if (mine, at, them) == (model, layer, other) and np.nanmax(values[row], initial=-1) > best:
                best = float(np.nanmax(values[row]))
                found = (theirs, int(self.blocks[(other, theirs)][int(np.nanargmax(values[row]))]))
        return found


def replicate(table: pd.DataFrame, units: list[Unit], overlap: float,
              matches: AlignmentMatches | None) -> pd.DataFrame:
    """Each cluster's closest causal cluster of the same model on another benchmark (Jaccard of
    their features) and, with alignment matches, of each other model on the same benchmark (the
    share of its features the alignment compared whose match lies there); a causal cluster that
    reaches `overlap` in either is a candidate primitive."""
    by_key = {(u.model, u.benchmark): u for u in units}
    causal = [(row.model, row.benchmark, row.cluster) for row in table.itertuples() if row.causal]  # in table order
    across_benchmarks, across_models = [], []
    for row in table.itertuples():
        mine = by_key[(row.model, row.benchmark)].members(row.cluster)
        best = ("", 0.0)
        for (model, bench, number) in causal:
            if model == row.model and bench != row.benchmark:
                theirs = by_key[(model, bench)].members(number)
                best = max(best, (f"{bench} C{number}", len(mine & theirs) / len(mine | theirs)), key=lambda b: b[1])
        across_benchmarks.append(best)
        best = ("", 0.0)
        for other in sorted({m for m, _ in by_key} - {row.model}) if matches is not None else ():
            compared = [f for f in sorted(mine) if matches.compared(row.model, *f)]  # type: ignore[union-attr]
            found = [matches.match(row.model, layer, feature, other) for layer, feature in compared]  # type: ignore[union-attr]
            for (model, bench, number) in causal:
                if model == other and bench == row.benchmark and compared:
                    share = sum(f in by_key[(model, bench)].members(number) for f in found if f) / len(compared)
                    best = max(best, (f"{other} C{number}", share), key=lambda b: b[1])
        across_models.append(best)
    table = table.assign(benchmark_replica=[b[0] for b in across_benchmarks],
                         benchmark_overlap=[b[1] for b in across_benchmarks],
                         model_replica=[b[0] for b in across_models], model_overlap=[b[1] for b in across_models])
    return table.assign(primitive=table["causal"] & ((table["benchmark_overlap"] >= overlap)
                                                     | (table["model_overlap"] >= overlap)))


# ---------------------------------------------------------------- report


def _report(report: Report, s: Settings, units: list[Unit], clusters: pd.DataFrame, book: cards.CardBook | None,
            chain: Chain) -> None:
    report.text(
        f"Ablation run `{s.ablation}`. Per model and benchmark, its {s.important} features most important to the "
        f"correct answer (mean |attribution| per item on the first {s.attribution_items} items) are clustered by co-activation (r "
        f"over every token of those items, weight {s.coactivation_weight:g}) and by attribution (r of their per-item "
        f"attributions, weight {1 - s.coactivation_weight:g}): average linkage on 1 - similarity, cut at {s.cut:g}; "
        f"C1 has the largest total importance. The first {s.max_clusters} clusters of {s.min_size} or more features "
        f"are zero-ablated as groups on the other items while the model answers, each beside {s.control_sets} random "
        "groups matched to it (per feature, one of its layer with a similar activation count, not one of the important features). `drop`: baseline minus "
        "ablated accuracy (`drop_low`-`drop_high` its paired 95% interval, Agresti and Min's), `control_drop` the groups' mean, "
        "`null_p_drop` where the drop falls among theirs, `p_ablated_vs_control` McNemar's exact test against the "
        "group that cost the most, `q` the same adjusted over the unit's clusters (Benjamini-Hochberg). Causal: "
        f"q < {s.alpha}, and a drop above {100 * s.min_drop:g} percentage points and above every control group's. Data: `merged.h5`.")
    report.heading("Clusters and their causal tests")
    report.table(clusters, "clusters", shown=clusters[clusters["tested"]].drop(columns=["tested"]))
    _primitives(report, s, clusters, book)
    _ground_truth(report, units, clusters, chain)
    for model in dict.fromkeys(unit.model for unit in units):
        _circuit_graph(report, model, [u for u in units if u.model == model], clusters)
    if s.alignment is not None:
        report.text(f"Across models, the alignment heatmap and the transfer plot: `{s.alignment / 'report'}`.")
    report.write()


def _primitives(report: Report, s: Settings, clusters: pd.DataFrame, book: cards.CardBook | None) -> None:
    """The candidate reasoning primitives, with their features' first contexts where cards exist."""
    report.heading("Candidate reasoning primitives")
    found = clusters[clusters["primitive"]]
    across = "another benchmark of the same model (Jaccard of their features)"
    if s.alignment is not None:
        across += " or of another model on the same benchmark (the share of its features whose alignment match lies there)"
    report.text(f"A causal cluster that shares at least {s.overlap:g} of its features with a causal cluster of {across}. "
                + ("None was found." if found.empty else f"{len(found)} found."))
    if found.empty:
        return
    report.table(found, "primitives", shown=found[["model", "benchmark", "cluster", "size", "features", "drop",
                                                   "q", "benchmark_replica", "benchmark_overlap", "model_replica",
                                                   "model_overlap"]])
    if book is None:
        return
    model = s.contexts_model or str(found["model"].iloc[0])
    features = [cards.FeatureId(layer=int(part.split()[0][1:]), feature=int(part.split()[1][1:]))
                for text in found[found["model"] == model]["features"] for part in text.split(", ")]
    book.section(report, list(dict.fromkeys(features)), f"Top contexts of {model}'s primitive features")


def _ground_truth(report: Report, units: list[Unit], clusters: pd.DataFrame, chain: Chain) -> None:
    """For an organism of the study: the cluster that holds its SAE's feature nearest the planted
    direction, on each benchmark, and what ablating it did."""
    lines = []
    for entry in (e for e in chain.models if any(u.model == e.name for u in units)):
        planted = planted_feature(chain.sae_spec(entry), entry)
        if planted is None:
            continue
        for unit in (u for u in units if u.model == entry.name):
            hit = unit.features[(unit.features["layer"] == planted[0]) & (unit.features["feature"] == planted[1])]
            where = f"- {entry.name} on {unit.benchmark}: L{planted[0]} F{planted[1]} "
            if hit.empty:
                lines.append(where + "is not among the important features")
                continue
            row = clusters[(clusters["model"] == entry.name) & (clusters["benchmark"] == unit.benchmark)
                           & (clusters["cluster"] == int(hit["cluster"].iloc[0]))].iloc[0]
            rank = int(unit.features["importance"].rank(ascending=False)[hit.index[0]])
            test = (f"ablated: drop {100 * row['drop']:+.1f} pp against the controls' {100 * row['control_drop']:+.1f} "
                    f"pp (q {row['q']:.2g}); {'causal' if row['causal'] else 'not causal'}"
                    f"{', a candidate primitive' if row['primitive'] else ''}" if row["tested"] else "not ablated")
            lines.append(where + f"(importance rank {rank}) is in C{row['cluster']} ({row['size']} features); {test}")
    if lines:
        report.heading("Ground truth: the organisms' planted features")
        report.text("Each organism carries its risk appetite along a planted direction at the decision cue "
                    "(jobs/_organism/README.md); in each trained SAE the feature whose decoder is nearest it stands "
                    "for the planted cause.\n\n" + "\n".join(lines))


def _circuit_graph(report: Report, model: str, units: list[Unit], clusters: pd.DataFrame) -> None:
    """Per benchmark, the model's clusters as nodes at their mean layer, sized by their drop (red:
    causal; blue: ablated, not causal; grey: not ablated), joined by the mean co-activation r between
    their features of different layers (drawn above 0.1)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(units), figsize=(5.5 * len(units), 4.5), squeeze=False)
    for ax, unit in zip(axes[0], units, strict=True):
        table = clusters[(clusters["model"] == model) & (clusters["benchmark"] == unit.benchmark)]
        layers = unit.features.groupby("cluster")["layer"].mean()
        place = {c: (layers[c], -rank) for rank, c in enumerate(table["cluster"])}
        for (a, b), r in cluster_edges(unit).items():
            if r > 0.1:
                ax.plot(*zip(place[a], place[b], strict=True), color="black", alpha=min(1.0, r), lw=4 * r, zorder=1)
        for row in table.itertuples():
            colour = "crimson" if row.causal else "steelblue" if row.tested else "lightgrey"
            size = 60 + 3000 * max(float(row.drop), 0.0) if row.tested else 40
            ax.scatter(*place[row.cluster], s=size, color=colour, edgecolor="black", zorder=2)
            ax.annotate(f"C{row.cluster} ({row.size})", place[row.cluster], xytext=(6, 4), textcoords="offset points",
                        fontsize=8)
        ax.set_xticks(sorted(set(unit.features["layer"].tolist())))
        ax.set_xlabel("mean layer of the cluster's features")
        ax.set_yticks([])
        ax.set_title(f"{model} on {unit.benchmark}")
    report.figure(fig, f"circuit_graph_{model}", f"{model}'s circuits: clusters of its important features at their "
                  "mean layer (C1 at the top), node area by the accuracy drop when the cluster is ablated (red: "
                  "causal; blue: ablated, not causal; grey: not ablated); edges: mean co-activation r between the "
                  "two clusters' features of different layers (drawn above 0.1, thicker: higher)")


def cluster_edges(unit: Unit) -> dict[tuple[int, int], float]:
    """Per pair of clusters, the mean co-activation r over pairs of their features in different
    layers (pairs with none are left out)."""
    layer = unit.features["layer"].to_numpy()
    cluster = unit.features["cluster"].to_numpy()
    r = np.nan_to_num(unit.coactivation)
    edges = {}
    numbers = sorted(set(cluster.tolist()))
    for i, a in enumerate(numbers):
        for b in numbers[i + 1 :]:
            pairs = np.ix_(cluster == a, cluster == b)
            apart = layer[cluster == a][:, None] != layer[cluster == b][None, :]
            if apart.any():
                edges[(a, b)] = float(r[pairs][apart].mean())
    return edges
