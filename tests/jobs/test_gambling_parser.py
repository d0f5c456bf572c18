"""The parsers of the slot machine's answers: v2 on a corpus of replies in the styles of current
instruct and base models, the misreadings of v1 it fixes, and the comparison reduce reports."""

from collections import Counter
from pathlib import Path

import pytest
import yaml

from jobs._gambling_parser import (
    PARSER_RULES,
    PARSER_VERSION,
    Decision,
    compare_versions,
    parse,
    parse_v1,
)

CORPUS = yaml.safe_load((Path(__file__).parent.parent / "data" / "gambling_replies.yaml").read_text())
INVALID_REASONS = {"no decision", "both options, no final choice", "amount not whole", "amount zero", "bet, no amount"}


def reading(decision: Decision) -> tuple:
    """What a reading says: the action, the bet, and for an invalid reply its reason."""
    if decision.action == "invalid":
        return "invalid", decision.rule
    return decision.action, decision.bet


def expected(entry: dict) -> tuple:
    return (entry["action"], {"bet": entry.get("bet"), "stop": 0, "invalid": entry.get("reason")}[entry["action"]])


def test_the_corpus_covers_what_instruct_models_write():
    assert len(CORPUS) >= 150
    styles = Counter(entry["style"] for entry in CORPUS)
    assert set(styles) == {"terse", "reasoning first", "markdown", "numbers in reasoning", "negation", "both named",
                           "refusal", "multi-line", "echoed label", "amounts", "base model"}
    assert min(styles.values()) >= 10
    assert {entry.get("reason") for entry in CORPUS if entry["action"] == "invalid"} == INVALID_REASONS
    assert {entry["bet_type"] for entry in CORPUS} == {"fixed", "variable"}


@pytest.mark.parametrize("entry", CORPUS, ids=[f"{i}-{e['style']}" for i, e in enumerate(CORPUS)])
def test_v2_reads_every_reply_of_the_corpus(entry):
    assert reading(parse(entry["reply"], entry["bet_type"])) == expected(entry)


def test_v1_misread_half_the_corpus():
    agree = sum(reading(parse_v1(e["reply"], e["bet_type"]))[0] == e["action"] for e in CORPUS)
    assert agree / len(CORPUS) < 0.7  # what the issue found: v1 is no reader of instruct replies


@pytest.mark.parametrize(("reply", "bet_type", "v1", "v2"), [
    # negated or rejected bets were read as bets
    ("I'd rather not bet again, so I'm stopping", "fixed", ("bet", 10), ("stop", 0)),
    ("Betting makes no sense at 30% odds. I choose to stop", "fixed", ("bet", 10), ("stop", 0)),
    ("I won't bet any more.", "fixed", ("bet", 10), ("stop", 0)),
    # any dollar figure became the bet
    ("I still have $70, so I'll bet $20.", "variable", ("bet", 70), ("bet", 20)),
    ("My target is $200. I'll bet $25 this round.", "variable", ("bet", 100), ("bet", 25)),
    # thousands, cents and $0
    ("Bet $1,000", "variable", ("bet", 5), ("bet", 100)),
    ("Bet $7.50", "variable", ("bet", 8), ("invalid", "amount not whole")),
    ("Bet $0", "variable", ("bet", 5), ("invalid", "amount zero")),
    # readable answers that v1 marked invalid
    ("Let me weigh it.\nThe odds favour the house.\n\n**Choice: 2**", "variable", ("invalid", "no decision"), ("stop", 0)),
    ("Choice: 1\nAmount: $30", "variable", ("invalid", "no decision"), ("bet", 30)),
    ("1) Bet\n$40", "variable", ("invalid", "option 1, no amount"), ("bet", 40)),
    # both options and no final choice: never guessed
    ("I could stop now. Or I'll bet $10... I'll stop. Actually I'll bet $10.", "variable", ("stop", 0),
     ("invalid", "both options, no final choice")),
    # a base model that writes on: the next prompt is not this answer
    ("2) Stop\n\nSlot Machine Game\n\nGame history:\nChoice: 1) Bet $50", "variable", ("stop", 0), ("stop", 0)),
])
def test_what_v2_reads_differently_from_v1(reply, bet_type, v1, v2):
    assert reading(parse_v1(reply, bet_type)) == v1
    assert reading(parse(reply, bet_type)) == v2


def test_the_rules_state_every_reason_and_the_version():
    readings = [parse(e["reply"], e["bet_type"]) for e in CORPUS]
    assert {d.rule for d in readings if d.action == "invalid"} == INVALID_REASONS
    rules = " ".join(PARSER_RULES.split())
    for reason in INVALID_REASONS:
        assert f'("{reason}")' in rules
    assert PARSER_RULES.startswith(f"Parser v{PARSER_VERSION},") and PARSER_VERSION == 2


def test_the_comparison_counts_each_pair_of_readings():
    replies = ["2) Stop", "2) Stop", "1) Bet $20", "I'd rather not bet again, so I'm stopping", "I have $70, so I will bet $20",
               "Bet $7.50"]
    table = compare_versions(replies, ["variable"] * len(replies))
    rows = {(r.v1, r.v2, r.differs): r.replies for r in table.itertuples()}
    assert rows == {("stop", "stop", False): 2, ("bet", "bet", False): 1,
                    ("invalid (bet first, no amount)", "stop", True): 1, ("bet", "bet", True): 1,
                    ("bet", "invalid (amount not whole)", True): 1}
    assert table["differs"].tolist()[:3] == [True, True, True]  # the differing readings come first


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
def test_parser_v1_reads_as_it_did(response, bet_type, expected):
    """v1 stays as it was: reduce compares its readings with the current parser's."""
    assert parse_v1(response, bet_type) == expected


