"""feature_alignment (the reasoning chain's step 4): anchors found the same way in any tokenizer,
the statistics against an independent computation, the null, and refusals."""

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from common.cli import main
from common.errors import UserError
from common.organism.files import Organism
from common.saes import SaeSpec, load_sae
from jobs import feature_alignment
from jobs._reasoning import teacher_forced
from jobs._reasoning.anchors import anchor_characters, anchor_positions, token_at
from jobs._reasoning.problems import BenchmarkSpec, load_benchmark
from tests.helpers import REPO, save_random_sae

GSM8K_SOLUTION = (" Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                  "altogether in April and May.\n#### 72")


def test_anchors_are_the_answers_start_each_steps_end_and_the_final_answer():
    found = anchor_characters(GSM8K_SOLUTION, "72", ["answer_start", "steps", "final_answer"])
    assert {name: GSM8K_SOLUTION[at] for name, at in found.items()} == {
        "answer_start": "N", "step_1": ".", "step_2": ".", "final_answer": "7"}
    assert GSM8K_SOLUTION[found["step_2"] - 4 : found["step_2"] + 1] == " May."
    # without a "####" line, the final answer is the target's last occurrence
    assert anchor_characters("So 3 + 4 = 7. The answer is 7", "7", ["final_answer"]) == {"final_answer": 28}


def test_a_token_is_found_by_the_span_that_holds_the_character():
    offsets = [(0, 3), (3, 4), (5, 8)]  # a space at 4 that no token holds
    assert [token_at(offsets, c) for c in (0, 2, 3, 4, 5, 7, 8)] == [0, 0, 1, 2, 2, 2, None]


def test_anchor_positions_point_at_those_tokens_of_the_teacher_forced_text():
    tokenizer = Organism().tokenizer()
    bench = load_benchmark(BenchmarkSpec(name="arithmetic", builtin="organism_arithmetic", n=5))
    ids, _, solution, _ = teacher_forced(tokenizer, bench, bench.items, torch.device("cpu"))
    for row, item in enumerate(bench.items):
        positions = anchor_positions(tokenizer, bench, item, ["question_end", "answer_start", "steps", "final_answer"])
        text = {name: tokenizer.decode([ids[row, at].item()]) for name, at in positions.items()}
        first = int(solution[row].nonzero()[0])
        assert positions["question_end"] == first - 1 and positions["answer_start"] == first
        assert text["final_answer"].strip() == item.target[0]  # the answer's first digit
        assert text["step_1"].strip() == item.solution.split("\n")[0].strip()[-1]


def test_the_organisms_decisions_are_a_benchmark_whose_prompts_end_at_the_cue():
    bench = load_benchmark(BenchmarkSpec(name="decisions", builtin="organism_decisions", n=50, max_new_tokens=8))
    assert all(item.question.endswith("Choice: ") and bench.with_solution(item) == item.question + item.solution
               for item in bench.items)
    assert {item.target for item in bench.items} == {"Bet", "Stop"}
    assert bench.score(bench.items[0], "1) Bet $10") == ("Bet", bench.items[0].target == "Bet")
    tokenizer = Organism().tokenizer()
    ids, _, _, _ = teacher_forced(tokenizer, bench, bench.items[:1], torch.device("cpu"))
    cue = anchor_positions(tokenizer, bench, bench.items[0], ["question_end"])["question_end"]
    assert tokenizer.decode(ids[0, cue - 2 : cue + 1].tolist()) == "Choice: "  # the cue token, as at a decision


def test_items_without_anchors_are_skipped_and_a_benchmark_without_any_is_refused(tmp_path, organism_model):
    """"It is $1,234" does not write the target 1234, so those items have no final_answer: a batch
    of only such items is skipped, and a benchmark of only such items is a UserError."""
    model, tokenizer = organism_model
    sae = load_sae(SaeSpec(path=save_random_sae(tmp_path / "saes", model.config.hidden_size, 32, layers=(1,))), 1,
                   model.config.hidden_size, torch.device("cpu"))
    answers = ["It is $1,234", "It is $2,234", "It is 5", "It is 7"]
    path = tmp_path / "money.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"How much is item {i}?", "answer": answer})
                              for i, answer in enumerate(answers)))
    bench = load_benchmark(BenchmarkSpec(name="money", format="jsonl", path=path))
    chosen = {1: np.arange(8)}
    settings = feature_alignment.Settings.model_construct(anchors=["final_answer"], batch_size=2)
    keys, features = feature_alignment.anchor_features(model, tokenizer, {1: sae}, chosen, bench, settings,
                                                       torch.device("cpu"))
    assert keys == [(2, "final_answer"), (3, "final_answer")] and features[1].shape == (2, 8)
    whole = feature_alignment.Settings.model_construct(anchors=["final_answer"], batch_size=4)
    _, together = feature_alignment.anchor_features(model, tokenizer, {1: sae}, chosen, bench, whole,
                                                    torch.device("cpu"))
    np.testing.assert_allclose(features[1], together[1], atol=1e-5)
    path.write_text("\n".join(json.dumps({"question": f"How much is item {i}?", "answer": answer})
                              for i, answer in enumerate(answers[:2])))
    with pytest.raises(UserError, match=r"feature_alignment.anchors: none of the anchors \['final_answer'\] was "
                       r"found in any of the 2 items of the benchmark 'money'.*add question_end or answer_start"):
        feature_alignment.anchor_features(model, tokenizer, {1: sae}, chosen, load_benchmark(bench.spec), settings,
                                          torch.device("cpu"))


