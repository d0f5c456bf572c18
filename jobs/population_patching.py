"""Population-mean patching of the contrast's features (seed 000, step 3 of 3).

    saebatch submit manifests/demo/gambling_4_patching.yaml --executor local

For each feature of the table (a work unit): the feature is set to its safe mean and to its bankrupt
mean at the last prompt token (optionally at every generated token too), keeping the SAE's error
term, and the model answers each fixed prompt `trials` times, sampling at the manifest's
temperature. The unpatched answers ("none") are generated once per prompt, in their own unit, and
shared by every feature. Rows of many features and layers share one generate call, each with its own
edit; a call's rows share their prompt, whose cache is computed once. Trial t of a prompt draws the
same sampling noise in every condition (common random numbers), so conditions differ by the edit
alone. Shards hold the raw answers; reduce parses them (jobs._gambling_parser, versioned), so a
newer parser needs no GPU, and tests each feature (jobs/_patching_results.py, which also writes the
report): Spearman between the condition order (safe, none, bankrupt) and the outcome over all
trials; on the trials paired by their shared noise, Wilcoxon's signed-rank test for bets and
McNemar's exact test for stopping (unpaired Mann-Whitney and Fisher kept as columns), with
Bonferroni and Benjamini-Hochberg across features.
"""

from __future__ import annotations

import csv
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
    forward_bytes,
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
from jobs._patching_results import (
    BASELINE,
    EXACT_COLUMNS,
    UNIT_ATTRS,
    Effects,
    classify_exact,
    exact_effects,
    feature_effects,
    null_p_values,
    write_report,
)

if TYPE_CHECKING:
    import pandas as pd
    import torch
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")

log = logging.getLogger(__name__)
FIELD = "population_patching"
NEEDED_COLUMNS = ("layer", "feature", "mean_safe", "mean_bankrupt")
FREQUENCY_COLUMNS = ("active_bankrupt", "active_safe")  # shares of games in which a feature is active
EXACT_BETS = ("bet_given_bet", "bet_mass", "bet_expected")  # the expected bet; variable bets: over `bet_amounts`
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
        table, where = read_feature_table(s.feature_table), str(s.feature_table)
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
    repeated = table[table.duplicated(["layer", "feature"], keep="first")]
    if not repeated.empty:
        pairs = sorted({(int(layer), int(feature)) for layer, feature in zip(repeated["layer"], repeated["feature"])})
        raise UserError(f"{FIELD}: the feature table {where} has more than one row to patch for (layer, feature) "
                        f"{pairs}; keep one row of each")
    return table.sort_values(["layer", "feature"]).reset_index(drop=True)


def _whole(text: str) -> int:
    if not text.strip().isdecimal():
        raise ValueError(f"{text!r} is not a whole number, 0 or more")
    return int(text)


def _finite(text: str) -> float:
    value = _number(text)
    if not np.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _number(text: str) -> float:
    try:
        return float(text) if text.strip() else np.nan  # an empty cell: missing, as pandas reads it
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _boolean(text: str) -> bool:
    if text.strip().lower() not in BOOLEANS:
        raise ValueError(f"{text!r} is not one of true/false, yes/no, 1/0 (in any case)")
    return BOOLEANS[text.strip().lower()]


# How each column the step reads is parsed; other columns are kept as text.
COLUMN_TYPES = {"layer": _whole, "feature": _whole, "mean_safe": _finite, "mean_bankrupt": _finite,
                "selected": _boolean, "active_bankrupt": _number, "active_safe": _number, "cohens_d": _number}


def read_feature_table(path: Path) -> pd.DataFrame:
    """The `feature_table` CSV (UTF-8, a header line, a row per feature), its columns typed by
    COLUMN_TYPES; any cell that does not parse is a UserError naming its line and column."""
    where = f"{FIELD}.feature_table: {path}"
    with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet's byte order mark dropped
        reader = csv.reader(file, strict=True)
        try:
            header = next(reader, [])
            rows = [(reader.line_num, row) for row in reader if row]  # blank lines skipped
        except csv.Error as error:
            raise UserError(f"{where}, line {reader.line_num}: not valid CSV ({error}); close every quote, "
                            "or save the table again as CSV") from None
        except UnicodeDecodeError as error:
            raise UserError(f"{where} is not UTF-8 text ({error}); save it as CSV in UTF-8") from None
    if not header:
        raise UserError(f"{where} is empty; give a header line with {list(NEEDED_COLUMNS)}, then a row per feature")
    if len(set(header)) != len(header):
        raise UserError(f"{where}: the header {header} repeats a column name; name each column once")
    columns: dict[str, list] = {name: [] for name in header}
    for line, row in rows:
        if len(row) != len(header):
            raise UserError(f"{where}, line {line}: {len(row)} values under {len(header)} column names; give each "
                            "row one value per column")
        for name, text in zip(header, row, strict=True):
            try:
                columns[name].append(COLUMN_TYPES.get(name, str)(text))
            except ValueError as error:
                raise UserError(f"{where}, line {line}, column {name}: {error}; correct the cell") from None
    return pd.DataFrame(columns)


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
    if "control" in found:  # runs from before controls lack it
        found = found[~found["control"].astype(bool)]
    found = found[found["causal"].astype(bool)]
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
    infos = check_saes(s.sae, layers, config.hidden_size, f"{FIELD}.sae", model=s.model, edited=True)
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
    check_saes(s.sae, sorted(per_layer), config.hidden_size, f"{FIELD}.sae", model=s.model, edited=True)
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
    infos = check_saes(s.sae, layers, config.hidden_size, f"{FIELD}.sae", model=s.model, edited=True)
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
    exact = max(exact_bets, forward_bytes(config, s.model.dtype, prompt_tokens))  # each row's own prompt forward
    return generation_memory(config, s.model.dtype, parameter_bytes(config, s.model.dtype) + sae_bytes, prompt_tokens,
                             s.max_new_tokens, prompt_cached=False, extra_per_row=width * DTYPE_BYTES[s.sae.dtype],
                             other_phase=exact)


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
        # Position 0 is the prompt's last token; with patch_generated the answer's tokens are edited
        # too, as they are when sampled (the right-padding after an answer is never read).
        offsets = tuple(range(inputs.shape[1])) if s.patch_generated else (0,)
        with row_edits(model, saes, repeated, every_token=False, offsets=offsets):
            logits = model(input_ids=inputs.repeat(len(rows), 1).to(device), cache=prefix,
                           use_cache=True).logits
        found = amounts(logits, s.temperature)
        read["bet_given_bet"].append(found["expected"])
        read["bet_mass"].append(found["mass"])
    return {name: torch.cat(parts) for name, parts in read.items()}


