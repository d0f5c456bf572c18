"""SAE features of bankrupt against voluntarily stopped games (seed 000, step 2 of 3).

    saebatch submit manifests/demo/gambling_2_contrast.yaml --executor local

Reads a gambling_games run. Per layer (a work unit) and feature, at each game's final decision
(the last prompt before bankruptcy or the decision to stop): the group means (the "bankrupt
mean" and the "safe mean"), Cohen's d with the pooled SD, and Welch's t-test. Reduce corrects the
p-values over every feature tested (Benjamini-Hochberg and Bonferroni), flags the features that
pass the manifest's selection, and writes the feature table (merged.h5 and report/features.csv)
that population_patching reads. Games that hit the round limit or ended unreadable are left out.
No model is loaded: this step needs no GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h5py
import numpy as np
from pydantic import Field

from common.errors import UserError
from common.lazy import lazy_import
from common.manifest import Manifest, StrictModel, UpstreamRun
from common.plan import Estimate, WorkUnit
from common.report import Report
from common.runtime import Work
from common.shards import LIBVER, ShardWriter
from common.sparse import read_csr
from jobs import _feature_cards as cards
from jobs import _gambling as task
from jobs._games_run import GROUPS, games_of, open_games

if TYPE_CHECKING:
    import pandas as pd
    from scipy import stats
else:
    pd = lazy_import("pandas")
    stats = lazy_import("scipy.stats")

log = logging.getLogger(__name__)
FIELD = "feature_contrast"
# The table population_patching reads, one row per feature.
COLUMNS = ("layer", "feature", "mean_bankrupt", "mean_safe", "sd_pooled", "cohens_d", "t", "p",
           "q_bh", "p_bonferroni", "active_bankrupt", "active_safe", "selected")

# ---------------------------------------------------------------- the manifest section


class Selection(StrictModel):
    """Which features the next step patches."""

    correction: Literal["bh", "bonferroni"] = Field("bh", description="p-values corrected by Benjamini-Hochberg "
                                                     "(q) or Bonferroni")
    alpha: float = Field(0.001, gt=0, lt=1, description="keep features whose corrected p-value is below this")
    min_abs_d: float = Field(0.8, ge=0, description="... and whose |Cohen's d| is above this")


class Settings(StrictModel):
    """The `feature_contrast:` section of a manifest."""

    games: UpstreamRun = Field(description="the gambling_games run: its directory, or its manifest "
                               "(a relative path is read beside this manifest)")
    layers: list[int] | None = Field(None, description="layers to contrast (None: every layer the games recorded)")
    selection: Selection = Field(default_factory=Selection, description="the features handed to patching")
    min_games: int = Field(2, ge=2, description="fewest games each group needs")
    top_features: int = Field(20, ge=1, description="features listed per layer in the report")
    contexts: UpstreamRun | None = Field(None, description=cards.CONTEXTS_HELP)


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """A unit per layer; checks the games run, its layers and the group sizes first."""
    s = manifest.settings
    games = games_of(s.games, f"{FIELD}.games")
    recorded = games.layers
    layers = s.layers if s.layers is not None else recorded
    missing = sorted(set(layers) - set(recorded))
    if missing or not layers:
        raise UserError(f"{FIELD}.layers: the games recorded SAE features at layers {recorded}, not at "
                        f"{missing or layers}; choose among those")
    counts = games.counts
    if counts is not None and any(n < s.min_games for n in counts.values()):
        raise UserError(f"{FIELD}: the games hold {counts['bankrupt']} bankrupt and {counts['safe']} stopped games; "
                        f"each group needs {s.min_games} (min_games). Play more games (gambling_games.repetitions)")
    cards.check_contexts(s.contexts, f"{FIELD}.contexts")
    return [WorkUnit(f"L{layer}", {"layer": layer}) for layer in layers]


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    games = games_of(manifest.settings.games, f"{FIELD}.games")
    read = Work("cpu_read", games.bytes_per_layer * len(units), label=f"the games' features at {len(units)} layer(s)")
    return Estimate(output_bytes=len(units) * games.width * 8 * 12, task_memory_bytes=games.games * games.width * 8 * 2,
                    notes=(f"{games.games:,} games, {games.width:,} features per layer; no GPU needed",), work=(read,))


# ---------------------------------------------------------------- the work (CPU)


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    shard.set_attrs(games=str(s.games), groups="bankrupt: games that went bankrupt; safe: games stopped "
                    "voluntarily; features at each game's final decision")
    pending = set(shard.pending())
    with open_games(s.games, f"{FIELD}.games") as games:
        for unit in units:
            if unit.id not in pending:
                continue
            groups = final_features(games, unit.payload["layer"])
            table = contrast(groups["bankrupt"], groups["safe"])
            with shard.unit(unit.id) as group:
                group.attrs.update(layer=unit.payload["layer"], n_bankrupt=len(groups["bankrupt"]),
                                   n_safe=len(groups["safe"]))
                for column, values in table.items():
                    group.create_dataset(column, data=values)


def final_features(games: h5py.File, layer: int) -> dict[str, np.ndarray]:
    """Per group, the (games, d_sae) SAE features at each game's last decision."""
    rows: dict[str, list[np.ndarray]] = {group: [] for group in GROUPS}
    for game in games["units"].values():
        for group, outcome in GROUPS.items():
            if game.attrs["outcome"] == outcome:
                rows[group].append(read_csr(game[f"features/L{layer}"])[[-1]].toarray()[0])
    return {group: np.asarray(values, dtype=np.float64) for group, values in rows.items()}


