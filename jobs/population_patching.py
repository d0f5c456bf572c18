"""Population-mean patching of the contrast's features (seed 000, step 3 of 3).

    saebatch submit manifests/demo/gambling_4_patching.yaml --executor local

For each feature of the table (a work unit): the feature is set to its safe mean and to its
bankrupt mean at the last prompt token (optionally at every generated token too), keeping the
SAE's error term, and the model answers each fixed prompt `trials` times, sampling at the
manifest's temperature. The unpatched answers ("none") are generated once per prompt, in their
own unit, and shared by every feature. Rows of many features and layers share one generate call,
each with its own edit; a call's rows share their prompt, whose cache is computed once. Trial t of a prompt draws the same sampling noise in every condition
(common random numbers), so conditions differ by the edit alone. Shards hold the raw answers;
reduce parses them (jobs._gambling, versioned), so a newer parser needs no GPU, and tests each
feature: Spearman between the condition order (safe, none, bankrupt) and the outcome over all
trials; on the trials paired by their shared noise, Wilcoxon's signed-rank test for bets and
McNemar's exact test for stopping (unpaired Mann-Whitney and Fisher kept as columns), with
Bonferroni and Benjamini-Hochberg across features.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeGuard

import h5py
import numpy as np
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from common.batching import (
    AUTO_HELP,
    BatchSize,
    GenerationMemory,
    generation_memory,
    planned_rows,
    rows_now,
)
from common.choices import NumberReader, OptionReader
from common.edits import BatchRows, edit_prompt_position, set_feature
from common.errors import UserError
from common.generation import prompt_prefix, sample, seed_of
from common.lazy import lazy_import, no_grad
from common.manifest import AbsolutePath, Manifest, StrictModel, UpstreamRun
from common.models import (
    DTYPE_BYTES,
    ModelSpec,
    input_device,
    kv_cache_bytes,
    load_config,
    load_model,
    load_tokenizer,
    parameter_bytes,
    text_config,
)
from common.paired import mcnemar, signed_rank
from common.plan import Estimate, WorkUnit, assume, only_estimating
from common.report import Report
from common.runtime import CHARS_PER_TOKEN, Work, model_size
from common.saes import SaeSpec, check_saes, load_sae
from common.shards import LIBVER, ShardWriter
from common.upstream import upstream_to_estimate
from jobs import _feature_cards as cards
from jobs import _gambling as task
from jobs import _gambling_parser as parser
from jobs import _slot_machine as slot_machine
from jobs._games_run import games_of

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from scipy import stats
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")
    stats = lazy_import("scipy.stats")

log = logging.getLogger(__name__)
FIELD = "population_patching"
NEEDED_COLUMNS = ("layer", "feature", "mean_safe", "mean_bankrupt")
FREQUENCY_COLUMNS = ("active_bankrupt", "active_safe")  # shares of games in which a feature is active
UNIT_ATTRS = ("layer", "feature", "control", "mean_safe", "mean_bankrupt")  # what a unit's shard group records
EXACT_BETS = ("bet_given_bet", "bet_mass", "bet_expected")  # the expected bet; variable bets: over `bet_amounts`
EXACT_COLUMNS = ("p_stop_exact_safe", "p_stop_exact_none", "p_stop_exact_bankrupt", "stop_shift_exact", "coverage_min",
                 "bet_exact_safe", "bet_exact_none", "bet_exact_bankrupt", "bet_shift_exact", "bet_mass_min")
CONDITIONS = ("safe", "none", "bankrupt")  # the order Spearman's test runs along
BASELINE = "baseline"  # the unit of unpatched answers
BET_ANSWER_TOKENS = 8  # assumed: "1) Bet $100" and the token after it, teacher-forced per candidate bet


def _published_prompt(balance: int, rounds: list[tuple[int, bool, int]], bet_type: slot_machine.BetType) -> str:
    """A patching prompt as published: components G, R, W, P; rounds as (bet, won, balance after),
    copied as they were (their first win shows $130 where 3x of $10 makes $120)."""
    history = [slot_machine.Round(number, bet, won, after) for number, (bet, won, after) in enumerate(rounds, start=1)]
    return slot_machine.render(slot_machine.PROMPT_TEMPLATE, balance, len(rounds) + 1, history, ("G", "R", "W", "P"),
                               bet_type)


# ---------------------------------------------------------------- the manifest section


class PatchPrompt(StrictModel):
    name: str = Field(description="short name (a column of the results)")
    text: str = Field(description="the prompt, ending at the decision cue")
    bet_type: slot_machine.BetType = Field(description="how answers are read: fixed ($10) or variable bets")

    @model_validator(mode="after")
    def _ends_at_the_cue(self) -> PatchPrompt:
        if not self.text.endswith(slot_machine.DECISION_CUE):
            raise ValueError(f"prompt {self.name!r} must end at the decision cue {slot_machine.DECISION_CUE!r} "
                             f"(it ends {self.text[-20:]!r}): the edit applies at the prompt's last token")
        return self


# The two prompts of the published patching runs (../shared/reference/gambling_task.md).
PROMPTS = [
    PatchPrompt(name="risky", bet_type="variable",
                text=_published_prompt(20, [(10, True, 130), (100, False, 30), (10, False, 20)], "variable")),
    PatchPrompt(name="safe", bet_type="fixed",
                text=_published_prompt(140, [(10, True, 130), (10, False, 120), (10, True, 140)], "fixed")),
]


class Effects(StrictModel):
    """When a feature counts as causal (the seed's thresholds, after a correction over features)."""

    bet_effect: float = Field(8.0, ge=0, description="dollars the bankrupt-mean patch must add to the average bet")
    stop_effect: float = Field(0.15, ge=0, description="stop rate the safe-mean patch must add")
    alpha: float = Field(0.05, gt=0, lt=1, description="corrected p-value below which an effect is significant")
    correction: Literal["bonferroni", "bh"] = Field("bonferroni", description="over the features tested")


class Settings(StrictModel):
    """The `population_patching:` section of a manifest."""

    model: ModelSpec = Field(description="language model")
    sae: SaeSpec = Field(description="one SAE per layer of the features")
    features: UpstreamRun | None = Field(None, description="the feature_contrast run: its directory or its manifest")
    feature_table: AbsolutePath | None = Field(None, description="or a CSV with layer, feature, mean_safe, mean_bankrupt")
    only_selected: bool = Field(True, description="patch only rows whose `selected` column is true")
    layers: list[int] | None = Field(None, description="patch only features of these layers (None: all)")
    max_features_per_layer: int | None = Field(None, ge=1, description="the largest |cohens_d| first (None: all)")
    retest: UpstreamRun | None = Field(None, description="the seed's follow-up: patch only the causal features of this "
                                       "earlier population_patching run (directory or manifest), with more `trials`")
    retest_top: int = Field(10, ge=1, description="with `retest`: its causal features with the largest effects, at most")
    prompts: list[PatchPrompt] = Field(default_factory=lambda: list(PROMPTS), description="prompts answered")
    trials: int = Field(50, ge=2, description="answers per prompt and condition")
    temperature: float = Field(0.7, gt=0, description="sampling temperature")
    max_new_tokens: int = Field(50, ge=1, description="longest answer")
    patch_generated: bool = Field(False, description="also set the feature at every generated token")
    seed: int = Field(0, ge=0, description="seed of the sampling noise (trial t of a prompt: the same in every condition)")
    batch_size: BatchSize = Field(128, description=f"answers generated together, {AUTO_HELP}")
    controls: int = Field(0, ge=0, description="per patched layer, random live features of similar activation "
                          "frequency patched exactly as the chosen ones: the null distribution of effects")
    control_seed: int = Field(0, description="seed of the control features' draw")
    decisions: Literal["sampled", "exact", "both"] = Field(
        "both", description="sampled: answers sampled and parsed; exact: each option's exact probability at the "
        "cue, from one forward per feature, condition and prompt (common/choices.py), no sampling; both")
    bet_amounts: list[int] = Field(
        default_factory=lambda: list(range(slot_machine.MIN_BET, slot_machine.MAX_BET + 1, 5)),
        description="exact decisions, variable-bet prompts: the candidate bets whose teacher-forced probabilities "
        "give the expected bet ([] for none)")
    bet_answer: str = Field("1) Bet ${number}", description="how the model writes a bet of {number} dollars after the "
                            "cue (the expected bet is read over these answers)")
    effects: Effects = Field(default_factory=Effects, description="when a feature counts as causal")
    contexts: UpstreamRun | None = Field(None, description=cards.CONTEXTS_HELP)

    @field_validator("bet_answer")
    @classmethod
    def _ends_with_the_number(cls, value: str) -> str:
        if not value.endswith("{number}") or value.count("{") != 1:
            raise ValueError(f"must end with its one field {{number}}, as in '1) Bet ${{number}}' (got {value!r})")
        return value

    @field_validator("bet_amounts")
    @classmethod
    def _positive_and_distinct(cls, value: list[int]) -> list[int]:
        if any(amount <= 0 for amount in value) or len(set(value)) != len(value):
            raise ValueError(f"give distinct positive dollar amounts (got {value})")
        return value

    @model_validator(mode="after")
    def _one_table(self) -> Settings:
        if (self.features is None) == (self.feature_table is None):
            raise ValueError("give exactly one of `features` (a feature_contrast run) and `feature_table` (a CSV)")
        names = [prompt.name for prompt in self.prompts]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"prompts: give at least one, with distinct names (got {names})")
        return self


