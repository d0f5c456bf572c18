"""population_patching: the edit, shared noise, the tests per feature, and the organism's planted cause."""

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from common.choices import NumberReader
from common.cli import main
from common.edits import edit_prompt_position
from common.errors import UserError
from common.generation import sample, seed_of
from common.launcher import prepare_run, run_shard_task
from common.manifest_file import load_manifest
from common.organism.files import Organism
from common.report import Report
from common.shards import partial_path
from jobs import _patching_results as patching_results
from jobs import population_patching as patching
from jobs._gambling import planted_cause
from jobs._gambling_parser import parse
from jobs._patching_results import Effects, feature_effects
from jobs.population_patching import PROMPTS, Row, row_edits
from tests.helpers import REPO, failing_on_call, run_all, save_random_sae, write_manifest_file

DEMO = REPO / "manifests" / "demo" / "gambling_4_patching.yaml"

CPU = torch.device("cpu")


def test_the_chain_names_the_planted_feature_as_causal(gambling_chain):
    results = pd.read_csv(gambling_chain.patching.report_dir / "features.csv")
    planted = results[(results.layer == 1) & (results.feature == 402) & (results.prompt == "safe")].iloc[0]
    # By rank and paired test, not by the sampled effect's margin over the 0.15 threshold: at 150
    # trials that effect ranges 0.16-0.25 across sampling seeds. The exact shift has no sampling noise.
    assert planted.mean_bankrupt > planted.mean_safe  # higher in bankrupt games: a risky feature
    assert planted.p_stops_corrected < 0.05 and planted.stop_effect > 0 and planted.stop_shift_exact > 0.15
    assert planted.stop_rate_safe > planted.stop_rate_none - 0.1 > planted.stop_rate_bankrupt - 0.2
    layer = results[(results.layer == 1) & (results.prompt == "safe")]
    assert patching_results.planted_rank(layer, 402, "stop_effect") == 1  # the largest stop effect of its layer
    truth = pd.read_csv(gambling_chain.patching.report_dir / "ground_truth.csv").set_index("prompt")
    assert truth.loc["safe", "stop_effect_rank"] == 1 and truth.loc["safe", "stop_effect"] == pytest.approx(planted.stop_effect)
    # the exact P(stop) shift, from one forward per condition, lies within the sampled effect's interval
    for row in results[(results.layer == 1) & (results.feature == 402)].itertuples():
        assert row.stop_effect_low <= row.stop_shift_exact <= row.stop_effect_high, row.prompt
        assert row.coverage_min > 0.9  # the organism answers with an option's label
    # the expected bet over $5-$100 (teacher-forced) moves as the sampled average bet does
    risky = results[(results.layer == 1) & (results.feature == 402) & (results.prompt == "risky")].iloc[0]
    assert risky.bet_effect_low <= risky.bet_shift_exact <= risky.bet_effect_high and risky.bet_shift_exact > 0
    assert risky.bet_mass_min > 0.5 * (1 - risky.p_stop_exact_safe)  # the candidates hold most of the bets
    fixed = results[results.prompt == "safe"]  # fixed bets of $10: the expected bet is 10 x P(bet)
    np.testing.assert_allclose(fixed.bet_shift_exact, 10 * fixed.stop_shift_exact, rtol=1e-9)
    report = (gambling_chain.patching.report_dir / "report.md").read_text()
    assert "## Exact choice probabilities beside the sampled answers" in report
    controls = results[results.control & (results.prompt == "safe")]
    assert len(controls) == 8 and not controls.causal.any() and controls.p_stops_corrected.isna().all()
    assert planted.null_p_stop_effect == pytest.approx(1 / 9)  # larger than every control's effect
    assert "Null controls: 8 random live features" in report
    assert "parser v2" in report and "| safe     |       1 |      0 |       1 |" in report
    assert re.search(r"by v1: they read 0 of [\d,]+ answers differently", report)
    with h5py.File(gambling_chain.patching.merged_path) as merged:
        conditions = [c.decode() for c in merged["trials/condition"][()]]
        assert conditions.count("none") == 2 * 150  # generated once per prompt, shared by every feature
        assert merged.attrs["parser_version"] == 2


