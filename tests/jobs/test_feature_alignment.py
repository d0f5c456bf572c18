"""feature_alignment (the reasoning chain's step 4): anchors found the same way in any tokenizer,
the statistics against an independent computation, the null, and refusals."""

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from common.cli import main
from common.organism.files import Organism
from jobs._reasoning import teacher_forced
from jobs._reasoning.anchors import anchor_characters, anchor_positions, token_at
from jobs._reasoning.problems import BenchmarkSpec, load_benchmark
from tests.helpers import REPO

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


def test_alignment_needs_two_models(tmp_path, capsys):
    """The ablation of a single-model chain is refused with what to do."""
    for step in sorted((REPO / "manifests" / "demo").glob("reasoning_*.yaml")):
        shutil.copy(step, tmp_path / step.name)
    capture = yaml.safe_load((tmp_path / "reasoning_1_capture.yaml").read_text())
    capture["activation_capture"]["models"] = capture["activation_capture"]["models"][:1]
    (tmp_path / "reasoning_1_capture.yaml").write_text(yaml.safe_dump(capture))
    assert main(["plan", str(tmp_path / "reasoning_4_alignment.yaml")]) == 2
    assert "the ablation ran one model (organism); alignment compares two or more" in capsys.readouterr().err