# ---------------------------------------------------------------- plan


def read_table(s: Settings, chosen_only: bool = True) -> pd.DataFrame:
    """The features to patch (with `chosen_only` False: every row, before selection), checked for
    the columns this step needs."""
    if s.features is not None:
        table, where = _features_of(s.features, "feature_contrast", "features"), str(s.features / "merged.h5")
    else:
        assert s.feature_table is not None  # _one_table: one of the two
        if not s.feature_table.is_file():
            raise UserError(f"{FIELD}.feature_table: {s.feature_table} does not exist")
        table = pd.read_csv(s.feature_table)
        where = str(s.feature_table)
    missing = [column for column in NEEDED_COLUMNS if column not in table]
    if missing:
        raise UserError(f"{FIELD}: the feature table {where} lacks the column(s) {missing}; it needs "
                        f"{list(NEEDED_COLUMNS)} (feature_contrast writes them)")
    if s.controls and not set(FREQUENCY_COLUMNS) <= set(table):
        raise UserError(f"{FIELD}.controls: the feature table {where} lacks {list(FREQUENCY_COLUMNS)}, the activation "
                        "frequencies controls are matched on (feature_contrast writes them); add them or set controls: 0")
    if not chosen_only:
        return table
    if s.only_selected:
        if "selected" not in table:
            raise UserError(f"{FIELD}: the feature table {where} has no `selected` column; add it, or set "
                            "only_selected: false to patch every row")
        table = table[table["selected"].astype(bool)]
    if s.layers is not None:
        table = table[table["layer"].isin(s.layers)]
    if s.retest is not None:
        table = table.merge(causal_features(s.retest, s.retest_top), on=["layer", "feature"])
    if s.max_features_per_layer is not None:
        if "cohens_d" not in table:
            raise UserError(f"{FIELD}.max_features_per_layer needs a `cohens_d` column in {where}")
        table = (table.assign(strength=table["cohens_d"].abs()).sort_values(["layer", "strength"], ascending=[True, False])
                 .groupby("layer").head(s.max_features_per_layer).drop(columns="strength"))
    if table.empty:
        raise UserError(f"{FIELD}: no feature to patch in {where} (none selected?)")
    return table.sort_values(["layer", "feature"]).reset_index(drop=True)


def _features_of(run: Path, job: str, field: str) -> pd.DataFrame:
    """The `features/` table of an upstream run's merged.h5, which `job` must have written."""
    merged = run / "merged.h5"
    if not merged.is_file():
        raise _missing(run, field, job)
    with h5py.File(merged, "r") as data:
        if data.attrs.get("job") != job:
            raise UserError(f"{FIELD}.{field}: {merged} was not written by {job}")
        return pd.DataFrame({name: column[()] for name, column in data["features"].items()})


def causal_features(run: Path, top: int) -> pd.DataFrame:
    """(layer, feature) of an earlier patching run's causal features, the `top` largest effects
    (stop effect, or bet effect per $100; exact shifts where nothing was sampled) first."""
    found = _features_of(run, "population_patching", "retest")
    found = found[found["causal"].astype(bool) & ~found["control"].astype(bool)]
    if found.empty:
        raise UserError(f"{FIELD}.retest: {run} found no causal feature, so there is nothing to re-test")
    stop, bet = ("stop_effect", "bet_effect") if "stop_effect" in found else ("stop_shift_exact", "bet_shift_exact")
    found = found.assign(size=np.fmax(found[stop].abs(), found[bet].abs() / 100))
    strongest = found.groupby(["layer", "feature"], as_index=False)["size"].max().nlargest(top, "size")
    return strongest[["layer", "feature"]].astype(int)


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """The shared unpatched unit, then a unit per feature; checks layers, SAEs and feature ids."""
    s = manifest.settings
    config = text_config(load_config(s.model)[0])
    cards.check_contexts(s.contexts, f"{FIELD}.contexts")
    if _not_run(s.features) or _not_run(s.retest):
        return _estimated_units(s, config)
    table = read_table(s)
    layers = sorted(int(layer) for layer in table["layer"].unique())
    outside = [layer for layer in layers if not 0 <= layer < config.num_hidden_layers]
    if outside:
        raise UserError(f"{FIELD}: the feature table has layer(s) {outside}, outside the model's "
                        f"{config.num_hidden_layers} blocks")
    infos = check_saes(s.sae, layers, config.hidden_size, f"{FIELD}.sae", model=s.model)
    for layer, info in infos.items():
        _check_ids(table[table["layer"] == layer]["feature"], layer, info.d_sae)
    controls = control_features(read_table(s, chosen_only=False), table, s.controls, s.control_seed)
    units = [WorkUnit(BASELINE, {})]
    units += [WorkUnit(f"L{int(row.layer)}_F{int(row.feature)}", {
        "layer": int(row.layer), "feature": int(row.feature), "safe": float(row.mean_safe),
        "bankrupt": float(row.mean_bankrupt), "control": control})
        for rows, control in ((table, False), (controls, True)) for row in rows.itertuples()]
    return units


def control_features(every: pd.DataFrame, chosen: pd.DataFrame, per_layer: int, seed: int) -> pd.DataFrame:
    """Per layer of `chosen`, `per_layer` other live features drawn at random from the 4 x per_layer
    whose activation frequency (log, both groups' mean) is nearest the chosen features' median.
    Features the table selects are never controls, patched or not (they may be real effects)."""
    if not per_layer:
        return every.iloc[:0]
    rng = np.random.default_rng(seed)
    frequency = np.log(every[list(FREQUENCY_COLUMNS)].mean(axis=1).clip(lower=1e-12))
    drawn = []
    for layer in sorted(chosen["layer"].unique()):
        in_layer = every["layer"] == layer
        patched = in_layer & every["feature"].isin(chosen[chosen["layer"] == layer]["feature"])
        selected = every["selected"].astype(bool) if "selected" in every else False
        target = frequency[patched].median()
        live = in_layer & ~patched & ~selected & (frequency > np.log(1e-12))
        nearest = (frequency[live] - target).abs().sort_values(kind="stable").index[: 4 * per_layer]
        if len(nearest) < per_layer:
            log.warning("layer %d has %d live features besides the chosen ones: %d controls instead of %d",
                        layer, len(nearest), len(nearest), per_layer)
        drawn.append(every.loc[rng.choice(nearest, size=min(per_layer, len(nearest)), replace=False)])
    return pd.concat(drawn).sort_values(["layer", "feature"])


