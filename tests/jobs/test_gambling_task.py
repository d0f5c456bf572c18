"""The slot-machine task of seed 000: the rules, the conditions, the prompts."""

import random

import pytest

from common.plan import WorkUnit
from jobs import _slot_machine as slot_machine
from jobs import gambling_games, token_tracking
from jobs._gambling import Condition, Game, check_template, conditions
from jobs._organism import corpus
from jobs._slot_machine import PROMPT_TEMPLATE, render


def test_the_design_has_the_published_128_conditions():
    design = conditions()
    assert len(design) == 128 and len({c.name for c in design}) == 128
    assert Condition(("G", "R", "W", "P"), "variable", "win") in design
    assert design[0].name == "BASE_fixed_win"


def test_games_follow_the_rules_and_their_seed():
    game = Game(Condition(("G",), "variable", "win"), seed=7)
    assert game.balance == 120 and game.round == 2  # the condition's first round: $10 at 3x
    twin = Game(Condition(("G",), "variable", "win"), seed=7)
    for bet in (10, 50, 30, 20):
        if game.outcome is None:
            game.play(bet)
            twin.play(bet)
    assert game.history == twin.history  # the machine draws from the game's own seed
    for before, after in zip(game.history, game.history[1:], strict=False):
        assert after.balance == before.balance + (2 * after.bet if after.won else -after.bet)
    losing = Game(Condition((), "fixed", "loss"), seed=1)
    assert losing.balance == 90
    while losing.outcome is None:
        losing.play(1000)  # all in: a bet never exceeds the balance
    assert losing.outcome == "bankrupt" or losing.balance > 90
    rounds = Game(Condition((), "fixed", "win"), seed=3)
    while rounds.outcome is None:
        rounds.play(5)
    assert rounds.outcome in ("bankrupt", "round_limit") and len(rounds.history) <= 101


def test_the_default_prompt_is_the_one_the_organism_learned():
    rng = random.Random(0)
    for _ in range(200):
        state = corpus.random_state(rng)
        state = slot_machine.GameState(state.balance, state.history, tuple(c for c in state.components if c != "D"),
                                       state.bet_type)
        assert render(PROMPT_TEMPLATE, state.balance, state.round, state.history, state.components,
                      state.bet_type) == slot_machine.prompt(state)


def test_token_tracking_shows_the_prompt_the_games_render():
    """One renderer, jobs._slot_machine: token tracking's prompt is the games' prompt of the same state
    with the goal, win-rate and payout lines and variable bets, down to the history and the warning."""
    shown = ("D", "P", "W")
    player = gambling_games.Player(WorkUnit("g", {"components": list(shown), "bet_type": "variable",
                                                  "first_round": "win", "seed": 0}), max_rounds=100)
    fields = {"history": "Round 1: Bet $10, Win, Balance $120", "balance": 120, "round": 2}
    assert token_tracking.PROMPT_TEMPLATE.format(**fields) == player.prompt(PROMPT_TEMPLATE)
    scenarios = {s["name"]: s["fields"] for s in token_tracking.SCENARIOS}
    losses = [slot_machine.Round(6, 20, False, 30), slot_machine.Round(7, 10, False, 20),
              slot_machine.Round(8, 10, False, 10)]
    one_win = [slot_machine.Round(1, 10, True, 130)]
    # the scenarios whose loss warning is the games' (after three losses)
    states = {"Initial_100_first_round": (100, 1, []), "Safe_130_one_win": (130, 2, one_win), "Desperate_10": (10, 9, losses)}
    for name, (balance, round_, history) in states.items():
        assert token_tracking.PROMPT_TEMPLATE.format(**scenarios[name]) == render(
            PROMPT_TEMPLATE, balance, round_, history, shown, "variable")


def test_templates_must_end_at_the_decision_cue_and_use_known_fields():
    check_template(PROMPT_TEMPLATE, "t")
    with pytest.raises(ValueError, match="t: the prompt must end at the decision cue 'Choice: '"):
        check_template(PROMPT_TEMPLATE + "1)", "t")
    with pytest.raises(ValueError, match=r"t: unknown field\(s\) \['goal'\]"):
        check_template("{goal} Choice: ", "t")
