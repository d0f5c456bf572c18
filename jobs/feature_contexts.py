"""Top-activating contexts of chosen SAE features: the feature cards a researcher reads them by.

    saebatch submit manifests/demo/gambling_3_contexts.yaml --executor local

Features are listed in the manifest, or taken from an earlier run: the features a contrast
selected, a patching run tested, an ablation ablated, or the ends of a correlation graph's
strongest edges. The corpus (the same sources as feature_correlation) is cut into token windows;
a work unit is a consecutive range of its tokens. Each batch of windows is forwarded once, up to
the last layer needed, and each layer's SAE encodes it. Per feature a unit keeps, on the device,
its exact top-k tokens (ties to the earlier corpus position) with a context window and the
feature's activation along it, a histogram of its activations and how often it is active
(common.top_activations). Reduce merges the units in corpus order, which gives the same result as
one pass, whatever the sharding. One more unit computes each feature's direct effect on the
logits, W_dec[f] @ W_U. The report is a card per feature (jobs._feature_cards): report.md and
cards.html, which the contrast, patching, ablation and correlation reports link to (`contexts:`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from pydantic import Field, model_validator
from tqdm import tqdm

from common.corpus import CorpusSpec, Window, token_units, windows_by_unit
from common.errors import UserError
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
from common.plan import Estimate, WorkUnit, assume, only_estimating
from common.registry import get_job
from common.report import Report
from common.runtime import Work, model_size, sae_size
from common.saes import SaeInfo, SaeSpec, check_saes, load_sae
from common.shards import LIBVER, ShardWriter
from common.top_activations import EMPTY, HISTOGRAM_EDGES, TopActivations, context_windows
from common.upstream import upstream_manifest
from common.window_encoder import WindowEncoder
from jobs import _feature_cards as cards
from jobs._feature_cards import FeatureId
from jobs._reasoning.chain import tested_chain, tested_model

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")


FIELD = "feature_contexts"
LOGITS_UNIT = "logit_effects"
ASSUMED_WIDTH = 16384  # for estimates when a pretrained SAE's width is not known before loading

# ---------------------------------------------------------------- the manifest section


class Settings(StrictModel):
    """The `feature_contexts:` section of a manifest."""

    model: ModelSpec = Field(description="language model")
    sae: SaeSpec | None = Field(None, description="one SAE per layer (those the features were found with); None: "
                                "those a feature_ablation or circuit_discovery run in features_from tested")
    features: list[FeatureId] | None = Field(None, min_length=1, description="the features, as [layer, feature] "
                                             "pairs, at least one (or give features_from)")
    features_from: UpstreamRun | None = Field(
        None, description="a run whose features to show: feature_contrast (its selected features), "
        "population_patching (those it patched), feature_ablation (those it ablated), circuit_discovery (its "
        "candidate primitives', else its causal clusters') or feature_correlation (the ends of its strongest "
        "edges); its directory or manifest")
    from_model: str | None = Field(None, description="feature_ablation and circuit_discovery runs: the model (its "
                                   "`models:` name) whose features to show, when the run has several")
    max_features: int = Field(64, ge=1, description="at most this many features from features_from, the "
                              "strongest first")
    corpus: CorpusSpec = Field(description="the text, its windows and the token budget")
    top_k: int = Field(20, ge=1, description="top-activating tokens kept per feature")
    context_before: int = Field(12, ge=0, description="tokens of context shown before the activating token")
    context_after: int = Field(4, ge=0, description="tokens of context shown after it")
    logit_tokens: int = Field(10, ge=1, description="tokens listed per feature as most promoted and most "
                              "suppressed by its decoder direction")
    cards: int = Field(32, ge=1, description="features with a card in report.md (cards.html has all)")
    batch_size: int = Field(16, ge=1, description="windows per forward pass")
    tokens_per_unit: int = Field(262_144, ge=1, description="corpus tokens per work unit (the unit of resuming)")

    @model_validator(mode="after")
    def _one_source(self) -> Settings:
        if (self.features is None) == (self.features_from is None):
            raise ValueError("give exactly one of `features` (a list of [layer, feature]) and `features_from` "
                             "(an earlier run)")
        if self.sae is None and self.features_from is None:
            raise ValueError("`sae` is required with `features` (only a reasoning run in `features_from` names its "
                             "SAEs)")
        if self.tokens_per_unit < self.corpus.window:
            raise ValueError(f"tokens_per_unit ({self.tokens_per_unit}) must be at least corpus.window "
                             f"({self.corpus.window}): a unit takes the windows that start in its range")
        return self

    @property
    def width(self) -> int:
        return self.context_before + 1 + self.context_after


# ---------------------------------------------------------------- the features


def sae_of(s: Settings) -> SaeSpec:
    """The SAEs: the manifest's, or those the reasoning run in features_from tested (for the
    model it names, which must be this manifest's model)."""
    if s.sae is not None:
        return s.sae
    assert s.features_from is not None  # _one_source
    entry, spec = tested_model(s.features_from, s.from_model, f"{FIELD}.features_from")
    if entry.model.name != s.model.name:
        raise UserError(f"{FIELD}.model: {s.model.name} is not {entry.name} ({entry.model.name}), whose SAEs "
                        f"{s.features_from.name} tested; set model to it, or from_model to the model you mean")
    return spec


