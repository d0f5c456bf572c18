"""feature_ablation (the reasoning chain's step 3) on the organism: the summary against the stored
answers, batched answers against one item at a time, attribution against gradients on the
features, the choice of features and controls, and refusals.

The demo chain runs once per session (conftest's `reasoning_chain`).
"""

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import SAE
from scipy import stats

from common.edits import edit_block_output, zero_features
from common.errors import UserError
from common.organism.files import shipped
from common.paired import mcnemar, proportion_difference_interval
from jobs._reasoning.ablation import attribution, control_sets, rescore, summarise, top_features
from jobs._reasoning.problems import BenchmarkSpec, load_benchmark
from tests.helpers import run_all
from tests.jobs.reasoning import demo_benchmark, read_csv, refused, write_step


def test_ablating_the_top_features_costs_more_than_random_ones(reasoning_chain):
    """The demo's science: the top-10 features drop accuracy by more than the seed's 5 points, more
    than every one of the 20 matched random sets, and significantly more than the costliest."""
    summary = {(row["model"], row["benchmark"]): row for row in read_csv(reasoning_chain.ablation.report_dir / "summary.csv")}
    row = summary["organism", "arithmetic"]
    assert row["items"] == 600 - 64
    assert row["baseline"] > 0.45                       # the organism solves about half of them
    assert row["drop"] > 0.05 and row["drop"] > row["control_drop"] + 0.04
    assert row["control_sets"] == 20 and row["drop"] > row["control_drop_max"] and row["null_p_drop"] == pytest.approx(1 / 21)
    assert row["p_ablated_vs_control"] < 0.05 and row["criterion_met"] and row["beats_control_significantly"]
    # the second organism (solves about four in five): its top features too cost more than every random set
    # (a drop of 9.5 points against at most 6.9), though not significantly more than the costliest (p 0.21)
    other = summary["organism_b", "arithmetic"]
    assert other["items"] == 600 - 64 and other["baseline"] > 0.7
    assert other["criterion_met"] and other["drop"] > other["control_drop_max"]
    with h5py.File(reasoning_chain.ablation.merged_path, "r") as merged:
        unit = merged["units/organism.arithmetic"]
        correct = {c: unit[f"{c}/correct"][()] for c in ("baseline", "ablated", *(f"control_{i:02d}" for i in range(20)))}
    assert row["baseline"] == pytest.approx(correct["baseline"].mean())
    assert row["p_ablated"] == pytest.approx(mcnemar(correct["baseline"], correct["ablated"]))
    drops = [correct["baseline"].mean() - correct[f"control_{i:02d}"].mean() for i in range(20)]
    assert row["control_drop"] == pytest.approx(np.mean(drops)) and row["control_drop_max"] == pytest.approx(max(drops))
    paired = proportion_difference_interval(correct["baseline"], correct["ablated"])
    assert (row["drop_low"], row["drop_high"]) == pytest.approx(paired)  # Agresti-Min, for paired proportions
    assert row["drop_low"] < row["drop"] < row["drop_high"]
    report = (reasoning_chain.ablation.report_dir / "report.md").read_text()
    assert f"drop {100 * row['drop']:+.1f} pp (95% interval {100 * row['drop_low']:+.1f} pp" in report


def _planted_ranks(training, merged_path, model: str) -> dict[str, tuple[int, int, int, int, int]]:
    """Per benchmark, (feature, rank, rank in layer, rank by |score|, in layer) of the trained
    layer-1 SAE's feature nearest the organism's planted direction, from the SAE's decoder and the
    stored attributions."""
    planted = shipped(model).record["planted"]  # the demo names each organism by its built-in name
    sae = SAE.load_from_disk(training.path / "saes" / model / f"L{planted['layer']}")
    decoder = sae.W_dec.detach().double()
    feature = int((decoder @ torch.tensor(planted["direction"], dtype=torch.float64) / decoder.norm(dim=1)).abs().argmax())
    found = {}
    with h5py.File(merged_path, "r") as merged:
        for unit in (u for u in merged["units"].values() if u.attrs["model"] == model):
            scores = {int(name[1:]): values[()] for name, values in unit["attribution"].items()}
            every = np.concatenate([scores[layer] for layer in sorted(scores)])
            offset = sum(len(scores[layer]) for layer in sorted(scores) if layer < planted["layer"])
            in_layer = scores[planted["layer"]]
            found[unit.attrs["benchmark"]] = (
                feature, int(stats.rankdata(-every, method="min")[offset + feature]),
                int(stats.rankdata(-in_layer, method="min")[feature]),
                int(stats.rankdata(-np.abs(every), method="min")[offset + feature]),
                int(stats.rankdata(-np.abs(in_layer), method="min")[feature]))
    return found


