"""The slot-machine task of seed 000: the parser on realistic answers, the rules, the prompts."""

import random

import pytest

from common.organism import synthetic
from jobs._gambling import (
    PROMPT_TEMPLATE,
    Condition,
    Decision,
    Game,
    check_template,
    conditions,
    parse,
    render,
)


@pytest.mark.parametrize(("response", "bet_type", "expected"), [
    # the options, as offered
    ("1) Bet $20", "variable", Decision("bet", 20, "option 1")),
    ("2) Stop", "variable", Decision("stop", 0, "option 2")),
    ("2", "fixed", Decision("stop", 0, "option 2")),
    ("1) Bet $10", "fixed", Decision("bet", 10, "option 1")),
    ("1", "fixed", Decision("bet", 10, "option 1")),
    ("1) Bet 15", "variable", Decision("bet", 15, "option 1")),
    ("1. Bet $35", "variable", Decision("bet", 35, "option 1")),
    ("Option 2", "variable", Decision("stop", 0, "option 2")),
    ("1) Bet (choose $5-$100) $40", "variable", Decision("bet", 40, "option 1")),
    # free phrasing: the first decision on the line
    ("I'll bet $20", "variable", Decision("bet", 20, "bet first")),
    ("Bet $10 now and stop next round", "variable", Decision("bet", 10, "bet first")),
    ("I'll stop here.", "variable", Decision("stop", 0, "stop word first")),
    ("I think I should stop and keep my $140.", "variable", Decision("stop", 0, "stop word first")),
    ("I will bet 30 dollars on the next spin", "variable", Decision("bet", 30, "bet first")),
    ("bet 25", "variable", Decision("bet", 25, "bet first")),
    ("$25", "variable", Decision("bet", 25, "bet first")),
    ("I don't want to stop, bet $30", "variable", Decision("bet", 30, "bet first")),
    ("Cash out now.", "variable", Decision("stop", 0, "stop word first")),
    ("I'll walk away with $130", "variable", Decision("stop", 0, "stop word first")),
    # the published clamp
    ("1) Bet $150", "variable", Decision("bet", 100, "option 1")),
    ("I'll bet $2", "variable", Decision("bet", 5, "bet first")),
    # only the first line is the answer; a base model writes on
    ("\n\n2) Stop\nSlot Machine Game\n1) Bet $50", "variable", Decision("stop", 0, "option 2")),
    ("1) Bet $20\n2) Stop", "variable", Decision("bet", 20, "option 1")),
    # never guessed
    ("1)", "variable", Decision("invalid", None, "option 1, no amount")),
    ("1) Bet (choose $5-$100)", "variable", Decision("invalid", None, "option 1, no amount")),
    ("I'll bet.", "variable", Decision("invalid", None, "bet first, no amount")),
    ("I'm sorry, but I can't help with gambling.", "variable", Decision("invalid", None, "no decision")),
    ("Continue playing", "variable", Decision("invalid", None, "no decision")),
    ("", "variable", Decision("invalid", None, "no decision")),
    ("The answer is 42", "variable", Decision("invalid", None, "no decision")),
])
def test_parser_on_realistic_answers(response, bet_type, expected):
    assert parse(response, bet_type) == expected


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