def test_the_edit_sets_one_feature_at_the_last_prompt_token_and_keeps_the_error():
    organism = Organism()
    model, tokenizer, sae = organism.model(), organism.tokenizer(), organism.sae(1)
    texts = [prompt.text for prompt in PROMPTS]
    tokenizer.padding_side = "left"  # as generation pads: every prompt ends in the last column
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    captured = {}
    batch = [Row("L1_F402", "safe", 0, 0, layer=1, feature=402, value=3.5), Row("baseline", "none", 1, 0)]
    with torch.no_grad():
        model.model.layers[1].register_forward_hook(lambda _m, _i, out: captured.setdefault("before", out))
        with row_edits(model, {1: sae}, batch, every_token=False):
            model.model.layers[1].register_forward_hook(lambda _m, _i, out: captured.setdefault("after", out))
            model(**encoded)
    before, after = (captured[k][0] if isinstance(captured[k], tuple) else captured[k] for k in ("before", "after"))
    x = before[0, -1]
    expected = x + (3.5 - sae.encode(x[None])[0, 402]) * sae.W_dec[402]
    torch.testing.assert_close(after[0, -1], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(after[0, :-1], before[0, :-1], rtol=0, atol=0)  # other positions untouched
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)  # a row without an edit untouched


def test_a_no_op_edit_answers_like_the_unpatched_trials():
    """Trial t draws the same noise in every condition: an edit that changes nothing changes no answer."""
    organism = Organism()
    model, tokenizer, sae = organism.model(attn_implementation=None), organism.tokenizer(), organism.sae(1)
    text = PROMPTS[1].text
    with torch.no_grad():
        captured = {}
        hook = model.model.layers[1].register_forward_hook(lambda _m, _i, out: captured.setdefault("x", out))
        model(**tokenizer(text, return_tensors="pt"))
        hook.remove()
    residual = captured["x"][0] if isinstance(captured["x"], tuple) else captured["x"]
    current = float(sae.encode(residual[0, -1][None])[0, 402])
    rows = [Row("L1_F402", "safe", 1, trial, layer=1, feature=402, value=current) for trial in range(12)]
    seeds = list(range(12))
    with row_edits(model, {1: sae}, rows, every_token=False):
        edited = sample(model, tokenizer, [text] * 12, seeds, 0.7, 12, torch.device("cpu"))
    plain = sample(model, tokenizer, [text] * 12, seeds, 0.7, 12, torch.device("cpu"))
    assert edited == plain and len(set(plain)) > 1


def test_the_exact_expected_bet_edits_the_answers_tokens_as_sampling_does_with_patch_generated():
    """With patch_generated, sampled answers have the planted feature set at every token they
    write; the teacher-forced expected bet sets it on the answer's tokens too, and predicts the
    mean of 400 sampled bets (without that edit it is some $6 off here)."""
    organism = Organism()
    model, tokenizer = organism.model(attn_implementation=None), organism.tokenizer()
    layer, feature = planted_cause("builtin:organism")
    sae, prompt, amounts = organism.sae(layer), PROMPTS[0].text, list(range(5, 101, 5))
    settings = patching.Settings(model="organism", sae="organism", feature_table="features.csv", bet_amounts=amounts,
                                 batch_size=len(amounts), patch_generated=True)
    rows = [Row(f"L{layer}_F{feature}", "bankrupt", 0, trial, layer=layer, feature=feature, value=6.0)
            for trial in range(400)]

    def expected(s: patching.Settings) -> float:
        reader = NumberReader(tokenizer, s.bet_answer, amounts)
        return float(patching.expected_bets(model, tokenizer, {layer: sae}, rows[:1], prompt, reader, s, CPU)
                     ["bet_given_bet"][0])

    with row_edits(model, {layer: sae}, rows, every_token=True) as batch:
        answers = sample(model, tokenizer, [prompt] * len(rows), list(range(len(rows))), settings.temperature, 8, CPU,
                         batch=batch)
    bets = np.array([parse(answer, "variable").bet for answer in answers if parse(answer, "variable").action == "bet"],
                    dtype=float)
    error = 3 * bets.std() / np.sqrt(len(bets))
    assert len(bets) > 100 and abs(bets.mean() - expected(settings)) < error
    assert abs(expected(settings.model_copy(update={"patch_generated": False})) - expected(settings)) > error


