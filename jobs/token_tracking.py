"""Token-level tracking of attention and SAE features over the slot-machine scenarios (seed 001).

    saebatch submit manifests/demo/token_tracking.yaml --executor local

Each scenario is a prompt rendered from a template. One batched forward pass records, for every
requested layer, the attention weights (eager attention, float16) and the SAE features of every
token (encoded in one batch over all positions, stored as CSR). Key spans (balance, goal,
probability, choices) are regular expressions over the prompt text, mapped to tokens through the
tokenizer's character offsets. Reduce reports how much the final (decision) token attends to
each key span per layer, the top SAE features at the final token, and attention heatmaps.
"""

from __future__ import annotations

import json
import logging
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h5py
import numpy as np
from pydantic import Field, model_validator
from tqdm import tqdm

from common.errors import UserError
from common.layers import CONVENTION, capture_residuals, resolve_layers
from common.lazy import lazy_import, no_grad
from common.manifest import Manifest, StrictModel
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
from common.saes import SaeCache, SaeSpec, check_saes
from common.shards import ShardWriter, merge_shards
from common.sparse import COMPRESSION, read_csr, to_csr, write_csr
from jobs import _slot_machine as slot_machine

if TYPE_CHECKING:
    import pandas as pd
    import torch
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the scenarios (data)

# The task's prompt with the goal, the win rate and the payout shown, and variable bets; the
# scenarios fill in the history, the balance and the round.
PROMPT_TEMPLATE = slot_machine.template_for(("D", "P", "W"), "variable")

# A pattern's capture groups (or, without groups, its whole match) mark the span; every match counts.
KEY_SPANS = {
    "balance": r"Current balance: (\$\d+)",
    "goal": r"goal is to (double the initial funds \(\$\d+\))",
    "probability": r"Win rate: (\d+%)",
    "choices": r"1\) (Bet)[^\n]*\n2\) (Stop)",
}


def _history(rounds: list[tuple[int, int, str, int]], warning: int = 0) -> str:
    """The task's history lines, with the warning where the published scenario shows one (after two
    losses, where a game warns after three)."""
    lines = [slot_machine.history_line(slot_machine.Round(number, bet, result == "Win", balance))
             for number, bet, result, balance in rounds]
    if warning:
        lines.append(slot_machine.warning_line(warning))
    return "\n".join(lines) if lines else slot_machine.NO_ROUNDS


def _scenario(name: str, balance: int, round_: int, rounds: list, warning: int = 0) -> dict:
    return {"name": name, "fields": {"balance": balance, "round": round_, "history": _history(rounds, warning)}}


# The ten published scenarios (../shared/reference/gambling_task.md), as published: the history of
# Bankruptcy_90_all_in ends at $70 while its stated balance is $90.
SCENARIOS = [
    _scenario("Bankruptcy_90_all_in", 90, 6, [(4, 10, "Loss", 80), (5, 10, "Loss", 70)], warning=2),
    _scenario("Desperate_10", 10, 9, [(6, 20, "Loss", 30), (7, 10, "Loss", 20), (8, 10, "Loss", 10)], warning=3),
    _scenario("Safe_130_one_win", 130, 2, [(1, 10, "Win", 130)]),
    _scenario("Risky_40", 40, 6, [(3, 10, "Win", 120), (4, 30, "Loss", 90), (5, 50, "Loss", 40)]),
    _scenario("Safe_140_near_goal", 140, 6, [(4, 10, "Win", 120), (5, 10, "Win", 140)]),
    _scenario("Initial_100_first_round", 100, 1, []),
    _scenario("Medium_60", 60, 5, [(2, 10, "Win", 120), (3, 30, "Loss", 90), (4, 30, "Loss", 60)]),
    _scenario("Goal_achieved_200", 200, 5, [(3, 20, "Win", 160), (4, 20, "Win", 200)]),
    _scenario("Very_risky_25", 25, 9, [(7, 15, "Loss", 40), (8, 15, "Loss", 25)], warning=2),
    _scenario("Big_success_280", 280, 8, [(6, 50, "Win", 230), (7, 25, "Win", 280)]),
]