def contrast(bankrupt: np.ndarray, safe: np.ndarray) -> dict[str, np.ndarray]:
    """Per feature: group means, pooled SD, Cohen's d, Welch's t and its two-sided p. A feature
    constant within each group separates them perfectly when the two constants differ (d and t
    infinite, p 0) and says nothing when they are equal (NaN)."""
    n1, n2 = len(bankrupt), len(safe)
    var1, var2 = bankrupt.var(axis=0, ddof=1), safe.var(axis=0, ddof=1)
    pooled = np.sqrt(((n1 - 1) * var1 + (n2 - 1) * var2) / (n1 + n2 - 2))
    difference = bankrupt.mean(axis=0) - safe.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(pooled > 0, difference / pooled, np.nan)
        t, p = stats.ttest_ind(bankrupt, safe, axis=0, equal_var=False)
    constant = (var1 == 0) & (var2 == 0)
    separated = constant & (difference != 0)
    d = np.where(separated, np.copysign(np.inf, difference), d)
    t = np.where(separated, np.copysign(np.inf, difference), np.where(constant, np.nan, t))
    p = np.where(separated, 0.0, np.where(constant, np.nan, p))
    return {"feature": np.arange(bankrupt.shape[1]), "mean_bankrupt": bankrupt.mean(axis=0),
            "mean_safe": safe.mean(axis=0), "sd_pooled": pooled, "cohens_d": d, "t": t, "p": p,
            "active_bankrupt": (bankrupt > 0).mean(axis=0), "active_safe": (safe > 0).mean(axis=0)}


# ---------------------------------------------------------------- reduce


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    parts, sizes = [], {}
    for path in shard_paths:
        with h5py.File(path, "r") as shard:
            for group in shard["units"].values():
                layer = int(group.attrs["layer"])
                sizes[layer] = (int(group.attrs["n_bankrupt"]), int(group.attrs["n_safe"]))
                parts.append(pd.DataFrame({"layer": layer, **{name: group[name][()] for name in group}}))
    table = correct(pd.concat(parts, ignore_index=True).sort_values(["layer", "feature"], ignore_index=True),
                    s.selection)
    table = table[list(COLUMNS)]
    _write_merged(out_dir / "merged.h5", table, s, sizes)
    with open_games(s.games, f"{FIELD}.games") as games:
        planted = task.planted_cause(str(games.attrs["model"]))
    _report(Report(out_dir / "report", "Features of bankrupt against stopped games"), table, s, sizes, planted,
            cards.cards_of(s.contexts, f"{FIELD}.contexts", manifest))