@contextmanager
def row_edits(model, saes: dict, batch: list[Row], every_token: bool,
              offsets: tuple[int, ...] = (-1,)) -> Iterator[BatchRows]:
    """Set each row's feature to its value at the last prompt token (positions `offsets` of the
    first forward: a teacher-forced answer names its own too; and, if asked, at every generated
    token), error term kept: x + (v - f(x)) W_dec[f]. Yields the batch's rows, for a decode loop
    to tell the edits which rows remain."""
    assert not (every_token and len(offsets) > 1), "a decode step's forward has one position to edit"
    rows = BatchRows(len(batch))
    features, values = torch.tensor([row.feature for row in batch]), torch.tensor([row.value for row in batch])
    with ExitStack() as stack:
        for layer, sae in saes.items():
            of_layer = [i for i, row in enumerate(batch) if row.layer == layer]
            for offset in offsets if of_layer else ():
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
        if exact is None:
            raise UserError(f"{FIELD}.decisions: exact, but the shards hold no exact decisions (they were written "
                            "with sampled answers alone); reduce them with decisions: sampled or both")
        trials, results = None, classify_exact(exact_effects(exact), s.effects)
    else:
        trials = parsed_trials(shard_paths, s)
        results = feature_effects(trials, s.effects)
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
    if trials is not None and s.decisions == "both":
        _note_missing_exact(report, trials, exact)
    write_report(report, trials, results, s, cards.cards_of(s.contexts, f"{FIELD}.contexts", manifest))


def _note_missing_exact(report: Report, trials: pd.DataFrame, exact: pd.DataFrame | None) -> None:
    """Shards written before exact decisions (or by `decisions: sampled`) still reduce: say which
    units have sampled answers alone, so an empty exact column is not read as no effect."""
    without = sorted(set(trials["unit"]) - (set() if exact is None else set(exact["unit"])))
    if without:
        report.text(f"{len(without):,} of {trials['unit'].nunique():,} units were written without exact decisions "
                    "(by an earlier version, or with `decisions: sampled`): their effects are the sampled ones alone"
                    + ("." if exact is not None else "; no unit has exact decisions, so none are shown."))


def parsed_trials(shard_paths: list[Path], s: Settings) -> pd.DataFrame:
    """Every answer, parsed now (parser v{PARSER_VERSION}); stops count as $0 bets."""
    frames = []
    for path in shard_paths:
        with h5py.File(path, "r") as shard:
            for unit_id, group in shard["units"].items():
                frame = pd.DataFrame({name: group[name][()] for name in ("condition", "prompt", "trial", "response")})
                frames.append(frame.assign(unit=unit_id, **_unit_attrs(group)))
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


def _unit_attrs(group: h5py.Group) -> dict:
    """A unit's layer, feature, means and control flag, as its shard group records them."""
    attrs = {name: group.attrs[name].item() for name in UNIT_ATTRS if name != "control"}
    return {**attrs, "control": bool(group.attrs.get("control", False))}  # shards from before controls lack it


def exact_table(shard_paths: list[Path], s: Settings) -> pd.DataFrame | None:
    """The options' exact probabilities: a row per unit, condition and prompt; None when no unit has
    them (shards from before exact decisions, or of `decisions: sampled`)."""
    frames = []
    for path in shard_paths:
        with h5py.File(path, "r") as shard:
            for unit_id, group in shard["units"].items():
                if "exact" not in group:
                    continue
                exact = group["exact"]
                frames.append(pd.DataFrame({
                    "unit": unit_id, **_unit_attrs(group),
                    "condition": [c.decode() if isinstance(c, bytes) else c for c in exact["condition"][()]],
                    "prompt": [s.prompts[p].name for p in exact["prompt"][()]],
                    **{name: exact[name][()] if name in exact else np.nan  # shards from before expected bets lack them
                       for name in ("p_bet", "p_stop", "coverage", *EXACT_BETS)}}))
    return pd.concat(frames, ignore_index=True) if frames else None


