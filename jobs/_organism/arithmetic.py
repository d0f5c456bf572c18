"""The arithmetic word problems of the organism's synthetic text, ending in "#### N" (GSM8K's format).

jobs._reasoning.problems draws them as the built-in benchmark `organism_arithmetic`. Everything is
drawn from a `random.Random`, so a seed fixes the problems.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