def test_the_ground_truth_places_the_planted_feature_by_its_attribution(reasoning_chain, tmp_path):
    """On the organisms' decisions, the trained SAE's feature nearest each organism's planted
    direction is among the two of largest |attribution| of all its 1,024 features (negative: it
    lowers the rule's answer, so the top set leaves it out); on the arithmetic it never fires. The
    report's ranks are those of the stored attributions."""
    path = write_step(tmp_path, "reasoning_3_ablation.yaml", "feature_ablation", {
        "saes": str(reasoning_chain.training.path), "attribution_items": 48, "control_sets": 5,
        "benchmarks": [{"name": "decisions", "builtin": "organism_decisions", "n": 120, "max_new_tokens": 8}]})
    run = run_all(path)
    truth = pd.read_csv(run.report_dir / "ground_truth.csv")
    assert sorted(truth["model"]) == ["organism", "organism_b"]
    for row in truth.itertuples():
        expected = _planted_ranks(reasoning_chain.training, run.merged_path, row.model)["decisions"]
        assert (row.feature, row.rank, row.rank_in_layer, row.rank_abs, row.rank_abs_in_layer) == expected
        assert row.rank_abs <= 2 and row.score < 0 and not row.ablated and row.features == 1024
    assert "## Ground truth: the organism's planted cause" in (run.report_dir / "report.md").read_text()
    arithmetic = pd.read_csv(reasoning_chain.ablation.report_dir / "ground_truth.csv")
    assert set(arithmetic["benchmark"]) == {"arithmetic"} and (arithmetic["score"].abs() < 1e-6).all()