def chosen_features(s: Settings) -> list[FeatureId] | None:
    """The features in the order their cards are shown (duplicates dropped); None only while
    planning a chain whose upstream run does not exist yet."""
    if s.features is not None:
        return list(dict.fromkeys(s.features))
    assert s.features_from is not None  # _one_source
    merged = s.features_from / "merged.h5"
    if not merged.is_file():
        only_estimating(UserError(f"{FIELD}.features_from: {s.features_from} has no merged.h5; run it first "
                                  "(saebatch submit <its manifest>) and wait for its reduce"))
        assume(f"{FIELD}.features_from: run {s.features_from.name} does not exist yet; taken to give "
               f"{s.max_features} features")
        return None
    found = cards.features_of_run(merged, s.from_model, f"{FIELD}.features_from")
    if not found:
        raise UserError(f"{FIELD}.features_from: {merged} names no feature (nothing selected?); choose another "
                        "run or list `features`")
    return found[: s.max_features]


def _upstream_layers(s: Settings, n_layers: int) -> list[int]:
    """Planning ahead of features_from: the layers its features would come from, read from its
    manifest (the SAEs that the memory estimate counts)."""
    assert s.features_from is not None  # chosen_features found no run
    manifest, where = upstream_manifest(s.features_from, UserError(f"{FIELD}.features_from: {s.features_from} has "
                                                                   "no merged.h5; run it first"))
    if manifest.job in ("feature_ablation", "circuit_discovery"):
        layers = tested_model(s.features_from, s.from_model, f"{FIELD}.features_from")[0].layers
    elif manifest.job == "feature_correlation":
        layers = manifest.settings.chosen_layers(n_layers)
    elif manifest.job in ("feature_contrast", "population_patching"):  # a unit per layer, or per feature
        layers = [unit.payload["layer"] for unit in get_job(manifest.job).plan(manifest) if "layer" in unit.payload]
    else:
        raise UserError(f"{FIELD}.features_from: {where} is a {manifest.job} manifest; name a feature_contrast, "
                        "population_patching, feature_ablation, circuit_discovery or feature_correlation run")
    layers = sorted(set(layers))
    assume(f"{FIELD}.features_from: its features taken to lie at layers {layers}, those of {where}")
    return layers


