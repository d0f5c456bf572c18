"""Causal ablation of the SAE features that carry the correct answer (seed 003, step 3 of 3), and
the report over every model and benchmark.

    saebatch submit manifests/demo/reasoning_3_ablation.yaml --executor local

Reads an sae_training run (and through it the activation_capture run: models, layers,
benchmarks). A work unit is one model on one benchmark:

1. Attribution. On the first `attribution_items` items, the model reads the prompt and the
   reference solution; each SAE feature's score is activation x gradient of the solution's
   log-probability, summed over positions and averaged over items: the linear estimate of the
   log-probability lost if the feature were zeroed. Gradients are taken at the block outputs, so
   the SAE's error term stays in the model: d/df_i = W_dec[i] . d/dx.
2. Ablation. On the other items (so that the ranking is not judged on the items it was fit to),
   greedy generation in one batch: unchanged, with the top-k features (over all the model's SAE
   layers) zero-ablated at every position, and with each of `control_sets` random sets of k
   features zero-ablated (the null: each set matched to the top set, a feature of the same layer
   and a similar activation frequency on the attribution items for each top feature).
   Ablation keeps the error term: x - sum_i f_i(x) W_dec[i].
3. Scoring with jobs/_reasoning/problems.py; McNemar's exact test pairs each item's outcomes.

Reduce writes the aggregate report: per model and benchmark the baseline, ablated and control
accuracy (the mean over the sets), the drops, where the top set's drop falls among the control
sets' (an empirical p-value), McNemar's p-values, the SAE quality, and whether the seed's success
criterion holds (a drop of more than `success_drop` and more than the control sets' mean).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from pydantic import Field

from common.batching import (
    AUTO_HELP,
    BatchSize,
    planned_rows,
    rows_note,
    rows_now,
)
from common.errors import UserError
from common.lazy import lazy_import
from common.manifest import Manifest, StrictModel, UpstreamRun
from common.models import (
    input_device,
    load_config,
    load_model,
    load_tokenizer,
    local_tokenizer,
    text_config,
)
from common.paired import mean_difference_interval, proportion_difference_interval
from common.plan import Estimate, WorkUnit
from common.report import Report
from common.runtime import Work, model_size
from common.saes import load_sae
from common.shards import LIBVER, ShardWriter
from jobs import _feature_cards as cards
from jobs._gambling import GROUND_TRUTH
from jobs._reasoning import (
    DEVICE_FIELD,
    benchmark_size,
    check_prompt_lengths,
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
from jobs._reasoning.chain import planted_feature, read_trained
from jobs._reasoning.problems import BenchmarkSpec, load_benchmark

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = lazy_import("pandas")

log = logging.getLogger(__name__)
FIELD = "feature_ablation"
PROMPT_TOKENS = 1024  # assumed by plan: a few-shot benchmark prompt (a task measures its own)


class Settings(StrictModel):
    """The `feature_ablation:` section of a manifest."""

    saes: UpstreamRun = Field(description="the sae_training run: its directory, or its manifest (a relative "
                              "path is read beside this manifest)")
    models: list[str] | None = Field(None, description="models to test (None: every model with trained SAEs)")
    benchmarks: list[BenchmarkSpec] | None = Field(None, description="benchmarks (None: those of the capture run)")
    k: int = Field(10, ge=1, description="features ablated, over all of a model's SAE layers")
    attribution_items: int = Field(32, ge=1, description="first items of each benchmark, used to rank features "
                                   "(not evaluated)")
    control_sets: int = Field(20, ge=1, description="random feature sets matched to the top set (per layer, "
                              "activation frequency): the null distribution of the drop")
    control_seed: int = Field(0, description="seed of the control sets")
    batch_size: BatchSize = Field(16, description="items answered together (each runs as 2 + control_sets rows), "
                                  + AUTO_HELP)
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level in the report")
    success_drop: float = Field(0.05, ge=0, le=1, description="the seed's criterion: accuracy drop above this "
                                "(and above the control's)")
    device: str = DEVICE_FIELD
    contexts: UpstreamRun | None = Field(None, description=cards.CONTEXTS_HELP)
    contexts_model: str | None = Field(None, description=cards.CONTEXTS_MODEL_HELP)


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """A unit per (model, benchmark); checks the SAEs against the models, k, and the item counts."""
    s = manifest.settings
    trained = read_trained(s.saes, f"{FIELD}.saes")
    capture = trained.capture
    cards.check_contexts(s.contexts, f"{FIELD}.contexts")
    benchmarks = s.benchmarks or capture.settings.benchmarks
    for index, spec in enumerate(benchmarks):
        items = benchmark_size(spec, f"{FIELD}.benchmarks[{index}]").items
        if items <= s.attribution_items:
            raise UserError(f"{FIELD}.attribution_items: {spec.name} has {items} items; ranking takes the "
                            f"first {s.attribution_items} and leaves none to evaluate. Lower attribution_items or "
                            "raise the benchmark's n")
    units = []
    for entry in capture.select(s.models or trained.models, f"{FIELD}.models"):
        widths = trained.sae_widths(entry)
        if s.k > sum(widths):
            raise UserError(f"{FIELD}.k: {s.k} is larger than the SAE width of {entry.name} ({sum(widths)} features "
                            f"over layers {entry.layers}); lower k")
        tokenizer = local_tokenizer(entry.model)  # on a node without the model, checked when the task starts
        if tokenizer is not None:
            config = text_config(load_config(entry.model)[0])
            for index, spec in enumerate(benchmarks):
                if spec.path is None or spec.path.exists():  # a file missing while planning is estimated
                    check_prompt_lengths(load_benchmark(spec), tokenizer, config, entry.name,
                                         f"{FIELD}.benchmarks[{index}]")
        units += [WorkUnit(f"{entry.name}.{spec.name}", {"model": entry.name, "benchmark": index})
                  for index, spec in enumerate(benchmarks)]
    tested = list(dict.fromkeys(unit.payload["model"] for unit in units))
    cards.check_contexts_model(s.contexts, s.contexts_model, tested, f"{FIELD}.contexts_model")
    return units


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    trained = read_trained(s.saes, f"{FIELD}.saes")
    capture = trained.capture
    benchmarks = s.benchmarks or capture.settings.benchmarks
    rows = 2 + s.control_sets  # per item: unchanged, top k ablated, each control set ablated
    out = memory = 0
    calls: list[int] = []  # rows a generate call, per unit
    work: list[Work] = []
    for name in dict.fromkeys(unit.payload["model"] for unit in units):  # a shard loads each model once
        entry = capture.models[name]
        d_model = text_config(load_config(entry.model)[0]).hidden_size
        sae_bytes = sum(2 * d_model * width * 4 for width in trained.sae_widths(entry))
        work.append(Work("load", model_size(entry.model).weight_bytes + sae_bytes, label=f"{name} and its SAEs"))
    for unit in units:
        entry, spec = capture.models[unit.payload["model"]], benchmarks[unit.payload["benchmark"]]
        full_config = load_config(entry.model)[0]
        widths = trained.sae_widths(entry)
        size = benchmark_size(spec, f"{FIELD}.benchmarks[{unit.payload['benchmark']}]")
        out += size.items * rows * (spec.max_new_tokens * 4 + 64) + sum(widths) * 4
        needs = generation_memory_of(full_config, entry.model.dtype, widths, PROMPT_TOKENS, spec.max_new_tokens)
        at_once = planned_rows(s.batch_size, needs, rows)
        calls.append(at_once)
        memory = max(memory, needs.peak(at_once))
        work += _unit_work(s, unit.id, model_size(entry.model), size, spec.max_new_tokens, at_once)
    return Estimate(output_bytes=out, task_memory_bytes=memory, work=tuple(work),
                    notes=(rows_note(calls, s.batch_size),
                           f"memory: weights, the SAEs, and per row (2 + control_sets per item) its KV cache at "
                           f"{PROMPT_TOKENS:,} prompt tokens and one layer's features of its prompt",))


def _unit_work(s: Settings, unit_id: str, model, size, max_new_tokens: int, at_once: int) -> list:
    """Attribution (a gradient through the prompt and solution of each ranking item), then every
    evaluated item answered as 2 + control_sets rows, each reading its prompt and generating."""
    rows = 2 + s.control_sets
    ranked = min(s.attribution_items, size.items)
    evaluated = size.items - ranked
    return [Work("gradient", ranked * (size.prompt_tokens + size.solution_tokens), model, label=f"{unit_id}: attribution"),
            Work("forward", evaluated * rows * size.prompt_tokens, model, label=f"{unit_id}: prompts"),
            Work("decode", evaluated * rows * max_new_tokens, model, rows=max(1, min(evaluated * rows, at_once)),
                 label=f"{unit_id}: {evaluated * rows:,} answers of up to {max_new_tokens} tokens")]


# ---------------------------------------------------------------- the work (GPU)


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    trained = read_trained(s.saes, f"{FIELD}.saes")
    capture = trained.capture
    benchmarks = s.benchmarks or capture.settings.benchmarks
    shard.set_attrs(saes=str(s.saes), k=s.k, attribution_items=s.attribution_items)
    models = capture.select(s.models or trained.models, f"{FIELD}.models")
    for entry, units_left in units_per_model(models, units, shard.pending()):
        model_spec = entry.placed(s.device)
        model, tokenizer = load_model(model_spec, attn_implementation=None), load_tokenizer(model_spec)
        device = input_device(model_spec)
        d_model = text_config(model.config).hidden_size
        saes = {layer: load_sae(trained.sae_spec(entry), layer, d_model, device) for layer in entry.layers}
        for unit in units_left:
            spec = benchmarks[unit.payload["benchmark"]]
            bench = load_benchmark(spec, f"{FIELD}.benchmarks")
            check_prompt_lengths(bench, tokenizer, text_config(model.config), entry.name, f"{FIELD}.benchmarks")
            ranking, evaluated = bench.items[: s.attribution_items], bench.items[s.attribution_items :]
            per_item, active = attribution(model, tokenizer, bench, ranking, saes, device)
            scores = {layer: values.mean(axis=0) for layer, values in per_item.items()}
            top = top_features(scores, s.k)
            controls = control_sets(active, top, s.control_sets, s.control_seed, unit.id)
            needs = generation_memory_of(load_config(model_spec)[0], model_spec.dtype,
                                         [sae.cfg.d_sae for sae in saes.values()],
                                         max((len(tokenizer(bench.prompt(item)).input_ids) for item in evaluated), default=1),
                                         spec.max_new_tokens)
            at_once = rows_now(s.batch_size, needs, device, rows_per_item=2 + s.control_sets)
            outcomes = ablate_and_generate(model, tokenizer, bench, evaluated, saes, {"ablated": top, **controls},
                                           at_once, device, desc=unit.id)
            with shard.unit(unit.id) as group:
                group.attrs.update(model=entry.name, benchmark=spec.name, kind=spec.kind, rows_at_once=at_once)
                group.create_dataset("item", data=np.asarray([item.index for item in evaluated]))
                group.create_dataset("target", data=[item.target for item in evaluated])
                for name, chosen in {"top": top, **controls}.items():
                    group.create_dataset(f"{name}/layer", data=chosen[:, 0])
                    group.create_dataset(f"{name}/feature", data=chosen[:, 1])
                    group.create_dataset(f"{name}/score", data=[scores[layer][f] for layer, f in chosen])
                for layer, values in scores.items():
                    group.create_dataset(f"attribution/L{layer}", data=values)
                for condition, (texts, answers, correct) in outcomes.items():
                    group.create_dataset(f"{condition}/text", data=texts, dtype=h5py.string_dtype())
                    group.create_dataset(f"{condition}/answer", data=[a or "" for a in answers],
                                         dtype=h5py.string_dtype())
                    group.create_dataset(f"{condition}/correct", data=np.asarray(correct, dtype=bool))
        del model, saes


# ---------------------------------------------------------------- reduce: the aggregate report


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    specs = {spec.name: spec for spec in s.benchmarks or read_trained(s.saes, f"{FIELD}.saes").capture.settings.benchmarks}
    outcomes, features, attributions = [], [], {}
    with h5py.File(out_dir / "merged.h5", "w", libver=LIBVER) as out:
        out.attrs.update(job="feature_ablation", format="saebatch-ablation/1", saes=str(s.saes), k=s.k,
                         attribution_items=s.attribution_items)
        for path in shard_paths:
            with h5py.File(path, "r") as shard:
                for unit_id in shard["units"]:
                    shard.copy(shard["units"][unit_id], out, name=f"units/{unit_id}")
                    group = out[f"units/{unit_id}"]
                    model, bench = str(group.attrs["model"]), str(group.attrs["benchmark"])
                    rescore(group, partial(load_benchmark, specs[bench], f"{FIELD}.benchmarks"), f"{FIELD}.benchmarks")
                    controls = sorted(name for name in group if name.startswith("control_"))
                    outcomes.append(pd.DataFrame({"model": model, "benchmark": bench, "item": group["item"][()],
                                                  **{c: group[f"{c}/correct"][()] for c in ("baseline", "ablated",
                                                                                            *controls)}}))
                    attributions[model, bench] = {int(name[1:]): values[()] for name, values in group["attribution"].items()}
                    for kind in ("top", *controls):
                        features.append(pd.DataFrame({"model": model, "benchmark": bench, "set": kind,
                                                      **{n: group[f"{kind}/{n}"][()] for n in ("layer", "feature",
                                                                                                "score")}}))
    items, ablated = pd.concat(outcomes, ignore_index=True), pd.concat(features, ignore_index=True)
    summary = pd.concat([summarise(items, ["model", "benchmark"], s.alpha, s.success_drop),
                         summarise(items.assign(benchmark="all"), ["model", "benchmark"], s.alpha, s.success_drop)],
                        ignore_index=True)
    summary = summary.merge(_sae_quality(s.saes), on="model", how="left")
    with h5py.File(out_dir / "merged.h5", "a") as out:
        for column in summary.columns:
            values = summary[column].to_numpy()
            out.create_dataset(f"summary/{column}", data=values.astype("S") if values.dtype == object else values)
    _report(Report(out_dir / "report", "Reasoning circuits: causal ablation of SAE features"), s, summary,
            cards.cards_of(s.contexts, f"{FIELD}.contexts", manifest),
            ablated, items, planted_ranks(s, attributions, ablated))


def _sae_quality(training_run: Path) -> pd.DataFrame:
    """Per model, the SAE metrics averaged over its layers (from the training run)."""
    with h5py.File(training_run / "merged.h5", "r") as merged:
        table = pd.DataFrame({name: merged[f"metrics/{name}"][()] for name in merged["metrics"]})
    table["model"] = table["model"].str.decode("utf-8")
    columns = {"l0": "sae_l0", "explained_variance": "sae_explained_variance", "dead_fraction": "sae_dead_fraction",
               "ce_recovered": "sae_ce_recovered"}
    return table.groupby("model")[list(columns)].mean().rename(columns=columns).reset_index()


def planted_ranks(s: Settings, attributions: dict[tuple[str, str], dict[int, np.ndarray]],
                  ablated: pd.DataFrame) -> pd.DataFrame:
    """Per organism and benchmark, its trained SAE's feature nearest the planted direction (what
    stands for the planted cause): its attribution score; its rank over all the model's features
    and in its layer, by score (1: the highest, as the top set is chosen) and by |score| (its
    influence either way); and whether it was in the ablated top set (`ablated`: the sets' features)."""
    trained = read_trained(s.saes, f"{FIELD}.saes")
    rows = []
    for entry in trained.capture.select(sorted({model for model, _ in attributions}), f"{FIELD}.models"):
        planted = planted_feature(trained.sae_spec(entry), entry)
        if planted is None:
            continue
        layer, feature = planted
        for (model, bench), scores in attributions.items():
            if model != entry.name:
                continue
            score, every, in_layer = scores[layer][feature], np.concatenate(list(scores.values())), scores[layer]
            rank = int((every > score).sum()) + 1
            rows.append({"model": model, "benchmark": bench, "layer": layer, "feature": feature, "score": score,
                         "features": len(every), "rank": rank, "rank_in_layer": int((in_layer > score).sum()) + 1,
                         "rank_abs": int((np.abs(every) > abs(score)).sum()) + 1,
                         "rank_abs_in_layer": int((np.abs(in_layer) > abs(score)).sum()) + 1,
                         "ablated": bool(((ablated["model"] == model) & (ablated["benchmark"] == bench)
                                          & (ablated["set"] == "top") & (ablated["layer"] == layer)
                                          & (ablated["feature"] == feature)).any())})
    return pd.DataFrame(rows)


def _report(report: Report, s: Settings, summary: pd.DataFrame, book: cards.CardBook | None, features: pd.DataFrame,
            items: pd.DataFrame, planted: pd.DataFrame) -> None:
    report.text(
        f"SAEs: `{s.saes}`. Per model and benchmark: the first {s.attribution_items} items rank the SAE features by "
        "activation x gradient of the reference solution's log-probability (error term kept); on the other items "
        f"the model answers greedily as it is, with the top {s.k} features zero-ablated at every position, and with "
        f"each of {s.control_sets} control sets zero-ablated: {s.k} random features matched to the top set (for each "
        "top feature one of its layer with a similar activation count on the attribution items). `control` and "
        "`control_drop` are the sets' means; `null_p_drop` is where the top set's drop falls among the sets' drops, "
        "(1 + sets that cost at least as much) / (1 + sets). Drops are differences of accuracies (fractions: 0.05 is "
        "5 percentage points), `drop_low`-`drop_high` the drop's 95% interval for paired proportions (Agresti and "
        "Min's, which keeps a width when few answers change); p-values are "
        "McNemar's exact test on paired items, against the control set that cost the most. The seed's criterion: a "
        f"drop of more than {100 * s.success_drop:g} percentage points and more than the control sets' mean. "
        "`all` pools a model's benchmarks."
    )
    report.heading("Accuracy under ablation")
    report.table(summary, "summary")
    verdicts = summary[summary["benchmark"] == "all"]
    report.heading("The seed's success criterion per model")
    report.text("\n".join(
        f"- **{row.model}**: drop {_points(row.drop)} (95% interval {_points(row.drop_low)} to "
        f"{_points(row.drop_high)}) against the control sets' {_points(row.control_drop)} (at most "
        f"{_points(row.control_drop_max)}; null p {row.null_p_drop:.2g}) over {row.items} items (McNemar p vs the "
        f"strongest control {row.p_ablated_vs_control:.2g}): criterion {'met' if row.criterion_met else 'NOT met'}"
        for row in verdicts.itertuples()))
    report.heading("Ablated and control features")
    report.table(features, "features", shown=_with_cards(features, book, s.contexts_model).head(40))
    if not planted.empty:
        report.heading(GROUND_TRUTH)
        report.text("Each organism carries its risk appetite along a planted direction at the decision cue "
                    "(jobs/_organism/README.md); in each trained SAE the feature whose decoder is nearest it stands for "
                    "the planted cause: on the organism's decisions it sets the answer, on its arithmetic it has no "
                    "planted role. `rank` is its place among all the model's SAE features by attribution (1: the "
                    f"highest, as the {s.k} ablated are chosen), `rank_abs` by |attribution|: a large negative score "
                    "is a feature that lowers the correct answer's probability, which zeroing it would raise, and "
                    "which the top set leaves out. `_in_layer`: among its layer's features.")
        report.table(planted, "ground_truth")
    items.to_csv(report.folder / "items.csv", index=False)
    _figure(report, items)
    report.write()


def _with_cards(features: pd.DataFrame, book: cards.CardBook | None, model: str | None) -> pd.DataFrame:
    """The features of the contexts run's `model` with their first contexts and card links."""
    if book is None:
        return features
    model = model or features["model"].iloc[0]  # plan checked: one model, or contexts_model
    annotated = book.annotate(features)
    other = annotated["model"] != model
    return annotated.assign(top_context=annotated["top_context"].mask(other, ""), card=annotated["card"].mask(other, ""))


def _points(difference: float) -> str:
    """A difference of two accuracies (fractions) in percentage points: 0.076 -> "+7.6 pp"."""
    return f"{100 * difference:+.1f} pp"


def _figure(report: Report, items: pd.DataFrame) -> None:
    """Per model and benchmark, the paired accuracy change against the unablated model on the same
    items: top-k ablated, the control sets' mean (per item), and each control set as a dot."""
    import matplotlib.pyplot as plt

    groups = list(items.groupby(["model", "benchmark"], sort=True))
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(groups) + 2), 3.8))
    for x, (_, group) in enumerate(groups):
        base = group["baseline"].to_numpy(float)
        controls = group[sorted(c for c in group if c.startswith("control_"))].to_numpy(float)
        ablated, control_mean = group["ablated"].to_numpy(float), controls.mean(axis=1)
        for offset, name, changed, (low, high), colour in (
                (-0.2, "top-k ablated", ablated, proportion_difference_interval(ablated, base), "crimson"),
                (0.05, "control sets' mean", control_mean, mean_difference_interval(control_mean - base), "steelblue")):
            mean = (changed - base).mean()
            ax.errorbar(x + offset, 100 * mean, yerr=[[100 * (mean - low)], [100 * (high - mean)]], fmt="o",
                        color=colour, capsize=3, label=name if x == 0 else None)
        ax.scatter(np.full(controls.shape[1], x + 0.25), 100 * (controls.mean(axis=0) - base.mean()), s=10,
                   color="grey", alpha=0.5, label="each control set" if x == 0 else None)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(groups)), [f"{model}\n{bench}\n({len(group)} items)" for (model, bench), group in groups],
                  fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("accuracy change (percentage points)\nablated minus baseline, same items")
    ax.legend(fontsize=8)
    report.figure(fig, "accuracy", "Paired change in accuracy against the unablated model (per item: ablated minus "
                  "baseline), mean with its paired 95% interval, for the top-k features ablated (Agresti-Min, for paired "
                  "proportions) and for the control sets (k matched random features; per item the sets' mean, a t "
                  "interval); grey: each control set's change")