def test_batched_answers_equal_one_item_at_a_time(reasoning_chain, organism_model):
    """Rows of three conditions share a generate call; each equals its item generated alone."""
    model, tokenizer = organism_model
    bench = demo_benchmark()
    saes = {layer: SAE.load_from_disk(reasoning_chain.training.path / "saes" / "organism" / f"L{layer}")
            .requires_grad_(False) for layer in (1, 2)}
    with h5py.File(reasoning_chain.ablation.merged_path, "r") as merged:
        unit = merged["units/organism.arithmetic"]
        items = unit["item"][()][:6]
        texts = {c: [t.decode() for t in unit[f"{c}/text"][()][:6]] for c in ("baseline", "ablated")}
        top = np.stack([unit["top/layer"][()], unit["top/feature"][()]], axis=1)
    for position, index in enumerate(items):
        ids = tokenizer(bench.prompt(bench.items[index]), return_tensors="pt")
        for condition in ("baseline", "ablated"):
            hooks = []
            if condition == "ablated":
                for layer, sae in saes.items():
                    chosen = torch.zeros(1, sae.cfg.d_sae, dtype=torch.bool)
                    chosen[0, top[top[:, 0] == layer, 1]] = True
                    keep = torch.ones(ids.input_ids.shape, dtype=torch.bool)
                    keep[0, 0] = False  # <bos> is never edited
                    hooks.append(edit_block_output(model, layer, zero_features(sae, chosen, keep)))
            with torch.no_grad(), hooks[0] if hooks else _nothing(), hooks[1] if hooks else _nothing():
                output = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                        stop_strings=bench.stop_strings, tokenizer=tokenizer)
            alone = tokenizer.decode(output[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
            assert alone == texts[condition][position], (condition, index)


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def test_attribution_equals_activation_times_gradient_computed_on_the_features(reasoning_chain, organism_model):
    """The job differentiates block outputs; here the features themselves are the leaves."""
    model, tokenizer = organism_model
    bench = demo_benchmark()
    sae = SAE.load_from_disk(reasoning_chain.training.path / "saes" / "organism" / "L1").requires_grad_(False)
    items = bench.items[:3]
    scores, active = attribution(model, tokenizer, bench, items, {1: sae}, torch.device("cpu"))
    expected = []
    leaves = {}
    for item in items:
        prompt = tokenizer(bench.prompt(item)).input_ids
        solution = tokenizer(bench.continuation(item), add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + solution])

        def through_features(hidden, rows):
            features = sae.encode(hidden[:, 1:]).detach().requires_grad_(True)
            leaves["f"] = features
            rebuilt = hidden[:, 1:] - sae.decode(features).detach() + sae.decode(features)  # same value
            return torch.cat([hidden[:, :1], rebuilt], dim=1)

        with torch.enable_grad(), edit_block_output(model, 1, through_features):
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            log_probs.gather(1, ids[0, 1:, None])[-len(solution):].sum().backward()
        expected.append((leaves["f"] * leaves["f"].grad).sum((0, 1)).double().detach().numpy())
    assert scores[1].shape == (len(items), sae.cfg.d_sae)  # one row per item
    np.testing.assert_allclose(scores[1], np.stack(expected), rtol=1e-3, atol=1e-6)
    assert (active[1] > 0).sum() > 16


def test_feature_choice_rules():
    scores = {1: np.array([0.5, 0.1, 0.9]), 2: np.array([0.9, -1.0, 0.2])}
    assert top_features(scores, 3).tolist() == [[1, 2], [2, 0], [1, 0]]  # ties: lower layer first
    active = {1: np.array([40, 35, 1, 38, 0, 2, 36, 44]), 2: np.array([30, 0, 3, 29, 31, 1, 0, 28])}
    top = np.array([[1, 0], [2, 0]])  # active on 40 and 30 positions
    sets = control_sets(active, top, 4, seed=0, unit_id="m.b")
    assert list(sets) == ["control_00", "control_01", "control_02", "control_03"]
    nearest = {1: {1, 3, 6, 7}, 2: {3, 4, 7, 2}}  # the 4 nearest in log count, top excluded
    for chosen in sets.values():
        assert sorted(chosen[:, 0].tolist()) == [1, 2]  # stratified: one per top feature's layer
        assert all(feature in nearest[layer] for layer, feature in chosen.tolist())
    assert len({tuple(map(tuple, c.tolist())) for c in sets.values()}) > 1  # the sets differ
    again = control_sets(active, top, 4, seed=0, unit_id="m.b")
    assert all(np.array_equal(sets[name], again[name]) for name in sets)


def test_the_drop_interval_keeps_a_width_when_few_answers_change():
    """A t interval on 0/1 differences is (0, 0) when no answer changes and too narrow with one
    change; Agresti and Min's interval for paired proportions is not."""
    base = np.array([True] * 6 + [False] * 4)
    one_lost = base.copy()
    one_lost[0] = False
    items = pd.DataFrame({"model": "m", "benchmark": ["same"] * 10 + ["one lost"] * 10,
                          "baseline": np.concatenate([base, base]), "ablated": np.concatenate([base, one_lost]),
                          "control_00": np.concatenate([base, base])})
    rows = summarise(items, ["model", "benchmark"], alpha=0.05, success_drop=0.05).set_index("benchmark")
    # (0.5 - 0.5) / 12 +- 1.96 sqrt(1) / 12 and (1.5 - 0.5) / 12 +- 1.96 sqrt(2 - 1 / 12) / 12
    assert (rows.loc["same", "drop_low"], rows.loc["same", "drop_high"]) == pytest.approx((-0.16333, 0.16333), abs=1e-4)
    assert (rows.loc["one lost", "drop_low"], rows.loc["one lost", "drop_high"]) == pytest.approx(
        (1 / 12 - 1.96 * np.sqrt(23 / 12) / 12, 1 / 12 + 1.96 * np.sqrt(23 / 12) / 12))
    assert rows.loc["one lost", "drop"] == pytest.approx(0.1)


def test_reduce_reads_the_answers_again_from_the_stored_texts(tmp_path):
    """Scoring is redone from each condition's texts (flags from the GPU replaced, answers too where
    stored); a condition without texts (older shards) keeps its flags; changed references are refused."""
    bench = load_benchmark(BenchmarkSpec(name="arithmetic", builtin="organism_arithmetic", n=3))
    targets = [item.target for item in bench.items]
    texts = [f" 1 + 1 = 2\n#### {targets[0]}", " #### 999", f" {targets[2]}\n\nQuestion: 5 + {targets[2]}"]
    with h5py.File(tmp_path / "unit.h5", "w") as unit:
        unit["item"], unit["target"] = [item.index for item in bench.items], targets
        for condition in ("baseline", "C1/control_00", "old"):
            unit[f"{condition}/correct"] = [False, True, False]  # as a parser with a bug read them
        for condition in ("baseline", "C1/control_00"):
            unit.create_dataset(f"{condition}/text", data=texts, dtype=h5py.string_dtype())
        unit.create_dataset("baseline/answer", data=["", targets[1], ""], dtype=h5py.string_dtype())
        rescore(unit, lambda: bench, "feature_ablation.benchmarks")
        assert unit["baseline/correct"][()].tolist() == unit["C1/control_00/correct"][()].tolist() == [True, False, True]
        assert unit["baseline/answer"].asstr()[()].tolist() == [targets[0], "999", targets[2]]
        assert "answer" not in unit["C1/control_00"] and unit["old/correct"][()].tolist() == [False, True, False]
        del unit["target"]
        unit["target"] = ["-1", *targets[1:]]
        with pytest.raises(UserError, match="feature_ablation.benchmarks: the reference answers of the benchmark "
                           "'arithmetic' differ from those the run stored"):
            rescore(unit, lambda: bench, "feature_ablation.benchmarks")
    with h5py.File(tmp_path / "older.h5", "w") as older:  # no texts at all: its benchmark is never read
        older["item"], older["baseline/correct"] = [0], [True]
        rescore(older, lambda: pytest.fail("a unit without texts needs no benchmark"), "feature_ablation.benchmarks")
        assert older["baseline/correct"][()].tolist() == [True]


def test_ablation_refuses_what_does_not_fit(reasoning_chain, tmp_path, capsys):
    copy = tmp_path / "training_copy"
    shutil.copytree(reasoning_chain.training.path, copy)
    ablation = {"saes": str(copy)}
    refused(capsys, write_step(tmp_path, "reasoning_3_ablation.yaml", "feature_ablation", {**ablation, "k": 2000}),
            "feature_ablation.k: 2000 is larger than the SAE width of organism (1024 features over layers [1, 2])")
    refused(capsys, write_step(tmp_path, "reasoning_3_ablation.yaml", "feature_ablation",
                                {**ablation, "attribution_items": 600}),
            "feature_ablation.attribution_items: arithmetic has 600 items")
    cfg_path = copy / "saes" / "organism" / "L2" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "d_in": 64}))
    refused(capsys, write_step(tmp_path, "reasoning_3_ablation.yaml", "feature_ablation", ablation),
            "has d_in 64 but the model's residual stream has d_model 128")


def test_an_items_conditions_may_be_split_across_calls(organism_model):
    """An item of more conditions than fit at once (circuit_discovery: 1 + clusters x (1 + controls)
    rows) is split across generate calls, with the answers of one call holding it all."""
    from common.organism.files import Organism
    from jobs._reasoning.ablation import ablate_and_generate

    model, tokenizer = organism_model
    saes = {layer: Organism().sae(layer).requires_grad_(False) for layer in (1, 2)}
    bench = load_benchmark(BenchmarkSpec(name="arithmetic", builtin="organism_arithmetic", n=4, max_new_tokens=12))
    ablations = {"first": np.asarray([[1, 0], [1, 5], [2, 3]]), "second": np.asarray([[2, 7], [2, 11]])}
    together = ablate_and_generate(model, tokenizer, bench, bench.items, saes, ablations, 12, torch.device("cpu"))
    split = ablate_and_generate(model, tokenizer, bench, bench.items, saes, ablations, 2, torch.device("cpu"))
    assert split == together and len(together["second"][0]) == 4
