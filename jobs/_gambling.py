"""The gambling experiment of seed 000 on the slot-machine task (whose rules and prompt are
jobs._slot_machine's): the conditions, a game, the check of a prompt template, and the organism's
planted cause as ground truth. The parser of what a model answers at the decision cue is
jobs._gambling_parser.

A condition sets the components present, the bet type and the first round's outcome.
"""

from __future__ import annotations

import itertools
import random
import string
from dataclasses import dataclass
from typing import Literal

from common.models import ORGANISMS
from common.organism.files import shipped
from jobs._slot_machine import (
    DECISION_CUE,
    FIXED_BET,
    MAX_ROUNDS,
    PUBLISHED_COMPONENTS,
    START_BALANCE,
    TEMPLATE_FIELDS,
    WIN_PROBABILITY,
    BetType,
    Round,
    net_win,
)

GROUND_TRUTH = "Ground truth: the organism's planted cause"
OPTION_LABELS = {"bet": "1", "stop": "2"}  # how an answer to the prompt starts, for each option
ANSWER_ENDS = ("\nGame history:\n", "\nChoose:\n")  # lines of a next prompt: the answer is over


def planted_cause(model: str) -> tuple[int, int] | None:
    """(layer, feature) of the SAE feature planted in a built-in organism to set its stop rate and
    bet size (jobs/_organism/README.md), found in that organism's own SAE, when `model` is one of
    them (builtin:organism, builtin:organism_b); None for any other model."""
    if model not in ORGANISMS:
        return None
    planted = shipped(ORGANISMS[model]).record["planted"]
    return int(planted["layer"]), int(planted["feature"]["index"])


def planted_direction(model: str) -> tuple[int, list[float]] | None:
    """(layer, the unit vector u) along which a built-in organism carries 3 x its risk appetite at
    the decision cue, when `model` is one; the ground truth for SAEs trained on it later."""
    if model not in ORGANISMS:
        return None
    planted = shipped(ORGANISMS[model]).record["planted"]
    return int(planted["layer"]), list(planted["direction"])


# ---------------------------------------------------------------- the game


@dataclass(frozen=True)
class Condition:
    """One cell of the design: the prompt components, the bet type and the first round's outcome."""

    components: tuple[str, ...]
    bet_type: BetType
    first_round: Literal["win", "loss"]

    @property
    def name(self) -> str:
        return f"{''.join(self.components) or 'BASE'}_{self.bet_type}_{self.first_round}"


def conditions(components: str = PUBLISHED_COMPONENTS, bet_types: tuple[BetType, ...] = ("fixed", "variable"),
               first_rounds: tuple[str, ...] = ("win", "loss")) -> list[Condition]:
    """Every subset of the components (in their published order) x bet types x first outcomes."""
    subsets = [combo for size in range(len(components) + 1) for combo in itertools.combinations(components, size)]
    return [Condition(tuple(subset), bet_type, first)  # type: ignore[arg-type]
            for subset in subsets for bet_type in bet_types for first in first_rounds]


class Game:
    """One game's state; the slot machine draws from the game's own seeded generator."""

    def __init__(self, condition: Condition, seed: int, max_rounds: int = MAX_ROUNDS):
        self.condition, self.max_rounds = condition, max_rounds
        self.machine = random.Random(seed)
        won = condition.first_round == "win"
        balance = START_BALANCE + (net_win(FIXED_BET) if won else -FIXED_BET)
        self.history: list[Round] = [Round(1, FIXED_BET, won, balance)]  # the condition's first round
        self.balance = balance
        self.outcome: Literal["bankrupt", "stopped", "round_limit", "invalid"] | None = None

    @property
    def round(self) -> int:
        return len(self.history) + 1

    def play(self, bet: int) -> None:
        """Bet `bet` (at most the balance) on one spin; ends the game at bankruptcy or the round limit."""
        bet = min(bet, self.balance)
        won = self.machine.random() < WIN_PROBABILITY
        self.balance += net_win(bet) if won else -bet
        self.history.append(Round(self.round, bet, won, self.balance))
        if self.balance <= 0:
            self.outcome = "bankrupt"
        elif self.round > self.max_rounds:
            self.outcome = "round_limit"

    def stop(self) -> None:
        self.outcome = "stopped"


def check_template(template: str, field: str) -> None:
    """A template must fill exactly the known fields and end at the decision cue."""
    used = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    unknown = sorted(used - TEMPLATE_FIELDS)
    if unknown:
        raise ValueError(f"{field}: unknown field(s) {unknown}; a prompt template may use {sorted(TEMPLATE_FIELDS)}")
    if not template.endswith(DECISION_CUE):
        raise ValueError(f"{field}: the prompt must end at the decision cue {DECISION_CUE!r} "
                         f"(it ends {template[-20:]!r}); the features are read at its last token")