def _check_features(features: list[FeatureId], widths: dict[int, int | None], n_layers: int) -> None:
    for feature in features:
        if not 0 <= feature.layer < n_layers:
            raise UserError(f"{FIELD}.features: layer {feature.layer} does not exist; the model has layers "
                            f"0 to {n_layers - 1}")
        width = widths.get(feature.layer)
        if width is not None and feature.feature >= width:
            raise UserError(f"{FIELD}.features: feature {feature.feature} of layer {feature.layer} is beyond the "
                            f"{width} features of its SAE; feature ids run from 0 to {width - 1}")


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """The logit-effects unit, then units of `tokens_per_unit` corpus tokens; checks the features
    against the model and its SAEs first."""
    s = manifest.settings
    config = text_config(load_config(s.model)[0])
    if s.corpus.window > config.max_position_embeddings:
        raise UserError(f"{FIELD}.corpus.window: {s.corpus.window} tokens exceed the model's "
                        f"{config.max_position_embeddings} positions; use shorter windows")
    features = chosen_features(s)
    if features is not None:
        _check_features(features, {}, config.num_hidden_layers)  # the layers exist, before their SAEs are looked up
        infos = check_saes(sae_of(s), sorted({f.layer for f in features}), config.hidden_size, f"{FIELD}.sae")
        _check_features(features, {layer: info.d_sae for layer, info in infos.items()}, config.num_hidden_layers)
    units = token_units(s.corpus, local_tokenizer(s.model), s.tokens_per_unit, f"{FIELD}.corpus")
    return [WorkUnit(LOGITS_UNIT, {}), *units]


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    config = text_config(load_config(s.model)[0])
    features = chosen_features(s)
    count = len(features) if features is not None else s.max_features
    if features is not None:
        layers = sorted({f.layer for f in features})
        infos = check_saes(sae_of(s), layers, config.hidden_size, f"{FIELD}.sae")
    else:
        layers = _upstream_layers(s, config.num_hidden_layers)
        infos = _saes_ahead(s, layers, config.hidden_size)
    width = max(info.d_sae or ASSUMED_WIDTH for info in infos.values())
    per_feature = s.top_k * (4 + 8 + s.width * 8) + (len(HISTOGRAM_EDGES) - 1) * 8 + 16
    token_units_here = [unit for unit in units if unit.id != LOGITS_UNIT]
    batch_tokens = s.batch_size * s.corpus.window
    itemsize = DTYPE_BYTES[s.model.dtype]
    device_bytes = (parameter_bytes(config, s.model.dtype) + len(layers) * 2 * config.hidden_size * width * 4
                    + batch_tokens * (len(layers) * config.hidden_size * itemsize + (width + 2 * count) * 4)
                    + count * (2 * per_feature + 4 * (s.top_k + batch_tokens)))
    on_cpu = s.model.device == "cpu" or manifest.cluster.gpus_per_task == 0
    notes = (f"{count} features at layers {layers}" + ("" if features is not None else " (assumed)"),
             f"device memory about {device_bytes / 1e9:.2f} GB (model, SAEs, one batch, the running top-{s.top_k})",
             "memory does not grow with the corpus: each unit keeps only its top-k per feature")
    return Estimate(output_bytes=per_feature * count * len(token_units_here),
                    task_memory_bytes=device_bytes if on_cpu else per_feature * count * 2,
                    notes=notes, work=_work(s, config, token_units_here, layers, width))


def _saes_ahead(s: Settings, layers: list[int], d_model: int) -> dict[int, SaeInfo]:
    """The SAEs of `layers`, planning ahead of features_from; those a chain trains (no `sae`)
    may not exist yet either, and are then as wide as its training makes them."""
    spec = sae_of(s)
    untrained = [layer for layer in layers if s.sae is None and not (Path(spec.describe(layer)) / "cfg.json").is_file()]
    trained = [layer for layer in layers if layer not in untrained]
    infos = check_saes(spec, trained, d_model, f"{FIELD}.sae")
    if untrained:
        assert s.features_from is not None  # no `sae`: the chain's
        chain, entry = tested_chain(s.features_from, s.from_model, f"{FIELD}.features_from")
        widths = dict(zip(entry.layers, chain.sae_widths(entry), strict=True))  # states its assumption
        infos |= {layer: SaeInfo(widths.get(layer), None) for layer in untrained}
    return infos


