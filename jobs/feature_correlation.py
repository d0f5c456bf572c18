"""The SAE feature correlation graph (seed 002): within and across layers, exact at any scale.

    saebatch submit manifests/demo/feature_correlation.yaml --executor local

The corpus is cut into token windows (common.corpus); a work unit is a consecutive range of its
tokens. For each batch of windows one forward pass, stopped after the last layer needed, gives the
residual stream at every layer; each layer's SAE encodes it. The chosen features of all layers,
side by side, are pooled into rows (per token, or one row per window) and added to the unit's
sparse sums (common.comoments). A shard stores each unit's sums; reduce merges them in corpus
order with pairwise formulas, so the result does not depend on the sharding, and computes Pearson
r, the mutual information of active/inactive, and the graph's edges.

Features: all of each SAE's, or per layer the `top` most frequently active ones (active on at
least `min_support` rows) in a first pass over the corpus's first `selection_tokens` tokens. Every
shard can run that pass; the first to finish publishes its choice beside the shards and the
others adopt it, so that every shard counts the same features.

An edge joins two features whose |r| exceeds the threshold, on enough evidence: for r > 0 both
features active together on at least `min_support` rows, for r < 0 the rarer feature active on at
least that many. Rarely active features therefore cannot produce the r = 1.0 artefacts that the
seed's 100-feature runs reported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h5py
import numpy as np
from pydantic import Field, model_validator
from tqdm import tqdm

from common.atomic import publish_once
from common.comoments import CoMoments, SparseSums, mutual_information
from common.corpus import CorpusSpec, Window, token_units, windows, windows_by_unit
from common.errors import UserError
from common.layers import CONVENTION, resolve_layers
from common.lazy import lazy_import, no_grad
from common.manifest import Manifest, StrictModel, UpstreamRun
from common.models import (
    DTYPE_BYTES,
    ModelSpec,
    input_device,
    load_config,
    load_model,
    load_tokenizer,
    local_tokenizer,
    parameter_bytes,
    text_config,
)
from common.plan import Estimate, WorkUnit
from common.report import Report
from common.runtime import Work, model_size, sae_size
from common.saes import SaeSpec, check_saes, load_sae
from common.shards import LIBVER, ShardWriter
from common.sparse import COMPRESSION
from common.window_encoder import WindowEncoder
from jobs import _feature_cards as cards
from jobs import _feature_graph as figures
from jobs._feature_graph import Layout

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from sae_lens import SAE
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")

log = logging.getLogger(__name__)

FIELD = "feature_correlation"
CHOICE_FILE = "feature_choice.json"
# Host memory per cell of the F x F matrices: the packed pair sums and their non-zero copy when a
# unit is stored (shards); the merged statistics, one unit's, the merge's result, then r and the
# mutual information's temporaries (reduce).
SHARD_BYTES_PER_PAIR = 32
REDUCE_BYTES_PER_PAIR = 96
ASSUMED_WIDTH = 16384  # for estimates when a pretrained SAE's width is not known before loading

Pooling = Literal["token", "sequence_mean_of_features", "sequence_features_of_mean_activation"]

# ---------------------------------------------------------------- the manifest section


class FeatureChoice(StrictModel):
    """Which features of each layer enter the graph."""

    top: int | None = Field(None, ge=1, description="per layer, the most frequently active features to keep "
                            "(None: every feature of the SAE)")
    min_support: int = Field(1, ge=1, description="rows a kept feature must be active on in the first pass")
    selection_tokens: int = Field(100_000, ge=1, description="tokens of the first pass (the corpus's first)")


class EdgeRule(StrictModel):
    """When two features are joined in the graph."""

    threshold: float = Field(0.3, ge=0, lt=1, description="an edge needs |r| above this")
    min_support: int = Field(10, ge=1, description="rows of evidence an edge needs: both features active "
                             "together (r > 0), or the rarer feature active (r < 0)")


class Settings(StrictModel):
    """The `feature_correlation:` section of a manifest."""

    model: ModelSpec = Field(description="language model")
    sae: SaeSpec = Field(description="one SAE per layer")
    layers: str | list[int] = Field(description="'all', a range 'A-B' or a list; layer L = block L's output")
    corpus: CorpusSpec = Field(description="the text, its windows and the token budget")
    features: FeatureChoice = Field(default_factory=FeatureChoice, description="which features enter the graph")
    pooling: Pooling = Field("token", description="a row per token; or per window, the mean of its tokens' "
                             "features, or the features of its mean activation (the seed's variant)")
    edges: EdgeRule = Field(default_factory=EdgeRule, description="when two features are joined")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    tokens_per_unit: int = Field(262_144, ge=1, description="corpus tokens per work unit (the unit of resuming)")
    top_pairs: int = Field(1000, ge=1, description="strongest edges listed in report/top_pairs.csv")
    heatmap_features: int = Field(32, ge=2, description="features in each layer's heatmap")
    contexts: UpstreamRun | None = Field(None, description=cards.CONTEXTS_HELP)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.tokens_per_unit < self.corpus.window:
            raise ValueError(f"tokens_per_unit ({self.tokens_per_unit}) must be at least corpus.window "
                             f"({self.corpus.window}): a unit takes the windows that start in its range")
        return self

    def chosen_layers(self, n_layers: int) -> list[int]:
        return resolve_layers(self.layers, n_layers, f"{FIELD}.layers")


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """Units of `tokens_per_unit` corpus tokens; checks model, SAEs, corpus and memory first."""
    s = manifest.settings
    config = text_config(load_config(s.model)[0])
    layers = s.chosen_layers(config.num_hidden_layers)
    cards.check_contexts(s.contexts, f"{FIELD}.contexts")
    widths = {layer: info.d_sae for layer, info in check_saes(s.sae, layers, config.hidden_size, f"{FIELD}.sae", model=s.model).items()}
    if s.corpus.window > config.max_position_embeddings:
        raise UserError(f"{FIELD}.corpus.window: {s.corpus.window} tokens exceed the model's "
                        f"{config.max_position_embeddings} positions; use shorter windows")
    _check_widths(s.features.top, widths)
    _check_memory(manifest, s.features.top, widths)
    return token_units(s.corpus, local_tokenizer(s.model), s.tokens_per_unit, f"{FIELD}.corpus")


def _check_widths(top: int | None, widths: dict[int, int | None]) -> None:
    for layer, width in widths.items():
        if top is not None and width is not None and top > width:
            raise UserError(f"{FIELD}.features.top: {top} is more than the {width} features of layer {layer}'s "
                            f"SAE; choose at most {width}, or leave `top` out to keep every feature")


def _feature_counts(top: int | None, widths: dict[int, int | None]) -> dict[int, int]:
    return {layer: top or width or ASSUMED_WIDTH for layer, width in widths.items()}


def _check_memory(manifest: Manifest[Settings], top: int | None, widths: dict[int, int | None]) -> None:
    """Refuse, before any GPU time, statistics that cannot fit in the memory the manifest asks for;
    an SAE whose width is known only once loaded counts as ASSUMED_WIDTH (the node checks again)."""
    counts = _feature_counts(top, widths)
    assumed = f"; SAE widths are known only once loaded: {ASSUMED_WIDTH} assumed" if top is None and None in widths.values() else ""
    features = sum(counts.values())
    cluster = manifest.cluster
    for need, limit, field in ((SHARD_BYTES_PER_PAIR, cluster.mem_gb, "cluster.mem_gb"),
                               (REDUCE_BYTES_PER_PAIR, cluster.reduce_mem_gb, "cluster.reduce_mem_gb")):
        estimate = need * features**2
        if estimate > limit * 1e9:
            fits = int((limit * 1e9 / need) ** 0.5) // len(counts)
            raise UserError(
                f"{FIELD}: the statistics of {features:,} features ({', '.join(f'{n} of layer {layer}' for layer, n in counts.items())}"
                f"{assumed}) "
                f"need about {estimate / 1e9:.1f} GB, more than {field} = {limit:g} GB. Keep fewer features "
                f"({FIELD}.features.top: {fits} or less per layer), choose fewer layers, or raise {field}"
            )


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    config, source = load_config(s.model)
    config = text_config(config)
    layers = s.chosen_layers(config.num_hidden_layers)
    infos = check_saes(s.sae, layers, config.hidden_size, f"{FIELD}.sae", model=s.model)
    widths = {layer: info.d_sae for layer, info in infos.items()}
    counts = _feature_counts(s.features.top, widths)
    features = sum(counts.values())
    notes = [f"model architecture from {source}",
             f"{features:,} features in the graph ({', '.join(f'L{layer}: {n}' for layer, n in counts.items())})"]
    if s.features.top is None and None in widths.values():
        notes.append(f"SAE widths are known only once loaded: {ASSUMED_WIDTH} assumed (checked again on the node)")
    if local_tokenizer(s.model) is None:
        notes.append("the corpus is counted on the nodes (the tokenizer is not in the local HF cache)")
    index_bytes = 2 if features <= 65536 else 4
    per_unit = features * (features + 1) // 2 * 2 * (8 + index_bytes)  # products and counts, upper triangle
    notes.append(f"shard output is an upper bound (every pair co-active); merged.h5 about "
                 f"{_human(12 * features**2)}; reduce needs about {_human(REDUCE_BYTES_PER_PAIR * features**2)}")
    width = max(w or ASSUMED_WIDTH for w in widths.values())
    itemsize = DTYPE_BYTES[s.model.dtype]
    batch_tokens = s.batch_size * s.corpus.window
    device_bytes = (parameter_bytes(config, s.model.dtype)
                    + len(layers) * 2 * config.hidden_size * width * 4  # SAEs (encoder and decoder, float32)
                    + batch_tokens * (len(layers) * config.hidden_size * itemsize + 2 * width * 4)
                    + 8 * features**2)  # the pair sums: half of F x F, two float64 each
    notes.append(f"device memory about {_human(device_bytes)} (model, SAEs, one batch of {batch_tokens} tokens, "
                 "the pair sums)")
    on_cpu = s.model.device == "cpu" or manifest.cluster.gpus_per_task == 0
    host = SHARD_BYTES_PER_PAIR * features**2 + (device_bytes if on_cpu else 0)
    notes.append("runtime counts the forwards and SAE encodings (and the first pass, once per shard), not the "
                 "co-moment sums (about L0^2 products per row)")
    return Estimate(output_bytes=per_unit * len(units), task_memory_bytes=host, notes=tuple(notes),
                    work=_work(s, config, units, layers, width))


def _work(s: Settings, config, units: list[WorkUnit], layers: list[int], width: int) -> tuple:
    """The model and SAEs loaded, then every token forwarded up to the last chosen block and
    encoded by each layer's SAE; with `features.top`, the first pass over its tokens as well."""
    model, saes = model_size(s.model), sae_size(config.hidden_size, width, len(layers))
    tokens = sum(unit.payload["stop"] - unit.payload["start"] for unit in units)
    if s.features.top is not None:  # each shard may make the first pass before one publishes its choice
        tokens += min(s.features.selection_tokens, s.corpus.tokens)
    depth = (max(layers) + 1) / config.num_hidden_layers  # the forward stops after the last chosen block
    return (Work("load", model.weight_bytes + saes.parameters * 2 * 4, label=f"{model.name} and {len(layers)} SAE(s)"),
            Work("forward", tokens * depth, model, label=f"{tokens:,} tokens through {depth:.0%} of the blocks"),
            Work("forward", tokens, saes, label=f"{tokens:,} tokens encoded by {len(layers)} SAE(s)"))


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


