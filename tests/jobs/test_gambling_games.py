"""The gambling_games job on the built-in model organism, against its rule and independent replays."""

import re

import h5py
import numpy as np
import pytest
import torch
from scipy import stats

from common.choices import OptionReader
from common.cli import main
from common.manifest_file import load_manifest
from common.organism.files import Organism
from common.plan import WorkUnit
from common.sparse import read_csr
from jobs import _gambling as task
from jobs import _slot_machine as slot_machine
from jobs import gambling_games
from jobs._organism import rule
from tests.helpers import REPO, write_manifest_file

DEMO = REPO / "manifests" / "demo" / "gambling_1_games.yaml"


def write(folder, overrides: dict):
    return write_manifest_file(folder, overrides, base=DEMO)


@pytest.fixture(scope="module")
def demo(gambling_chain):
    """The demo's games (the first step of the chain the other gambling tests share)."""
    return gambling_chain.games, load_manifest(gambling_chain.games.manifest_path)


def decisions_of(group) -> list[dict]:
    columns = group["decisions"]
    text = {name: [v.decode() if isinstance(v, bytes) else v for v in columns[name][()]]
            for name in ("prompt", "response", "action", "rule")}
    return [{**{name: values[i] for name, values in text.items()}, "round": int(columns["round"][i]),
             "balance": int(columns["balance"][i]), "bet": int(columns["bet"][i])} for i in range(len(text["action"]))]


def test_every_game_is_played_to_an_end_by_the_rules(demo):
    run, manifest = demo
    with h5py.File(run.merged_path) as merged:
        games = merged["units"]
        assert len(games) == 128
        for group in games.values():
            history, decisions = group["history"][()], decisions_of(group)
            outcome = group.attrs["outcome"]
            assert outcome in ("bankrupt", "stopped", "round_limit", "invalid")
            assert history[0, 1] == 10 and history[0, 2] == (group.attrs["first_round"] == "win")
            for before, after in zip(history, history[1:], strict=False):  # won: +2x the bet; lost: -bet
                assert after[3] == before[3] + (2 * after[1] if after[2] else -after[1])
            bets = [d for d in decisions if d["action"] == "bet"]
            assert len(bets) == len(history) - 1  # every bet played one round
            assert all(b["bet"] == 10 for b in bets) or group.attrs["bet_type"] == "variable"
            assert (outcome == "bankrupt") == (group.attrs["final_balance"] == 0)
            assert (outcome == "stopped") == (decisions[-1]["action"] == "stop")
            assert all(d["prompt"].endswith(task.DECISION_CUE) for d in decisions)


def test_decisions_follow_the_organisms_rule(demo):
    """Games render prompts as the organism learned them and the parser reads its answers: the
    rule's appetite is higher where it bet than where it stopped, and variable bets go bankrupt more."""
    run, _ = demo
    appetite = {"bet": [], "stop": []}
    bankrupt = {"fixed": [0, 0], "variable": [0, 0]}
    with h5py.File(run.merged_path) as merged:
        for group in merged["units"].values():
            history = [slot_machine.Round(int(r), int(b), bool(w), int(x)) for r, b, w, x in group["history"][()]]
            components = tuple(group.attrs["components"])
            for decision in decisions_of(group):
                state = slot_machine.GameState(decision["balance"], tuple(history[: decision["round"] - 1]),
                                               components, group.attrs["bet_type"])
                assert slot_machine.prompt(state) == decision["prompt"]
                if decision["action"] != "invalid":
                    appetite[decision["action"]].append(rule.risk(state))
            bankrupt[group.attrs["bet_type"]][group.attrs["outcome"] == "bankrupt"] += 1
    assert np.mean(appetite["bet"]) > np.mean(appetite["stop"]) + 0.1
    assert stats.mannwhitneyu(appetite["bet"], appetite["stop"], alternative="greater").pvalue < 1e-6
    assert stats.fisher_exact([bankrupt["variable"], bankrupt["fixed"]])[1] < 0.01
    assert bankrupt["variable"][1] > bankrupt["fixed"][1]


def test_a_game_replays_from_its_seed_in_any_batch(demo):
    run, manifest = demo
    s = manifest.settings
    organism = Organism()
    model, tokenizer = organism.model(attn_implementation=None), organism.tokenizer()
    with h5py.File(run.merged_path) as merged:
        stored = {name: (dict(group.attrs), decisions_of(group)) for name, group in list(merged["units"].items())[:6]}
    for name, (attrs, decisions) in stored.items():
        unit = WorkUnit(name, {"components": attrs["components"], "bet_type": attrs["bet_type"],
                               "first_round": attrs["first_round"], "seed": int(attrs["seed"])})
        player = gambling_games.Player(unit, s.max_rounds)
        reader = OptionReader(tokenizer, task.OPTION_LABELS)
        while player.running:  # alone in its batch this time
            gambling_games._play_round(s, model, tokenizer, {}, reader, torch.device("cpu"), [player])
        assert [d["response"] for d in player.decisions] == [d["response"] for d in decisions]
        assert player.game.outcome == attrs["outcome"]