# ---------------------------------------------------------------- the statistics, independently


def aligned_rows(run) -> tuple[list, dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """From the shards: the (benchmark, item, anchor) keys every model has, in the first model's
    order, and per model and layer (feature ids, the rows' values at those keys)."""
    keyed: dict[str, dict] = {}
    for path in sorted(run.shards_dir.glob("shard_*.h5")):
        with h5py.File(path) as shard:
            for unit in shard["units"].values():
                model, bench = unit.attrs["model"], unit.attrs["benchmark"]
                keys = [(bench, int(i), a.decode()) for i, a in zip(unit["item"][()], unit["anchor"][()])]
                for name in (n for n in unit if n.startswith("L")):
                    store = keyed.setdefault(model, {}).setdefault(int(name[1:]), [unit[f"{name}/features"][()], {}])
                    store[1].update(zip(keys, unit[f"{name}/values"][()]))
    models = list(keyed)
    first = next(iter(keyed[models[0]].values()))[1]
    shared = [key for key in first if all(key in next(iter(keyed[m].values()))[1] for m in models)]
    return shared, {m: {layer: (ids, np.array([rows[k] for k in shared])) for layer, (ids, rows) in layers.items()}
                    for m, layers in keyed.items()}


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of every column of x with every column of y (NaN for a constant column)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        zx = (x - x.mean(0)) / x.std(0)
        zy = (y - y.mean(0)) / y.std(0)
    return zx.T @ zy / len(x)


def test_r_between_models_is_pearson_over_the_shared_anchor_rows(reasoning_chain):
    run = reasoning_chain.alignment
    keys, blocks = aligned_rows(run)
    (a, b) = list(blocks)
    with h5py.File(run.merged_path) as merged:
        assert merged.attrs["rows"] == len(keys) > 1000
        for la in blocks[a]:
            for lb in blocks[b]:
                stored = merged[f"r/{a}.L{la}__{b}.L{lb}"][()]
                expected = pearson(blocks[a][la][1].astype(np.float64), blocks[b][lb][1].astype(np.float64))
                np.testing.assert_allclose(stored, expected, atol=1e-9, equal_nan=True)


def test_a_matchs_p_value_is_its_rank_among_the_permutations(reasoning_chain):
    """The null regenerated as documented (per permutation, each model's rows permuted in model
    order by numpy's generator from `seed`) for the most important feature of the first model."""
    run = reasoning_chain.alignment
    settings = yaml.safe_load((run.path / "manifest.yaml").read_text())["feature_alignment"]
    keys, blocks = aligned_rows(run)
    (a, b) = list(blocks)
    matches = pd.read_csv(run.report_dir / "matches.csv")
    top = matches[(matches["model"] == a) & (matches["rank"] == 1)].iloc[0]
    mine = blocks[a][top.layer][1][:, list(blocks[a][top.layer][0]).index(top.feature)].astype(np.float64)
    theirs = np.concatenate([blocks[b][layer][1] for layer in sorted(blocks[b])], axis=1).astype(np.float64)
    observed = np.nanmax(pearson(mine[:, None], theirs))
    assert top.r == pytest.approx(observed, abs=1e-9)
    rng = np.random.default_rng(settings["seed"])
    null = []
    for _ in range(settings["permutations"]):
        orders = {model: rng.permutation(len(keys)) for model in blocks}
        null.append(np.nanmax(pearson(mine[orders[a]][:, None], theirs[orders[b]])))
    assert top.p == pytest.approx((1 + np.sum(np.array(null) >= observed - 1e-6)) / (1 + len(null)))
    assert top.null_r95 == pytest.approx(np.quantile(null, 0.95), abs=1e-4)


def test_the_organisms_planted_features_are_each_others_match(reasoning_chain):
    """The ground truth: in each organism's trained SAE, the feature nearest its planted direction;
    each is the other's best match, far above the null, and the important arithmetic features
    match above the null too."""
    run = reasoning_chain.alignment
    report = (run.report_dir / "report.md").read_text()
    lines = [line for line in report.splitlines() if "nearest the planted direction" in line]
    assert len(lines) == 2 and all("best match in" in line and "is the planted feature" in line for line in lines)
    matches = pd.read_csv(run.report_dir / "matches.csv")
    assert matches["matched"].mean() > 0.5 and (matches["r"] > matches["null_r95"]).mean() > 0.5
    pairs = pd.read_csv(run.report_dir / "pairs.csv")
    assert (pairs["share_matched"] > pairs["null_share_matched"] + 0.3).all()


PLAN_MODELS, PLAN_BENCHMARKS = ["pythia", "gpt2"], ["gsm8k", "folio"]  # neither in alphabetical order
ANCHORS = ["question_end", "answer_start", "step_1", "step_2", "step_10", "final_answer"]


def write_alignment_shard(path, units: list[tuple[str, str]], seed: int = 1):
    """A shard of `units` (model, benchmark) with 10 items' anchor rows of 6 features on layer 1
    that share a latent structure across models, so that features align."""
    rng = np.random.default_rng(seed)
    latent = {bench: rng.normal(size=(10 * len(ANCHORS), 3)) for bench in PLAN_BENCHMARKS}
    values = {(m, b): np.maximum(latent[b] @ rng.normal(size=(3, 6)) + 0.5 * rng.normal(size=(len(latent[b]), 6)), 0)
              for m in PLAN_MODELS for b in PLAN_BENCHMARKS}
    with h5py.File(path, "w") as shard:
        for model, bench in units:
            unit = shard.create_group(f"units/{model}.{bench}")
            unit.attrs.update(model=model, benchmark=bench)
            unit.create_dataset("item", data=np.repeat(np.arange(10), len(ANCHORS)))
            unit.create_dataset("anchor", data=ANCHORS * 10, dtype=h5py.string_dtype())
            unit.create_dataset("L1/features", data=np.arange(6))
            unit.create_dataset("L1/values", data=values[model, bench].astype(np.float32))
    return path


def alignment_results(paths, monkeypatch) -> tuple[feature_alignment.Aligned, list[pd.DataFrame]]:
    monkeypatch.setattr(feature_alignment, "importance", lambda ablation, model, field: {1: np.linspace(1, 0, 6)})
    s = feature_alignment.Settings.model_construct(ablation=REPO, permutations=50, seed=0, threshold=0.5,
                                                   important=4, alpha=0.05)
    aligned = feature_alignment.align_rows(paths, s, PLAN_MODELS, PLAN_BENCHMARKS)
    moments = feature_alignment.comoments(aligned.values)
    null = feature_alignment.PermutationNull(aligned, PLAN_MODELS, s.permutations, s.seed)
    matches, null_spearman = feature_alignment.match_table(aligned, moments, null, PLAN_MODELS, s)
    pairs = feature_alignment.pair_table(aligned, moments, null, s)
    return aligned, [matches, pairs, feature_alignment.transfer_table(matches, null_spearman)]


def test_alignment_does_not_depend_on_the_sharding(tmp_path, monkeypatch):
    """Rows and models follow the plan, not the order shards list their units in (alphabetical
    within a shard), so one shard and two give the same null, p-values and block order."""
    plan = [(model, bench) for model in PLAN_MODELS for bench in PLAN_BENCHMARKS]
    one, one_tables = alignment_results([write_alignment_shard(tmp_path / "one.h5", plan)], monkeypatch)
    two, two_tables = alignment_results([write_alignment_shard(tmp_path / "a.h5", plan[:2]),
                                         write_alignment_shard(tmp_path / "b.h5", plan[2:])], monkeypatch)
    assert [block.model for block in one.blocks] == PLAN_MODELS
    assert one.keys[:7] == [("gsm8k", 0, anchor) for anchor in ANCHORS] + [("gsm8k", 1, "question_end")]
    assert one.keys[len(one.keys) // 2] == ("folio", 0, "question_end")
    assert one.keys == two.keys
    np.testing.assert_array_equal(one.values, two.values)
    for first, second in zip(one_tables, two_tables, strict=True):
        pd.testing.assert_frame_equal(first, second)
    assert list(one_tables[1]["block_a"]) == ["pythia L1", "gpt2 L1"]


def test_each_heatmap_cell_is_its_row_blocks_share_matched(tmp_path):
    """Block a's 6 features all have a match in block b, but only 3 of b's 6 have one in a: the two
    directions differ, and each cell of the heatmap shows its row block's."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(300, 3))
    a = latent[:, [0, 1, 2, 0, 1, 2]] + 0.1 * rng.normal(size=(300, 6))
    b = np.concatenate([latent + 0.1 * rng.normal(size=(300, 3)), rng.normal(size=(300, 3))], axis=1)
    blocks = [feature_alignment.Block("a", 1, np.arange(6), np.linspace(1, 0, 6), slice(0, 6)),
              feature_alignment.Block("b", 1, np.arange(6), np.linspace(1, 0, 6), slice(6, 12))]
    aligned = feature_alignment.Aligned([("x", i, "question_end") for i in range(300)],
                                        np.concatenate([a, b], axis=1).astype(np.float32), blocks)
    s = feature_alignment.Settings.model_construct(threshold=0.5)
    null = feature_alignment.PermutationNull(aligned, ["a", "b"], 20, 0)
    pairs = feature_alignment.pair_table(aligned, feature_alignment.comoments(aligned.values), null, s)
    assert list(zip(pairs["block_a"], pairs["block_b"], pairs["share_matched"], strict=True)) == [
        ("a L1", "b L1", 1.0), ("b L1", "a L1", 0.5)]
    expected = [(pearson(a, b).max(axis=1) > 0.5).mean(), (pearson(b, a).max(axis=1) > 0.5).mean()]
    assert list(pairs["share_matched"]) == expected

    class Figures:
        def figure(self, fig, name, caption):
            self.shown = fig.axes[0].images[0].get_array()

    report = Figures()
    feature_alignment._heatmap(report, aligned, pairs)
    np.testing.assert_array_equal(np.ma.filled(report.shown, np.nan), [[np.nan, 1.0], [0.5, np.nan]])


def test_transfer_has_no_p_value_without_a_spearman_correlation():
    """Constant importance gives rho NaN; its p-value is NaN too, not 1 / (1 + permutations)."""
    matches = pd.DataFrame({"model": "a", "other": "b", "importance": [1.0, 1.0, 1.0, 1.0],
                            "match_importance": [0.4, 0.3, 0.2, 0.1], "matched": True})
    null = {("a", "b"): np.array([0.1, -0.2, 0.5])}
    row = feature_alignment.transfer_table(matches, null).iloc[0]
    assert np.isnan(row["spearman_all"]) and np.isnan(row["p_spearman_all"])
    varied = feature_alignment.transfer_table(matches.assign(importance=[4.0, 3.0, 1.0, 2.0]), null).iloc[0]
    assert varied["spearman_all"] == pytest.approx(0.8) and varied["p_spearman_all"] == pytest.approx(1 / 4)


def test_alignment_needs_two_models(tmp_path, capsys):
    """The ablation of a single-model chain is refused with what to do."""
    for step in sorted((REPO / "manifests" / "demo").glob("reasoning_*.yaml")):
        shutil.copy(step, tmp_path / step.name)
    capture = yaml.safe_load((tmp_path / "reasoning_1_capture.yaml").read_text())
    capture["activation_capture"]["models"] = capture["activation_capture"]["models"][:1]
    (tmp_path / "reasoning_1_capture.yaml").write_text(yaml.safe_dump(capture))
    assert main(["plan", str(tmp_path / "reasoning_4_alignment.yaml")]) == 2
    assert "the ablation ran one model (organism); alignment compares two or more" in capsys.readouterr().err