# ---------------------------------------------------------------- the GPU work


@dataclass
class Encoder:
    """The model and its SAEs, turning windows into each layer's SAE features, pooled as chosen."""

    windows: WindowEncoder
    pooling: Pooling

    @property
    def saes(self) -> dict[int, SAE]:
        return self.windows.saes

    @property
    def device(self) -> torch.device:
        return self.windows.device

    @no_grad
    def features(self, batch: list[Window]) -> dict[int, torch.Tensor]:
        """Per layer, (rows, d_sae) features on the device: a row per content token, or per window."""
        if self.pooling == "token":
            return self.windows.token_features(batch)
        residuals, content = self.windows.residuals(batch)
        weights = (content / content.sum(dim=1, keepdim=True)).unsqueeze(-1)
        pooled = {}
        for layer, residual in residuals.items():
            sae, share = self.saes[layer], weights.to(residual.dtype)
            if self.pooling == "sequence_mean_of_features":
                pooled[layer] = (sae.encode(residual) * share).sum(dim=1)
            else:  # sequence_features_of_mean_activation
                pooled[layer] = sae.encode((residual * share).sum(dim=1))
        return pooled


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    # No attention weights needed: transformers picks the fastest attention the model supports
    # (sdpa; eager for Gemma 2, whose logit soft-capping sdpa lacks).
    model, tokenizer = load_model(s.model, attn_implementation=None), load_tokenizer(s.model)
    config = text_config(model.config)
    layers = s.chosen_layers(config.num_hidden_layers)
    device = input_device(s.model)
    saes = {layer: load_sae(s.sae, layer, config.hidden_size, device) for layer in layers}
    widths = {layer: sae.cfg.d_sae for layer, sae in saes.items()}
    _check_widths(s.features.top, widths)
    _check_memory(manifest, s.features.top, widths)
    encoder = Encoder(WindowEncoder(model, saes, device, tokenizer.pad_token_id), s.pooling)
    if s.features.top is None:
        chosen = {layer: np.arange(width) for layer, width in widths.items()}
    else:
        chosen = _choose_features(s, encoder, tokenizer, shard.shared_file(CHOICE_FILE))
    features = json.dumps({layer: ids.tolist() for layer, ids in chosen.items()})
    if shard.get_attr("features", features) != features:
        raise UserError(f"shard {shard.shard_index} was started with another feature choice than "
                        f"{shard.shared_file(CHOICE_FILE)} holds now; start the run afresh (new run.dir)")
    shard.set_attrs(
        model=s.model.name, model_dtype=s.model.dtype, layers=layers, layer_convention=CONVENTION,
        pooling=s.pooling, corpus=s.corpus.describe(), features=features,
        sae_ids=json.dumps({layer: s.sae.describe(layer) for layer in layers}),
    )
    columns = {layer: torch.as_tensor(ids, device=device) for layer, ids in chosen.items()}
    width = sum(len(ids) for ids in chosen.values())
    pending = set(shard.pending())
    to_write = [unit for unit in units if unit.id in pending]
    total = sum(unit.payload["stop"] - unit.payload["start"] for unit in to_write)
    with tqdm(total=total, desc=f"shard {shard.shard_index}", unit="tok", unit_scale=True) as progress:
        for unit, unit_windows in windows_by_unit(s.corpus, tokenizer, to_write, f"{FIELD}.corpus"):
            sums = SparseSums.zeros(width, device)
            for start in range(0, len(unit_windows), s.batch_size):
                batch = unit_windows[start : start + s.batch_size]
                encoded = encoder.features(batch)
                sums.add(torch.cat([encoded[layer][:, columns[layer]] for layer in layers], dim=1))
                progress.update(sum(w.content for w in batch))
            with shard.unit(unit.id) as group:
                group.attrs.update(start=unit.payload["start"], stop=unit.payload["stop"],
                                   tokens=sum(w.content for w in unit_windows), windows=len(unit_windows))
                sums.write(group)
            del sums  # before the next unit's sums are made: one set on the device at a time