def _work(s: Settings, config, units: list[WorkUnit], layers: list[int], width: int) -> tuple:
    """The model and SAEs loaded, then every token forwarded up to the last layer needed and
    encoded by each layer's SAE."""
    model, saes = model_size(s.model), sae_size(config.hidden_size, width, len(layers))
    tokens = sum(unit.payload["stop"] - unit.payload["start"] for unit in units)
    depth = (max(layers) + 1) / config.num_hidden_layers
    return (Work("load", model.weight_bytes + saes.parameters * 2 * 4, label=f"{model.name} and {len(layers)} SAE(s)"),
            Work("forward", tokens * depth, model, label=f"{tokens:,} tokens through {depth:.0%} of the blocks"),
            Work("forward", tokens, saes, label=f"{tokens:,} tokens encoded by {len(layers)} SAE(s)"))


# ---------------------------------------------------------------- the GPU work


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    features = chosen_features(s)
    assert features is not None  # the upstream run exists once a task runs (checked at submit)
    model, tokenizer = load_model(s.model, attn_implementation=None), load_tokenizer(s.model)
    config = text_config(model.config)
    device = input_device(s.model)
    layers = sorted({f.layer for f in features})
    spec = sae_of(s)
    saes = {layer: load_sae(spec, layer, config.hidden_size, device) for layer in layers}
    _check_features(features, {layer: sae.cfg.d_sae for layer, sae in saes.items()}, config.num_hidden_layers)
    listed = json.dumps([[f.layer, f.feature] for f in features])
    if shard.get_attr("features", listed) != listed:
        raise UserError(f"shard {shard.shard_index} was started with other features than {FIELD} names now "
                        "(did the upstream run change?); start the run afresh (new run.dir)")
    shard.set_attrs(model=s.model.name, model_dtype=s.model.dtype, corpus=s.corpus.describe(), features=listed,
                    sae_ids=json.dumps({layer: spec.describe(layer) for layer in layers}))
    pending = set(shard.pending())
    if LOGITS_UNIT in pending:
        with shard.unit(LOGITS_UNIT) as group:
            _logit_effects(model, saes, features, s.logit_tokens, group)
    reader = FeatureReader(WindowEncoder(model, saes, device, tokenizer.pad_token_id), features)
    to_write = [unit for unit in units if unit.id in pending and unit.id != LOGITS_UNIT]
    total = sum(unit.payload["stop"] - unit.payload["start"] for unit in to_write)
    with tqdm(total=total, desc=f"shard {shard.shard_index}", unit="tok", unit_scale=True) as progress:
        for unit, unit_windows in windows_by_unit(s.corpus, tokenizer, to_write, f"{FIELD}.corpus"):
            top = TopActivations.zeros(len(features), s.top_k, s.width, device)
            for start in range(0, len(unit_windows), s.batch_size):
                batch = unit_windows[start : start + s.batch_size]
                top.add(reader.activations(batch), *batch_contexts(batch, s.context_before, s.context_after))
                progress.update(sum(w.content for w in batch))
            with shard.unit(unit.id) as group:
                group.attrs.update(start=unit.payload["start"], stop=unit.payload["stop"], windows=len(unit_windows))
                top.write(group)
            del top  # before the next unit's: one set on the device at a time


class FeatureReader:
    """The chosen features' activations, a column each in the order of the list, a row per content token."""

    def __init__(self, encoder: WindowEncoder, features: list[FeatureId]):
        self.encoder = encoder
        self.columns = {layer: ([i for i, f in enumerate(features) if f.layer == layer],
                                torch.tensor([f.feature for f in features if f.layer == layer], device=encoder.device))
                        for layer in sorted({f.layer for f in features})}
        self.count = len(features)

    @no_grad
    def activations(self, batch: list[Window]) -> torch.Tensor:
        encoded = self.encoder.token_features(batch)
        rows = len(next(iter(encoded.values())))
        out = torch.empty((rows, self.count), device=self.encoder.device)
        for layer, (where, ids) in self.columns.items():
            out[:, where] = encoded[layer][:, ids].float()
        return out