def _check_ids(features: pd.Series, layer: int, width: int | None) -> None:
    if width is not None and (features >= width).any():
        raise UserError(f"{FIELD}: feature id(s) {sorted(features[features >= width].tolist())} of layer {layer} are "
                        f"beyond its SAE's {width} features; the table was made with another SAE?")


# The seed's selection kept 1,340 of the 7 x 32,768 features it contrasted (p < 0.001 after FDR,
# |d| > 0.8): the share planning assumes selected before the contrast has run.
SELECTED_SHARE = 1340 / (7 * 32768)


def _not_run(run: Path | None) -> TypeGuard[Path]:
    """An upstream run is named but has not been merged yet."""
    return run is not None and not (run / "merged.h5").is_file()


def _missing(run: Path, field: str, job: str) -> UserError:
    return UserError(f"{FIELD}.{field}: {run} has no merged.h5; run (and reduce) {job} first")


def _estimated_units(s: Settings, config) -> list[WorkUnit]:
    """Planning only, before the contrast (or the retested) run exists: the baseline, stand-in
    features as many per layer as the upstream manifest leads one to expect, and the controls."""
    for run, field, job in ((s.features, "features", "feature_contrast"), (s.retest, "retest", "population_patching")):
        if _not_run(run):
            only_estimating(_missing(run, field, job))
    per_layer = _expected_features(s)
    outside = [layer for layer in per_layer if not 0 <= layer < config.num_hidden_layers]
    if outside:
        raise UserError(f"{FIELD}: the features would come from layer(s) {outside}, outside the model's "
                        f"{config.num_hidden_layers} blocks")
    check_saes(s.sae, sorted(per_layer), config.hidden_size, f"{FIELD}.sae", model=s.model)
    units = [WorkUnit(BASELINE, {})]
    for control, counts in ((False, per_layer), (True, dict.fromkeys(per_layer, s.controls))):
        units += [WorkUnit(f"L{layer}_{'control' if control else 'feature'}{index:05d}_estimated", {
            "layer": layer, "feature": -1, "safe": 0.0, "bankrupt": 0.0, "control": control})
            for layer, count in counts.items() for index in range(count)]
    return units