def _choose_features(s: Settings, encoder: Encoder, tokenizer, published: Path) -> dict[int, np.ndarray]:
    """The first pass: per layer, the `top` most frequently active features; shared by all shards."""
    if not published.exists():
        choice = s.features
        assert choice.top is not None  # run_shard chooses only a `top`
        limit = s.corpus.model_copy(update={"tokens": min(choice.selection_tokens, s.corpus.tokens),
                                            "allow_short": True})
        active = {layer: torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=encoder.device)
                  for layer, sae in encoder.saes.items()}
        rows = 0
        found = list(windows(limit, tokenizer, f"{FIELD}.corpus"))
        for start in tqdm(range(0, len(found), s.batch_size), desc="choosing features", unit="batch"):
            features = encoder.features(found[start : start + s.batch_size])
            for layer, layer_features in features.items():
                active[layer] += (layer_features > 0).sum(dim=0)
            rows += len(next(iter(features.values())))  # the same for every layer
        layers = {}
        for layer, counts in active.items():
            ids = most_frequent(counts.cpu().numpy(), choice.top, choice.min_support)
            if not len(ids):
                raise UserError(f"{FIELD}.features: no feature of layer {layer} is active on {choice.min_support} "
                                f"of the first pass's {rows} rows; lower features.min_support or raise "
                                "features.selection_tokens")
            if len(ids) < choice.top:
                log.warning("layer %d: only %d features are active on %d rows or more (top: %d)",
                            layer, len(ids), choice.min_support, choice.top)
            layers[str(layer)] = {"features": ids.tolist(), "active_rows": counts.cpu().numpy()[ids].tolist()}
        text = json.dumps({"rows": rows, "tokens": sum(w.content for w in found), "layers": layers})
        if publish_once(published, text) != text:
            log.info("another shard published its feature choice first; using it")
    stored = json.loads(published.read_text())
    return {int(layer): np.asarray(entry["features"], dtype=np.int64) for layer, entry in stored["layers"].items()}


