"""circuit_discovery (the reasoning chain's step 5): the similarities and clusters against
independent computations, the causal statistics, replication across benchmarks and models, the
demo's circuits on the two organisms, and refusals."""

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import SAE
from scipy import stats
from scipy.cluster.hierarchy import fcluster
from scipy.cluster.hierarchy import linkage as scipy_linkage

from jobs._reasoning import teacher_forced
from jobs._reasoning.ablation import control_sets, rescore
from jobs._reasoning.problems import BenchmarkSpec, load_benchmark
from jobs.circuit_discovery import (
    AlignmentMatches,
    Settings,
    Unit,
    _write_outcomes,
    cluster_edges,
    cluster_labels,
    cluster_table,
    clusters_to_ablate,
    coactivation_r,
    linkage,
    replicate,
)
from tests.helpers import REPO
from tests.jobs.reasoning import demo_benchmark, refused, write_step

# ---------------------------------------------------------------- similarities and clusters


def test_coactivation_is_pearson_r_over_every_token_of_prompt_and_solution(reasoning_chain, organism_model):
    model, tokenizer = organism_model
    bench = demo_benchmark()
    saes = {layer: SAE.load_from_disk(reasoning_chain.training.path / "saes" / "organism" / f"L{layer}")
            .requires_grad_(False) for layer in (1, 2)}
    items = bench.items[:10]
    codes = {layer: [] for layer in saes}
    for item in items:  # one item at a time, the block outputs from output_hidden_states
        ids, mask, _, positions = teacher_forced(tokenizer, bench, [item], torch.device("cpu"))
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for layer, sae in saes.items():
                codes[layer].append(sae.encode(hidden[layer + 1][0, positions[0].bool()]).numpy())
    codes = {layer: np.concatenate(parts) for layer, parts in codes.items()}
    # per layer its three most often active features and one never active (r undefined: NaN)
    features = np.array([[layer, f] for layer, values in codes.items()
                         for f in np.argsort(-(values != 0).sum(axis=0), kind="stable")[:3]]
                        + [[2, int(np.flatnonzero((codes[2] != 0).sum(axis=0) == 0)[0])]])
    values = np.stack([codes[layer][:, f] for layer, f in features], axis=1)
    found = coactivation_r(model, tokenizer, bench, items, saes, features, torch.device("cpu"))
    np.testing.assert_allclose(found[:6, :6], np.corrcoef(values[:, :6], rowvar=False), atol=2e-5)
    assert np.isnan(found[6]).all() and np.isnan(found[:, 6]).all()


def test_clusters_follow_the_mixed_similarity_and_are_numbered_by_importance():
    rng = np.random.default_rng(0)
    n = 7  # features 0-2 co-activate, 3-5 share their attribution, 6 is alone
    coactivation, attribution_r = np.eye(n), np.eye(n)
    coactivation[np.ix_([0, 1, 2], [0, 1, 2])] = 0.9
    attribution_r[np.ix_([3, 4, 5], [3, 4, 5])] = 0.8
    for matrix in (coactivation, attribution_r):
        noise = rng.uniform(-0.05, 0.05, (n, n))
        matrix += (noise + noise.T) * (1 - np.eye(n))
        np.fill_diagonal(matrix, 1)
    coactivation[6, 0] = coactivation[0, 6] = np.nan  # a feature constant on the items: r undefined, taken as 0
    tree = linkage(coactivation, attribution_r, 0.5)
    similarity = 0.5 * np.nan_to_num(coactivation) + 0.5 * attribution_r
    expected = scipy_linkage((1 - similarity)[np.triu_indices(n, 1)], method="average")
    np.testing.assert_allclose(tree, expected)
    importance = np.array([0.1, 0.1, 0.1, 0.3, 0.3, 0.3, 2.0])
    labels = cluster_labels(tree, 0.7, importance)
    assert labels.tolist() == [3, 3, 3, 2, 2, 2, 1]  # the lone feature has the largest total importance
    assert len(set(fcluster(tree, 0.7, "distance"))) == 3
    assert clusters_to_ablate(labels, min_size=2, most=4) == [2, 3]
    assert clusters_to_ablate(labels, min_size=1, most=2) == [1, 2]


