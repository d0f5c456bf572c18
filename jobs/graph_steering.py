"""Graph-corrected steering against naive steering, measured (seed 002's "corrective steering").

    saebatch submit manifests/demo/steering.yaml --executor local

Steering adds delta to one SAE feature (the target) at the chosen positions, error term kept:
x_L += delta * W_dec[target]. Naive steering moves the target alone. Corrected steering also
moves the target's neighbours in the correlation graph (a feature_correlation run: features joined
to the target by an edge, |r| above its threshold, in the target's layer or a later one), each by
its regression on the target from the graph's exact co-moments, beta_g = r * sd_g / sd_t:
x_{L_g} += beta_g * delta * W_dec[g]. So the edit looks like the text the graph was computed on,
where the target never moves alone; whether that helps is what this job measures.

On held-out text, the same for every strength and method (paired): (a) the behaviour steering is
meant to move, the exact P(stop) at the decision cue of slot-machine prompts (next-token mass on
the options, common/choices.py), steered minus unsteered per prompt; (b) its off-target cost,
KL(unsteered || steered) of the next-token distribution at each steered token of neutral text.

A work unit is one strength: the unsteered, naive and corrected forwards of every prompt and
text window. Shards hold the per-prompt P(stop) and per-token KL; reduce states, per strength and
method, the mean shift and mean KL with 95% intervals, and the paired difference corrected minus
naive with its interval and p-value.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h5py
import numpy as np
from pydantic import Field, field_validator
from tqdm import tqdm

from common.choices import OptionReader
from common.corpus import CorpusSpec, Window, check_source, pad_windows, windows
from common.edits import edit_block_output
from common.errors import UserError
from common.layers import CONVENTION, resolve_layers
from common.lazy import lazy_import, no_grad
from common.manifest import Manifest, StrictModel, UpstreamRun, shown
from common.models import (
    DTYPE_BYTES,
    ModelSpec,
    input_device,
    load_config,
    load_model,
    load_tokenizer,
    parameter_bytes,
    text_config,
)
from common.plan import Estimate, WorkUnit, assume, only_estimating
from common.report import Report
from common.runtime import CHARS_PER_TOKEN, Work, model_size
from common.saes import SaeSpec, check_saes, load_sae
from common.shards import LIBVER, ShardWriter
from common.upstream import upstream_to_estimate
from jobs import _gambling as task
from jobs import _slot_machine as slot_machine
from jobs._steering import SCALES, Scale, TargetInGraph, directions, mean_interval, open_graph, target_in_graph

if TYPE_CHECKING:
    import pandas as pd
    import torch
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")

log = logging.getLogger(__name__)
FIELD = "graph_steering"
METHODS = ("naive", "corrected")
TRAINING_SEEDS = range(3)  # the organism's training draws from seeds 0, 1 and 2 (jobs/_organism/training.py)
ASSUMED_WIDTH = 16384  # for estimates when a pretrained SAE's width is not known before loading

# ---------------------------------------------------------------- the manifest section


class Target(StrictModel):
    """The SAE feature steered."""

    layer: int = Field(ge=0, description="its layer (layer L = block L's output)")
    feature: int = Field(ge=0, description="its index in that layer's SAE; the correlation graph must keep it")


class DecisionPrompts(StrictModel):
    """Held-out slot-machine decision prompts (random game states, jobs._organism.corpus), each ending
    at the decision cue."""

    count: int = Field(200, ge=2, description="prompts")
    seed: int = Field(10_100, description="seed of the game states; not 0-2, the organism's training seeds "
                      "(its own measurements use 10,000-10,005)")
    bet_type: Literal["any", "fixed", "variable"] = Field("any", description="only prompts of this bet type")

    @field_validator("seed")
    @classmethod
    def _held_out(cls, value: int) -> int:
        if value in TRAINING_SEEDS:
            raise ValueError(f"seed {value} drew the organism's training text; choose another (e.g. 10100)")
        return value


class Settings(StrictModel):
    """The `graph_steering:` section of a manifest."""

    model: ModelSpec = Field(description="language model (the one the correlation graph was computed on)")
    sae: SaeSpec = Field(description="one SAE per layer (the graph's)")
    correlation: UpstreamRun = Field(description="the feature_correlation run: its directory, or its manifest "
                                     "(a path relative to this manifest)")
    target: Target = Field(description="the feature steered")
    strengths: list[float] = Field(
        default_factory=lambda: [-2.0, -1.0, 1.0, 2.0, 4.0],
        description="amounts added to the target's activation, in `scale` units (a work unit each)")
    scale: Scale = Field("active_mean", description="the unit of `strengths`: active_mean, the target's mean "
                         "activation on the rows where it is active (its typical firing); sd, its standard "
                         "deviation over all rows (small for a rarely active feature); activation, raw SAE units. "
                         "All from the graph's merged statistics")
    positions: Literal["all", "last"] = Field(
        "all", description="where to steer: every content token of a prompt or text window (not <bos> or padding), "
        "or the last one only (the decision cue). KL is read at the steered tokens")
    neighbours: int | None = Field(None, ge=1, description="corrected: at most this many neighbours, strongest |r| "
                                   "first (None: every neighbour in the graph)")
    decisions: DecisionPrompts = Field(default_factory=DecisionPrompts, description="the behaviour measured")
    neutral: CorpusSpec = Field(description="neutral text for the off-target cost (for the organism: "
                                "`builtin: organism_plain`, its plain sentences)")
    temperature: float = Field(1.0, gt=0, description="temperature of the exact P(stop) at the cue")
    batch_size: int = Field(16, ge=1, description="prompts or text windows per forward")

    @field_validator("strengths")
    @classmethod
    def _distinct(cls, value: list[float]) -> list[float]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"give at least one strength, each once (got {value})")
        return value


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """A unit per strength; checks the target against the model, its SAE and the graph first."""
    s = manifest.settings
    config = text_config(load_config(s.model)[0])
    if not s.target.layer < config.num_hidden_layers:
        raise UserError(f"{FIELD}.target.layer: {s.target.layer} is beyond the model's {config.num_hidden_layers} "
                        f"blocks (0-{config.num_hidden_layers - 1})")
    _check_feature(s, check_saes(s.sae, [s.target.layer], config.hidden_size, f"{FIELD}.sae", model=s.model, edited=True)[s.target.layer].d_sae)
    if (s.correlation / "merged.h5").is_file():
        target = read_target(s)
        check_saes(s.sae, sorted({g.layer for g in target.neighbours}), config.hidden_size, f"{FIELD}.sae", model=s.model, edited=True)
    else:
        _graph_to_come(s, config.num_hidden_layers)
    try:
        check_source(s.neutral, f"{FIELD}.neutral")
    except UserError as error:
        if s.neutral.path is None or s.neutral.path.exists():
            raise
        only_estimating(error)
        assume(f"{FIELD}.neutral: {shown(s.neutral.path)} is not here; taken to hold the {s.neutral.tokens:,} tokens asked for")
    return [WorkUnit(f"strength_{strength:+g}", {"strength": strength}) for strength in s.strengths]


def _check_feature(s: Settings, width: int | None) -> None:
    if width is not None and not s.target.feature < width:
        raise UserError(f"{FIELD}.target.feature: {s.target.feature} is beyond layer {s.target.layer}'s SAE of {width} "
                        f"features (0-{width - 1})")


def read_target(s: Settings) -> TargetInGraph:
    """The target and its neighbours in the correlation run, which must be of this model and SAEs."""
    field = f"{FIELD}.correlation"
    with open_graph(s.correlation, field) as graph:
        saes = json.loads(graph.attrs["sae_ids"])
        ours = {layer: s.sae.describe(int(layer)) for layer in saes}
        if graph.attrs["model"] != s.model.name or saes != ours:
            raise UserError(f"{field}: the graph was computed on {graph.attrs['model']} with SAEs {saes}, not on "
                            f"{s.model.name} with {ours}; steer with the graph's model and SAEs")
        _check_pooling(str(graph.attrs.get("pooling", "token")), s.correlation.name)
        return target_in_graph(graph, s.target.layer, s.target.feature, s.neighbours, FIELD)


def _check_pooling(pooling: str, where: str) -> None:
    """Steering edits every token, so strengths, slopes and neighbours must be per-token ones: a
    graph of per-window means has another scale (the organism's planted feature: 75x smaller)."""
    if pooling != "token":
        raise UserError(f"{FIELD}.correlation: {where} pools each window (feature_correlation.pooling "
                        f"{pooling}), but steering edits each token; steer with a graph of pooling: token")


def _graph_to_come(s: Settings, n_layers: int) -> None:
    """Planning only, before the correlation run exists: what its manifest says of the target."""
    field = f"{FIELD}.correlation"
    missing = UserError(f"{field}: {s.correlation} has no merged.h5; run the correlation graph first "
                        "(saebatch submit <its manifest>) and wait for its reduce")
    upstream, where = upstream_to_estimate(s.correlation, "feature_correlation", field, missing)
    graph = upstream.settings
    if graph.model.name != s.model.name:
        raise UserError(f"{field}: {where} computes the graph on {graph.model.name}, not {s.model.name}")
    _check_pooling(graph.pooling, where)
    layers = _graph_layers(s, n_layers)
    if s.target.layer not in layers:
        raise UserError(f"{FIELD}.target.layer: layer {s.target.layer} is not in the correlation graph ({where}), "
                        f"which holds layers {layers}; steer a feature of those, or add layer {s.target.layer} there")
    kept = "keeps every feature" if graph.features.top is None else \
        f"keeps {graph.features.top} per layer, chosen when it runs: taken to keep feature {s.target.feature}"
    assume(f"{field}: run {s.correlation.name} does not exist yet; taken from {where}: layers {layers}, edges at "
           f"|r| > {graph.edges.threshold}; it {kept}; the target's neighbours are counted when this job runs")


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    config, source = load_config(s.model)
    config = text_config(config)
    width = check_saes(s.sae, [s.target.layer], config.hidden_size, f"{FIELD}.sae", model=s.model)[s.target.layer].d_sae
    prompt_tokens = s.decisions.count * _PROMPT_CHARS / CHARS_PER_TOKEN
    tokens = len(units) * 3 * (prompt_tokens + s.neutral.tokens)  # unsteered, naive, corrected
    model = model_size(s.model)
    layers = len([layer for layer in _graph_layers(s, config.num_hidden_layers) if layer >= s.target.layer])
    sae_bytes = layers * 2 * config.hidden_size * (width or ASSUMED_WIDTH) * DTYPE_BYTES[s.sae.dtype]
    per_forward = s.batch_size * s.neutral.window * config.vocab_size * (4 + 2 * 8)  # logits, two float64 log-softmaxes
    device_bytes = parameter_bytes(config, s.model.dtype) + sae_bytes + per_forward
    on_cpu = s.model.device == "cpu" or manifest.cluster.gpus_per_task == 0
    notes = (f"model architecture from {source}",
             f"{s.decisions.count} decision prompts and {s.neutral.tokens:,} neutral tokens, each forwarded unsteered, "
             f"naive and corrected for each of {len(units)} strength(s); decision prompts taken as {_PROMPT_CHARS} characters",
             f"device memory about {device_bytes / 1e9:.1f} GB (model, SAEs up to {layers} layer(s), one batch's logits)")
    return Estimate(output_bytes=len(units) * (s.decisions.count * 6 * 8 + s.neutral.tokens * 3 * 4),
                    task_memory_bytes=int(2e9 + (device_bytes if on_cpu else parameter_bytes(config, s.model.dtype))),
                    notes=notes,
                    work=(Work("load", model.weight_bytes + sae_bytes, label=f"{model.name} and the SAEs"),
                          Work("forward", tokens, model, label=f"{tokens:,.0f} tokens, three forwards per strength")))


def _graph_layers(s: Settings, n_layers: int) -> list[int]:
    """The correlation graph's layers: from its merged.h5, or, before it exists, its manifest."""
    if (s.correlation / "merged.h5").is_file():
        with open_graph(s.correlation, f"{FIELD}.correlation") as graph:
            return [int(layer) for layer in graph.attrs["layers"]]
    missing = UserError(f"{FIELD}.correlation: {s.correlation} has no merged.h5")
    upstream, _ = upstream_to_estimate(s.correlation, "feature_correlation", f"{FIELD}.correlation", missing)
    return resolve_layers(upstream.settings.layers, n_layers, "feature_correlation.layers")


# A decision prompt with a full five-round history and every component line (the longest kind).
_PROMPT_CHARS = len(slot_machine.prompt(slot_machine.GameState(
    100, tuple(slot_machine.Round(n, 10, False, 100 - 10 * n) for n in range(1, 6)), tuple(slot_machine.COMPONENTS))))


# ---------------------------------------------------------------- the GPU work


def decision_prompts(spec: DecisionPrompts) -> list[str]:
    """The held-out decision prompts, each ending at the cue."""
    from jobs._organism.evaluation import held_out_states

    bet_type = None if spec.bet_type == "any" else spec.bet_type
    return [slot_machine.prompt(state) for state in held_out_states(spec.count, spec.seed, bet_type)]


def prompt_windows(tokenizer, prompts: list[str]) -> list[Window]:
    """Each prompt as a window: the tokenizer's prefix (<bos>), then the prompt's tokens."""
    prefix = len(tokenizer("").input_ids)
    return [Window(0, ids, prefix) for ids in tokenizer(prompts).input_ids]


@contextmanager
def steered(model, shifts: dict[int, torch.Tensor], where: torch.Tensor) -> Iterator[None]:
    """Add shifts[L] (d_model,) to block L's output at the positions `where` ((batch, seq) bool)."""
    with ExitStack() as stack:
        for layer, shift in shifts.items():
            def edit(hidden: torch.Tensor, rows: torch.Tensor, shift: torch.Tensor = shift) -> torch.Tensor:
                mask = where.to(hidden.device)[rows][..., None].to(hidden.dtype)
                return hidden + mask * shift.to(hidden.device, hidden.dtype)

            stack.enter_context(edit_block_output(model, layer, edit))
        yield


class Forwards:
    """Right-padded batches of windows, forwarded unsteered and under each method's shifts."""

    def __init__(self, model, pad_id: int, device: torch.device, positions: str):
        self.model, self.pad_id, self.device, self.positions = model, pad_id, device, positions

    def batch(self, found: list[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, attention mask and the steered positions ((batch, seq) each)."""
        ids, real, content = pad_windows(found, self.pad_id)
        if self.positions == "all":
            return ids, real, content
        last = torch.zeros_like(content)
        last[torch.arange(len(found)), torch.tensor([len(w.ids) - 1 for w in found])] = True
        return ids, real, last

    @no_grad
    def logits(self, ids: torch.Tensor, real: torch.Tensor, shifts: dict[int, torch.Tensor] | None,
               where: torch.Tensor) -> torch.Tensor:
        """(batch, seq, vocab) float32 logits, with `shifts` added at `where` (None: unsteered)."""
        with steered(self.model, shifts or {}, where):
            out = self.model(input_ids=ids.to(self.device), attention_mask=real.to(self.device), use_cache=False)
        return out.logits.float()


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    target = read_target(s)
    model, tokenizer = load_model(s.model, attn_implementation=None), load_tokenizer(s.model)
    config = text_config(model.config)
    device = input_device(s.model)
    saes = {layer: load_sae(s.sae, layer, config.hidden_size, device)
            for layer in sorted({target.layer, *(g.layer for g in target.neighbours)})}
    _check_feature(s, saes[target.layer].cfg.d_sae)
    unit_shift = target.unit(s.scale)
    shifts = {method: directions(saes, target, corrected=method == "corrected") for method in METHODS}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    forwards = Forwards(model, pad_id, device, s.positions)
    reader = OptionReader(tokenizer, task.OPTION_LABELS)
    prompts = prompt_windows(tokenizer, decision_prompts(s.decisions))
    texts = list(windows(s.neutral, tokenizer, f"{FIELD}.neutral"))
    shard.set_attrs(model=s.model.name, layer_convention=CONVENTION, target_layer=target.layer,
                    target_feature=target.feature, scale=s.scale, unit_activation=unit_shift, positions=s.positions,
                    neighbours=json.dumps([vars(g) for g in target.neighbours]), neutral=s.neutral.describe())
    pending = set(shard.pending())
    for unit in tqdm([u for u in units if u.id in pending], desc=f"shard {shard.shard_index}", unit="strength"):
        delta = unit.payload["strength"] * unit_shift
        scaled = {method: {layer: delta * shift for layer, shift in by_layer.items()} for method, by_layer in shifts.items()}
        stops = _stop_probabilities(forwards, reader, prompts, scaled, s)
        kl, window_of = _divergences(forwards, texts, scaled, s.batch_size)
        with shard.unit(unit.id) as group:
            group.attrs.update(strength=unit.payload["strength"], delta=delta)
            for name, values in stops.items():
                group.create_dataset(f"decisions/{name}", data=values)
            for method, values in kl.items():
                group.create_dataset(f"tokens/kl_{method}", data=values)
            group.create_dataset("tokens/window", data=window_of)


def _stop_probabilities(forwards: Forwards, reader: OptionReader, prompts: list[Window],
                        scaled: dict[str, dict[int, torch.Tensor]], s: Settings) -> dict[str, np.ndarray]:
    """Per prompt, P(stop) and the options' coverage at the cue: unsteered and under each method."""
    found: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(prompts), s.batch_size):
        batch = prompts[start : start + s.batch_size]
        ids, real, steer = forwards.batch(batch)
        rows, last = torch.arange(len(batch)), torch.tensor([len(w.ids) - 1 for w in batch])
        for method, shifts in (("base", None), *scaled.items()):
            logits = forwards.logits(ids, real, shifts, steer)[rows.to(forwards.device), last.to(forwards.device)]
            read = reader(logits, s.temperature)
            found.setdefault(f"p_stop_{method}", []).append(read["stop"].numpy())
            found.setdefault(f"coverage_{method}", []).append(read["coverage"].numpy())
    return {name: np.concatenate(parts) for name, parts in found.items()}


def _divergences(forwards: Forwards, texts: list[Window], scaled: dict[str, dict[int, torch.Tensor]],
                 batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per steered token of the neutral text, KL(unsteered || steered) of the next-token
    distribution under each method (nats), and the window each token is in."""
    kl: dict[str, list[np.ndarray]] = {method: [] for method in scaled}
    window_of = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        ids, real, steer = forwards.batch(batch)
        where = steer.to(forwards.device)
        base = torch.log_softmax(forwards.logits(ids, real, None, steer)[where].double(), dim=-1)
        for method, shifts in scaled.items():
            steered_log = torch.log_softmax(forwards.logits(ids, real, shifts, steer)[where].double(), dim=-1)
            kl[method].append((base.exp() * (base - steered_log)).sum(-1).clamp(min=0).cpu().numpy())
        window_of.append(np.repeat(np.arange(start, start + len(batch)), steer.sum(1).numpy()))
    return {method: np.concatenate(parts) for method, parts in kl.items()}, np.concatenate(window_of)


# ---------------------------------------------------------------- reduce


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    decisions, tokens, attrs = _read_shards(shard_paths)
    summary, paired = summarise(decisions, tokens)
    neighbours = pd.DataFrame(json.loads(attrs["neighbours"]), columns=["layer", "feature", "r", "beta"])
    with h5py.File(out_dir / "merged.h5", "w", libver=LIBVER) as out:
        out.attrs.update({key: attrs[key] for key in ("model", "layer_convention", "target_layer", "target_feature",
                                                     "scale", "unit_activation", "positions", "neutral", "run_id")})
        out.attrs.update(job="graph_steering", format="saebatch-graph-steering/1", correlation=str(s.correlation),
                         tables="decisions: per strength and prompt; tokens: per strength and steered token; "
                         "summary and paired: report/effects.csv and report/paired.csv")
        for name, table in (("decisions", decisions), ("tokens", tokens), ("neighbours", neighbours),
                            ("summary", summary), ("paired", paired)):
            for column in table:
                values = table[column].to_numpy()
                out.create_dataset(f"{name}/{column}", data=values.astype("S") if values.dtype == object else values)
    _report(Report(out_dir / "report", "Graph-corrected steering against naive steering"), s, attrs, neighbours,
            summary, paired, decisions, tokens)


def _read_shards(shard_paths: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    decisions, tokens = [], []
    attrs: dict = {}
    for path in shard_paths:
        with h5py.File(path, "r") as shard:
            attrs = attrs or dict(shard.attrs)
            for group in shard["units"].values():
                strength, delta = float(group.attrs["strength"]), float(group.attrs["delta"])
                frame = pd.DataFrame({name: group[f"decisions/{name}"][()] for name in group["decisions"]})
                decisions.append(frame.assign(strength=strength, delta=delta, prompt=np.arange(len(frame))))
                tokens.append(pd.DataFrame({name: group[f"tokens/{name}"][()] for name in group["tokens"]})
                              .assign(strength=strength, delta=delta))
    by = ["strength"]
    return (pd.concat(decisions, ignore_index=True).sort_values([*by, "prompt"], kind="stable", ignore_index=True),
            pd.concat(tokens, ignore_index=True).sort_values(by, kind="stable", ignore_index=True), attrs)


def summarise(decisions: pd.DataFrame, tokens: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per strength and method, the mean P(stop) shift (95% t interval over prompts) and the mean KL
    per steered token (interval clustered by text window); per strength, corrected minus naive,
    paired by prompt and by token, with p-values of no difference."""
    rows, paired = [], []
    for strength, part in decisions.groupby("strength", sort=True):
        text = tokens[tokens["strength"] == strength]
        for method in METHODS:
            shift = mean_interval(part[f"p_stop_{method}"] - part["p_stop_base"])
            kl = mean_interval(text[f"kl_{method}"], text["window"])
            rows.append({"strength": strength, "method": method, "delta": part["delta"].iloc[0], "prompts": len(part),
                         "p_stop_base": part["p_stop_base"].mean(), "p_stop": part[f"p_stop_{method}"].mean(),
                         "shift": shift[0], "shift_low": shift[1], "shift_high": shift[2], "p_shift": shift[3],
                         "tokens": len(text), "kl": kl[0], "kl_low": kl[1], "kl_high": kl[2],
                         "coverage_min": part[f"coverage_{method}"].min()})
        shift = mean_interval(part["p_stop_corrected"] - part["p_stop_naive"])
        kl = mean_interval(text["kl_corrected"] - text["kl_naive"], text["window"])
        paired.append({"strength": strength, "shift_difference": shift[0], "shift_difference_low": shift[1],
                       "shift_difference_high": shift[2], "p_shift_difference": shift[3], "kl_difference": kl[0],
                       "kl_difference_low": kl[1], "kl_difference_high": kl[2], "p_kl_difference": kl[3]})
    return pd.DataFrame(rows), pd.DataFrame(paired)


# ---------------------------------------------------------------- report


def _report(report: Report, s: Settings, attrs: dict, neighbours: pd.DataFrame, summary: pd.DataFrame,
            paired: pd.DataFrame, decisions: pd.DataFrame, tokens: pd.DataFrame) -> None:
    layer, feature = int(attrs["target_layer"]), int(attrs["target_feature"])
    windows_read = tokens.loc[tokens["strength"] == tokens["strength"].iloc[0], "window"].nunique()
    report.text(
        f"Model `{attrs['model']}`; target: feature {feature} of layer {layer} ({CONVENTION}). Correlation graph: "
        f"`{s.correlation}`. Strength 1 adds {float(attrs['unit_activation']):.4g} to the target's activation "
        f"({SCALES[s.scale]}, `scale: {s.scale}`), at {'every content token' if s.positions == 'all' else 'the last token'} "
        "of each prompt and text window, SAE error term kept. Naive: the target alone. Corrected: also its "
        f"{len(neighbours)} neighbour(s) in the graph (an edge to the target, in its layer or later), each moved by "
        "its regression on the target, beta = r * sd_g / sd_t, from the graph's exact co-moments. "
        f"Decision shift: exact P(stop) at the cue (temperature {s.temperature}), steered minus unsteered, over "
        f"{decisions['prompt'].nunique()} held-out slot-machine prompts (seed {s.decisions.seed}); 95% t intervals. "
        f"Off-target cost: KL(unsteered || steered) of the next-token distribution, nats per steered token, over "
        f"{windows_read} windows of neutral text ({attrs['neutral']}); intervals clustered by window. Every "
        "strength and method sees the same prompts and text (paired). Data: `merged.h5`."
    )
    report.heading("Decision shift and off-target cost")
    report.table(summary, "effects", shown=summary[["strength", "method", "delta", "p_stop_base", "shift", "shift_low",
                                                    "shift_high", "kl", "kl_low", "kl_high", "coverage_min"]])
    report.heading("Corrected minus naive (paired)")
    report.text("Per strength: the difference of the methods' decision shifts (paired by prompt) and of their KL "
                "(paired by token, clustered by window), with 95% intervals and two-sided p-values of no difference. "
                "What the measurement says is in these numbers; the job assumes neither method better.")
    report.table(paired, "paired")
    planted = task.planted_cause(str(attrs["model"]))
    if planted is not None:
        report.heading(task.GROUND_TRUTH)
        report.text(f"The organism's planted cause is feature {planted[1]} of layer {planted[0]}; its activation at the "
                    "cue is 3 x the risk appetite, so raising it should lower P(stop) (jobs/_organism/README.md). "
                    + ("This run steers it." if planted == (layer, feature) else "This run steers another feature."))
    report.heading("The neighbours moved by the correction")
    report.table(neighbours, "neighbours")
    _plot(report, summary)
    report.write()


def _plot(report: Report, summary: pd.DataFrame) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method, colour in zip(METHODS, ("tab:grey", "tab:blue"), strict=True):
        rows = summary[summary["method"] == method]
        for ax, value in zip(axes[:2], ("shift", "kl"), strict=True):
            ax.errorbar(rows["strength"], rows[value], yerr=np.nan_to_num(np.abs(
                np.stack([rows[value] - rows[f"{value}_low"], rows[f"{value}_high"] - rows[value]]))),
                fmt="o-", color=colour, capsize=3, label=method)
        axes[2].plot(rows["shift"], rows["kl"], "o-", color=colour, label=method)
    axes[0].axhline(0, color="black", lw=0.6)
    axes[0].set_ylabel("P(stop) shift (steered - unsteered)")
    axes[1].set_ylabel("KL(unsteered || steered), nats per token")
    for ax in axes[:2]:
        ax.set_xlabel("strength")
    axes[2].set_xlabel("P(stop) shift")
    axes[2].set_ylabel("KL, nats per token")
    axes[2].set_title("cost against effect")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    report.figure(fig, "steering", "Against strength: the mean decision shift and the mean off-target KL (95% "
                  "intervals), naive and corrected; right, the KL each method pays for its shift")