def correct(table: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """BH q-values and Bonferroni p-values over every tested feature, and the selection flag."""
    tested = table["p"].notna().to_numpy()
    p = table["p"].to_numpy()
    q, bonferroni = np.full(len(p), np.nan), np.full(len(p), np.nan)
    if tested.any():
        q[tested] = stats.false_discovery_control(p[tested], method="bh")
        bonferroni[tested] = np.minimum(p[tested] * tested.sum(), 1.0)
    corrected = q if selection.correction == "bh" else bonferroni
    with np.errstate(invalid="ignore"):
        selected = (corrected < selection.alpha) & (table["cohens_d"].abs().to_numpy() > selection.min_abs_d)
    return table.assign(q_bh=q, p_bonferroni=bonferroni, selected=selected)


def _write_merged(path: Path, table: pd.DataFrame, s: Settings, sizes: dict) -> None:
    with h5py.File(path, "w", libver=LIBVER) as out:
        out.attrs.update(format="saebatch-feature-table/1", job="feature_contrast", games=str(s.games),
                         correction=s.selection.correction, alpha=s.selection.alpha, min_abs_d=s.selection.min_abs_d,
                         group_sizes=str({layer: {"bankrupt": b, "safe": n} for layer, (b, n) in sizes.items()}))
        for column in COLUMNS:
            out.create_dataset(f"features/{column}", data=table[column].to_numpy())


def _report(report: Report, table: pd.DataFrame, s: Settings, sizes: dict, planted: tuple[int, int] | None,
            book: cards.CardBook | None) -> None:
    n_bankrupt, n_safe = next(iter(sizes.values()))
    corrected = "q_bh" if s.selection.correction == "bh" else "p_bonferroni"
    report.text(
        f"Games: `{s.games}`; {n_bankrupt} bankrupt and {n_safe} voluntarily stopped games, SAE features at each "
        f"game's final decision. Per feature: Cohen's d (pooled SD), Welch's t-test, Benjamini-Hochberg and "
        f"Bonferroni over all {int(table['p'].notna().sum()):,} features tested. Selected: {corrected} < "
        f"{s.selection.alpha} and |d| > {s.selection.min_abs_d}. The full table: `features.csv` and `merged.h5`."
    )
    counts = table.groupby("layer").agg(
        features=("feature", "size"), tested=("p", lambda p: int(p.notna().sum())),
        p_below_alpha=("p", lambda p: int((p < s.selection.alpha).sum())),
        corrected_below_alpha=(corrected, lambda q: int((q < s.selection.alpha).sum())),
        large_d=("cohens_d", lambda d: int((d.abs() > s.selection.min_abs_d).sum())),
        selected=("selected", "sum")).reset_index()
    report.heading("Features per layer")
    report.table(counts, "counts")
    report.heading("Strongest selected features")
    strongest = table[table["selected"]].assign(abs_d=table["cohens_d"].abs()).sort_values("abs_d", ascending=False)
    shown = strongest.groupby("layer").head(s.top_features).drop(columns="abs_d")
    report.table(table, "features", shown=shown if book is None else book.annotate(shown))
    if planted is not None:
        _ground_truth(report, table, *planted)
        if book is not None:
            book.section(report, [cards.FeatureId(layer=planted[0], feature=planted[1])], "Card of the planted feature")
    _volcano(report, table, corrected, s.selection)
    report.write()


def _ground_truth(report: Report, table: pd.DataFrame, layer: int, feature: int) -> None:
    """Where the organism's planted feature ranks by |d| among its layer's features (and the selected ones)."""
    report.heading(task.GROUND_TRUTH)
    in_layer = table[table["layer"] == layer].assign(rank=lambda t: t["cohens_d"].abs().rank(ascending=False, method="min"))
    row = in_layer[in_layer["feature"] == feature]
    if not row.empty and np.isnan(row.iloc[0]["cohens_d"]):
        report.text(f"The planted feature {feature} of layer {layer} has no d here (it never varied over the games).")
        return
    if row.empty:
        report.text(f"The planted feature {feature} of layer {layer} was not contrasted (layer {layer} is not in this run).")
        return
    row = row.iloc[0]
    chosen = in_layer[in_layer["selected"]]
    selected_rank = int((chosen["cohens_d"].abs() > abs(row["cohens_d"])).sum()) + 1 if row["selected"] else None
    report.text(
        f"The organism's planted cause is feature {feature} of layer {layer}. Here its d is {row['cohens_d']:.2f} "
        f"(Welch p {row['p']:.2g}), it ranks {int(row['rank'])} of {len(in_layer)} layer-{layer} features by |d|, and it "
        + (f"is selected, {selected_rank} of the layer's {len(chosen)} selected features." if row["selected"]
           else "is not selected.")
    )


def _volcano(report: Report, table: pd.DataFrame, corrected: str, selection: Selection) -> None:
    import matplotlib.pyplot as plt

    layers = sorted(table["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers, strict=True):
        part = table[(table["layer"] == layer) & table["p"].notna()]
        height = -np.log10(part[corrected].clip(lower=1e-300))
        ax.scatter(part["cohens_d"], height, s=4, c=np.where(part["selected"], "crimson", "grey"), alpha=0.7)
        ax.axhline(-np.log10(selection.alpha), color="black", lw=0.6, ls="--")
        for edge in (-selection.min_abs_d, selection.min_abs_d):
            ax.axvline(edge, color="black", lw=0.6, ls="--")
        ax.set_title(f"layer {layer}: {int(part['selected'].sum())} selected")
        ax.set_xlabel("Cohen's d (bankrupt - safe)")
    axes[0][0].set_ylabel(f"-log10 {corrected}")
    report.figure(fig, "volcano", "Effect size against corrected significance per feature; selected in red")