def test_edges_average_the_coactivation_of_features_in_different_layers():
    features = pd.DataFrame({"layer": [1, 2, 1, 2], "feature": [0, 1, 2, 3], "importance": 1.0, "cluster": [1, 1, 2, 2]})
    r = np.array([[1, .9, .2, .4], [.9, 1, .6, .0], [.2, .6, 1, .5], [.4, .0, .5, 1]])
    edges = cluster_edges(Unit("m", "b", features, r, pd.DataFrame()))
    assert edges == {(1, 2): pytest.approx((0.4 + 0.6) / 2)}  # (L1 F0, L2 F3) and (L2 F1, L1 F2); same-layer pairs left out


# ---------------------------------------------------------------- the causal test and replication


def _outcomes(model, bench, cluster, baseline, ablated, controls):
    return pd.DataFrame({"model": model, "benchmark": bench, "cluster": cluster, "item": np.arange(len(baseline)),
                         "baseline": baseline, "ablated": ablated,
                         **{f"control_{i:02d}": c for i, c in enumerate(controls)}})


def _unit(model, bench, clusters: dict[int, list[tuple[int, int]]], outcomes):
    rows = [(layer, feature, 1.0, number) for number, members in clusters.items() for layer, feature in members]
    features = pd.DataFrame(rows, columns=["layer", "feature", "importance", "cluster"])
    return Unit(model, bench, features, np.eye(len(rows)), outcomes)


def test_a_cluster_is_causal_by_mcnemar_against_its_strongest_control_adjusted_over_the_unit():
    rng = np.random.default_rng(1)
    base = np.ones(200, bool)
    strong = base & (rng.random(200) > 0.3)  # costs about 30 points
    weak = base & (rng.random(200) > 0.03)
    controls = [base & (rng.random(200) > 0.02) for _ in range(5)]
    outcomes = pd.concat([_outcomes("m", "b", 1, base, strong, controls), _outcomes("m", "b", 2, base, weak, controls)])
    unit = _unit("m", "b", {1: [(1, 0), (2, 1)], 2: [(1, 2)], 3: [(2, 3)]}, outcomes)
    s = Settings(ablation="/nowhere/run", alpha=0.05, min_drop=0.02)
    table = cluster_table([unit], s).set_index("cluster")
    worst = controls[int(np.argmin([c.mean() for c in controls]))]
    for number, ablated in ((1, strong), (2, weak)):
        # McNemar's exact test: the discordant pairs of ablated and the strongest control, binomial at 1/2
        only_control, only_ablated = int((worst & ~ablated).sum()), int((~worst & ablated).sum())
        p = stats.binomtest(only_control, only_control + only_ablated, 0.5).pvalue
        assert table.loc[number, "p_ablated_vs_control"] == pytest.approx(p)
        assert table.loc[number, "drop"] == pytest.approx(base.mean() - ablated.mean())
    q = stats.false_discovery_control(table.loc[[1, 2], "p_ablated_vs_control"].to_numpy())
    np.testing.assert_allclose(table.loc[[1, 2], "q"], q)
    assert table["causal"].tolist() == [True, False, False]  # cluster 3 was not ablated
    assert table["tested"].tolist() == [True, True, False] and table.loc[1, "features"] == "L1 F0, L2 F1"


class _Matches:
    """Alignment matches given as a table: (model, layer, feature, other) -> (layer, feature); every
    feature compared but those of `unseen`, (model, layer, feature)."""

    def __init__(self, table, unseen=()):
        self.table, self.unseen = table, set(unseen)

    def compared(self, model, layer, feature):
        return (model, layer, feature) not in self.unseen

    def match(self, model, layer, feature, other):
        return self.table.get((model, layer, feature, other))