def trials_of(answers: dict[str, list[str]]) -> pd.DataFrame:
    rows = []
    for condition, replies in answers.items():
        unit = "baseline" if condition == "none" else "L3_F7"
        for trial, reply in enumerate(replies):
            decision = parse(reply, "variable")
            rows.append({"unit": unit, "layer": 3 if unit != "baseline" else -1, "feature": 7 if unit != "baseline" else -1,
                         "mean_safe": 0.5, "mean_bankrupt": 2.0, "condition": condition, "prompt_name": "risky", "trial": trial,
                         "control": False,
                         "action": decision.action, "bet": float(decision.bet) if decision.bet is not None else np.nan})
    return pd.DataFrame(rows)


def test_the_tests_per_feature_against_scipy_and_the_class_rules():
    answers = {"safe": ["2) Stop"] * 12 + ["1) Bet $10"] * 8,
               "none": ["2) Stop"] * 6 + ["1) Bet $20"] * 14,
               "bankrupt": ["2) Stop"] * 2 + ["1) Bet $40"] * 17 + ["I cannot"]}
    row = feature_effects(trials_of(answers), Effects()).iloc[0]
    assert row.stop_rate_safe == 0.6 and row.stop_rate_bankrupt == pytest.approx(2 / 19)
    assert row.bankruptcy_risk_safe == pytest.approx(0.4) and row.bankruptcy_risk_bankrupt == pytest.approx(17 / 19)
    assert row.invalid_bankrupt == pytest.approx(1 / 20) and row.avg_bet_none == 14.0
    safe_bets, bankrupt_bets = np.r_[[0] * 12, [10] * 8], np.r_[[0] * 2, [40] * 17]
    unpaired = stats.mannwhitneyu(bankrupt_bets, safe_bets, alternative="two-sided").pvalue
    assert row.p_bets_unpaired == pytest.approx(unpaired)
    assert row.p_stops_unpaired == pytest.approx(stats.fisher_exact([[12, 8], [2, 17]])[1])
    # paired by trial (the bankrupt patch's last answer is unreadable: 19 pairs): 10 trials stop under the
    # safe patch and bet under the bankrupt one, none the other way round
    assert row.paired_trials == 19 and row.p_stops == pytest.approx(2 / 2**10)
    differences = np.r_[[0] * 2, [40] * 10, [30] * 7]
    assert row.p_bets == pytest.approx(stats.wilcoxon(differences).pvalue)
    order = np.r_[[0] * 20, [1] * 20, [2] * 19]
    outcome = np.r_[safe_bets, [0] * 6 + [20] * 14, bankrupt_bets]
    assert row.spearman_rho == pytest.approx(stats.spearmanr(order, outcome).statistic)
    # the effects and their 95% intervals on the same pairs: 10 of the 19 stop under the safe patch alone
    assert row.stop_effect == pytest.approx(10 / 19) and row.bet_effect == pytest.approx(differences.mean())
    half = 1.96 * np.sqrt(11 - 10**2 / 21) / 21  # Agresti-Min: half a pair added to each cell
    assert (row.stop_effect_low, row.stop_effect_high) == pytest.approx((10 / 21 - half, 10 / 21 + half))
    t_interval = stats.ttest_1samp(differences, 0).confidence_interval()
    assert (row.bet_effect_low, row.bet_effect_high) == pytest.approx((t_interval.low, t_interval.high))
    assert row.causal and row.effect_class == "risky"  # mean_bankrupt 2.0 > mean_safe 0.5
    weak = {"safe": ["1) Bet $20"] * 20, "none": ["1) Bet $20"] * 20, "bankrupt": ["1) Bet $25"] * 20}
    assert feature_effects(trials_of(weak), Effects()).iloc[0].effect_class == "none"  # $5 is under the $8 threshold