def most_frequent(active_rows: np.ndarray, top: int, min_support: int) -> np.ndarray:
    """Ids (ascending) of the `top` features active on the most rows, each on `min_support` or more.

    Ties go to the lower feature id, so the choice is a function of the counts alone.
    """
    eligible = np.flatnonzero(active_rows >= min_support)
    ranked = eligible[np.lexsort((eligible, -active_rows[eligible]))]
    return np.sort(ranked[:top])


# ---------------------------------------------------------------- reduce


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    attrs, layout, stats, tokens = _merge(shard_paths)
    graph = {pair: find_edges(stats, layout, *pair, s.edges) for pair in layout.pairs()}
    edges = _edge_table(graph, stats, layout)
    _write_merged(out_dir / "merged.h5", attrs, layout, stats, edges, tokens, s)
    _report(Report(out_dir / "report", "Feature correlation graph"), s, attrs, layout, stats, tokens,
            _edge_counts(graph, layout), edges, cards.cards_of(s.contexts, f"{FIELD}.contexts", manifest))


def _merge(shard_paths: list[Path]) -> tuple[dict, Layout, CoMoments, int]:
    """Every unit's sums merged in corpus order, whatever the order of the shards."""
    units = []
    attrs: dict = {}
    for path in shard_paths:
        with h5py.File(path, "r") as shard:
            if not attrs:
                attrs = dict(shard.attrs)
            elif shard.attrs["features"] != attrs["features"]:
                raise UserError(f"{path} counted other features than {shard_paths[0]}: the shards disagree on "
                                f"the first pass ({CHOICE_FILE} changed mid-run?); rerun the run afresh")
            units += [(int(group.attrs["start"]), path, name) for name, group in shard["units"].items()]
    layers = [int(layer) for layer in attrs["layers"]]
    features = {int(layer): np.asarray(ids) for layer, ids in json.loads(attrs["features"]).items()}
    layout = Layout(layers, features)
    stats = CoMoments.empty(sum(len(ids) for ids in features.values()))
    tokens = 0
    for _, path, name in tqdm(sorted(units), desc="merging units", unit="unit"):
        with h5py.File(path, "r") as shard:
            group = shard["units"][name]
            stats = stats.merge(SparseSums.read(group).comoments())
            tokens += int(group.attrs["tokens"])
    return attrs, layout, stats, tokens