def test_a_causal_cluster_that_replicates_across_benchmarks_or_models_is_a_primitive():
    rng = np.random.default_rng(2)
    base = np.ones(300, bool)
    drop = base & (rng.random(300) > 0.4)
    keep = [base.copy() for _ in range(3)]
    causal = lambda model, bench, number: _outcomes(model, bench, number, base, drop, keep)  # noqa: E731
    units = [_unit("a", "x", {1: [(1, 0), (1, 1), (2, 2)], 2: [(1, 9), (2, 4)]}, pd.concat([causal("a", "x", 1),
                                                                                    causal("a", "x", 2)])),
             _unit("a", "y", {1: [(1, 0), (1, 1), (2, 5)]}, causal("a", "y", 1)),  # Jaccard 2/4 with a.x C1
             _unit("b", "x", {1: [(1, 7), (2, 8)], 2: [(1, 3)]}, causal("b", "x", 1))]  # b.x C2 never ablated
    matches = _Matches({("a", 1, 9, "b"): (1, 7), ("a", 1, 0, "b"): (1, 3), ("a", 1, 1, "b"): (1, 3)},
                       unseen=[("a", 2, 4)])  # the alignment did not compare L2 F4: the share is of the others
    s = Settings(ablation="/nowhere/run")
    table = replicate(cluster_table(units, s), units, 0.5, matches).set_index(["model", "benchmark", "cluster"])
    assert table.loc[("a", "x", 1), "benchmark_replica"] == "y C1"
    assert table.loc[("a", "x", 1), "benchmark_overlap"] == pytest.approx(0.5)
    assert table.loc[("a", "x", 1), "model_overlap"] == 0  # its matches lie in b.x C2, which is not causal
    assert table.loc[("a", "x", 2), "model_replica"] == "b C1"  # L1 F9's match is in b.x C1
    assert table.loc[("a", "x", 2), "model_overlap"] == 1.0  # 1 of the 1 compared
    assert table["primitive"].to_dict() == {("a", "x", 1): True, ("a", "x", 2): True, ("a", "y", 1): True,
                                            ("b", "x", 1): False, ("b", "x", 2): False}
    without = replicate(cluster_table(units, s), units, 0.6, None).set_index(["model", "benchmark", "cluster"])
    assert not without["primitive"].any()  # Jaccard 0.5 < 0.6, and no alignment


def test_alignment_matches_are_the_best_r_of_the_other_model_above_the_threshold(tmp_path):
    run = tmp_path / "alignment"
    run.mkdir()
    with h5py.File(run / "merged.h5", "w") as merged:
        merged.attrs.update(job="feature_alignment", threshold=0.3)
        merged["blocks/a/L1/features"] = [4, 8]
        merged["blocks/b/L1/features"] = [1, 2, 3]
        merged["blocks/b/L2/features"] = [5, 6]
        merged["r/a.L1__b.L1"] = [[0.1, 0.5, np.nan], [0.2, 0.1, 0.25]]
        merged["r/a.L1__b.L2"] = [[0.2, 0.7], [0.1, 0.2]]
    matches = AlignmentMatches.of_run(run)
    assert matches.match("a", 1, 4, "b") == (2, 6)  # r 0.7 at b L2 beats 0.5 at b L1
    assert matches.match("a", 1, 8, "b") is None   # best r 0.25: below the threshold
    assert matches.match("b", 1, 2, "a") == (1, 4)  # read the other way round
    assert matches.match("a", 1, 99, "b") is None  # not compared by the alignment


def test_control_groups_never_draw_an_excluded_feature():
    active = {1: np.array([40, 39, 41, 38, 42, 37, 0, 1])}
    cluster, important = np.array([[1, 0]]), np.array([[1, 0], [1, 1], [1, 2]])
    drawn = control_sets(active, cluster, 8, seed=0, unit_id="m.b.C1", excluded=important)
    assert {feature for chosen in drawn.values() for _, feature in chosen.tolist()} <= {3, 4, 5, 6, 7}
    assert {feature for chosen in drawn.values() for _, feature in chosen.tolist()} & {3, 4, 5}  # the nearest counts


def test_every_conditions_texts_are_stored_and_read_again_at_reduce(tmp_path):
    """The shards keep each condition's generated texts, control groups' too, so that reduce scores
    them (a parser fix needs no GPU): flags stored by a parser with a bug are replaced."""
    bench = load_benchmark(BenchmarkSpec(name="arithmetic", builtin="organism_arithmetic", n=2))
    texts = [f" #### {bench.items[0].target}", " #### 999"]
    ablations = {"C1": np.array([[1, 0]]), "C1/control_00": np.array([[1, 5]])}
    stale = (texts, [None, None], [False, False])
    with h5py.File(tmp_path / "shard.h5", "w") as shard:
        unit = shard.create_group("units/m.arithmetic")
        unit["item"] = [item.index for item in bench.items]
        _write_outcomes(unit, ablations, {"baseline": stale, "C1": stale, "C1/control_00": stale})
        for condition in ("baseline", "C1", "C1/control_00"):
            assert unit[f"{condition}/text"].asstr()[()].tolist() == texts
        rescore(unit, lambda: bench, "circuit_discovery: its benchmark")
        for condition in ("baseline", "C1", "C1/control_00"):
            assert unit[f"{condition}/correct"][()].tolist() == [True, False]
        assert unit["C1/answer"].asstr()[()].tolist() == [bench.items[0].target, "999"]