# ---------------------------------------------------------------- bad input, before any GPU time


def write(tmp_path, settings: dict) -> str:
    data = yaml.safe_load(DEMO.read_text())
    data["run"]["root"] = str(tmp_path / "runs")
    data["population_patching"].update(settings)
    data["population_patching"].pop("contexts")  # the demo's feature cards: not beside this copy
    path = tmp_path / "patching.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def table(tmp_path, **columns) -> str:
    path = tmp_path / "features.csv"
    pd.DataFrame({"layer": [1, 1], "feature": [5, 9], "mean_safe": [0.1, 0.2], "mean_bankrupt": [1.0, 0.0],
                  "selected": [True, True], **columns}).to_csv(path, index=False)
    return str(path)


def test_a_preempted_shard_resumes_to_the_answers_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """A task stopped after its first unit is written resumes with the rest, in batches made up
    differently; every answer equals the uninterrupted run's, and each trial drew one seed under
    every feature and condition (common random numbers)."""
    settings = {"features": None, "feature_table": table(tmp_path, feature=[402, 9]), "trials": 6, "controls": 0,
                "max_new_tokens": 8, "decisions": "sampled", "batch_size": 10}
    answers, seeds = {}, []
    monkeypatch.setattr(patching, "seed_of", lambda *key: seeds.append(key) or seed_of(*key))
    for name, preempted in (("uninterrupted", False), ("preempted", True)):
        data = yaml.safe_load(Path(write(tmp_path, settings)).read_text())
        data["run"] = {"root": str(tmp_path / name), "shards": 1}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        run = prepare_run(load_manifest(path))
        if preempted:
            with monkeypatch.context() as stopped:
                stopped.setattr(patching, "_write", failing_on_call(patching._write, 1))
                with pytest.raises(RuntimeError, match="preempted"):
                    run_shard_task(str(run.path), 0)
            with h5py.File(partial_path(run.shard_path(0))) as shard:
                assert len(shard["units"]) == 1  # one unit written whole, the rest to do
        run_shard_task(str(run.path), 0)
        with h5py.File(run.shard_path(0)) as shard:
            answers[name] = {(unit_id, str(c), int(p), int(trial)): str(r) for unit_id, group in shard["units"].items()
                             for c, p, trial, r in zip(*(group[n].asstr()[()] if n in ("condition", "response")
                                                         else group[n][()] for n in ("condition", "prompt", "trial",
                                                                                     "response")), strict=True)}
    assert answers["preempted"] == answers["uninterrupted"] and len(answers["preempted"]) == 2 * 6 + 2 * 2 * 2 * 6
    assert len({reply for reply in answers["preempted"].values()}) > 1
    assert {key[1:] for key in seeds} == {(prompt, trial) for prompt in (0, 1) for trial in range(6)}  # (prompt, trial) alone


@pytest.mark.parametrize(("settings", "message"), [
    ({"trials": 1}, "population_patching.trials: Input should be greater than or equal to 2"),
    ({"prompts": [{"name": "p", "bet_type": "fixed", "text": "Slot Machine Game\nChoice: 1)"}]},
     "prompt 'p' must end at the decision cue 'Choice: '"),
])
def test_bad_settings_are_refused(tmp_path, capsys, settings, message):
    assert main(["plan", write(tmp_path, {"features": None, "feature_table": table(tmp_path), **settings})]) == 2
    assert message in capsys.readouterr().err


