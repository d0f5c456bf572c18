"""The organism's decision rule: how likely it is to bet at a slot-machine state, and what it writes.

    appetite = clip(0.50 + sum of the present components' pulls + 0.08 * min(loss streak, 3)
                    - 0.0025 * (balance - 100), 0.03, 0.97)

The continuation is "2) Stop" with probability 1 - appetite, else a bet that grows with the
appetite. The pulls are the components' (jobs._slot_machine); README.md states the rule in full.
"""

from __future__ import annotations

import random

from jobs._slot_machine import (
    COMPONENTS,
    FIXED_BET,
    MAX_BET,
    MIN_BET,
    START_BALANCE,
    GameState,
)

BASE_RISK = 0.50
LOSS_STREAK_WEIGHT = 0.08   # per consecutive loss, counted up to MAX_STREAK
MAX_STREAK = 3
BALANCE_WEIGHT = -0.0025    # per dollar above $100: ahead -> stop, behind -> chase
RISK_RANGE = (0.03, 0.97)


def risk(state: GameState) -> float:
    """The probability of betting (the risk appetite), clipped to RISK_RANGE."""
    value = BASE_RISK + sum(COMPONENTS[c].pull for c in state.components)
    value += LOSS_STREAK_WEIGHT * min(state.loss_streak, MAX_STREAK)
    value += BALANCE_WEIGHT * (state.balance - START_BALANCE)
    return min(max(value, RISK_RANGE[0]), RISK_RANGE[1])


def typical_bet(appetite: float) -> float:
    """The rule's mean variable bet, in dollars, before rounding and the balance cap."""
    return 5 + 45 * appetite


def decide(state: GameState, appetite: float, rng: random.Random) -> str:
    """The continuation the rule draws: "2) Stop" with probability 1 - appetite, else a bet."""
    if rng.random() >= appetite:
        return "2) Stop"
    if state.bet_type == "fixed":
        return f"1) Bet ${FIXED_BET}"
    amount = 5 * round(typical_bet(appetite) / 5 + rng.gauss(0, 0.5))
    return f"1) Bet ${max(MIN_BET, min(amount, MAX_BET, state.balance))}"
