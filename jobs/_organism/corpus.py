"""The organism's synthetic text: what it was trained on, and the `builtin: organism` corpora.

Three kinds of documents (`document()` draws one of them, as the pieces training tokenized one by one):

- slot-machine decision prompts (jobs._slot_machine renders them), continued by "1) Bet $B" or
  "2) Stop" as the decision rule (rule.py) draws them;
- short arithmetic word problems ending in "#### N" (jobs._organism.arithmetic);
- plain varied sentences, so correlation runs have something to chew on.

Everything is drawn from a `random.Random`, so a seed fixes the corpus. `DOCUMENTS` names the
corpora common.corpus offers: all three kinds, or the decisions or the plain sentences alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs._organism.arithmetic import problem, problem_prompt
from jobs._organism.rule import decide, risk
from jobs._slot_machine import (
    COMPONENTS,
    FIXED_BET,
    START_BALANCE,
    WIN_PROBABILITY,
    BetType,
    GameState,
    Round,
    net_win,
    prompt,
)

# ---------------------------------------------------------------- slot-machine decisions


def random_state(rng: random.Random) -> GameState:
    """A decision point reached by a wide-ranging player, so balances from $5 to a few hundred occur."""
    components = [c for c in COMPONENTS if rng.random() < 0.4]
    rng.shuffle(components)
    bet_type: BetType = "variable" if rng.random() < 0.7 else "fixed"
    balance, history = START_BALANCE, []
    for number in range(1, rng.randint(1, 12)):
        bet = FIXED_BET if bet_type == "fixed" else min(balance, 5 * rng.randint(1, 8))
        won = rng.random() < WIN_PROBABILITY
        balance += net_win(bet) if won else -bet
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


@dataclass(frozen=True)
class Document:
    """One document of the organism's text as it was trained on it: pieces tokenized one by one
    (a prompt, then its continuation), so a decision prompt ends in its cue token as at a decision."""

    pieces: tuple[str, ...]
    appetite: float | None = None  # a decision's: the appetite its continuation was drawn with


def document(rng: random.Random) -> Document:
    """One document of the organism's text, of the three kinds in equal shares (a corpus for its jobs)."""
    kind = rng.randrange(3)
    if kind == 0:
        return decision_document(rng)
    if kind == 1:
        drawn_problem = problem(rng)
        return Document((problem_prompt(drawn_problem.question), drawn_problem.solution))
    return plain_document(rng)


def decision_document(rng: random.Random) -> Document:
    """A decision prompt and its answer, alone."""
    drawn = decision(rng)
    return Document((drawn.prompt, drawn.continuation), drawn.appetite)


def plain_document(rng: random.Random) -> Document:
    """Plain sentences, alone."""
    return Document((paragraph(rng),))


# The `builtin:` corpora of common.corpus, by name.
DOCUMENTS: dict[str, Callable[[random.Random], Document]] = {
    "organism": document, "organism_decisions": decision_document, "organism_plain": plain_document}