@dataclass(frozen=True)
class BlockEdges:
    """The edges between two layers' features (a layer with itself: each pair once)."""

    rows: np.ndarray          # indices into layer a's chosen features
    cols: np.ndarray          # ... and layer b's
    r: np.ndarray
    unsupported: int          # pairs above the threshold without enough evidence


def find_edges(stats: CoMoments, layout: Layout, layer_a: int, layer_b: int, rule: EdgeRule) -> BlockEdges:
    rows, cols = layout.block(layer_a), layout.block(layer_b)
    r = stats.pearson(rows, cols)
    strong = np.abs(r) > rule.threshold  # NaN (a feature that never varies) is never strong
    if layer_a == layer_b:
        strong &= np.triu(np.ones_like(strong), k=1)  # each pair once, never a feature with itself
    evidence = np.where(r > 0, stats.coactive[rows, cols],
                        np.minimum.outer(stats.active[rows], stats.active[cols]))
    supported = strong & (evidence >= rule.min_support)
    i, j = np.nonzero(supported)
    return BlockEdges(i, j, r[i, j], int(strong.sum() - supported.sum()))


def _write_merged(path: Path, attrs: dict, layout: Layout, stats: CoMoments, edges: pd.DataFrame, tokens: int,
                  s: Settings) -> None:
    with h5py.File(path, "w", libver=LIBVER) as out:
        out.attrs.update({key: attrs[key] for key in ("model", "model_dtype", "layers", "layer_convention",
                                                       "pooling", "corpus", "sae_ids", "run_id", "job")})
        out.attrs.update(format="saebatch-feature-correlation/1", rows=stats.n, tokens=tokens,
                         threshold=s.edges.threshold, min_support=s.edges.min_support,
                         blocks="blocks/La-Lb/{r, mi, coactive}: rows are layer a's features, columns layer b's")
        variance = stats.variance()
        for layer in layout.layers:
            block = layout.block(layer)
            group = out.create_group(f"layers/L{layer}")
            group.create_dataset("features", data=layout.features[layer])
            group.create_dataset("mean", data=stats.mean[block])
            group.create_dataset("variance", data=variance[block])
            group.create_dataset("active", data=stats.active[block])
        for a, b in layout.pairs():
            group = out.create_group(f"blocks/L{a}-L{b}")
            rows, cols = layout.block(a), layout.block(b)
            group.create_dataset("r", data=stats.pearson(rows, cols), **COMPRESSION)
            group.create_dataset("mi", data=stats.mutual_information(rows, cols), **COMPRESSION)
            group.create_dataset("coactive", data=stats.coactive[rows, cols], **COMPRESSION)
        for column, values in edges.items():
            out.create_dataset(f"edges/{column}", data=values.to_numpy())


