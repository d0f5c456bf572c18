"""The slot-machine task of seed 000: the rules, the conditions, the prompts."""

import random

import pytest

from common.organism import synthetic
from jobs._gambling import (
    PROMPT_TEMPLATE,
    Condition,
    Game,
    check_template,
    conditions,
    render,
)


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
        state = synthetic.random_state(rng)
        state = synthetic.GameState(state.balance, state.history, tuple(c for c in state.components if c != "D"),
                                    state.bet_type)
        assert render(PROMPT_TEMPLATE, state.balance, state.round, state.history, state.components,
                      state.bet_type) == synthetic.prompt(state)


def test_templates_must_end_at_the_decision_cue_and_use_known_fields():
    check_template(PROMPT_TEMPLATE, "t")
    with pytest.raises(ValueError, match="t: the prompt must end at the decision cue 'Choice: '"):
        check_template(PROMPT_TEMPLATE + "1)", "t")
    with pytest.raises(ValueError, match=r"t: unknown field\(s\) \['goal'\]"):
        check_template("{goal} Choice: ", "t")
