"""What population_patching's reduce computes from the answers and shows: each feature's effects
and tests per prompt, the null controls' p-values, the exact decision shifts, and the report.

A helper never imports a job, so the report takes the job's settings untyped (`s`:
jobs.population_patching.Settings).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from common.lazy import lazy_import
from common.manifest import StrictModel
from common.paired import mcnemar, mean_difference_interval, proportion_difference_interval, signed_rank
from common.report import Report
from jobs import _feature_cards as cards
from jobs import _gambling as task
from jobs import _gambling_parser as parser

if TYPE_CHECKING:
    import pandas as pd
    from scipy import stats
else:
    pd = lazy_import("pandas")
    stats = lazy_import("scipy.stats")

CONDITIONS = ("safe", "none", "bankrupt")  # the order Spearman's test runs along
# The shards' layout, as population_patching writes it:
BASELINE = "baseline"  # the unit of unpatched answers
UNIT_ATTRS = ("layer", "feature", "control", "mean_safe", "mean_bankrupt")  # what a unit's shard group records
EXACT_COLUMNS = ("p_stop_exact_safe", "p_stop_exact_none", "p_stop_exact_bankrupt", "stop_shift_exact", "coverage_min",
                 "bet_exact_safe", "bet_exact_none", "bet_exact_bankrupt", "bet_shift_exact", "bet_mass_min")


class Effects(StrictModel):
    """When a feature counts as causal (the seed's thresholds, after a correction over features)."""

    bet_effect: float = Field(8.0, ge=0, description="dollars the bankrupt-mean patch must add to the average bet")
    stop_effect: float = Field(0.15, ge=0, description="stop rate the safe-mean patch must add")
    alpha: float = Field(0.05, gt=0, lt=1, description="corrected p-value below which an effect is significant")
    correction: Literal["bonferroni", "bh"] = Field("bonferroni", description="over the features tested")


# ---------------------------------------------------------------- the statistics


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


def feature_effects(trials: pd.DataFrame, effects: Effects) -> pd.DataFrame:
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
    return _classify(pd.DataFrame(rows), effects)


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
    # The effects and their intervals on those pairs too, as the tests: the shared noise cancels.
    stopped_safe, stopped_bankrupt = pairs["action_safe"] == "stop", pairs["action_bankrupt"] == "stop"
    bet_shifts = pairs["bet_bankrupt"] - pairs["bet_safe"]
    stop_low, stop_high = proportion_difference_interval(stopped_safe, stopped_bankrupt) if len(pairs) else (np.nan, np.nan)
    bet_low, bet_high = mean_difference_interval(bet_shifts)
    return {"spearman_rho": rho, "p_spearman": p_spearman, "paired_trials": len(pairs), "p_bets": p_bets_paired,
            "p_stops": p_stops_paired, "p_bets_unpaired": p_bets, "p_stops_unpaired": p_stops,
            "bet_effect": bet_shifts.mean() if len(pairs) else np.nan, "bet_effect_low": bet_low,
            "bet_effect_high": bet_high,
            "stop_effect": (stopped_safe.mean() - stopped_bankrupt.mean()) if len(pairs) else np.nan,
            "stop_effect_low": stop_low, "stop_effect_high": stop_high}


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


# ---------------------------------------------------------------- the report


def write_report(report: Report, trials: pd.DataFrame | None, results: pd.DataFrame, s: Any,
                 book: cards.CardBook | None) -> None:
    """The report of a run with sampled answers (`trials`), or of exact decisions alone (None);
    `s` is the run's settings (jobs.population_patching.Settings), `book` its feature cards."""
    if trials is None:
        _report_exact(report, results, s, book)
    else:
        _report_sampled(report, trials, results, s, book)


def _report_sampled(report: Report, trials: pd.DataFrame, results: pd.DataFrame, s: Any,
                    book: cards.CardBook | None) -> None:
    """The report of sampled answers: the tests, the strongest effects, the exact shifts beside
    them (`decisions: both`), the ground truth, the plot and what parser versions read."""
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


def _report_exact(report: Report, results: pd.DataFrame, s: Any, book: cards.CardBook | None) -> None:
    """The report of `decisions: exact`: no sampled answers, the exact P(stop) shifts alone."""
    import matplotlib.pyplot as plt

    chosen, controls = results[~results["control"]], results[results["control"]]
    report.text(
        f"Model `{s.model.name}`. {chosen['unit'].nunique():,} features x {len(s.prompts)} prompts, exact decisions only "
        f"(`decisions: exact`): P(stop) at the cue from one forward per feature, condition and prompt at temperature "
        f"{s.temperature}, the next-token mass on tokens that start option 2 against option 1 (common/choices.py), "
        "edit at the last prompt token, SAE error term kept. " + _NO_INTERVAL + " There is no sampling noise, so no test: a feature is "
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


_NO_INTERVAL = ("An exact shift has no interval: every trial of a prompt is the same forward, so the rows of a feature, "
                "condition and prompt share one probability; what a shift is measured against is the null controls' "
                "shifts (where `controls` is set) and, beside sampling, the sampled effect's interval.")


def _exact_section(report: Report, results: pd.DataFrame, s: Any) -> None:
    import matplotlib.pyplot as plt

    report.heading("Exact choice probabilities beside the sampled answers")
    report.text(
        f"P(stop) at the decision cue from one forward per feature, condition and prompt, at temperature "
        f"{s.temperature}: the next-token mass on tokens that start option 2 (\"Stop\") against option 1 (\"Bet\"), "
        "leading whitespace ignored, renormalised over the two options; `coverage_min` is the smallest share of the "
        "mass on the two options (the rest: answers that start with words, which sampling may still read). No "
        "sampling noise and no parser: `stop_shift_exact` is what `stop_effect` estimates from sampled answers, and "
        "`bet_shift_exact` what `bet_effect` does. " + _NO_INTERVAL + " " + _BETS_EXPLAINED.format(
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


def _ground_truth(report: Report, results: pd.DataFrame, s: Any, book: cards.CardBook | None) -> None:
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


def _plot(report: Report, results: pd.DataFrame, s: Any) -> None:
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
                  "controls (grey crosses); bars: 95% intervals over the paired trials (stop effect: Agresti-Min; bet "
                  "effect: paired t; none where the bet shifts are constant); dashed: the thresholds")


def _interval(rows: pd.DataFrame, effect: str) -> np.ndarray:
    """(2, n) distances from each `effect` to its `_low` and `_high` bounds, for errorbar; 0 where unknown."""
    return np.nan_to_num(np.abs(np.stack([rows[effect] - rows[f"{effect}_low"], rows[f"{effect}_high"] - rows[effect]])))
