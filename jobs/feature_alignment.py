"""Cross-model alignment of SAE features (seed 003: "feature importance scores align across models").

    saebatch submit manifests/demo/reasoning_4_alignment.yaml --executor local

Reads a feature_ablation run, and through it the SAEs (its sae_training run), the models, their
layers and the benchmarks (the capture run's, all of them) and each feature's importance (the
ablation's attribution to the correct answer, averaged over the benchmarks it ablated on). Every model reads the same
items, prompt then reference solution, each tokenized on its own; at the anchor tokens
(jobs._reasoning.anchors: the question's end, the answer's start, each reasoning step's end, the
final answer), the same places of the text whatever the tokenizer, its SAE features are read at
each layer: the `features_per_layer` most important of the layer. A work unit is one model on one
benchmark; shards store these anchor rows.

Reduce lines the rows up across models by (benchmark, item, anchor), keeping the anchors every
model has, and computes exact co-moments of all models' features side by side
(common.comoments): Pearson r between any two (model, layer) blocks. A feature's match in another
model is the feature of that model (at any layer) it correlates with most; two features are mutual
matches when each is the other's. The null permutes each model's rows across items and anchors
(`permutations` times, seeded), which keeps every model's own structure and breaks the alignment:
beside every figure stands its value under the null, and a match's p-value is the share of
permutations whose best r reaches it. Transfer: among a model's `important` features that have a
match, the Spearman correlation of their importance with their matches' importance, against the
same under the null.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from pydantic import Field

from common.comoments import CoMoments, SparseSums
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
from jobs._gambling import planted_direction
from jobs._reasoning import (
    DEVICE_FIELD,
    benchmark_size,
    teacher_forced,
    units_per_model,
)
from jobs._reasoning.anchors import ANCHOR_KINDS, AnchorKind, anchor_order, anchor_positions
from jobs._reasoning.chain import Chain, importance, read_chain
from jobs._reasoning.problems import load_benchmark

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from scipy import stats
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")
    stats = lazy_import("scipy.stats")

FIELD = "feature_alignment"
# Permutations behind a block pair's null figures: a mean or share over a block's features varies
# little between permutations, and every block pair costs a product of its two blocks per permutation.
BLOCK_PERMUTATIONS = 20

# ---------------------------------------------------------------- the manifest section


class Settings(StrictModel):
    """The `feature_alignment:` section of a manifest."""

    ablation: UpstreamRun = Field(description="the feature_ablation run (its directory or manifest): its models, "
                                  "SAEs, benchmarks and each feature's importance")
    anchors: list[AnchorKind] = Field(default_factory=lambda: list(ANCHOR_KINDS), min_length=1,
                                      description="where models are compared: question_end, answer_start, steps "
                                      "(each reasoning step's last token), final_answer")
    features_per_layer: int = Field(256, ge=2, description="per model and layer, its most important features "
                                    "(by the ablation's attribution) that are compared")
    important: int = Field(32, ge=1, description="per model, its most important features over all its layers: "
                           "their matches are listed and their importance's transfer measured")
    threshold: float = Field(0.3, gt=0, lt=1, description="a match needs Pearson r above this (and above the null)")
    alpha: float = Field(0.05, gt=0, lt=1, description="... with a permutation p-value below this")
    permutations: int = Field(200, ge=10, description="permutations of the rows across items: the null")
    seed: int = Field(0, description="seed of the permutations")
    batch_size: int = Field(8, ge=1, description="items forwarded together")
    device: str = DEVICE_FIELD


# ---------------------------------------------------------------- the runs read


def read(s: Settings) -> Chain:
    return read_chain(s.ablation, f"{FIELD}.ablation")


def compared_features(scores: dict[int, np.ndarray], per_layer: int) -> dict[int, np.ndarray]:
    """Per layer, the ids (ascending) of its `per_layer` most important features (ties: lower id)."""
    return {layer: np.sort(np.argsort(-values, kind="stable")[:per_layer]) for layer, values in scores.items()}


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """A unit per (model, benchmark); checks that there are models to compare."""
    s = manifest.settings
    chain = read(s)
    models = chain.models
    if len(models) < 2:
        raise UserError(f"{FIELD}.ablation: the ablation ran one model ({models[0].name}); alignment compares two or "
                        "more. Capture, train and ablate the models to compare together")
    return [WorkUnit(f"{entry.name}.{spec.name}", {"model": entry.name, "benchmark": index})
            for entry in models for index, spec in enumerate(chain.benchmarks)]


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    chain = read(s)
    entries = {entry.name: entry for entry in chain.models}
    work, rows, memory = [], 0, 0
    for unit in units:
        entry, spec = entries[unit.payload["model"]], chain.benchmarks[unit.payload["benchmark"]]
        size = benchmark_size(spec, f"{FIELD}: the benchmark {spec.name}")
        model = model_size(entry.model)
        config = text_config(load_config(entry.model)[0])
        work += [Work("load", model.weight_bytes, label=unit.id),
                 Work("forward", size.items * (size.prompt_tokens + size.solution_tokens), model, label=f"{unit.id}: "
                      f"{size.items:,} items read with their solutions")]
        rows += size.items * (len(s.anchors) + 4)  # about four steps an item
        memory = max(memory, model.weight_bytes + s.batch_size * 2048 * config.hidden_size * 4 * 8)
    features = len(entries) * max(len(entry.layers) for entry in entries.values()) * s.features_per_layer
    return Estimate(output_bytes=rows * s.features_per_layer * 4 * 3, task_memory_bytes=memory, work=tuple(work),
                    notes=(f"about {rows // len(entries):,} anchor rows a model (four steps an item assumed); reduce "
                           f"holds the co-moments of {features:,} features (about {16 * features**2 / 1e9:.1f} GB)",))


# ---------------------------------------------------------------- the work (GPU)


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    chain = read(s)
    for entry, units_left in units_per_model(chain.models, units, shard.pending()):
        spec = entry.placed(s.device)
        model, tokenizer = load_model(spec, attn_implementation=None), load_tokenizer(spec)
        device = input_device(spec)
        d_model = text_config(model.config).hidden_size
        saes = {layer: load_sae(chain.sae_spec(entry), layer, d_model, device) for layer in entry.layers}
        chosen = compared_features(importance(s.ablation, entry.name, f"{FIELD}.ablation"), s.features_per_layer)
        for unit in units_left:
            bench = load_benchmark(chain.benchmarks[unit.payload["benchmark"]], f"{FIELD}: its benchmark")
            keys, features = anchor_features(model, tokenizer, saes, chosen, bench, s, device)
            with shard.unit(unit.id) as group:
                group.attrs.update(model=entry.name, benchmark=bench.spec.name)
                group.create_dataset("item", data=np.asarray([item for item, _ in keys], dtype=np.int64))
                group.create_dataset("anchor", data=[anchor for _, anchor in keys], dtype=h5py.string_dtype())
                for layer, values in features.items():
                    group.create_dataset(f"L{layer}/features", data=chosen[layer])
                    group.create_dataset(f"L{layer}/values", data=values, compression="gzip", shuffle=True)
        del model, saes


@no_grad
def anchor_features(model, tokenizer, saes: dict, chosen: dict[int, np.ndarray], bench, s: Settings,
                    device: torch.device) -> tuple[list[tuple[int, str]], dict[int, np.ndarray]]:
    """(item, anchor) of every anchor row, in item order, and per layer the chosen features there.
    An item may lack an anchor (a final answer the solution does not write as the target); a
    benchmark with none of the anchors at all is refused, as it has nothing to compare."""
    keys: list[tuple[int, str]] = []
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in saes}
    columns = {layer: torch.as_tensor(ids, device=device) for layer, ids in chosen.items()}
    for start in range(0, len(bench.items), s.batch_size):
        items = bench.items[start : start + s.batch_size]
        rows, positions = [], []
        for row, item in enumerate(items):
            for anchor, position in anchor_positions(tokenizer, bench, item, s.anchors).items():
                keys.append((item.index, anchor))
                rows.append(row)
                positions.append(position)
        if not rows:
            continue
        ids, mask, _, _ = teacher_forced(tokenizer, bench, items, device)
        with capture_residuals(model, sorted(saes), stop=True) as residuals:
            model(input_ids=ids, attention_mask=mask)
        at = torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
        for layer, sae in saes.items():
            hidden = residuals[layer][at].to(sae.dtype)
            parts[layer].append(sae.encode(hidden)[:, columns[layer]].float().cpu().numpy())
    if not keys:
        raise UserError(f"{FIELD}.anchors: none of the anchors {list(s.anchors)} was found in any of the "
                        f"{len(bench.items)} items of the benchmark {bench.spec.name!r} (final_answer needs a "
                        "'####' line or the target written as the solution writes it; steps need solution lines); "
                        "add question_end or answer_start, which every item has")
    return keys, {layer: np.concatenate(values) for layer, values in parts.items()}


# ---------------------------------------------------------------- reduce


@dataclass(frozen=True)
class Block:
    """One (model, layer) SAE's compared features: where they sit among all models' side by side."""

    model: str
    layer: int
    features: np.ndarray  # SAE feature ids
    importance: np.ndarray
    columns: slice

    @property
    def name(self) -> str:
        return f"{self.model} L{self.layer}"


@dataclass
class Aligned:
    """The anchor rows every model has, in plan order, each model's features side by side (models
    in plan order too)."""

    keys: list[tuple[str, int, str]]  # (benchmark, item, anchor)
    values: np.ndarray                # (rows, all features) float32
    blocks: list[Block]

    def model_columns(self, model: str) -> np.ndarray:
        return np.concatenate([np.arange(b.columns.start, b.columns.stop) for b in self.blocks if b.model == model])


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    chain = read(s)
    aligned = align_rows(shard_paths, s, [entry.name for entry in chain.models],
                         [spec.name for spec in chain.benchmarks])
    moments = comoments(aligned.values)
    models = list(dict.fromkeys(block.model for block in aligned.blocks))
    null = PermutationNull(aligned, models, s.permutations, s.seed)
    matches, null_spearman = match_table(aligned, moments, null, models, s)
    pairs = pair_table(aligned, moments, null, s)
    transfer = transfer_table(matches, null_spearman)
    with h5py.File(out_dir / "merged.h5", "w", libver=LIBVER) as out:
        out.attrs.update(job=FIELD, format="saebatch-alignment/1", ablation=str(s.ablation), rows=len(aligned.keys),
                         permutations=s.permutations, threshold=s.threshold,
                         blocks="blocks/<model>/L<layer>/{features, importance}; r/<a>__<b>: Pearson r between "
                                "block a's features (rows) and block b's (columns)")
        for block in aligned.blocks:
            out.create_dataset(f"blocks/{block.model}/L{block.layer}/features", data=block.features)
            out.create_dataset(f"blocks/{block.model}/L{block.layer}/importance", data=block.importance)
        for a, b in _block_pairs(aligned.blocks):
            out.create_dataset(f"r/{a.model}.L{a.layer}__{b.model}.L{b.layer}",
                               data=moments.pearson(a.columns, b.columns), compression="gzip")
        for name, table in {"matches": matches, "pairs": pairs, "transfer": transfer}.items():
            for column in table.columns:
                values = table[column].to_numpy()
                out.create_dataset(f"{name}/{column}", data=values.astype("S") if values.dtype == object else values)
    planted = planted_columns(aligned, chain)
    _report(Report(out_dir / "report", "Reasoning features across models"), s, aligned, moments, matches, pairs,
            transfer, planted)


def align_rows(shard_paths: list[Path], s: Settings, models: list[str], benchmarks: list[str]) -> Aligned:
    """Each model's anchor rows keyed by (benchmark, item, anchor); the keys every model has, in
    plan order (`benchmarks`' order, then item, then anchor in the text), and the models in `models`'
    order. Never the order the shards list their units in: it decides the null's permutations and
    which block is `a`, so the results would change with `run.shards`."""
    rows: dict[str, dict[tuple[str, int, str], int]] = {}
    values: dict[str, dict[int, list[np.ndarray]]] = {}
    features: dict[str, dict[int, np.ndarray]] = {}
    for path in shard_paths:
        with h5py.File(path, "r") as shard:
            for group in shard["units"].values():
                model, bench = str(group.attrs["model"]), str(group.attrs["benchmark"])
                keys = rows.setdefault(model, {})
                anchors = [a.decode() if isinstance(a, bytes) else str(a) for a in group["anchor"][()]]
                for item, anchor in zip(group["item"][()], anchors, strict=True):
                    keys[(bench, int(item), anchor)] = len(keys)
                layers = sorted(int(name[1:]) for name in group if name.startswith("L"))
                for layer in layers:
                    values.setdefault(model, {}).setdefault(layer, []).append(group[f"L{layer}/values"][()])
                    features.setdefault(model, {})[layer] = group[f"L{layer}/features"][()]
    models = [model for model in models if model in rows]
    shared = sorted((key for key in rows[models[0]] if all(key in rows[m] for m in models[1:])),
                    key=lambda key: (benchmarks.index(key[0]), key[1], anchor_order(key[2])))
    blocks, columns, start = [], [], 0
    for model in models:
        scores = importance(s.ablation, model, f"{FIELD}.ablation")
        taken = [rows[model][key] for key in shared]
        for layer, parts in sorted(values[model].items()):
            ids = features[model][layer]
            blocks.append(Block(model, layer, ids, scores[layer][ids], slice(start, start + len(ids))))
            columns.append(np.concatenate(parts)[taken])
            start += len(ids)
    return Aligned(shared, np.concatenate(columns, axis=1), blocks)


def comoments(values: np.ndarray, chunk: int = 4096) -> CoMoments:
    """Exact float64 co-moments of the rows, added in order."""
    sums = SparseSums.zeros(values.shape[1])
    for start in range(0, len(values), chunk):
        sums.add(torch.from_numpy(values[start : start + chunk]))
    return sums.comoments()


def _block_pairs(blocks: list[Block]) -> list[tuple[Block, Block]]:
    """Every pair of blocks of different models, in block order."""
    return [(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1 :] if a.model != b.model]


class PermutationNull:
    """Best matches under permutations of each model's rows (independently, seeded): the alignment
    broken, every model's own structure kept."""

    def __init__(self, aligned: Aligned, models: list[str], permutations: int, seed: int):
        self.standardized = _standardized(aligned.values)
        rng = np.random.default_rng(seed)
        self.orders = [{model: rng.permutation(len(aligned.keys)) for model in models} for _ in range(permutations)]

    def best(self, rows: np.ndarray, model: str, columns: np.ndarray, other: str,
             permutations: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(permutations, len(rows)) each of `model`'s features (columns `rows`) best r among `other`'s
        columns `columns`, and which (an index into `columns`); over the first `permutations` (None: all)."""
        orders = self.orders[:permutations]
        values, index = np.empty((len(orders), len(rows))), np.empty((len(orders), len(rows)), dtype=np.int64)
        mine, theirs = self.standardized[:, rows], self.standardized[:, columns]
        for p, order in enumerate(orders):
            # Only the two models' relative order matters: row k of `mine` meets row paired[k] of
            # `theirs`, or equally row j of `theirs` meets row unpaired[j] of `mine`; the narrower side moves.
            paired = order[other][np.argsort(order[model])]
            product = mine[np.argsort(paired)].T @ theirs if len(rows) <= len(columns) else mine.T @ theirs[paired]
            r = np.nan_to_num(product / len(mine), nan=-1)
            index[p] = r.argmax(axis=1)
            values[p] = r[np.arange(len(rows)), index[p]]
        return values, index


def _standardized(values: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to unit population variance (a constant column: NaN), in float32:
    the null's products need no more."""
    x = values.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)


def best_matches(moments: CoMoments, rows: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `rows`, the index (into `columns`) of the column it correlates with most and
    that r; -1 and NaN for a feature that never varies on the anchor rows (it has no match)."""
    r = moments.pearson(rows, columns)
    valid = ~np.isnan(r).all(axis=1)
    index = np.full(len(rows), -1, dtype=np.int64)
    index[valid] = np.nanargmax(r[valid], axis=1)
    best = np.full(len(rows), np.nan)
    best[valid] = r[np.flatnonzero(valid), index[valid]]
    return index, best


def match_table(aligned: Aligned, moments: CoMoments, null: PermutationNull, models: list[str],
                s: Settings) -> tuple[pd.DataFrame, dict[tuple[str, str], np.ndarray]]:
    """Each model's `important` features with their best match in every other model; and per pair
    of models, the Spearman correlation of importance with the null matches' (one per permutation)."""
    parts, null_spearman = [], {}
    for model in models:
        columns = aligned.model_columns(model)
        scores = np.concatenate([b.importance for b in aligned.blocks if b.model == model])
        top = np.argsort(-scores, kind="stable")[: s.important]
        rows = columns[top]
        for other in (m for m in models if m != model):
            theirs = aligned.model_columns(other)
            index, best = best_matches(moments, rows, theirs)
            has = index >= 0
            back, _ = best_matches(moments, theirs[index[has]], columns)
            null_best, null_index = null.best(rows[has], model, theirs, other)
            their_importance = np.array([_importance_of(aligned, c) for c in theirs])
            null_spearman[(model, other)] = np.array([_spearman(scores[top][has], their_importance[chosen])
                                                      for chosen in null_index])
            match = [_owner(aligned, theirs[i]) if i >= 0 else (-1, -1) for i in index]
            p = np.full(len(rows), np.nan)
            p[has] = (1 + (null_best >= best[has][None, :]).sum(axis=0)) / (1 + len(null_best))
            mutual = np.zeros(len(rows), dtype=bool)
            mutual[has] = columns[back] == rows[has]
            parts.append(pd.DataFrame({
                "model": model, "layer": [_owner(aligned, c)[0] for c in rows],
                "feature": [_owner(aligned, c)[1] for c in rows], "importance": scores[top],
                "rank": np.arange(1, len(top) + 1), "other": other,
                "match_layer": [layer for layer, _ in match], "match_feature": [feature for _, feature in match],
                "match_importance": np.where(has, their_importance[index], np.nan), "r": best,
                "null_r95": _spread(null_best, has, 0.95), "p": p, "mutual": mutual}))
    table = pd.concat(parts, ignore_index=True)
    return table.assign(matched=(table["r"] > s.threshold) & (table["p"] < s.alpha)), null_spearman


def _spread(null_best: np.ndarray, has: np.ndarray, quantile: float) -> np.ndarray:
    """The null's `quantile` of best r for the features that have a match (NaN for the others)."""
    out = np.full(len(has), np.nan)
    out[has] = np.quantile(null_best, quantile, axis=0)
    return out


def _owner(aligned: Aligned, column: int) -> tuple[int, int]:
    """(layer, SAE feature id) of a column."""
    block = next(b for b in aligned.blocks if b.columns.start <= column < b.columns.stop)
    return block.layer, int(block.features[column - block.columns.start])


def _importance_of(aligned: Aligned, column: int) -> float:
    block = next(b for b in aligned.blocks if b.columns.start <= column < b.columns.stop)
    return float(block.importance[column - block.columns.start])


def pair_table(aligned: Aligned, moments: CoMoments, null: PermutationNull, s: Settings) -> pd.DataFrame:
    """Per ordered pair of (model, layer) blocks of different models: how well a's features find a
    match in b, observed and under the null, and the mutual matches. Both orders, as a's share
    matched in b is not b's in a (a block of many features that b lacks)."""
    rows = []
    for a, b in ((a, b) for a in aligned.blocks for b in aligned.blocks if a.model != b.model):
        r = moments.pearson(a.columns, b.columns)
        varies_a, varies_b = ~np.isnan(r).all(axis=1), ~np.isnan(r).all(axis=0)  # features that vary on the rows
        r = np.nan_to_num(r[np.ix_(varies_a, varies_b)], nan=-1)
        forward, backward = r.argmax(axis=1), r.argmax(axis=0)
        best = r.max(axis=1)
        null_best, _ = null.best(np.arange(a.columns.start, a.columns.stop)[varies_a], a.model,
                                 np.arange(b.columns.start, b.columns.stop)[varies_b], b.model, BLOCK_PERMUTATIONS)
        rows.append({"block_a": a.name, "block_b": b.name, "rows": len(aligned.keys), "features_a": len(a.features),
                     "varying_a": int(varies_a.sum()), "features_b": len(b.features), "varying_b": int(varies_b.sum()),
                     "mean_best_r": float(best.mean()),
                     "null_mean_best_r": float(null_best.mean()),
                     "share_matched": float((best > s.threshold).mean()),
                     "null_share_matched": float((null_best > s.threshold).mean()),
                     "mutual_matches": int((backward[forward] == np.arange(len(forward))).sum())})
    return pd.DataFrame(rows)


def transfer_table(matches: pd.DataFrame, null_spearman: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    """Per ordered pair of models: the Spearman correlation of importance between a model's
    important features and their matches (all of them, and the matched ones), with the null's. The
    p-value is NaN where rho is (no null value reaches NaN, which would read as significant)."""
    rows = []
    for (model, other), part in matches.groupby(["model", "other"], sort=False):
        matched = part[part["matched"]]
        rho = _spearman(part["importance"], part["match_importance"])
        null = null_spearman[(model, other)]
        null = null[~np.isnan(null)]
        testable = len(null) > 0 and not np.isnan(rho)
        rows.append({"model": model, "other": other, "important": len(part), "matched": len(matched),
                     "spearman_all": rho, "null_spearman_mean": float(null.mean()) if len(null) else float("nan"),
                     "p_spearman_all": float((1 + (null >= rho).sum()) / (1 + len(null))) if testable else float("nan"),
                     "spearman_matched": _spearman(matched["importance"], matched["match_importance"])})
    return pd.DataFrame(rows)


def _spearman(x, y) -> float:
    """Spearman's rho over the pairs where both are known; NaN with fewer than three or a constant side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    known = ~np.isnan(x) & ~np.isnan(y)
    x, y = x[known], y[known]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


# ---------------------------------------------------------------- report


def _report(report: Report, s: Settings, aligned: Aligned, moments: CoMoments, matches: pd.DataFrame,
            pairs: pd.DataFrame, transfer: pd.DataFrame, planted: dict[str, int]) -> None:
    models = list(dict.fromkeys(block.model for block in aligned.blocks))
    counts = pd.Series([anchor.split("_")[0] if anchor.startswith("step_") else anchor
                        for _, _, anchor in aligned.keys]).value_counts()
    report.text(
        f"Models {', '.join(f'`{m}`' for m in models)} on the same items, compared at {len(aligned.keys):,} anchor "
        f"tokens every model has ({', '.join(f'{n:,} {a}' for a, n in counts.items())}). Per model and layer, the "
        f"{s.features_per_layer} features most important to the correct answer (the ablation `{s.ablation.name}`'s "
        "attribution). A feature's match in another model is the feature (any layer) it correlates with most "
        "(Pearson r over the anchor rows, exact co-moments); mutual: each is the other's match. Null: each model's "
        f"rows permuted across items and anchors, {s.permutations} times; `p` is the share of permutations whose "
        f"best r reaches the observed one. Matched: r > {s.threshold} and p < {s.alpha}. Data: `merged.h5`.")
    report.heading("Alignment between layers of different models")
    report.text("Per ordered pair of (model, layer) SAEs: the mean of a's features' best r in b, and the share above the "
                f"threshold, beside the same under the null (its first {BLOCK_PERMUTATIONS} permutations); over the "
                "features that vary on the anchor rows "
                "(`varying_a`, `varying_b`: a feature never active at an anchor has no match).")
    report.table(pairs, "pairs")
    _heatmap(report, aligned, pairs)
    report.heading("Each model's most important features and their matches")
    report.table(matches, "matches", shown=matches[matches["rank"] <= 10])
    report.heading("Transfer of importance")
    report.text("The Spearman correlation of each important feature's importance with its best match's importance "
                "in the other model (`spearman_all`), beside the same with the null's matches (its mean, and the share "
                "of permutations reaching it: `p_spearman_all`); `spearman_matched`: over the matched features alone.")
    report.table(transfer, "transfer")
    _transfer_plot(report, matches, models)
    _ground_truth(report, aligned, moments, planted)
    report.write()


def _heatmap(report: Report, aligned: Aligned, pairs: pd.DataFrame) -> None:
    """Every (model, layer) block (row) against every other's (column): the share of the row block's
    features with a match above the threshold in the column block (observed; the null's beneath in
    brackets)."""
    import matplotlib.pyplot as plt

    names = [block.name for block in aligned.blocks]
    share = np.full((len(names), len(names)), np.nan)
    null = np.full_like(share, np.nan)
    for row in pairs.itertuples():
        i, j = names.index(row.block_a), names.index(row.block_b)
        share[i, j], null[i, j] = row.share_matched, row.null_share_matched
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 1.5))
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(share):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}\n({null[i, j]:.2f})", ha="center", va="center", fontsize=8,
                    color="white" if value < 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of features with a match (r > threshold)")
    report.figure(fig, "alignment_heatmap", "Alignment across models: per pair of (model, layer) SAEs, the share of "
                  "the row block's features whose best match in the column block exceeds the threshold (the null's in "
                  "brackets); blocks of one model are not compared")


def _transfer_plot(report: Report, matches: pd.DataFrame, models: list[str]) -> None:
    """Importance rank in one model against its match's importance rank in the other."""
    import matplotlib.pyplot as plt

    pairs = [(m, o) for m in models for o in models if m != o]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), squeeze=False)
    for ax, (model, other) in zip(axes[0], pairs, strict=True):
        part = matches[(matches["model"] == model) & (matches["other"] == other)]
        theirs = part["match_importance"].rank(ascending=False)
        colours = np.where(part["matched"], "tab:blue", "lightgrey")
        ax.scatter(part["rank"], theirs, c=colours, s=18)
        ax.set_xlabel(f"importance rank in {model}")
        ax.set_ylabel(f"match's importance rank in {other}")
        ax.set_title(f"{model} -> {other}: {int(part['matched'].sum())} matched")
    report.figure(fig, "transfer", "Transfer: each important feature's rank against its match's rank in the other "
                  "model (blue: matched, r above the threshold and the null; grey: best match, not significant)")


def planted_columns(aligned: Aligned, chain: Chain) -> dict[str, int]:
    """Per organism of the study, the column of its trained SAE's feature that stands for its planted
    cause: of the compared features at the planted layer, the one whose decoder direction is
    closest (cosine) to the planted direction u."""
    found = {}
    for entry in chain.models:
        planted = planted_direction(entry.model.name)
        block = next((b for b in aligned.blocks if planted and b.model == entry.name and b.layer == planted[0]), None)
        if planted is None or block is None:
            continue
        d_model = text_config(load_config(entry.model)[0]).hidden_size
        decoder = load_sae(chain.sae_spec(entry), block.layer, d_model, torch.device("cpu")).W_dec.detach()
        rows = decoder[torch.as_tensor(block.features)].double()
        cosine = rows @ torch.tensor(planted[1], dtype=torch.float64) / rows.norm(dim=1)
        found[entry.name] = block.columns.start + int(cosine.abs().argmax())
    return found


def _ground_truth(report: Report, aligned: Aligned, moments: CoMoments, planted: dict[str, int]) -> None:
    """Where two or more models are organisms: whether the features standing for their planted
    causes match each other."""
    if len(planted) < 2:
        return
    report.heading("Ground truth: the organisms' planted features")
    lines = []
    for model, column in planted.items():
        for other, theirs in planted.items():
            if other == model:
                continue
            index, best = best_matches(moments, np.array([column]), aligned.model_columns(other))
            match = aligned.model_columns(other)[index[0]] if index[0] >= 0 else -1
            layer, feature = _owner(aligned, column)
            verdict = "the planted feature" if match == theirs else "another feature"
            lines.append(f"- {model} L{layer} F{feature} (its SAE's feature nearest the planted direction): its best "
                         f"match in {other} is {verdict} (r {best[0]:.2f}; r with the planted one "
                         f"{moments.pearson(np.array([column]), np.array([theirs]))[0, 0]:.2f})")
    report.text("Each organism carries its risk appetite along a planted direction at the decision cue "
                "(jobs/_organism/README.md); in each trained SAE the feature whose decoder is nearest it stands for "
                "the planted cause.\n\n" + "\n".join(lines))