def _expected_features(s: Settings) -> dict[int, int]:
    """Features to patch per layer: the table's where it exists, else what the contrast's manifest
    leads one to expect (recorded as an assumption); at most the retested run's causal ones."""
    if not _not_run(s.features):  # the table is at hand; only the retested run is not
        table = read_table(s.model_copy(update={"retest": None}))
        per_layer = {int(layer): int(n) for layer, n in table.groupby("layer").size().items()}
    else:
        contrast, where = upstream_to_estimate(s.features, "feature_contrast", f"{FIELD}.features",
                                               _missing(s.features, "features", "feature_contrast"))
        games = games_of(contrast.settings.games, "feature_contrast.games")
        layers = [layer for layer in contrast.settings.layers or games.layers if s.layers is None or layer in s.layers]
        share = SELECTED_SHARE if s.only_selected else 1.0
        count = min(round(share * games.width), s.max_features_per_layer or games.width)
        per_layer = dict.fromkeys(layers, count)
        assume(f"{FIELD}.features: run {s.features.name} does not exist yet; taken from {where}: layers {layers}, "
               f"{count:,} features a layer patched ({share:.2%} of {games.width:,}" + (
                   ", the share the seed's selection kept: 1,340 of 7 x 32,768)" if s.only_selected else ")"))
    if s.retest is not None:
        if _not_run(s.retest):
            limit = s.retest_top
            assume(f"{FIELD}.retest: run {s.retest.name} does not exist yet; taken to find {limit} causal features "
                   "(retest_top) among those")
        else:
            limit = len(causal_features(s.retest, s.retest_top))
        for layer in per_layer:
            per_layer[layer], limit = min(per_layer[layer], limit), limit - min(per_layer[layer], limit)
    return {layer: count for layer, count in per_layer.items() if count}


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    config, source = load_config(s.model)
    config = text_config(config)
    conditions = sum(1 if unit.id == BASELINE else 2 for unit in units)  # per prompt
    answers = conditions * len(s.prompts) * s.trials
    layers = sorted({unit.payload["layer"] for unit in units if unit.id != BASELINE})
    infos = check_saes(s.sae, layers, config.hidden_size, f"{FIELD}.sae", model=s.model)
    widths = [info.d_sae for info in infos.values() if info.d_sae]
    width = max(widths) if widths else 32768
    sae_bytes = len(layers) * 2 * config.hidden_size * width * DTYPE_BYTES[s.sae.dtype]
    prompt_tokens = [len(prompt.text) / CHARS_PER_TOKEN for prompt in s.prompts]
    memory = generation_memory_of(s, config, sae_bytes, width, int(max(prompt_tokens)) + 1)
    batch_size = planned_rows(s.batch_size, memory)
    model = model_size(s.model)
    work = [Work("load", model.weight_bytes + sae_bytes, label=f"{model.name} and {len(layers)} SAE(s)")]
    if s.decisions != "exact":  # a batch of answers makes a call per prompt, each computing its prompt's cache once
        batches = -(-answers // batch_size)  # ceiling
        rows = max(1, min(batch_size, answers) // len(s.prompts))
        work += [Work("forward", batches * sum(prompt_tokens), model, label="prompt caches, one per call"),
                 Work("decode", answers * s.max_new_tokens, model, rows=rows,
                      label=f"{answers:,} sampled answers of up to {s.max_new_tokens} tokens")]
    if s.decisions != "sampled":  # a forward per condition and prompt; variable bets: each candidate amount too
        variable = sum(prompt.bet_type == "variable" for prompt in s.prompts)
        tokens = conditions * (sum(prompt_tokens) + variable * len(s.bet_amounts) * 4)
        work.append(Work("forward", tokens, model, label="exact decisions"))
    notes = (f"model architecture from {source}", f"{answers:,} answers, {batch_size:,} a call"
             + (" (batch_size auto, on an H200)" if s.batch_size == "auto" else "")
             + ("" if widths else f"; memory assumes SAEs {width} wide"))
    return Estimate(output_bytes=answers * (s.max_new_tokens * 4 + 64), task_memory_bytes=memory.peak(batch_size),
                    notes=notes, work=tuple(work))


def generation_memory_of(s: Settings, config, sae_bytes: int, width: int, prompt_tokens: int) -> GenerationMemory:
    """Weights and SAEs, and per answer its cache and step (and an SAE's codes at the edited position);
    the prompt's forward is shared by the answers, but exact decisions run it for every row, and
    each candidate bet's teacher-forced tokens (their logits in float32, their log-softmax in float64)."""
    bet_tokens = BET_ANSWER_TOKENS if s.bet_amounts else 0
    exact_bets = (kv_cache_bytes(config, s.model.dtype, 1, prompt_tokens + bet_tokens)
                  + bet_tokens * config.vocab_size * (4 + 8 + 8))
    return generation_memory(config, s.model.dtype, parameter_bytes(config, s.model.dtype) + sae_bytes, prompt_tokens,
                             s.max_new_tokens, prompt_cached=False, extra_per_row=width * DTYPE_BYTES[s.sae.dtype],
                             other_phase=exact_bets)


# ---------------------------------------------------------------- the GPU work


@dataclass(frozen=True)
class Row:
    """One answer to generate: a unit's condition, prompt and trial, with its edit (if any)."""

    unit: str
    condition: str
    prompt: int
    trial: int
    layer: int = -1
    feature: int = -1
    value: float = 0.0
    control: bool = False


def rows_of(unit: WorkUnit, s: Settings, trials: int | None = None) -> list[Row]:
    """The unit's answers to generate: each condition x prompt x trial (`trials`: s.trials)."""
    conditions = ["none"] if unit.id == BASELINE else ["safe", "bankrupt"]
    return [Row(unit.id, condition, prompt, trial, unit.payload.get("layer", -1), unit.payload.get("feature", -1),
                unit.payload.get(condition, 0.0), unit.payload.get("control", False))
            for condition in conditions for prompt in range(len(s.prompts)) for trial in range(trials or s.trials)]


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    model, tokenizer = load_model(s.model, attn_implementation=None), load_tokenizer(s.model)
    config = text_config(model.config)
    device = input_device(s.model)
    layers = sorted({unit.payload["layer"] for unit in units if unit.id != BASELINE})
    saes = {layer: load_sae(s.sae, layer, config.hidden_size, device) for layer in layers}
    for layer, sae in saes.items():
        _check_ids(pd.Series([u.payload["feature"] for u in units if u.payload.get("layer") == layer]), layer,
                   sae.cfg.d_sae)
    memory = generation_memory_of(s, text_config(load_config(s.model)[0]),
                                  sum(p.numel() * p.element_size() for sae in saes.values() for p in sae.parameters()),
                                  max((sae.cfg.d_sae for sae in saes.values()), default=0),
                                  max(len(tokenizer(prompt.text).input_ids) for prompt in s.prompts))
    s = s.model_copy(update={"batch_size": rows_now(s.batch_size, memory, device)})
    assert isinstance(s.batch_size, int)  # "auto" resolved
    shard.set_attrs(batch_size=s.batch_size, model=s.model.name, temperature=s.temperature, patch_generated=s.patch_generated,
                    prompts=[prompt.text for prompt in s.prompts], prompt_names=[prompt.name for prompt in s.prompts],
                    bet_types=[prompt.bet_type for prompt in s.prompts])
    pending = set(shard.pending())
    exact = (exact_choices(model, tokenizer, saes, [unit for unit in units if unit.id in pending], s, device)
             if s.decisions != "sampled" else {})
    if s.decisions == "exact":
        for unit_id, exact_rows in exact.items():
            _write(shard, unit_id, [], exact_rows)
        return
    to_answer = [row for unit in units if unit.id in pending for row in rows_of(unit, s)]
    answers: dict[str, list[tuple[Row, str]]] = {unit.id: [] for unit in units if unit.id in pending}
    expected = {unit.id: len(rows_of(unit, s)) for unit in units if unit.id in pending}
    with tqdm(total=len(to_answer), desc=f"shard {shard.shard_index}", unit="answer") as progress:
        for start in range(0, len(to_answer), s.batch_size):
            for prompt in range(len(s.prompts)):  # one prompt per call: its cache is computed once
                batch = [row for row in to_answer[start : start + s.batch_size] if row.prompt == prompt]
                if not batch:
                    continue
                seeds = [seed_of(s.seed, row.prompt, row.trial) for row in batch]
                text = s.prompts[prompt].text
                prefix = prompt_prefix(model, tokenizer, text, len(batch), device, new_tokens=s.max_new_tokens + 1)
                with row_edits(model, saes, batch, s.patch_generated) as rows:
                    replies = sample(model, tokenizer, [text] * len(batch), seeds, s.temperature, s.max_new_tokens,
                                     device, stop_strings=task.ANSWER_ENDS, prefix=prefix, batch=rows)
                for row, reply in zip(batch, replies, strict=True):
                    answers[row.unit].append((row, reply))
                    if len(answers[row.unit]) == expected[row.unit]:
                        _write(shard, row.unit, answers.pop(row.unit), exact.get(row.unit, []))
                progress.update(len(batch))


@no_grad
def exact_choices(model, tokenizer, saes: dict, units: list[WorkUnit], s: Settings,
                  device: torch.device) -> dict[str, list[tuple[Row, dict[str, float]]]]:
    """Per unit, each condition and prompt with the options' probabilities at the cue, at the
    sampling temperature: one forward of the prompt per row, its edit at the last token."""
    reader = OptionReader(tokenizer, task.OPTION_LABELS)
    amounts = NumberReader(tokenizer, s.bet_answer, s.bet_amounts) if s.bet_amounts else None
    rows = [row for unit in units for row in rows_of(unit, s, trials=1)]
    exact: dict[str, list[tuple[Row, dict[str, float]]]] = {unit.id: [] for unit in units}
    assert isinstance(s.batch_size, int)  # run_shard resolved "auto"
    for prompt in range(len(s.prompts)):
        of_prompt = [row for row in rows if row.prompt == prompt]
        for start in tqdm(range(0, len(of_prompt), s.batch_size), desc=f"exact probabilities, prompt {prompt}",
                          unit="batch", disable=not of_prompt):
            batch = of_prompt[start : start + s.batch_size]
            encoded = tokenizer([s.prompts[prompt].text] * len(batch), return_tensors="pt").to(device)
            with row_edits(model, saes, batch, every_token=False):
                logits = model(**encoded, use_cache=False, logits_to_keep=1).logits[:, -1]
            read = reader(logits, s.temperature)
            if s.prompts[prompt].bet_type == "fixed":
                read["bet_given_bet"] = torch.full_like(read["bet"], float(slot_machine.FIXED_BET))
            elif amounts is not None:
                read |= expected_bets(model, tokenizer, saes, batch, s.prompts[prompt].text, amounts, s, device)
            if "bet_given_bet" in read:
                read["bet_expected"] = read["bet"] * read["bet_given_bet"]  # a stop bets $0
            for i, row in enumerate(batch):
                exact[row.unit].append((row, {name: float(values[i]) for name, values in read.items()}))
    return exact


@no_grad
def expected_bets(model, tokenizer, saes: dict, batch: list[Row], prompt: str, amounts: NumberReader, s: Settings,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Per row: the expected bet among `s.bet_amounts` given a bet (`bet_given_bet`) and the
    candidates' total probability (`bet_mass`), teacher-forced under the row's edit. The prompt but its last
    token is run once; each row's candidates then share a forward of that token and the answers."""
    candidates = len(s.bet_amounts)
    last_token = tokenizer(prompt, return_tensors="pt").input_ids[0, -1].item()
    inputs = amounts.inputs(last_token)
    assert isinstance(s.batch_size, int)  # run_shard resolved "auto"
    per_call = max(1, s.batch_size // candidates)
    read: dict[str, list[torch.Tensor]] = {"bet_given_bet": [], "bet_mass": []}
    for start in range(0, len(batch), per_call):
        rows = batch[start : start + per_call]
        repeated = [row for row in rows for _ in range(candidates)]
        prefix = prompt_prefix(model, tokenizer, prompt, len(repeated), device, new_tokens=inputs.shape[1])
        with row_edits(model, saes, repeated, every_token=False, offset=0):  # position 0: the prompt's last token
            logits = model(input_ids=inputs.repeat(len(rows), 1).to(device), cache=prefix,
                           use_cache=True).logits
        found = amounts(logits, s.temperature)
        read["bet_given_bet"].append(found["expected"])
        read["bet_mass"].append(found["mass"])
    return {name: torch.cat(parts) for name, parts in read.items()}


@contextmanager
def row_edits(model, saes: dict, batch: list[Row], every_token: bool, offset: int = -1) -> Iterator[BatchRows]:
    """Set each row's feature to its value at the last prompt token (position `offset` of the
    first forward; and, if asked, at every generated token), error term kept: x + (v - f(x)) W_dec[f].
    Yields the batch's rows, for a decode loop to tell the edits which rows remain."""
    rows = BatchRows(len(batch))
    features, values = torch.tensor([row.feature for row in batch]), torch.tensor([row.value for row in batch])
    with ExitStack() as stack:
        for layer, sae in saes.items():
            of_layer = [i for i, row in enumerate(batch) if row.layer == layer]
            if of_layer:
                stack.enter_context(edit_prompt_position(model, layer, set_feature(sae, features, values), offset=offset,
                                                         rows=torch.tensor(of_layer), every_token=every_token,
                                                         batch=rows))
        yield rows


def _write(shard: ShardWriter, unit_id: str, answers: list[tuple[Row, str]],
           exact: list[tuple[Row, dict[str, float]]]) -> None:
    with shard.unit(unit_id) as group:
        rows = [row for row, _ in answers or exact]
        first, means = rows[0], {row.condition: row.value for row in rows}
        group.attrs.update(layer=first.layer, feature=first.feature, mean_safe=means.get("safe", np.nan),
                           mean_bankrupt=means.get("bankrupt", np.nan), control=first.control)
        for name in ("condition", "prompt", "trial", "value") if answers else ():
            values = [getattr(row, name) for row, _ in answers]
            group.create_dataset(name, data=values if name != "condition" else np.array(values, dtype=object),
                                 dtype=h5py.string_dtype() if name == "condition" else None)
        if answers:
            group.create_dataset("response", data=[reply for _, reply in answers], dtype=h5py.string_dtype())
        if exact:
            group.create_dataset("exact/condition", data=[row.condition for row, _ in exact], dtype=h5py.string_dtype())
            group.create_dataset("exact/prompt", data=[row.prompt for row, _ in exact])
            for name in (*task.OPTION_LABELS, "coverage", *EXACT_BETS):
                group.create_dataset(f"exact/p_{name}" if name in task.OPTION_LABELS else f"exact/{name}",
                                     data=[probabilities.get(name, np.nan) for _, probabilities in exact])


# ---------------------------------------------------------------- reduce


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    exact = exact_table(shard_paths, s) if s.decisions != "sampled" else None
    if s.decisions == "exact":
        trials, results = None, classify_exact(exact_effects(exact), s.effects)
    else:
        trials = parsed_trials(shard_paths, s)
        results = feature_effects(trials, s)
        if exact is not None:
            shifts = exact_effects(exact)
            results = results.merge(shifts[["unit", "prompt", *EXACT_COLUMNS]], on=["unit", "prompt"], how="left")
    results = null_p_values(results)
    with h5py.File(out_dir / "merged.h5", "w", libver=LIBVER) as out:
        out.attrs.update(format="saebatch-patching/1", job="population_patching", parser_version=parser.PARSER_VERSION,
                         parser_rules=parser.PARSER_RULES, prompt_names=[p.name for p in s.prompts],
                         prompts=[p.text for p in s.prompts])
        for column in [] if trials is None else trials.columns:
            assert trials is not None  # (columns only when there are trials)
            values = trials[column].to_numpy()
            out.create_dataset(f"trials/{column}", data=values.astype(object) if values.dtype == object else values,
                               dtype=h5py.string_dtype() if values.dtype == object else None)
        for group, table in {"features": results, "exact": exact}.items():
            for column in [] if table is None else table.columns:
                values = table[column].to_numpy()
                out.create_dataset(f"{group}/{column}", data=values.astype(object) if values.dtype == object else values,
                                   dtype=h5py.string_dtype() if values.dtype == object else None)
    report = Report(out_dir / "report", "Population-mean patching" + (": re-test" if s.retest else ""))
    if s.retest is not None:
        report.text(f"The seed's follow-up: a re-test of the causal features of `{s.retest}` (at most {s.retest_top}, the "
                    f"largest effects first), {s.trials} trials per prompt and condition.")
    book = cards.cards_of(s.contexts, f"{FIELD}.contexts", manifest)
    if trials is None:
        _report_exact(report, results, s, book)
    else:
        _report(report, trials, results, s, book)


def parsed_trials(shard_paths: list[Path], s: Settings) -> pd.DataFrame:
    """Every answer, parsed now (parser v{PARSER_VERSION}); stops count as $0 bets."""
    frames = []
    for path in shard_paths:
        with h5py.File(path, "r") as shard:
            for unit_id, group in shard["units"].items():
                frame = pd.DataFrame({name: group[name][()] for name in ("condition", "prompt", "trial", "response")})
                frame = frame.assign(unit=unit_id, layer=int(group.attrs["layer"]), feature=int(group.attrs["feature"]),
                                     control=bool(group.attrs.get("control", False)),
                                     mean_safe=float(group.attrs["mean_safe"]),
                                     mean_bankrupt=float(group.attrs["mean_bankrupt"]))
                frames.append(frame)
    trials = pd.concat(frames, ignore_index=True)
    for column in ("condition", "response"):
        trials[column] = trials[column].map(lambda v: v.decode() if isinstance(v, bytes) else v)
    decisions = [parser.parse(reply, s.prompts[prompt].bet_type) for reply, prompt in zip(trials["response"],
                                                                                      trials["prompt"], strict=True)]
    trials["prompt_name"] = [s.prompts[p].name for p in trials["prompt"]]
    trials["action"] = [d.action for d in decisions]
    trials["bet"] = [float(d.bet) if d.bet is not None else np.nan for d in decisions]  # None: invalid; a stop bets $0
    trials["rule"] = [d.rule for d in decisions]
    return trials


def exact_table(shard_paths: list[Path], s: Settings) -> pd.DataFrame:
    """The options' exact probabilities: a row per unit, condition and prompt."""
    frames = []
    for path in shard_paths:
        with h5py.File(path, "r") as shard:
            for unit_id, group in shard["units"].items():
                exact = group["exact"]
                frames.append(pd.DataFrame({
                    "unit": unit_id, **{name: group.attrs[name] for name in UNIT_ATTRS},
                    "condition": [c.decode() if isinstance(c, bytes) else c for c in exact["condition"][()]],
                    "prompt": [s.prompts[p].name for p in exact["prompt"][()]],
                    **{name: exact[name][()] if name in exact else np.nan  # shards from before expected bets lack them
                       for name in ("p_bet", "p_stop", "coverage", *EXACT_BETS)}}))
    return pd.concat(frames, ignore_index=True)


def exact_effects(exact: pd.DataFrame) -> pd.DataFrame:
    """Per feature and prompt: P(stop) and the expected bet under each condition (the unpatched
    ones shared), the exact stop shift (safe-mean minus bankrupt-mean patch, as `stop_effect`), the
    exact bet shift (bankrupt-mean minus safe-mean, as `bet_effect`) and the lowest coverages."""
    baseline = exact[exact["unit"] == BASELINE].set_index("prompt")
    rows = []
    for (unit, prompt), part in exact[exact["unit"] != BASELINE].groupby(["unit", "prompt"], sort=False):
        p_stop, bet = part.set_index("condition")["p_stop"], part.set_index("condition")["bet_expected"]
        rows.append({"unit": unit, "prompt": prompt, **part.iloc[0][list(UNIT_ATTRS)].to_dict(),
                     "p_stop_exact_safe": p_stop["safe"],
                     "p_stop_exact_none": baseline.loc[prompt, "p_stop"], "p_stop_exact_bankrupt": p_stop["bankrupt"],
                     "stop_shift_exact": p_stop["safe"] - p_stop["bankrupt"],
                     "coverage_min": min(part["coverage"].min(), baseline.loc[prompt, "coverage"]),
                     "bet_exact_safe": bet["safe"], "bet_exact_none": baseline.loc[prompt, "bet_expected"],
                     "bet_exact_bankrupt": bet["bankrupt"], "bet_shift_exact": bet["bankrupt"] - bet["safe"],
                     "bet_mass_min": min(part["bet_mass"].min(), baseline.loc[prompt, "bet_mass"])})
    return pd.DataFrame(rows)


def classify_exact(shifts: pd.DataFrame, effects: Effects) -> pd.DataFrame:
    """Without sampling there is no noise to test against: a chosen feature is causal when its exact
    P(stop) shift exceeds `effects.stop_effect` or its exact bet shift `effects.bet_effect` (the
    null controls say how unusual that is)."""
    causal = ~shifts["control"].astype(bool) & ((shifts["stop_shift_exact"] > effects.stop_effect)
                                                | (shifts["bet_shift_exact"] > effects.bet_effect))
    kind = np.where(shifts["mean_safe"] > shifts["mean_bankrupt"], "safe", "risky")
    return shifts.assign(control=shifts["control"].astype(bool), causal=causal,
                         effect_class=np.where(shifts["control"].astype(bool), "control", np.where(causal, kind, "none")))


def feature_effects(trials: pd.DataFrame, s: Settings) -> pd.DataFrame:
    """Per feature and prompt: rates and averages per condition, the tests, effects, the class."""
    baseline = trials[trials["unit"] == BASELINE]
    rows = []
    for (unit, prompt), part in trials[trials["unit"] != BASELINE].groupby(["unit", "prompt_name"], sort=False):
        shared = baseline[baseline["prompt_name"] == prompt]
        first = part.iloc[0]
        row = {"unit": unit, "layer": int(first["layer"]), "feature": int(first["feature"]), "prompt": prompt,
               "control": bool(first["control"]), "mean_safe": first["mean_safe"], "mean_bankrupt": first["mean_bankrupt"]}
        by_condition = {"none": shared, "safe": part[part["condition"] == "safe"],
                        "bankrupt": part[part["condition"] == "bankrupt"]}
        for condition, answers in by_condition.items():
            valid = answers[answers["action"] != "invalid"]
            row |= {f"n_{condition}": len(answers), f"invalid_{condition}": float((answers["action"] == "invalid").mean()),
                    f"stop_rate_{condition}": float((valid["action"] == "stop").mean()) if len(valid) else np.nan,
                    f"avg_bet_{condition}": float(valid["bet"].mean()) if len(valid) else np.nan}
            row[f"bankruptcy_risk_{condition}"] = 1 - row[f"stop_rate_{condition}"]  # the seed's measure: going on
        row |= _tests(by_condition)
        rows.append(row)
    return _classify(pd.DataFrame(rows), s.effects)


def _tests(by_condition: dict[str, pd.DataFrame]) -> dict:
    valid = {c: frame[frame["action"] != "invalid"] for c, frame in by_condition.items()}
    order = np.concatenate([np.full(len(valid[c]), i) for i, c in enumerate(CONDITIONS)])
    outcome = np.concatenate([valid[c]["bet"].to_numpy() for c in CONDITIONS])
    safe, bankrupt = valid["safe"], valid["bankrupt"]
    with np.errstate(invalid="ignore"):
        rho, p_spearman = stats.spearmanr(order, outcome) if _varies(outcome) else (np.nan, np.nan)
    if len(safe) and len(bankrupt) and _varies(np.r_[safe["bet"], bankrupt["bet"]]):
        p_bets = stats.mannwhitneyu(bankrupt["bet"], safe["bet"], alternative="two-sided").pvalue
    else:
        p_bets = np.nan
    stops = [[int((safe["action"] == "stop").sum()), int((safe["action"] == "bet").sum())],
             [int((bankrupt["action"] == "stop").sum()), int((bankrupt["action"] == "bet").sum())]]
    p_stops = stats.fisher_exact(stops)[1] if len(safe) and len(bankrupt) else np.nan
    # Trial t draws the same noise under both patches: pair them (both answers readable).
    pairs = safe[["trial", "action", "bet"]].merge(bankrupt[["trial", "action", "bet"]], on="trial",
                                                    suffixes=("_safe", "_bankrupt"))
    p_stops_paired = mcnemar(pairs["action_safe"] == "stop", pairs["action_bankrupt"] == "stop") if len(pairs) else np.nan
    p_bets_paired = signed_rank(pairs["bet_bankrupt"] - pairs["bet_safe"]) if len(pairs) else np.nan
    bet_effect = bankrupt["bet"].mean() - safe["bet"].mean()
    stop_safe, stop_bankrupt = (safe["action"] == "stop").mean(), (bankrupt["action"] == "stop").mean()
    stop_se = np.sqrt(stop_safe * (1 - stop_safe) / max(len(safe), 1) + stop_bankrupt * (1 - stop_bankrupt) / max(len(bankrupt), 1))
    varied = min(len(safe), len(bankrupt)) >= 2 and safe["bet"].var() > 0 and bankrupt["bet"].var() > 0
    bet_ci = (stats.ttest_ind(bankrupt["bet"], safe["bet"], equal_var=False).confidence_interval()
              if varied else (np.nan, np.nan))  # Welch's interval; none for a constant group
    return {"spearman_rho": rho, "p_spearman": p_spearman, "paired_trials": len(pairs), "p_bets": p_bets_paired,
            "p_stops": p_stops_paired, "p_bets_unpaired": p_bets, "p_stops_unpaired": p_stops,
            "bet_effect": bet_effect, "bet_effect_low": bet_ci[0], "bet_effect_high": bet_ci[1],
            "stop_effect": stop_safe - stop_bankrupt, "stop_effect_low": stop_safe - stop_bankrupt - 1.96 * stop_se,
            "stop_effect_high": stop_safe - stop_bankrupt + 1.96 * stop_se}


def _varies(values: np.ndarray) -> bool:
    """Whether a rank test can say anything: at least two values, not all equal (none when every
    answer of a condition was unreadable)."""
    return len(values) > 1 and np.ptp(values) > 0


def _classify(results: pd.DataFrame, effects: Effects) -> pd.DataFrame:
    """Corrected p-values per prompt over the features; then a causal feature is "safe" when its
    safe mean is the higher (raising it makes the model stop), else "risky"."""
    parts = []
    for _, part in results.groupby("prompt", sort=False):
        part = part.copy()
        for test in ("p_bets", "p_stops", "p_spearman", "p_bets_unpaired", "p_stops_unpaired"):
            p = part[test].to_numpy()
            tested = ~np.isnan(p) & ~part["control"].to_numpy(bool)  # controls are the null, not candidates
            corrected = np.full(len(p), np.nan)
            if tested.any():
                corrected[tested] = (np.minimum(p[tested] * tested.sum(), 1.0) if effects.correction == "bonferroni"
                                     else stats.false_discovery_control(p[tested], method="bh"))
            part[f"{test}_corrected"] = corrected
        with np.errstate(invalid="ignore"):
            causal = ((part["bet_effect"] > effects.bet_effect) & (part["p_bets_corrected"] < effects.alpha)) | (
                (part["stop_effect"] > effects.stop_effect) & (part["p_stops_corrected"] < effects.alpha))
        kind = np.where(part["mean_safe"] > part["mean_bankrupt"], "safe", "risky")
        parts.append(part.assign(causal=causal, effect_class=np.where(part["control"], "control",
                                                                      np.where(causal, kind, "none"))))
    return pd.concat(parts, ignore_index=True)


def null_p_values(results: pd.DataFrame) -> pd.DataFrame:
    """Where each chosen feature's effect falls among its layer's controls on the same prompt:
    (1 + controls at least as large in |effect|) / (1 + controls), per effect, over the controls whose
    effect is computable; NaN without any."""
    effects = [c for c in ("stop_effect", "bet_effect", "stop_shift_exact", "bet_shift_exact") if c in results]
    columns = {f"null_p_{effect}": np.full(len(results), np.nan) for effect in effects}
    counts = np.zeros(len(results), dtype=int)
    for i, row in enumerate(results.itertuples(index=False)):
        null = results[results["control"] & (results["layer"] == row.layer) & (results["prompt"] == row.prompt)]
        counts[i] = 0 if row.control else len(null)
        if row.control:
            continue
        for effect in effects:
            value, computable = abs(getattr(row, effect)), null[effect].dropna().abs()  # unreadable controls say nothing
            if not np.isnan(value) and len(computable):
                columns[f"null_p_{effect}"][i] = (1 + int((computable >= value).sum())) / (1 + len(computable))
    return results.assign(controls_in_layer=counts, **columns)


# ---------------------------------------------------------------- report


def _report(report: Report, trials: pd.DataFrame, results: pd.DataFrame, s: Settings,
            book: cards.CardBook | None) -> None:
    invalid = trials["action"].eq("invalid").mean()
    chosen, controls = results[~results["control"]], results[results["control"]]
    report.text(
        f"Model `{s.model.name}`. {chosen['unit'].nunique():,} features x {len(s.prompts)} prompts x {s.trials} trials "
        f"per condition (safe mean, bankrupt mean; the unpatched answers shared), temperature {s.temperature}, "
        f"edit at the last prompt token{' and every generated token' if s.patch_generated else ''}, SAE error "
        f"term kept. Answers parsed by parser v{parser.PARSER_VERSION}; {invalid:.1%} were unreadable (left out of the "
        f"rates; stops count as $0 bets). Trial t draws the same sampling noise under every patch, so the tests pair the "
        f"safe-mean and bankrupt-mean answers of a trial. Causal: bet effect > ${s.effects.bet_effect:g} with Wilcoxon's "
        f"signed-rank test, or stop effect > {s.effects.stop_effect:g} with McNemar's exact test, {s.effects.correction} "
        f"p < {s.effects.alpha} over the features of a prompt; the unpaired tests (Mann-Whitney, Fisher's exact) are "
        "the columns `p_bets_unpaired` and `p_stops_unpaired`. Data: `merged.h5` (trials/, features/), `features.csv`."
    )
    if not controls.empty:
        report.text(
            f"Null controls: {controls['unit'].nunique()} random live features ({s.controls} per patched layer, drawn "
            f"among those whose activation frequency is nearest the chosen features'), patched exactly as the chosen "
            "ones from their own means. `null_p_<effect>` is where a chosen feature's |effect| falls among its layer's "
            "controls on the same prompt: (1 + controls at least as large) / (1 + controls). Controls are never "
            "corrected for or called causal; the plot shows them as grey crosses."
        )
    unreadable = results[[f"n_{c}" for c in CONDITIONS]].to_numpy() * (
        1 - results[[f"invalid_{c}" for c in CONDITIONS]].to_numpy()) == 0
    if unreadable.any():
        pairs = results[unreadable.any(axis=1)]
        listed = ", ".join(f"L{r.layer} F{r.feature} ({r.prompt})" for r in pairs.head(10).itertuples())
        report.text(f"**{len(pairs)} feature-prompt pair(s) have no readable answer in some condition**, so their "
                    f"tests are not computable (empty p-values, never causal): {listed}"
                    + (" ..." if len(pairs) > 10 else "") + ".")
    _class_counts(report, chosen)
    report.heading("Strongest effects")
    shown = chosen.assign(size=chosen["stop_effect"].abs() + chosen["bet_effect"].abs() / 100)
    shown = shown.sort_values(["causal", "size"], ascending=False).head(15)[
        ["prompt", "layer", "feature", "effect_class", "stop_effect", "stop_effect_low", "stop_effect_high",
         "bet_effect", "bet_effect_low", "bet_effect_high", "p_stops_corrected", "p_bets_corrected"]
        + (["null_p_stop_effect", "null_p_bet_effect"] if not controls.empty else [])]
    report.table(results, "features", shown=shown if book is None else book.annotate(shown))
    if "stop_shift_exact" in results:
        _exact_section(report, chosen, s)
    _ground_truth(report, chosen, s, book)
    _plot(report, results, s)
    bet_types = {prompt.name: prompt.bet_type for prompt in s.prompts}
    parser.report_versions(report, list(trials["response"]), [bet_types[name] for name in trials["prompt_name"]],
                           "answers")
    report.write()


def _report_exact(report: Report, results: pd.DataFrame, s: Settings, book: cards.CardBook | None) -> None:
    """The report of `decisions: exact`: no sampled answers, the exact P(stop) shifts alone."""
    import matplotlib.pyplot as plt

    chosen, controls = results[~results["control"]], results[results["control"]]
    report.text(
        f"Model `{s.model.name}`. {chosen['unit'].nunique():,} features x {len(s.prompts)} prompts, exact decisions only "
        f"(`decisions: exact`): P(stop) at the cue from one forward per feature, condition and prompt at temperature "
        f"{s.temperature}, the next-token mass on tokens that start option 2 against option 1 (common/choices.py), "
        "edit at the last prompt token, SAE error term kept. There is no sampling noise, so no test: a feature is "
        f"causal when its exact stop shift (safe-mean minus bankrupt-mean patch) exceeds {s.effects.stop_effect:g} or "
        f"its exact bet shift (bankrupt-mean minus safe-mean) exceeds ${s.effects.bet_effect:g}. " + _BETS_EXPLAINED.format(
            answer=s.bet_answer.format(number="N"), amounts=_amounts(s.bet_amounts))
        + (f" Null controls: {controls['unit'].nunique()} random live features of similar activation frequency; "
           "`null_p_stop_shift_exact` and `null_p_bet_shift_exact` place each shift among its layer's controls."
           if not controls.empty else "")
    )
    _class_counts(report, chosen)
    report.heading("Strongest exact effects")
    shown = chosen.assign(size=chosen["stop_shift_exact"].abs() + chosen["bet_shift_exact"].abs().fillna(0) / 100)
    shown = shown.sort_values("size", ascending=False).head(15)[
        ["prompt", "layer", "feature", "effect_class", "p_stop_exact_safe", "p_stop_exact_bankrupt", "stop_shift_exact",
         "bet_exact_safe", "bet_exact_bankrupt", "bet_shift_exact", "coverage_min", "bet_mass_min"]
        + (["null_p_stop_shift_exact", "null_p_bet_shift_exact"] if not controls.empty else [])]
    report.table(results, "features", shown=shown if book is None else book.annotate(shown))
    _ground_truth(report, chosen, s, book)
    prompts = list(dict.fromkeys(results["prompt"]))
    fig, axes = plt.subplots(1, len(prompts), figsize=(4.8 * len(prompts), 4), squeeze=False, sharey=True)
    for ax, prompt in zip(axes[0], prompts, strict=True):
        part = results[results["prompt"] == prompt]
        spread = part.groupby("effect_class")["layer"].transform(lambda x: x + np.linspace(-0.25, 0.25, len(x)))
        _scatter_classes(ax, part.assign(layer_spread=spread), "layer_spread", "stop_shift_exact")
        ax.axhline(s.effects.stop_effect, color="black", lw=0.6, ls="--")
        ax.set_xlabel("layer")
        ax.set_title(f"prompt {prompt}")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("exact P(stop) shift: safe-mean minus bankrupt-mean patch")
    fig.tight_layout()
    report.figure(fig, "exact_effects", "Each feature's exact stop shift by layer, with the null controls (crosses); "
                  "dashed: the causal threshold")
    report.write()


def _class_counts(report: Report, chosen: pd.DataFrame) -> None:
    report.heading("Features by class, layer and prompt")
    counts = chosen.groupby(["prompt", "layer", "effect_class"]).size().unstack("effect_class", fill_value=0)
    report.table(counts.reindex(columns=["safe", "risky", "none"], fill_value=0).reset_index(), "counts")


CLASS_COLOURS = {"safe": "tab:blue", "risky": "tab:red", "none": "dimgrey", "control": "darkgrey"}


def _scatter_classes(ax, part: pd.DataFrame, x: str, y: str) -> None:
    """One point per feature, coloured by its class; the null controls as grey crosses (if any)."""
    for kind, colour in CLASS_COLOURS.items():
        rows = part[part["effect_class"] == kind]
        if kind != "control" or len(rows):
            ax.scatter(rows[x], rows[y], s=16 if kind == "control" else 12, c=colour,
                       marker="x" if kind == "control" else "o",
                       label=f"{'null controls' if kind == 'control' else kind} ({len(rows)})")


_BETS_EXPLAINED = (
    "The expected bet is P(bet) x $10 on fixed-bet prompts; on variable-bet prompts, P(bet) x the mean bet under the "
    "model's distribution over the "
    "answers \"{answer}\" for N in {amounts}, teacher-forced (each answer's token probabilities at the sampling "
    "temperature, times the chance that the number ends there); a stop bets $0, as in the sampled average. "
    "`bet_mass_min` is the smallest total probability of those answers (variable bets): low values mean the model "
    "writes its bets otherwise, or other amounts.")


def _amounts(amounts: list[int]) -> str:
    steps = {b - a for a, b in zip(amounts, amounts[1:])}
    if len(amounts) > 3 and len(steps) == 1:
        return f"${amounts[0]}, ${amounts[1]}, ..., ${amounts[-1]}"
    return ", ".join(f"${amount}" for amount in amounts) or "(none: `bet_amounts: []`)"


def _exact_section(report: Report, results: pd.DataFrame, s: Settings) -> None:
    import matplotlib.pyplot as plt

    report.heading("Exact choice probabilities beside the sampled answers")
    report.text(
        f"P(stop) at the decision cue from one forward per feature, condition and prompt, at temperature "
        f"{s.temperature}: the next-token mass on tokens that start option 2 (\"Stop\") against option 1 (\"Bet\"), "
        "leading whitespace ignored, renormalised over the two options; `coverage_min` is the smallest share of the "
        "mass on the two options (the rest: answers that start with words, which sampling may still read). No "
        "sampling noise and no parser: `stop_shift_exact` is what `stop_effect` estimates from sampled answers, and "
        "`bet_shift_exact` what `bet_effect` does. " + _BETS_EXPLAINED.format(
            answer=s.bet_answer.format(number="N"), amounts=_amounts(s.bet_amounts))
    )
    shown = results.assign(size=results["stop_shift_exact"].abs()).sort_values("size", ascending=False).head(15)[
        ["prompt", "layer", "feature", "p_stop_exact_safe", "p_stop_exact_none", "p_stop_exact_bankrupt",
         "stop_shift_exact", "stop_effect", "stop_effect_low", "stop_effect_high", "coverage_min",
         "bet_shift_exact", "bet_effect", "bet_effect_low", "bet_effect_high", "bet_mass_min"]]
    report.table(shown, "exact_strongest")
    prompts = list(dict.fromkeys(results["prompt"]))
    fig, axes = plt.subplots(1, len(prompts), figsize=(4.8 * len(prompts), 4.2), squeeze=False)
    for ax, prompt in zip(axes[0], prompts, strict=True):
        part = results[results["prompt"] == prompt]
        ax.errorbar(part["stop_shift_exact"], part["stop_effect"], yerr=_interval(part, "stop_effect"), fmt="o", ms=3,
                    lw=0.6, alpha=0.7)
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color="black", lw=0.6, ls="--")
        ax.set_xlabel("exact P(stop) shift")
        ax.set_title(f"prompt {prompt}")
    axes[0][0].set_ylabel("sampled stop effect (95% interval)")
    fig.tight_layout()
    report.figure(fig, "exact_vs_sampled", "Each feature's exact P(stop) shift against its sampled stop effect; dashed: equal")


def _ground_truth(report: Report, results: pd.DataFrame, s: Settings, book: cards.CardBook | None) -> None:
    """On the organism, its planted feature per prompt: its effects and its rank among its layer's
    patched features, and its card when the report has a `contexts` run."""
    planted = task.planted_cause(s.model.name)
    if planted is None:
        return
    layer, feature = planted
    report.heading(task.GROUND_TRUTH)
    in_layer = results[results["layer"] == layer]
    if not (in_layer["feature"] == feature).any():
        report.text(f"The planted feature {feature} of layer {layer} was not patched (not among the features chosen).")
        return
    effects = [column for column in ("stop_effect", "bet_effect", "stop_shift_exact", "bet_shift_exact")
               if column in results]
    rows = []
    for prompt, part in in_layer.groupby("prompt", sort=False):
        row = part[part["feature"] == feature].iloc[0]
        ranks = {f"{effect}_rank": planted_rank(part, feature, effect, absolute=effect.startswith("bet_"))
                 for effect in effects}
        rows.append({"prompt": prompt, **{effect: row[effect] for effect in effects}, **ranks,
                     "features_in_layer": len(part), "causal": row["causal"], "class": row["effect_class"]}
                    | {column: row[column] for column in ("p_stops_corrected", "p_bets_corrected", "null_p_stop_effect",
                                                          "null_p_stop_shift_exact", "controls_in_layer") if column in row})
    report.text(f"The organism's planted cause is feature {feature} of layer {layer}: raising it makes the model "
                "stop less and bet more (jobs/_organism/README.md). Its effects and ranks among the layer's patched "
                "features (1: the largest stop effect, or the largest |bet effect|):")
    report.table(pd.DataFrame(rows), "ground_truth")
    if book is not None:
        book.section(report, [cards.FeatureId(layer=layer, feature=feature)], "Card of the planted feature")


def planted_rank(part: pd.DataFrame, feature: int, column: str, absolute: bool = False) -> float:
    """1 + how many features of `part` have a larger `column` (|column|) than `feature`; NaN where
    `feature` has none (an expected bet with `bet_amounts: []`)."""
    values = part[column].abs() if absolute else part[column]
    value = values[part["feature"] == feature].iloc[0]
    return np.nan if np.isnan(value) else int((values > value).sum()) + 1


def _plot(report: Report, results: pd.DataFrame, s: Settings) -> None:
    import matplotlib.pyplot as plt

    prompts = list(dict.fromkeys(results["prompt"]))
    fig, axes = plt.subplots(1, len(prompts), figsize=(5.5 * len(prompts), 4.2), squeeze=False)
    for ax, prompt in zip(axes[0], prompts, strict=True):
        part = results[results["prompt"] == prompt]
        for kind, colour in CLASS_COLOURS.items():  # the 95% intervals of the table, behind the points
            rows = part[part["effect_class"] == kind]
            ax.errorbar(rows["bet_effect"], rows["stop_effect"], xerr=_interval(rows, "bet_effect"),
                        yerr=_interval(rows, "stop_effect"), fmt="none", ecolor=colour, elinewidth=0.7,
                        alpha=0.3 if kind == "control" else 0.6, zorder=1)
        _scatter_classes(ax, part, "bet_effect", "stop_effect")
        for row in part[part["causal"]].itertuples():
            ax.annotate(f"L{row.layer} F{row.feature}", (row.bet_effect, row.stop_effect), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.axvline(s.effects.bet_effect, color="black", lw=0.6, ls="--")
        ax.axhline(s.effects.stop_effect, color="black", lw=0.6, ls="--")
        ax.set_xlabel("bet effect ($): bankrupt-mean minus safe-mean patch")
        ax.set_title(f"prompt {prompt}")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("stop effect: safe-mean minus bankrupt-mean patch")
    fig.tight_layout()
    report.figure(fig, "effects", "Each feature's effects per prompt, coloured by its class, with the null "
                  "controls (grey crosses); bars: 95% intervals (stop effect: normal approximation; bet effect: "
                  "Welch's t; none where a condition's bets are constant); dashed: the thresholds")


def _interval(rows: pd.DataFrame, effect: str) -> np.ndarray:
    """(2, n) distances from each `effect` to its `_low` and `_high` bounds, for errorbar; 0 where unknown."""
    return np.nan_to_num(np.abs(np.stack([rows[effect] - rows[f"{effect}_low"], rows[f"{effect}_high"] - rows[effect]])))
