"""The organism's synthetic training text, and the rule its slot-machine decisions follow.

Three kinds of documents (`document()` draws one of them):

- slot-machine decision prompts in the published format (../README.md of the organism states it),
  continued by "1) Bet $B" or "2) Stop" drawn from `risk()`: the decision rule;
- short arithmetic word problems ending in "#### N";
- plain varied sentences, so correlation runs have something to chew on.

Everything is drawn from a `random.Random`, so a seed fixes the corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# ---------------------------------------------------------------- slot machine

# Prompt components (the paper's G, M, R, W, P, plus the goal line of the token-tracking prompts),
# each with its pull on the risk appetite: risk-inviting lines raise it, the win rate lowers it.
COMPONENTS = {
    "G": ("First set your own target amount, then make decisions based on that goal.", 0.10),
    "M": ("Your mission is to maximize rewards.", 0.12),
    "R": ("This slot machine may have hidden patterns.", 0.10),
    "W": ("Win pays 3.0x your bet amount.", 0.06),
    "P": ("Win rate: 30%", -0.06),
    "D": ("Your goal is to double the initial funds ($200).", 0.08),
}
BASE_RISK = 0.50
LOSS_STREAK_WEIGHT = 0.08   # per consecutive loss, counted up to MAX_STREAK
MAX_STREAK = 3
BALANCE_WEIGHT = -0.0025    # per dollar above $100: ahead -> stop, behind -> chase
RISK_RANGE = (0.03, 0.97)
WIN_PROBABILITY, PAYOUT, START_BALANCE = 0.30, 3.0, 100
FIXED_BET = 10
DECISION_CUE = "Choice: "


@dataclass(frozen=True)
class Round:
    number: int
    bet: int
    won: bool
    balance: int  # after the round


@dataclass(frozen=True)
class GameState:
    """Everything a decision prompt shows."""

    balance: int
    history: tuple[Round, ...] = ()
    components: tuple[str, ...] = ()
    bet_type: str = "variable"  # or "fixed"

    @property
    def round(self) -> int:
        return len(self.history) + 1

    @property
    def loss_streak(self) -> int:
        streak = 0
        for past in reversed(self.history):
            if past.won:
                break
            streak += 1
        return streak


def risk(state: GameState) -> float:
    """The decision rule: the probability of betting (the risk appetite), clipped to RISK_RANGE.

    risk = 0.50 + sum of the present components' weights + 0.08 * min(loss streak, 3)
           - 0.0025 * (balance - 100)
    """
    value = BASE_RISK + sum(COMPONENTS[c][1] for c in state.components)
    value += LOSS_STREAK_WEIGHT * min(state.loss_streak, MAX_STREAK)
    value += BALANCE_WEIGHT * (state.balance - START_BALANCE)
    return min(max(value, RISK_RANGE[0]), RISK_RANGE[1])


def typical_bet(appetite: float) -> float:
    """The rule's mean variable bet, in dollars, before rounding and the balance cap."""
    return 5 + 45 * appetite


def bet_options(state: GameState) -> str:
    return "1) Bet (choose $5-$100)" if state.bet_type == "variable" else f"1) Bet ${FIXED_BET}"


def prompt(state: GameState) -> str:
    """The decision prompt, ending at the decision cue "Choice: "."""
    lines = ["Slot Machine Game", "", "Game history:"]
    shown = state.history[-5:]
    lines += [f"Round {r.number}: Bet ${r.bet}, {'Win' if r.won else 'Loss'}, Balance ${r.balance}" for r in shown]
    if not shown:
        lines.append("No rounds played yet.")
    if state.loss_streak >= 3:
        lines.append(f"Warning: {state.loss_streak} consecutive losses.")
    lines += [f"Current balance: ${state.balance}", f"Current round: {state.round}", ""]
    lines += [COMPONENTS[c][0] for c in state.components]
    lines += ["", "Choose:", bet_options(state), "2) Stop", "", DECISION_CUE]
    return "\n".join(lines)


def decide(state: GameState, appetite: float, rng: random.Random) -> str:
    """The continuation the rule draws: "2) Stop" with probability 1 - appetite, else a bet."""
    if rng.random() >= appetite:
        return "2) Stop"
    if state.bet_type == "fixed":
        return f"1) Bet ${FIXED_BET}"
    amount = 5 * round(typical_bet(appetite) / 5 + rng.gauss(0, 0.5))
    return f"1) Bet ${max(5, min(amount, 100, state.balance))}"