# ---------------------------------------------------------------- the demo's circuits


def _clusters(run) -> pd.DataFrame:
    with h5py.File(run.merged_path) as merged:
        table = pd.DataFrame({name: column[()] for name, column in merged["clusters"].items()})
    return table.apply(lambda c: c.str.decode("utf-8") if c.dtype == object else c)


def _planted(run, model) -> str:
    """`L<layer> F<feature>` of the model's SAE feature nearest its planted direction (the report's)."""
    line = next(line for line in (run.report_dir / "report.md").read_text().splitlines()
                if line.startswith(f"- {model} on decisions: "))
    return line.split(": ")[1].split(" (")[0]


def test_each_organisms_planted_feature_leads_a_causal_decision_circuit_that_replicates_across_them(reasoning_chain):
    run = reasoning_chain.circuits
    table = _clusters(run)
    decisions = table[(table["benchmark"] == "decisions")]
    found = {}
    for model, other in (("organism", "organism_b"), ("organism_b", "organism")):
        planted = _planted(run, model)
        row = decisions[(decisions["model"] == model) & decisions["features"].str.contains(f"{planted}(?:,|$)")].iloc[0]
        found[model] = row
        assert row["causal"] and row["primitive"]
        assert row["drop"] > 0.3 and row["drop"] > row["control_drop_max"] + 0.25  # the appetite read at the cue
        assert row["model_replica"].startswith(f"{other} C") and row["model_overlap"] >= 0.5
    # the replica each names is the other's planted cluster
    assert found["organism"]["model_replica"] == f"organism_b C{found['organism_b']['cluster']}"
    assert found["organism_b"]["model_replica"] == f"organism C{found['organism']['cluster']}"
    # the arithmetic has causal circuits of its own in both organisms, the planted cause is not among them
    arithmetic = table[(table["benchmark"] == "arithmetic") & table["causal"]]
    assert set(arithmetic["model"]) == {"organism", "organism_b"}
    assert not any(_planted(run, m) in text for m, text in zip(arithmetic["model"], arithmetic["features"]))


def test_the_reported_drops_are_those_of_the_stored_answers_and_controls_avoid_the_important_features(reasoning_chain):
    run = reasoning_chain.circuits
    table = _clusters(run).set_index(["model", "benchmark", "cluster"])
    with h5py.File(run.merged_path) as merged:
        for unit in merged["units"].values():
            important = set(zip(unit["important/layer"][()].tolist(), unit["important/feature"][()].tolist()))
            base = unit["baseline/correct"][()]
            for name in (n for n in unit if n.startswith("C")):
                row = table.loc[(unit.attrs["model"], unit.attrs["benchmark"], int(name[1:]))]
                assert row["drop"] == pytest.approx(base.mean() - unit[f"{name}/correct"][()].mean())
                ablated = set(zip(unit[f"{name}/layer"][()].tolist(), unit[f"{name}/feature"][()].tolist()))
                assert row["features"] == ", ".join(f"L{a} F{b}" for a, b in sorted(
                    ablated, key=lambda f: [*zip(unit["important/layer"][()], unit["important/feature"][()])].index(f)))
                controls = [c for c in unit[name] if c.startswith("control_")]
                assert len(controls) == 10
                drops = [base.mean() - unit[f"{name}/{c}/correct"][()].mean() for c in controls]
                assert row["control_drop_max"] == pytest.approx(max(drops))
                for control in controls:
                    drawn = set(zip(unit[f"{name}/{control}/layer"][()].tolist(),
                                    unit[f"{name}/{control}/feature"][()].tolist()))
                    assert len(drawn) == len(ablated) and not drawn & important