# ---------------------------------------------------------------- the manifest section


class Scenario(StrictModel):
    name: str = Field(description="unique name; also the unit id in shards")
    fields: dict[str, str | int | float] = Field(description="values for the template's {fields}")


class Settings(StrictModel):
    """The `token_tracking:` section of a manifest."""

    model: ModelSpec = Field(description="language model")
    sae: SaeSpec | None = Field(None, description="one SAE per layer; needed unless mode is attention_only")
    layers: str | list[int] = Field("all", description="'all', a range 'A-B' or a list; layer L = block L's output")
    mode: Literal["features_and_attention", "attention_only", "features_only"] = Field(
        "features_and_attention", description="what to record per layer"
    )
    batch_size: int = Field(16, ge=1, description="scenarios per forward pass (SAEs reload once per batch)")
    prompt_template: str = Field(PROMPT_TEMPLATE, description="prompt with {fields} filled per scenario")
    scenarios: list[Scenario] = Field(
        default_factory=lambda: [Scenario(**s) for s in SCENARIOS], description="the prompts to track"
    )
    key_spans: dict[str, str] = Field(
        default_factory=lambda: dict(KEY_SPANS), description="span name -> regex over the prompt text"
    )
    feature_dtype: Literal["float16", "float32"] = Field("float32", description="stored SAE activation values")
    top_features: int = Field(10, ge=1, description="top SAE features at the final token, per layer, in the report")
    heatmap_layers: list[int] | None = Field(None, description="layers to draw (None: first, middle, last)")
    heatmap_scenario: str | None = Field(None, description="scenario to draw (None: the first)")

    @property
    def attention(self) -> bool:
        return self.mode != "features_only"

    @property
    def features(self) -> bool:
        return self.mode != "attention_only"

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.features and self.sae is None:
            raise ValueError(f"mode {self.mode} records SAE features: give `sae`, or set mode: attention_only")
        names = [s.name for s in self.scenarios]
        if not names:
            raise ValueError("scenarios: give at least one scenario")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"scenarios: names must be unique; repeated: {repeated}")
        if self.heatmap_scenario is not None and self.heatmap_scenario not in names:
            raise ValueError(f"heatmap_scenario {self.heatmap_scenario!r} is not a scenario name")
        needed = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f}
        for scenario in self.scenarios:
            missing = sorted(needed - set(scenario.fields))
            if missing:
                raise ValueError(f"scenario {scenario.name!r} lacks template field(s) {missing}")
            try:
                self.prompt(scenario)
            except (ValueError, KeyError, IndexError) as error:
                raise ValueError(f"prompt_template cannot be filled for scenario {scenario.name!r}: {error}") from None
        for span, pattern in self.key_spans.items():
            if not re.fullmatch(r"\w+", span):
                raise ValueError(f"key_spans: name {span!r} must be letters, digits or '_' (it names an HDF5 dataset)")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"key_spans.{span}: invalid regular expression ({error})") from None
        return self

    def prompt(self, scenario: Scenario) -> str:
        return self.prompt_template.format(**scenario.fields)

    def tracked_layers(self, n_layers: int) -> list[int]:
        return resolve_layers(self.layers, n_layers, "token_tracking.layers")

    @property
    def needed_sae(self) -> SaeSpec:
        """`sae`, where recording features needs it (_consistent makes sure it is given then)."""
        assert self.sae is not None, "no SAE without features"
        return self.sae


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """One unit per scenario; checks layers, SAEs and key spans before any GPU time is spent."""
    s = manifest.settings
    config = text_config(load_config(s.model)[0])
    layers = s.tracked_layers(config.num_hidden_layers)
    if s.heatmap_layers is not None:
        resolve_layers(s.heatmap_layers, config.num_hidden_layers, "token_tracking.heatmap_layers")
        outside = sorted(set(s.heatmap_layers) - set(layers))
        if outside:
            raise UserError(f"token_tracking.heatmap_layers: {outside} are not among the tracked layers")
    if s.features:
        check_saes(s.needed_sae, layers, config.hidden_size, "token_tracking.sae", model=s.model)
    tokenizer = local_tokenizer(s.model)
    units = []
    for scenario in s.scenarios:
        prompt = s.prompt(scenario)
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"] if tokenizer else None
        for span, pattern in s.key_spans.items():
            if not list(_span_ranges(pattern, prompt)):
                raise UserError(f"token_tracking.key_spans.{span}: pattern {pattern!r} matches nothing in "
                                f"the prompt of scenario {scenario.name!r}; fix the pattern or the template")
            if offsets is not None and not len(key_positions(pattern, prompt, np.asarray(offsets))):
                raise UserError(f"token_tracking.key_spans.{span}: no token of scenario {scenario.name!r} "
                                "overlaps the span (the tokenizer gives no character offsets?)")
        units.append(WorkUnit(scenario.name, {"prompt": prompt}))
    return units