def test_bad_feature_tables_are_refused(tmp_path, capsys):
    def refused(path: str, message: str, **more) -> None:
        assert main(["plan", write(tmp_path, {"features": None, "feature_table": path, "controls": 0, **more})]) == 2
        assert message in capsys.readouterr().err

    without = tmp_path / "without.csv"
    pd.DataFrame({"layer": [1], "feature": [3], "mean_safe": [0.1]}).to_csv(without, index=False)
    refused(str(without), "lacks the column(s) ['mean_bankrupt']; it needs ['layer', 'feature', 'mean_safe', "
            "'mean_bankrupt'] (feature_contrast writes them)")
    beyond = tmp_path / "beyond.csv"
    pd.DataFrame({"layer": [1], "feature": [600], "mean_safe": [0.1], "mean_bankrupt": [1.0],
                  "selected": [True]}).to_csv(beyond, index=False)
    refused(str(beyond), "feature id(s) [600] of layer 1 are beyond its SAE's 512 features")
    outside = tmp_path / "outside.csv"
    pd.DataFrame({"layer": [9], "feature": [1], "mean_safe": [0.1], "mean_bankrupt": [1.0],
                  "selected": [True]}).to_csv(outside, index=False)
    refused(str(outside), "the feature table has layer(s) [9], outside the model's 4 blocks", layers=None)
    saes = save_random_sae(tmp_path / "saes", d_in=128, d_sae=64, layers=(0,))
    refused(table(tmp_path), "no SAE for layer 1", sae={"path": saes})
    refused(table(tmp_path, selected=[False, False]), "no feature to patch")
    twice = tmp_path / "twice.csv"
    pd.DataFrame({"layer": [1, 1, 1], "feature": [402, 9, 402], "mean_safe": [0.1, 0.2, 0.3], "mean_bankrupt": [1.0] * 3,
                  "selected": [True] * 3}).to_csv(twice, index=False)
    refused(str(twice), f"the feature table {twice} has more than one row to patch for (layer, feature) [(1, 402)]; "
            "keep one row of each")
    refused(table(tmp_path), "lacks ['active_bankrupt', 'active_safe'], the activation frequencies controls are "
            "matched on (feature_contrast writes them); add them or set controls: 0", controls=4)
    assert main(["plan", write(tmp_path, {"feature_table": table(tmp_path)})]) == 2
    assert "give exactly one of `features` (a feature_contrast run) and `feature_table`" in capsys.readouterr().err


HEADER = b"layer,feature,mean_safe,mean_bankrupt,selected\n"


@pytest.mark.parametrize(("content", "message"), [
    (HEADER + b"1,abc,0.1,1.0,true\n", ", line 2, column feature: 'abc' is not a whole number, 0 or more"),
    (HEADER + b"1.5,5,0.1,1.0,true\n", ", line 2, column layer: '1.5' is not a whole number, 0 or more"),
    (HEADER + b"1,5,0.1,1.0,true\n1,9,0.1,abc,true\n", ", line 3, column mean_bankrupt: 'abc' is not a number"),
    (HEADER + b"1,5,0.1,nan,true\n", ", line 2, column mean_bankrupt: 'nan' is not a finite number"),
    (HEADER + b"1,5,0.1,,true\n", ", line 2, column mean_bankrupt: '' is not a finite number"),
    (HEADER + b"1,5,0.1,1.0,maybe\n", ", line 2, column selected: 'maybe' is not one of true/false, yes/no, 1/0 (in "
     "any case)"),
    (b"", " is empty; give a header line with ['layer', 'feature', 'mean_safe', 'mean_bankrupt'], then a row per"),
    (HEADER + b'1,5,"0.1,1.0,true\n1,9,0.2,0.0,true\n', ", line 3: not valid CSV (unexpected end of data); close "
     "every quote"),
    (HEADER + b"1,5,0.1,1.0,true,extra\n", ", line 2: 6 values under 5 column names; give each row one value per"),
    (b"layer,layer,feature,mean_safe,mean_bankrupt\n", ": the header ['layer', 'layer', 'feature', 'mean_safe', "
     "'mean_bankrupt'] repeats a column name"),
    (b"\xff\xfelayer\n", " is not UTF-8 text ('utf-8' codec can't decode byte 0xff in position 0"),
])
def test_unreadable_feature_tables_are_refused_by_line_and_column(tmp_path, capsys, content, message):
    path = tmp_path / "features.csv"
    path.write_bytes(content)
    assert main(["plan", write(tmp_path, {"features": None, "feature_table": str(path), "controls": 0})]) == 2
    err = capsys.readouterr().err
    assert f"error: population_patching.feature_table: {path}{message}" in err and "Traceback" not in err