def test_the_longest_prompt_bounds_every_prompt_a_game_asks(demo):
    """`batch_size: auto` sizes a game's memory by `longest_prompt`: no recorded prompt has more
    tokens, and neither has any prompt of games that bet the most every round to the round limit;
    the plan's estimate of its tokens, made without the tokenizer, is within 10% of its count."""
    run, manifest = demo
    s = manifest.settings
    tokenizer = Organism().tokenizer()
    bound = gambling_games.longest_prompt(s)
    bound_tokens = len(tokenizer(bound).input_ids)
    with h5py.File(run.merged_path) as merged:
        asked = [d["prompt"] for group in merged["units"].values() for d in decisions_of(group)]
    played = []
    for seed, condition in enumerate(s.design() * 20):
        game = task.Game(condition, seed, s.max_rounds)
        while game.outcome is None:
            played.append(slot_machine.render(s.prompt_template, game.balance, game.round, game.history,
                                              condition.components, condition.bet_type))
            game.play(slot_machine.MAX_BET)
    assert max(len(ids) for ids in tokenizer(asked + played).input_ids) <= bound_tokens
    assert "Warning:" in bound
    assert gambling_games.estimated_tokens(bound) == pytest.approx(bound_tokens, rel=0.1)


def test_features_are_the_saes_at_the_prompts_last_token(demo):
    run, _ = demo
    organism = Organism()
    model, tokenizer, sae = organism.model(), organism.tokenizer(), organism.sae(1)
    with h5py.File(run.merged_path) as merged:
        group = next(g for g in merged["units"].values() if len(g["decisions/action"]) >= 3)
        stored = read_csr(group["features/L1"]).toarray()
        prompts = decisions_of(group)
    for row, decision in zip(stored, prompts, strict=True):
        captured = {}
        hook = model.model.layers[1].register_forward_hook(lambda _m, _i, out, store=captured: store.setdefault("x", out))
        with torch.no_grad():
            model(**tokenizer(decision["prompt"], return_tensors="pt"))
        hook.remove()
        residual = captured["x"][0] if isinstance(captured["x"], tuple) else captured["x"]
        expected = sae.encode(residual[0, -1]).numpy()
        np.testing.assert_allclose(row, expected, rtol=0, atol=1e-4)
        assert (row > 0).sum() == 16  # TopK k=16


def test_the_report_counts_the_games(demo):
    run, _ = demo
    table = (run.report_dir / "outcomes_by_condition.csv").read_text().splitlines()
    assert len(table) == 1 + 32 and table[0].startswith("condition,games,mean_rounds")
    report = (run.report_dir / "report.md").read_text()
    assert "128 games (4 per condition)" in report and "Played with parser v2" in report
    # the organism answers "1) Bet $N" or "2) Stop": both parser versions read every answer alike
    assert re.search(r"by v1: they read 0 of [\d,]+ answers differently", report)
    assert (run.report_dir / "bankruptcy.png").stat().st_size > 10_000


# ---------------------------------------------------------------- bad input, before any GPU time


@pytest.mark.parametrize(("overrides", "message"), [
    ({"bet_types": []}, "gambling_games: the conditions produce no games (0 conditions x 4 repetitions)"),
    ({"repetitions": 0}, "the conditions produce no games (32 conditions x 0 repetitions)"),
    ({"prompt_template": "Slot Machine Game\n{balance}\nChoice: 1)"},
     "prompt_template: the prompt must end at the decision cue 'Choice: '"),
    ({"prompt_template": "{goal}\nChoice: "}, "prompt_template: unknown field(s) ['goal']"),
    ({"components": "GXZ"}, "gambling_games.components: Value error, give distinct letters of GMRWP (got 'GXZ')"),
    ({"sae": None}, "layers are given, so give `sae`"),
    ({"layers": [1, 7]}, "gambling_games.layers: layer(s) [7] outside the model, which has 4 blocks"),
])
def test_bad_manifests_are_refused_with_the_field(tmp_path, capsys, overrides, message):
    assert main(["plan", str(write(tmp_path, {"gambling_games": overrides}))]) == 2
    assert message in capsys.readouterr().err


def test_every_decision_records_the_options_exact_probabilities(demo):
    """P(stop) at each decision equals an independent forward of its prompt, and the sampled answers
    stop as often as those probabilities predict (a Poisson-binomial z-score over all decisions)."""
    run, manifest = demo
    organism = Organism()
    model, tokenizer = organism.model(attn_implementation=None), organism.tokenizer()
    reader = OptionReader(tokenizer, task.OPTION_LABELS)
    predicted, variance, observed, checked = 0.0, 0.0, 0, 0
    with h5py.File(run.merged_path) as merged:
        for group in merged["units"].values():
            decisions = decisions_of(group)
            p_stop, coverage = group["decisions/p_stop"][()], group["decisions/coverage"][()]
            if checked < 5:
                with torch.no_grad():
                    logits = model(**tokenizer(decisions[0]["prompt"], return_tensors="pt")).logits[:, -1]
                assert reader(logits, manifest.settings.temperature)["stop"][0] == pytest.approx(p_stop[0], abs=1e-5)
                checked += 1
            starts_stop = p_stop * coverage  # the chance that the sampled answer starts with "2"
            predicted += starts_stop.sum()
            variance += (starts_stop * (1 - starts_stop)).sum()
            observed += sum(d["response"].lstrip().startswith("2") for d in decisions)
    assert abs(observed - predicted) / np.sqrt(variance) < 4