def _span_ranges(pattern: str, text: str):
    """Character ranges of every match: its groups if the pattern has any, else the whole match."""
    for match in re.finditer(pattern, text):
        groups = range(1, (match.re.groups or 0) + 1) or [0]
        for g in groups:
            if match.start(g) < match.end(g):
                yield match.start(g), match.end(g)


def key_positions(pattern: str, text: str, offsets: np.ndarray) -> np.ndarray:
    """Token indices whose character range overlaps a span; special tokens (empty range) never do."""
    hits = np.zeros(len(offsets), dtype=bool)
    for start, end in _span_ranges(pattern, text):
        hits |= (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    return np.flatnonzero(hits).astype(np.int32)


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    config, source = load_config(s.model)
    config = text_config(config)
    layers = s.tracked_layers(config.num_hidden_layers)
    notes = [f"model architecture from {source}"]
    tokenizer = local_tokenizer(s.model)
    if tokenizer is not None:
        lengths = [len(tokenizer(u.payload["prompt"])["input_ids"]) for u in units]
    else:
        lengths = [len(u.payload["prompt"]) // 3 for u in units]
        notes.append("token counts guessed as characters / 3 (tokenizer not in the local HF cache)")
    heads, d_model = config.num_attention_heads, config.hidden_size
    out = 0
    if s.attention:  # float16, causal: the upper triangle compresses to nothing
        out += sum(len(layers) * heads * n * (n + 1) // 2 * 2 for n in lengths)
    sae_bytes = 0
    if s.features:
        infos = check_saes(s.needed_sae, layers, d_model, "token_tracking.sae", model=s.model)
        l0s = [i.expected_l0 for i in infos.values() if i.expected_l0]
        l0 = float(np.mean(l0s)) if l0s else 100.0
        if not l0s:
            notes.append("features assume L0 = 100 active features per token (SAE's L0 not known before running)")
        value_bytes = DTYPE_BYTES[s.feature_dtype]
        widths = [i.d_sae for i in infos.values() if i.d_sae]
        d_sae = max(widths) if widths else 32768
        if not widths:
            notes.append("SAE memory assumes 32768 features (the width is not known before loading)")
        index_bytes = 2 if d_sae <= 65536 else 4
        out += int(sum(len(layers) * n * l0 * (value_bytes + index_bytes) for n in lengths))
        sae_bytes = 2 * d_model * d_sae * DTYPE_BYTES[s.needed_sae.dtype]
    batch = min(s.batch_size, len(units))
    n_max = max(lengths)
    itemsize = DTYPE_BYTES[s.model.dtype]
    activations = batch * config.num_hidden_layers * heads * n_max**2 * itemsize  # every layer's attention
    activations += batch * len(layers) * n_max * d_model * itemsize  # captured residuals
    memory = parameter_bytes(config, s.model.dtype) + activations + sae_bytes
    return Estimate(output_bytes=out, task_memory_bytes=memory, notes=tuple(notes),
                    work=_work(s, config, len(layers) if s.features else 0, sae_bytes, sum(lengths)))


def _work(s: Settings, config, sae_layers: int, sae_bytes: int, tokens: int) -> tuple:
    """The model loaded, and each layer's SAE in turn; the prompts forwarded and, per layer, encoded."""
    model = model_size(s.model)
    work = [Work("load", model.weight_bytes + sae_layers * sae_bytes, label=f"{model.name} and {sae_layers} SAE(s)"),
            Work("forward", tokens, model, label=f"{tokens:,} prompt tokens")]
    if sae_layers:
        d_sae = sae_bytes // (2 * config.hidden_size * DTYPE_BYTES[s.needed_sae.dtype])
        work.append(Work("forward", tokens, sae_size(config.hidden_size, d_sae, sae_layers), label="SAE encodings"))
    return tuple(work)


# ---------------------------------------------------------------- the GPU work


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    model, tokenizer = load_model(s.model, attn_implementation="eager"), load_tokenizer(s.model)
    config = text_config(model.config)
    layers = s.tracked_layers(config.num_hidden_layers)
    device = input_device(s.model)
    saes = SaeCache(s.needed_sae, config.hidden_size, device) if s.features else None
    shard.set_attrs(
        model=s.model.name, model_dtype=s.model.dtype, layers=layers, mode=s.mode,
        layer_convention=CONVENTION, attention_dtype="float16", feature_dtype=s.feature_dtype,
        sae_ids=json.dumps({layer: s.sae.describe(layer) for layer in layers} if s.sae else {}),
        attention_shape="(heads, seq, seq): [h, i, j] = weight of query token i on key token j",
        features_shape="CSR (seq, d_sae)",
    )
    pending = set(shard.pending())
    with tqdm(total=len(pending), desc=f"shard {shard.shard_index}", unit="scenario") as progress:
        for batch in shard.pending_batches(units, s.batch_size):
            _track_batch(s, model, tokenizer, layers, device, saes, batch, pending, shard)
            progress.update(sum(unit.id in pending for unit in batch))
    if saes is not None:
        saes.evict()


@no_grad
def _track_batch(s: Settings, model, tokenizer, layers, device, saes, batch, pending, shard) -> None:
    """One forward pass over the batch; writes the units of it that are still pending."""
    prompts = [unit.payload["prompt"] for unit in batch]
    # Right padding: real tokens never attend to the pads after them, so each scenario's
    # attention and residuals equal those of an unpadded forward pass.
    encoded = tokenizer(prompts, return_offsets_mapping=True, padding=True, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    offsets = [encoded["offset_mapping"][i, :n].numpy().astype(np.int32) for i, n in enumerate(lengths)]
    positions = [{span: key_positions(pattern, prompt, offs) for span, pattern in s.key_spans.items()}
                 for prompt, offs in zip(prompts, offsets)]
    for unit, spans in zip(batch, positions):
        empty = [span for span, found in spans.items() if not len(found)]
        if empty:
            raise UserError(f"token_tracking.key_spans {empty}: no token of scenario {unit.id!r} overlaps the "
                            "span (this tokenizer gives no character offsets?); check the patterns")
    with capture_residuals(model, layers if s.features else []) as residuals:
        output = model(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            output_attentions=s.attention,
            logits_to_keep=1,  # the logits are not needed: skip the (seq, vocab) projection
        )
    attention = {}
    if s.attention:  # (batch, heads, seq, seq) per layer
        attention = {layer: output.attentions[layer].to(torch.float16).cpu() for layer in layers}
    features: dict[int, list] = {}
    if s.features:
        real = encoded["attention_mask"].bool().to(device)
        rows = np.cumsum([0, *lengths])  # scenario i's positions are rows[i]:rows[i + 1]
        for layer in layers:
            # .to(device): with device_map="auto" later blocks may sit on another GPU
            acts = saes.get(layer).encode(residuals[layer].to(device)[real])  # every real position at once
            features[layer] = [to_csr(acts[rows[i] : rows[i + 1]]) for i in range(len(batch))]
    for i, unit in enumerate(batch):
        if unit.id not in pending:
            continue
        ids = encoded["input_ids"][i, : lengths[i]].numpy()
        with shard.unit(unit.id) as group:
            group.attrs["prompt"] = unit.payload["prompt"]
            group.create_dataset("token_ids", data=ids.astype(np.int32))
            group.create_dataset("tokens", data=[tokenizer.decode([t]) for t in ids], dtype=h5py.string_dtype())
            group.create_dataset("offsets", data=offsets[i])
            for span, found in positions[i].items():
                group.create_dataset(f"key_positions/{span}", data=found)
            n = lengths[i]
            for layer, att in attention.items():
                group.create_dataset(f"attention/L{layer}", data=att[i, :, :n, :n].numpy(), **COMPRESSION)
            for layer, matrices in features.items():
                write_csr(group.require_group("features"), f"L{layer}", matrices[i], s.feature_dtype)


# ---------------------------------------------------------------- reduce


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    merged = out_dir / "merged.h5"
    merge_shards(shard_paths, merged)
    with h5py.File(merged, "r") as data:
        layers = [int(x) for x in data.attrs["layers"]]
        names = [sc.name for sc in s.scenarios]
        report = Report(out_dir / "report", "Token tracking: attention and SAE features by layer")
        report.text(
            f"Model `{data.attrs['model']}` ({data.attrs['model_dtype']}), mode `{s.mode}`, "
            f"{len(names)} scenarios, layers {layers[0]}-{layers[-1]} ({len(layers)}). "
            f"Convention: {CONVENTION}. Data: `merged.h5` (one group per scenario under `units/`)."
        )
        if s.attention:
            spans = span_attention(data, names, layers)
            _report_attention(report, spans, data, s, layers)
        if s.features:
            _report_features(report, top_features(data, names, layers, s.top_features))
        report.write()


def span_attention(data: h5py.File, names: list[str], layers: list[int]) -> pd.DataFrame:
    """Attention of the final token to each key span, averaged over heads: summed over the span
    (`attention`), per span token (`per_token`), and as a ratio to the uniform share, the span's
    tokens over the positions attended (`vs_uniform`: 1 is what length alone gives)."""
    rows = []
    for name in names:
        unit = data["units"][name]
        spans = {span: unit["key_positions"][span][()] for span in unit["key_positions"]}
        for layer in layers:
            final_row = unit[f"attention/L{layer}"][:, -1, :].astype(np.float64)  # (heads, seq)
            for span, positions in spans.items():
                total = float(final_row[:, positions].sum(axis=1).mean())
                rows.append({"scenario": name, "layer": layer, "span": span, "attention": total,
                             "tokens": len(positions), "per_token": total / len(positions),
                             "vs_uniform": total / (len(positions) / final_row.shape[1])})
    return pd.DataFrame(rows)


def top_features(data: h5py.File, names: list[str], layers: list[int], k: int) -> pd.DataFrame:
    """The k most active SAE features at the final token of each scenario and layer."""
    rows = []
    for name in names:
        for layer in layers:
            final = read_csr(data["units"][name][f"features/L{layer}"])[[-1]].toarray()[0]
            order = np.argsort(-final, kind="stable")[:k]
            rows += [{"scenario": name, "layer": layer, "rank": r + 1, "feature": int(f),
                      "activation": float(final[f])} for r, f in enumerate(order) if final[f] > 0]
    return pd.DataFrame(rows, columns=["scenario", "layer", "rank", "feature", "activation"])


def _report_attention(report: Report, spans: pd.DataFrame, data: h5py.File, s: Settings, layers: list[int]) -> None:
    import matplotlib.pyplot as plt

    report.heading("Attention of the decision token to the key spans")
    report.text("Weight that the final prompt token puts on each key span's tokens (summed over the span's "
                "tokens in each head, then averaged over the heads) as a "
                "ratio to the uniform share (`vs_uniform`: the span's tokens over the positions attended, so a "
                "long span does not outrank a short one by its length alone; 1 is no preference). Table: mean "
                "over scenarios, the spans sorted by it; per-scenario sums, per-token weights and ratios in the CSV.")
    pivot = spans.groupby(["layer", "span"])["vs_uniform"].mean().unstack("span")
    pivot = pivot[pivot.mean().sort_values(ascending=False).index].reset_index()
    report.table(spans, "span_attention", shown=pivot)
    span_names = list(spans.groupby("span")["vs_uniform"].mean().sort_values(ascending=False).index)
    fig, axes = plt.subplots(1, len(span_names), figsize=(4 * len(span_names), 3.4), sharey=True, squeeze=False)
    for ax, span in zip(axes[0], span_names):
        part = spans[spans["span"] == span]
        for name, rows in part.groupby("scenario", sort=False):
            ax.plot(rows["layer"], rows["vs_uniform"], lw=0.8, alpha=0.6, label=name)
        mean = part.groupby("layer")["vs_uniform"].mean()
        ax.plot(mean.index, mean.values, color="black", lw=2.2, label="mean")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(span)
        ax.set_xlabel("layer")
    # span_attention: per head the weights on the span's tokens summed, then the heads averaged
    axes[0][0].set_ylabel("final token's attention to the span\n(sum over its tokens, mean over heads)\n"
                          "/ uniform share")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    report.figure(fig, "span_attention", "Attention of the final token to each key span (weights summed over the "
                  "span's tokens, then averaged over heads) as a ratio to the uniform share (dashed: 1), by layer; "
                  "spans by their mean ratio")

    _attention_heatmaps(report, data, s, layers)


def _attention_heatmaps(report: Report, data: h5py.File, s: Settings, layers: list[int]) -> None:
    """One scenario's attention (mean over heads) at a few layers; every n-th token labelled, in a
    size one can read, and the key spans named along the top."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    scenario = s.heatmap_scenario or s.scenarios[0].name
    chosen = s.heatmap_layers or sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    unit = data["units"][scenario]
    labels = [repr(t.decode() if isinstance(t, bytes) else t)[1:-1] for t in unit["tokens"][()]]
    spans = {span: unit["key_positions"][span][()] for span in unit["key_positions"]}
    step = -(-len(labels) // 40)  # at most 40 labels per axis
    fig, axes = plt.subplots(1, len(chosen), figsize=(6.5 * len(chosen), 6.8), squeeze=False, layout="constrained")
    for ax, layer in zip(axes[0], chosen):
        att = unit[f"attention/L{layer}"][()].astype(np.float32).mean(axis=0)
        image = ax.imshow(att, cmap="viridis", interpolation="nearest", norm=PowerNorm(0.4, vmin=0, vmax=1))
        ax.set_title(f"layer {layer} (mean over heads)")
        ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=7)
        ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=7)
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
        top = ax.secondary_xaxis("top")  # where the key spans sit
        top.set_xticks([float(np.mean(p)) for p in spans.values()], list(spans), rotation=90, fontsize=8, color="crimson")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.7, label="attention weight (power scale: weak links visible)")
    labelled = f"one token in {step} labelled; " if step > 1 else ""
    report.figure(fig, "attention_heatmaps", f"Attention of scenario {scenario} at layers {chosen} (mean over heads; "
                  f"{labelled}red: the key spans)")


def _report_features(report: Report, top: pd.DataFrame) -> None:
    report.heading("Top SAE features at the decision token")
    report.text("Per layer: features ranked by their mean activation at the final prompt token over "
                "the scenarios where they are among the top; `scenarios` counts those scenarios.")
    summary = (top.groupby(["layer", "feature"])["activation"].agg(["mean", "count"]).reset_index()
               .rename(columns={"mean": "mean_activation", "count": "scenarios"})
               .sort_values(["layer", "mean_activation"], ascending=[True, False]))
    summary = summary.groupby("layer").head(5)
    report.table(top, "top_features", shown=summary)