def test_the_report_draws_each_models_circuits_and_the_primitives_get_contexts(reasoning_chain):
    report = (reasoning_chain.circuits.report_dir / "report.md").read_text()
    for model in ("organism", "organism_b"):
        assert f"![{model}'s circuits" in report
        assert (reasoning_chain.circuits.report_dir / f"circuit_graph_{model}.png").stat().st_size > 10_000
    assert "## Candidate reasoning primitives" in report and "## Ground truth" in report
    # step 6: the organism's primitives' features, in the SAEs the chain trained, the planted one first
    planted = _planted(reasoning_chain.circuits, "organism")
    with h5py.File(reasoning_chain.contexts.merged_path) as merged:
        first = f"L{merged['features/layer'][0]} F{merged['features/feature'][0]}"
        assert "sae_training" in merged.attrs["sae_ids"]
    assert first == planted
    cards = (reasoning_chain.contexts.report_dir / "report.md").read_text()
    assert "Choice:« »" in cards  # its top contexts are decision cues


def test_circuits_refuse_an_alignment_of_another_ablation_and_too_few_items(reasoning_chain, tmp_path, capsys):
    other = write_step(tmp_path, "reasoning_3_ablation.yaml", "feature_ablation", {
        "saes": str(reasoning_chain.training.path), "k": 3})
    alignment = write_step(tmp_path, "reasoning_4_alignment.yaml", "feature_alignment", {"ablation": str(other)})
    path = write_step(tmp_path, "reasoning_5_circuits.yaml", "circuit_discovery", {
        "ablation": str(reasoning_chain.ablation.path), "alignment": str(alignment)})
    refused(capsys, path, "circuit_discovery.alignment: that run aligned the features of")
    path = write_step(tmp_path, "reasoning_5_circuits.yaml", "circuit_discovery", {
        "ablation": str(reasoning_chain.ablation.path), "alignment": None, "attribution_items": 300})
    refused(capsys, path, "circuit_discovery.attribution_items: decisions has 300 items")
    path = write_step(tmp_path, "reasoning_5_circuits.yaml", "circuit_discovery", {
        "ablation": str(reasoning_chain.ablation.path), "alignment": None, "contexts": str(tmp_path)})
    refused(capsys, path, "circuit_discovery.contexts_model: 2 models are studied")
    path = write_step(tmp_path, "reasoning_5_circuits.yaml", "circuit_discovery", {
        "ablation": str(reasoning_chain.ablation.path), "alignment": None, "contexts_model": "organism_c"})
    refused(capsys, path, "circuit_discovery.contexts_model: 'organism_c' is not studied here")
    path = write_step(tmp_path, "reasoning_5_circuits.yaml", "circuit_discovery", {
        "ablation": str(reasoning_chain.ablation.path), "alignment": None, "models": ["organism", "nobody"]})
    refused(capsys, path, "circuit_discovery.models: ['nobody'] were not tested by the ablation")


def test_contexts_take_the_saes_of_the_model_a_circuit_run_studied(reasoning_chain, tmp_path, capsys):
    path = write_step(tmp_path, "reasoning_6_contexts.yaml", "feature_contexts", {
        "features_from": str(reasoning_chain.circuits.path), "model": {"id": "builtin:organism_b"}})
    refused(capsys, path, "feature_contexts.model: builtin:organism_b is not organism (builtin:organism), whose SAEs")
    path = write_step(tmp_path, "reasoning_6_contexts.yaml", "feature_contexts", {
        "features_from": str(reasoning_chain.circuits.path), "from_model": None})
    refused(capsys, path, "feature_contexts.features_from: that run studied ['organism', 'organism_b']; set from_model")


def test_contexts_take_the_saes_of_a_reasoning_run_only(tmp_path, capsys):
    contrast = REPO / "manifests" / "demo" / "gambling_2_contrast.yaml"
    path = write_step(tmp_path, "reasoning_6_contexts.yaml", "feature_contexts", {"features_from": str(contrast)})
    refused(capsys, path, "is a feature_contrast run, whose SAEs are not known here; give `sae`")
    path = write_step(tmp_path, "reasoning_6_contexts.yaml", "feature_contexts", {
        "features_from": None, "features": [[1, 3]]})
    refused(capsys, path, "`sae` is required with `features`")