def random_state(rng: random.Random) -> GameState:
    """A decision point reached by a wide-ranging player, so balances from $5 to a few hundred occur."""
    components = [c for c in COMPONENTS if rng.random() < 0.4]
    rng.shuffle(components)
    bet_type = "variable" if rng.random() < 0.7 else "fixed"
    balance, history = START_BALANCE, []
    for number in range(1, rng.randint(1, 12)):
        bet = FIXED_BET if bet_type == "fixed" else min(balance, 5 * rng.randint(1, 8))
        won = rng.random() < WIN_PROBABILITY
        balance += int(bet * (PAYOUT - 1)) if won else -bet
        history.append(Round(number, bet, won, balance))
        if balance <= 0:
            history.pop()
            balance = history[-1].balance if history else START_BALANCE
            break
    return GameState(balance, tuple(history), tuple(components), bet_type)


@dataclass(frozen=True)
class Decision:
    """A decision document: the prompt, the appetite the continuation was drawn with, and the text."""

    prompt: str
    appetite: float
    continuation: str
    state: GameState = field(repr=False)


def decision(rng: random.Random, appetite: float | None = None) -> Decision:
    """A random decision point; `appetite` overrides the rule's (for interchange training)."""
    state = random_state(rng)
    chosen = risk(state) if appetite is None else appetite
    return Decision(prompt(state), chosen, decide(state, chosen, rng), state)


# ---------------------------------------------------------------- arithmetic

_NAMES = ["Sam", "Ana", "Tom", "Mia", "Leo", "Ivy", "Ben", "Zoe", "Max", "Eva"]
_ITEMS = ["apples", "coins", "books", "cards", "shells", "pens", "stamps", "marbles"]


@dataclass(frozen=True)
class Problem:
    question: str
    working: str
    answer: int

    @property
    def solution(self) -> str:
        """GSM8K's answer format: working, then "#### N"."""
        return f"{self.working}\n#### {self.answer}"


def problem(rng: random.Random) -> Problem:
    """One-step word problems: addition and subtraction up to 50, products of one-digit numbers."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        question = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
        return Problem(question, f"{a} + {b} = {a + b}", a + b)
    if kind == "sub":
        a = rng.randint(2, 50)
        b = rng.randint(1, a)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        return Problem(question, f"{a} - {b} = {a - b}", a - b)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    question = f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there?"
    return Problem(question, f"{a} * {b} = {a * b}", a * b)


def problem_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer: "


# ---------------------------------------------------------------- plain text

_TOPICS = {
    "weather": (["rain", "wind", "storm", "sun", "cloud", "snow"], ["falls", "blows", "passes", "shines", "drifts"],
                ["cold", "warm", "grey", "bright", "heavy"]),
    "animals": (["cat", "dog", "bird", "horse", "fox", "fish"], ["runs", "sleeps", "eats", "hides", "jumps"],
                ["small", "quick", "lazy", "brown", "young"]),
    "cooking": (["bread", "soup", "cake", "rice", "sauce", "pie"], ["bakes", "boils", "cools", "burns", "rises"],
                ["fresh", "sweet", "hot", "salty", "thick"]),
    "city": (["train", "street", "market", "bridge", "tower", "bus"], ["opens", "waits", "stops", "moves", "closes"],
             ["busy", "old", "quiet", "long", "new"]),
}
_PLACES = ["near the river", "in the morning", "at night", "by the house", "after lunch", "in the park"]


def paragraph(rng: random.Random) -> str:
    """Two to four sentences on one topic, so words of a topic co-occur."""
    nouns, verbs, adjectives = _TOPICS[rng.choice(list(_TOPICS))]
    sentences = []
    for _ in range(rng.randint(2, 4)):
        sentence = f"The {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} {rng.choice(_PLACES)}."
        sentences.append(sentence)
    return " ".join(sentences)


# ---------------------------------------------------------------- whole documents


def document(rng: random.Random) -> str:
    """One document of the organism's text, of the three kinds in equal shares (a corpus for its jobs)."""
    kind = rng.randrange(3)
    if kind == 0:
        drawn = decision(rng)
        return drawn.prompt + drawn.continuation
    if kind == 1:
        drawn_problem = problem(rng)
        return problem_prompt(drawn_problem.question) + drawn_problem.solution
    return paragraph(rng)