def batch_contexts(batch: list[Window], before: int, after: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the batch's content tokens in order: corpus positions, context token ids, and the row
    of each context token (EMPTY outside its window), as TopActivations.add takes them."""
    positions = np.concatenate([np.arange(w.start, w.start + w.content) for w in batch])
    ids = np.concatenate([np.asarray(w.ids[w.prefix :], dtype=np.int64) for w in batch])
    around, inside = context_windows([w.content for w in batch], before, after)
    rows = np.where(inside, around, EMPTY)
    context = np.where(inside, ids[np.clip(around, 0, len(ids) - 1)], EMPTY)
    return torch.from_numpy(positions), torch.from_numpy(context), torch.from_numpy(rows)


@no_grad
def _logit_effects(model, saes: dict, features: list[FeatureId], count: int, group: h5py.Group) -> None:
    """Per feature, the tokens whose logits its decoder direction raises and lowers most (W_dec[f] @ W_U)."""
    unembedding = model.get_output_embeddings().weight  # (vocab, d_model)
    directions = torch.stack([saes[f.layer].W_dec[f.feature] for f in features])
    results: dict[str, list[torch.Tensor]] = {"top_ids": [], "top_values": [], "bottom_ids": [], "bottom_values": []}
    for start in range(0, len(features), 256):  # (256, vocab) at a time
        effects = directions[start : start + 256].to(unembedding.device, torch.float32) @ unembedding.float().T
        top, bottom = effects.topk(count, dim=1), effects.topk(count, dim=1, largest=False)
        for name, values in (("top_ids", top.indices), ("top_values", top.values), ("bottom_ids", bottom.indices),
                             ("bottom_values", bottom.values)):
            results[name].append(values.cpu())
    for name, parts in results.items():
        group.create_dataset(name, data=torch.cat(parts).numpy())


# ---------------------------------------------------------------- reduce


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    attrs, top, logits = _merge(shard_paths)
    features = [FeatureId(layer=layer, feature=feature) for layer, feature in json.loads(attrs["features"])]
    tokenizer = load_tokenizer(s.model)
    with h5py.File(out_dir / "merged.h5", "w", libver=LIBVER) as out:
        out.attrs.update({key: attrs[key] for key in ("model", "model_dtype", "corpus", "sae_ids", "features")})
        out.attrs.update(job=FIELD, format="saebatch-feature-contexts/1", tokens=top.tokens, top_k=s.top_k,
                         context_before=s.context_before, context_after=s.context_after,
                         histogram_edges=HISTOGRAM_EDGES,
                         features_from=str(s.features_from or "the manifest's list"))
        out.create_dataset("features/layer", data=np.array([f.layer for f in features]))
        out.create_dataset("features/feature", data=np.array([f.feature for f in features]))
        top.write(out.create_group("top"))
        cards.write_texts(out["top"], top, tokenizer)
        for name, values in logits.items():
            out.create_dataset(f"logits/{name}", data=values)
        cards.write_logit_texts(out["logits"], logits, tokenizer)
    with h5py.File(out_dir / "merged.h5", "r") as merged:
        book = cards.CardBook.from_merged(merged)
    cards.write_report(Report(out_dir / "report", "Feature cards: top-activating contexts"), book, s.cards)


def _merge(shard_paths: list[Path]) -> tuple[dict, TopActivations, dict[str, np.ndarray]]:
    """Every token unit merged in corpus order, whatever the order of the shards, and the logit effects."""
    units: list[tuple[int, Path, str]] = []
    attrs: dict = {}
    logits: dict[str, np.ndarray] = {}
    for path in shard_paths:
        with h5py.File(path, "r") as shard:
            if attrs and shard.attrs["features"] != attrs["features"]:
                raise UserError(f"{path} read other features than {shard_paths[0]}; rerun the run afresh")
            attrs = attrs or dict(shard.attrs)
            for name, group in shard["units"].items():
                if name == LOGITS_UNIT:
                    logits = {key: group[key][()] for key in group}
                else:
                    units.append((int(group.attrs["start"]), path, name))
    merged: TopActivations | None = None
    for _, path, name in tqdm(sorted(units), desc="merging units", unit="unit"):
        with h5py.File(path, "r") as shard:
            part = TopActivations.read(shard["units"][name])
        merged = part if merged is None else merged.merge(part)
    assert merged is not None  # a plan has at least one token unit
    return attrs, merged, logits