def _edge_table(graph: dict[tuple[int, int], BlockEdges], stats: CoMoments, layout: Layout) -> pd.DataFrame:
    """Every edge with its r, MI and evidence, strongest |r| first."""
    parts = []
    for (a, b), edges in graph.items():
        rows, cols = layout.block(a), layout.block(b)
        i, j = rows.start + edges.rows, cols.start + edges.cols
        parts.append(pd.DataFrame({
            "layer_a": a, "feature_a": layout.features[a][edges.rows], "layer_b": b,
            "feature_b": layout.features[b][edges.cols], "r": edges.r,
            "mi_bits": mutual_information(stats.n, stats.coactive[i, j], stats.active[i], stats.active[j]),
            "coactive": stats.coactive[i, j], "active_a": stats.active[i], "active_b": stats.active[j],
        }))
    table = pd.concat(parts, ignore_index=True)
    return table.iloc[np.argsort(-table["r"].abs().to_numpy(), kind="stable")].reset_index(drop=True)


def _edge_counts(graph: dict[tuple[int, int], BlockEdges], layout: Layout) -> pd.DataFrame:
    rows = []
    for (a, b), edges in graph.items():
        n_a, n_b = len(layout.features[a]), len(layout.features[b])
        strongest = edges.r[np.argmax(np.abs(edges.r))] if len(edges.r) else np.nan
        rows.append({"block": _block_name(a, b), "layer_a": a, "layer_b": b,
                     "pairs": n_a * (n_a - 1) // 2 if a == b else n_a * n_b, "edges": len(edges.rows),
                     "positive": int((edges.r > 0).sum()), "negative": int((edges.r < 0).sum()),
                     "unsupported": edges.unsupported, "strongest_r": strongest})
    return pd.DataFrame(rows)


def _block_name(a: int, b: int) -> str:
    """The seed's names: layer_4 within a layer, layer_4_vs_8 across."""
    return f"layer_{a}" if a == b else f"layer_{a}_vs_{b}"