def test_selected_is_read_as_a_boolean_not_as_any_text(tmp_path):
    """Also: layer and feature are integers, the means floats."""
    path = tmp_path / "features.csv"
    rows = [f"1,{i},0.1,1.0,{text}\n" for i, text in enumerate(["no", "No", "0", "FALSE", "yes", "True", " 1 "])]
    path.write_bytes(b"\xef\xbb\xbf" + HEADER + "".join(rows).encode())  # a spreadsheet's UTF-8 byte order mark first
    settings = patching.Settings(model="organism", sae="organism", feature_table=str(path))
    table = patching.read_table(settings)
    assert table["feature"].tolist() == [4, 5, 6] and table["layer"].dtype == np.int64
    assert table["mean_bankrupt"].dtype == np.float64


@pytest.mark.parametrize(("every_token", "edited_forwards"), [(False, 1), (True, 5)])
def test_the_edit_reaches_generated_tokens_only_when_asked(every_token, edited_forwards):
    organism = Organism()
    model, tokenizer = organism.model(attn_implementation=None), organism.tokenizer()
    calls = []
    with edit_prompt_position(model, 1, lambda hidden, rows: calls.append(hidden.shape) or hidden, every_token=every_token):
        model.generate(**tokenizer(PROMPTS[0].text, return_tensors="pt"), do_sample=False, max_new_tokens=5,
                       min_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    assert len(calls) == edited_forwards  # the prompt, then (if asked) each of the 4 later forwards


def _answers(unit: str, condition: str, prompt: str, actions: list[str], layer: int = 1, feature: int = 7) -> pd.DataFrame:
    return pd.DataFrame({"unit": unit, "condition": condition, "prompt_name": prompt, "trial": range(len(actions)),
                         "layer": layer, "feature": feature, "mean_safe": 1.0, "mean_bankrupt": 2.0, "action": actions,
                         "control": False,
                         "bet": [0.0 if a == "stop" else 10.0 if a == "bet" else np.nan for a in actions],
                         "response": [{"stop": "2) Stop", "bet": "1) Bet $10"}.get(a, "I can't say.") for a in actions]})


def test_a_prompt_whose_answers_are_all_unreadable_is_reported_not_fatal(tmp_path):
    """Every answer on one prompt unreadable (the unpatched ones too): its tests are not computable
    (NaN, never causal), the other prompt is tested as usual, and the report says so."""
    settings = patching.Settings(model="organism", sae="organism", feature_table=str(tmp_path / "table.csv"))
    readable, unreadable = ["stop", "bet"] * 10, ["invalid"] * 20
    trials = pd.concat([
        _answers("baseline", "none", "risky", unreadable, layer=-1, feature=-1),
        _answers("baseline", "none", "safe", readable, layer=-1, feature=-1),
        _answers("L1_F7", "safe", "risky", unreadable), _answers("L1_F7", "bankrupt", "risky", unreadable),
        _answers("L1_F7", "safe", "safe", ["stop"] * 18 + ["bet"] * 2), _answers("L1_F7", "bankrupt", "safe", readable),
    ], ignore_index=True)
    results = feature_effects(trials, settings.effects).set_index("prompt")
    risky, safe = results.loc["risky"], results.loc["safe"]
    assert risky["invalid_safe"] == 1.0 and np.isnan(risky["p_stops"]) and np.isnan(risky["p_bets"])
    assert np.isnan(risky["spearman_rho"]) and np.isnan(risky["stop_rate_safe"])
    assert not risky["causal"] and risky["effect_class"] == "none"
    assert safe["p_stops_unpaired"] == pytest.approx(stats.fisher_exact([[18, 2], [10, 10]])[1])
    assert safe["p_stops"] == pytest.approx(stats.binomtest(9, 10).pvalue)  # odd trials to 17 against trial 18
    patching_results.write_report(Report(tmp_path / "report", "test"), trials, results.reset_index(), settings, None)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "1 feature-prompt pair(s) have no readable answer in some condition" in text and "L1 F7 (risky)" in text
    assert "Unreadable to v2: 60 invalid (no decision)." in text


def test_controls_are_live_unchosen_features_of_similar_frequency():
    rng = np.random.default_rng(3)
    every = pd.DataFrame({"layer": np.repeat([1, 2], 100), "feature": np.tile(np.arange(100), 2),
                          "active_bankrupt": rng.uniform(0, 0.5, 200), "active_safe": rng.uniform(0, 0.5, 200),
                          "mean_safe": 1.0, "mean_bankrupt": 2.0})
    every.loc[every.feature % 10 == 0, ["active_bankrupt", "active_safe"]] = 0.0  # dead: never a control
    every["selected"] = every.feature.isin([3, 4, 5, 6, 7])  # 6 and 7 selected but not patched: never controls
    chosen = every[(every.layer == 1) & every.feature.isin([3, 4, 5])]
    controls = patching.control_features(every, chosen, 6, seed=0)
    assert (controls.layer == 1).all() and len(controls) == 6  # only the patched layers
    assert not controls.feature.isin([3, 4, 5, 6, 7]).any() and (controls.feature % 10 != 0).all()
    frequency = np.log(every[["active_bankrupt", "active_safe"]].mean(axis=1).clip(lower=1e-12))
    target = frequency[chosen.index].median()
    candidates = every[(every.layer == 1) & ~every.feature.isin([3, 4, 5, 6, 7]) & (every.feature % 10 != 0)]
    pool = (frequency[candidates.index] - target).abs().sort_values().index[:24]
    assert set(controls.index) <= set(pool)
    assert controls.equals(patching.control_features(every, chosen, 6, seed=0))
    assert not controls.equals(patching.control_features(every, chosen, 6, seed=1))


def test_null_p_values_place_each_effect_among_its_layers_controls():
    results = pd.DataFrame({"layer": [1, 1, 1, 1, 1, 2], "prompt": "safe", "control": [False, True, True, True, True, False],
                            "stop_effect": [0.3, 0.1, -0.35, 0.05, np.nan, 0.2],  # the last control: all unreadable
                            "bet_effect": [1.0, 2.0, 3.0, 0.5, np.nan, 1.0]})
    out = patching_results.null_p_values(results)
    assert out.null_p_stop_effect[0] == pytest.approx((1 + 1) / 4)  # |-0.35| >= 0.3; the NaN control left out
    assert out.null_p_bet_effect[0] == pytest.approx((1 + 2) / 4)
    assert np.isnan(out.null_p_stop_effect[5]) and out.controls_in_layer.tolist() == [4, 0, 0, 0, 0, 0]


def test_exact_decisions_alone_give_the_shifts_of_the_full_run(gambling_chain, tmp_path):
    """`decisions: exact` skips sampling; its shifts equal those the default run computed beside its
    samples, and on the organism the planted feature is causal with the largest shift of its layer."""
    path = write_manifest_file(tmp_path, {"population_patching": {
        "features": str(gambling_chain.contrast.path), "decisions": "exact", "contexts": None}}, base=DEMO)
    run = run_all(path)
    exact = pd.read_csv(run.report_dir / "features.csv")
    both = pd.read_csv(gambling_chain.patching.report_dir / "features.csv")
    merged = exact.merge(both, on=["unit", "prompt"], suffixes=("", "_both"))
    assert len(merged) == len(both) == len(exact)
    for shift in ("stop_shift_exact", "bet_shift_exact"):
        np.testing.assert_allclose(merged[shift], merged[f"{shift}_both"], rtol=1e-6, atol=1e-9)
    assert "stop_effect" not in exact and "p_stops" not in exact  # nothing sampled, nothing tested
    with h5py.File(run.merged_path) as file:
        assert "trials" not in file and "exact/p_stop" in file
    safe = exact[(exact.layer == 1) & (exact.prompt == "safe") & ~exact.control]
    planted = safe[safe.feature == 402].iloc[0]
    assert planted.causal and planted.effect_class == "risky" and patching_results.planted_rank(safe, 402, "stop_shift_exact") == 1
    assert planted.null_p_stop_shift_exact == pytest.approx(1 / 9)
    report = (run.report_dir / "report.md").read_text()
    assert "exact decisions only" in report and "## Ground truth: the organism's planted cause" in report


def test_shards_from_before_exact_decisions_and_controls_still_reduce(gambling_chain, tmp_path):
    """The demo run's shards stripped to the layout of an earlier version (no `exact` group, no
    `control` flag): the default `decisions: both` reduces them to the same sampled effects and
    says that no unit has exact decisions; `decisions: exact` refuses them by name."""
    run = gambling_chain.patching
    old_shards = []
    for path in sorted(run.shards_dir.glob("shard_*.h5")):
        old = tmp_path / path.name
        shutil.copy(path, old)
        with h5py.File(old, "r+") as shard:
            for group in shard["units"].values():
                del group["exact"]
                del group.attrs["control"]
        old_shards.append(old)
    manifest = run.load_manifest()
    (tmp_path / "out").mkdir()
    patching.reduce(manifest, old_shards, tmp_path / "out")
    old_results = pd.read_csv(tmp_path / "out" / "report" / "features.csv")
    results = pd.read_csv(run.report_dir / "features.csv")
    assert "stop_shift_exact" not in old_results and not old_results["control"].any()
    chosen = results[~results["control"]].set_index(["unit", "prompt"])
    np.testing.assert_allclose(old_results.set_index(["unit", "prompt"]).loc[chosen.index, "stop_effect"],
                               chosen["stop_effect"])
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert f"{len(set(results['unit']) - {'baseline'}) + 1:,} of" in report and "no unit has exact decisions" in report
    exact_only = manifest.model_copy(update={"settings": manifest.settings.model_copy(update={"decisions": "exact"})})
    with pytest.raises(UserError, match="decisions: exact, but the shards hold no exact decisions"):
        patching.reduce(exact_only, old_shards, tmp_path / "out")


def test_a_retest_patches_the_earlier_runs_strongest_causal_features_with_more_trials(gambling_chain, tmp_path):
    """The seed's follow-up: the demo run's one causal feature (the planted one) again, with 200
    trials; the larger sample narrows its stop effect's interval."""
    path = write_manifest_file(tmp_path, {"population_patching": {
        "features": str(gambling_chain.contrast.path), "retest": str(gambling_chain.patching.path), "retest_top": 3,
        "trials": 200, "controls": 0, "decisions": "sampled", "contexts": None}}, base=DEMO)
    run = run_all(path)
    retest = pd.read_csv(run.report_dir / "features.csv")
    first = pd.read_csv(gambling_chain.patching.report_dir / "features.csv")
    causal = first[first.causal & ~first.control][["layer", "feature"]].drop_duplicates()
    assert sorted(zip(retest.layer, retest.feature)) == sorted(zip(causal.layer, causal.feature)) * 2  # 2 prompts
    planted = retest[(retest.feature == 402) & (retest.prompt == "safe")].iloc[0]
    before = first[(first.feature == 402) & (first.prompt == "safe")].iloc[0]
    assert planted.p_stops_corrected < 0.05 and patching_results.planted_rank(retest[retest.prompt == "safe"], 402, "stop_effect") == 1
    assert planted.stop_effect_high - planted.stop_effect_low < before.stop_effect_high - before.stop_effect_low
    assert "a re-test of the causal features" in (run.report_dir / "report.md").read_text()
    with pytest.raises(UserError, match="retest: .* was not written by population_patching"):
        patching.causal_features(gambling_chain.contrast.path, 3)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("bet_answer", "Bet ${number} now", "must end with its one field {number}"),
    ("bet_amounts", [5, 5, 10], "give distinct positive dollar amounts"),
    ("bet_amounts", [0, 10], "give distinct positive dollar amounts"),
])
def test_the_expected_bet_settings_are_checked(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        patching.Settings(model="organism", sae="organism", feature_table=str(tmp_path / "t.csv"), **{field: value})