# ---------------------------------------------------------------- report


def _report(report: Report, s: Settings, attrs: dict, layout: Layout, stats: CoMoments, tokens: int,
            counts: pd.DataFrame, edges: pd.DataFrame, book: cards.CardBook | None) -> None:
    within, cross = counts[counts.layer_a == counts.layer_b], counts[counts.layer_a != counts.layer_b]
    summary = {
        "model": attrs["model"], "pooling": s.pooling, "rows": stats.n, "tokens": tokens,
        "threshold": s.edges.threshold, "min_support": s.edges.min_support,
        "features_per_layer": {f"layer_{layer}": len(ids) for layer, ids in layout.features.items()},
        "within_layer": dict(zip(within.block, within.edges.astype(int).tolist(), strict=True)),
        "cross_layer": dict(zip(cross.block, cross.edges.astype(int).tolist(), strict=True)),
        "within_layer_total": int(within.edges.sum()), "cross_layer_total": int(cross.edges.sum()),
        "unsupported_above_threshold": dict(zip(counts.block, counts.unsupported.astype(int).tolist(), strict=True)),
    }
    (report.folder / "summary.json").write_text(json.dumps(summary, indent=1))
    chosen = (f"per layer the {s.features.top} most frequently active features (each active on at least "
              f"{s.features.min_support} rows of a first pass over {s.features.selection_tokens:,} tokens)"
              if s.features.top else "every feature of each SAE")
    rows_are = "tokens" if s.pooling == "token" else f"windows (pooling `{s.pooling}`)"
    report.text(
        f"Model `{attrs['model']}` ({attrs['model_dtype']}), layers {layout.layers} ({CONVENTION}). "
        f"Corpus: {attrs['corpus']}; {tokens:,} tokens, {stats.n:,} rows ({rows_are}). Features: {chosen}. "
        f"An edge needs |r| > {s.edges.threshold} and at least {s.edges.min_support} rows of evidence (both "
        "features active together for r > 0; the rarer feature active for r < 0). Statistics are exact "
        "float64 co-moments merged over every unit. Data: `merged.h5`; numbers: `summary.json`."
    )
    report.heading("Edges per layer and layer pair")
    report.text(f"{summary['within_layer_total']:,} within-layer and {summary['cross_layer_total']:,} cross-layer "
                "edges. `unsupported`: pairs above the threshold left out for lack of evidence.")
    report.table(counts, "edge_counts", shown=counts.drop(columns=["layer_a", "layer_b"]))
    figures.edge_matrix(report, layout, counts)
    report.heading("Features per layer")
    report.table(_layer_table(layout, stats, edges), "layers")
    report.heading("Strongest edges")
    report.table(edges.head(s.top_pairs), "top_pairs", shown=_with_cards(edges.head(15), book))
    figures.heatmaps(report, s.heatmap_features, layout, stats, edges)
    report.heading("Strongest cross-layer edges")
    cross_edges = edges[edges.layer_a != edges.layer_b]
    report.table(cross_edges.head(s.top_pairs), "top_cross_layer_pairs",
                 shown=_with_cards(cross_edges.head(15), book))
    figures.cross_layer(report, s.heatmap_features, layout, stats, edges)
    figures.degrees(report, layout, edges)
    report.write()


def _with_cards(edges: pd.DataFrame, book: cards.CardBook | None) -> pd.DataFrame:
    """Edges with both ends' first contexts and card links, when the report has a `contexts` run."""
    if book is None:
        return edges
    for end in ("a", "b"):
        edges = book.annotate(edges, f"layer_{end}", f"feature_{end}", suffix=f"_{end}")
    return edges


def _layer_table(layout: Layout, stats: CoMoments, edges: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for layer in layout.layers:
        active = stats.active[layout.block(layer)]
        rows.append({"layer": layer, "features": len(active), "never_active": int((active == 0).sum()),
                     "mean_active_per_row": float(active.sum() / max(stats.n, 1)),
                     "features_with_edges": int(np.isin(layout.features[layer], figures.feature_ends(edges, layer)).sum())})
    return pd.DataFrame(rows)
