"""Reasoning benchmarks: loading items from local files, prompting, reading and scoring answers.

A benchmark is GSM8K (question, answer ending "#### N"), MATH (problem, solution whose last
`\\boxed{}` is the answer), FOLIO (premises, conclusion, label True/False/Uncertain), a JSONL
whose fields the manifest names, or the model organism's arithmetic. Nothing is downloaded.

Prompts are the format's template around the question, after `few_shot` worked examples: the
first items of the file, which are then not evaluated. Answers are read the way models write
them ("#### N", "The answer is N", "A: N", \\boxed{N}, else the final number; thousands
separators, "$", units, negative and decimal numbers), MATH answers are compared after
normalising their LaTeX, and logic labels in any case.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.errors import UserError
from common.manifest import AbsolutePath, StrictModel
from jobs._organism import arithmetic
from jobs._organism.corpus import decision

AnswerKind = Literal["number", "math", "label"]
LOGIC_LABELS = ("True", "False", "Uncertain")
FOLIO_QUESTION = "Based on the premises, is the conclusion True, False, or Uncertain?"
TEMPLATES = {  # per format: the prompt around one question
    "gsm8k": "Question: {question}\nAnswer:",
    "math": "Problem: {question}\nSolution:",
    "folio": "{question}\nAnswer:",
    "jsonl": "Question: {question}\nAnswer:",
    "organism_arithmetic": arithmetic.problem_prompt("{question}"),
    "organism_decisions": "{question}",  # the slot-machine prompt, ending in its decision cue
}
KINDS: dict[str, AnswerKind] = {"gsm8k": "number", "math": "math", "folio": "label", "organism_arithmetic": "number",
                                "organism_decisions": "label"}
DECISION_LABELS = ("Bet", "Stop")


class BenchmarkSpec(StrictModel):
    """One benchmark: a local file in a known format, or the organism's arithmetic."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="label in unit ids and reports, e.g. gsm8k")
    format: Literal["gsm8k", "math", "folio", "jsonl"] | None = Field(
        None, description="file format (give with `path`)")
    path: AbsolutePath | None = Field(
        None, description="a .jsonl file (MATH: also a folder of per-problem .json files)")
    builtin: Literal["organism_arithmetic", "organism_decisions"] | None = Field(
        None, description="'organism_arithmetic': word problems the model organism learned to solve; "
        "'organism_decisions': its slot-machine decisions (the answer is the option the decision rule favours, "
        "Bet or Stop); drawn from `seed`")
    seed: int = Field(20_000, description="seed of the builtin problems (the organisms trained on seeds 0-3)")
    n: int | None = Field(None, ge=1, description="items evaluated: the first n after the few-shot examples "
                          "(None: all; required for builtin)")
    few_shot: int = Field(0, ge=0, description="the file's first items shown as worked examples in every prompt "
                          "(not evaluated)")
    template: str | None = Field(None, description="prompt around one question, with {question} (None: the "
                                 "format's default)")
    question_field: str = Field("question", description="jsonl: key of the question")
    answer_field: str = Field("answer", description="jsonl: key of the reference answer")
    answer_kind: AnswerKind = Field("number", description="jsonl: how answers compare: number, math or label")
    labels: list[str] = Field(list(LOGIC_LABELS), min_length=2, description="answer_kind label: the valid labels")
    max_new_tokens: int = Field(256, ge=1, description="tokens generated per answer")

    @model_validator(mode="after")
    def _one_source(self) -> BenchmarkSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of `path` (with `format`) and `builtin` (organism_arithmetic or "
                             "organism_decisions)")
        if self.path is not None and self.format is None:
            raise ValueError("`format` is required with `path`: gsm8k, math, folio or jsonl")
        if self.builtin is not None and self.n is None:
            raise ValueError("`n` is required with `builtin` (how many problems to draw)")
        if "{question}" not in self.prompt_template:
            raise ValueError(f"`template` must contain {{question}} (got {self.template!r})")
        return self

    @property
    def source(self) -> str:
        return self.builtin or self.format  # type: ignore[return-value]

    @property
    def kind(self) -> AnswerKind:
        return self.answer_kind if self.source == "jsonl" else KINDS[self.source]

    @property
    def valid_labels(self) -> list[str]:
        """The labels an answer may give (answer_kind label)."""
        return list(DECISION_LABELS) if self.builtin == "organism_decisions" else self.labels

    @property
    def prompt_template(self) -> str:
        return self.template or TEMPLATES[self.source]


@dataclass(frozen=True)
class Item:
    """One question: `target` is the reference answer as extracted, `solution` the worked answer
    (what a few-shot example shows and what capture may append)."""

    index: int
    question: str
    target: str
    solution: str


@dataclass(frozen=True)
class Benchmark:
    spec: BenchmarkSpec
    examples: list[Item]
    items: list[Item]

    @cached_property
    def stop_strings(self) -> list[str]:
        """Where an answer ends: where the model starts the next question, on a new line, or at
        two blank lines. A question prompt opens with the template's text before {question}
        ("Question:"); a template with none (FOLIO's, the organism's decisions) opens with the
        question itself, so the stop is the first line every question prompt shares ("Premises:"),
        if they share one. Without it, a few-shot model writes a whole invented example after its
        answer, and that example's answer is read instead."""
        lead = self.spec.prompt_template.split("{question}")[0].strip()
        if not lead:
            first_lines = {self.question_prompt(item).strip().split("\n")[0].strip()
                           for item in [*self.examples, *self.items]}
            lead = first_lines.pop() if len(first_lines) == 1 else ""
        return [f"\n{lead}", "\n\n\n"] if lead else ["\n\n\n"]

    def prompt(self, item: Item) -> str:
        shots = "".join(f"{self.question_prompt(e)}{self._gap(e)}{e.solution}\n\n" for e in self.examples)
        return shots + self.question_prompt(item)

    def question_prompt(self, item: Item) -> str:
        return self.spec.prompt_template.replace("{question}", item.question)

    def with_solution(self, item: Item) -> str:
        """The prompt followed by the reference solution, as a model would write it."""
        return self.prompt(item) + self.continuation(item)

    def continuation(self, item: Item) -> str:
        """What a model should write after the prompt: the reference solution."""
        return self._gap(item) + item.solution

    def _gap(self, item: Item) -> str:
        """A space between question and solution, unless the prompt ends in whitespace already."""
        return "" if self.question_prompt(item).endswith((" ", "\n")) else " "

    def score(self, item: Item, generated: str) -> tuple[str | None, bool]:
        """The answer read from `generated` (None: none found) and whether it is correct."""
        return score(self.spec.kind, generated, item.target, self.spec.valid_labels, self.stop_strings)


# ---------------------------------------------------------------- loading


def load_benchmark(spec: BenchmarkSpec, field: str = "benchmark") -> Benchmark:
    """Items of the benchmark; a missing file or an item without an answer is a UserError."""
    if spec.builtin is not None:
        items = _builtin_items(spec)
    else:
        items = list(itertools.islice(_read_items(spec, field), spec.few_shot + spec.n if spec.n else None))
    wanted = spec.few_shot + (spec.n or 0)
    if spec.n is not None and len(items) < wanted:
        raise UserError(f"{field}.n: {spec.path} holds {len(items)} items, fewer than few_shot + n = {wanted}; "
                        "lower n, or set it to null for all items")
    if len(items) <= spec.few_shot:
        raise UserError(f"{field}.few_shot: {spec.path} holds {len(items)} items, none left to evaluate after "
                        f"{spec.few_shot} examples")
    end = None if spec.n is None else wanted
    return Benchmark(spec, items[: spec.few_shot], items[spec.few_shot : end])


def _builtin_items(spec: BenchmarkSpec) -> list[Item]:
    """The organism's problems or decision points, drawn from the spec's seed."""
    rng = random.Random(spec.seed)
    count = spec.few_shot + spec.n  # type: ignore[operator]
    if spec.builtin == "organism_arithmetic":
        problems = [arithmetic.problem(rng) for _ in range(count)]
        return [Item(i, p.question, str(p.answer), p.solution) for i, p in enumerate(problems)]
    drawn = [decision(rng) for _ in range(count)]
    return [Item(i, d.prompt, DECISION_LABELS[0] if d.appetite >= 0.5 else DECISION_LABELS[1], d.continuation)
            for i, d in enumerate(drawn)]


def _read_items(spec: BenchmarkSpec, field: str) -> Iterator[Item]:
    path: Path = spec.path  # type: ignore[assignment]
    if not path.exists():
        raise UserError(f"{field}.path: {path} does not exist; give the local {spec.format} file "
                        "(nothing is downloaded)")
    for index, (where, record) in enumerate(_records(path, field)):
        try:
            yield _item(spec, index, record)
        except (KeyError, ValueError, TypeError) as problem:
            raise UserError(f"{field}: item {index} ({where}) has no usable answer: {problem}; fix or remove "
                            "that item") from None


def _records(path: Path, field: str) -> Iterator[tuple[str, dict]]:
    """(where, record) pairs from a .jsonl file, or from a folder of .json files (MATH's layout)."""
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{field}.path: the folder {path} holds no .json files")
    for file in files:
        lines = [file.read_text()] if file.suffix == ".json" else file.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{file}" if file.suffix == ".json" else f"{file} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{field}.path: {where} is not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise UserError(f"{field}.path: {where} is not a JSON object")
            yield where, record


def _item(spec: BenchmarkSpec, index: int, record: dict) -> Item:
    if spec.format == "gsm8k":
        question, solution = _text(record, "question"), _text(record, "answer")
        if "####" not in solution:
            raise ValueError("its answer has no final '#### N' line")
        return Item(index, question, _plain_number(solution.rsplit("####", 1)[1]), solution)
    if spec.format == "math":
        question, solution = _text(record, "problem"), _text(record, "solution")
        boxed = last_boxed(solution)
        if boxed is None:
            raise ValueError("its solution has no \\boxed{} answer")
        return Item(index, question, boxed, solution)
    if spec.format == "folio":
        premises = record["premises"]
        premises = "\n".join(premises) if isinstance(premises, list) else str(premises)
        label = _text(record, "label")
        if label not in spec.labels:
            raise ValueError(f"label {label!r} is not one of {spec.labels}")
        question = f"Premises:\n{premises}\nConclusion: {_text(record, 'conclusion')}\n{FOLIO_QUESTION}"
        return Item(index, question, label, f"The answer is {label}.")
    answer = _text(record, spec.answer_field)
    if spec.answer_kind == "number":
        value = extract_number(answer)
        if value is None:
            raise ValueError(f"{answer!r} holds no number")
        target = str(value)
    elif spec.answer_kind == "math":
        target = last_boxed(answer) or answer
    else:
        target = answer
        if target not in spec.labels:
            raise ValueError(f"label {target!r} is not one of {spec.labels}")
    return Item(index, _text(record, spec.question_field), target, answer)


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise KeyError(f"field {key!r} is missing or empty")
    return value.strip()


def _plain_number(text: str) -> str:
    value = parse_number(text)
    if value is None:
        raise ValueError(f"{text.strip()!r} is not a number")
    return str(value)


# ---------------------------------------------------------------- reading answers

# A minus is a sign only before the digits (or "$"), and not after a number or a closing bracket
# (with or without a space), where it subtracts: "12 - 5" and "(3)-5" hold 5, not -5; "is - 5" is -5.
_NUMBER = r"(?:(?<![\d)\]])(?<![\d)\]]\s)[-−]\s?(?=\$?\d))?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# A final answer worked out after its marker: arithmetic, "=", then a lone number ending the sentence.
_WORKED = re.compile(rf"[\d\s.,$+\-−*/×÷()]+=\s*({_NUMBER})\s*")
_SENTENCE_END = re.compile(r"\n|[.!?](?!\d)")
_GSM8K_CUE = re.compile(rf"####\s*({_NUMBER})")  # the few-shot prompts' answer line: nothing after it counts
_NUMBER_CUES = (  # other final-answer markers; the last one in the text wins
    re.compile(rf"answer is\s*:?\s*({_NUMBER})", re.IGNORECASE),
    re.compile(rf"^\s*A(?:nswer)?\s*:\s*({_NUMBER})", re.IGNORECASE | re.MULTILINE),
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\{")


def parse_number(text: str) -> Fraction | None:
    """The first number in `text` as an exact fraction ("$1,234.50" -> 2469/2), None if none."""
    match = re.search(_NUMBER, text)
    if not match:
        return None
    cleaned = re.sub(r"[\s$,]", "", match[0]).replace("−", "-")
    return Fraction(cleaned)


def extract_number(text: str) -> Fraction | None:
    """The answer a model wrote: after GSM8K's "####"; else at its last final-answer marker ("the
    answer is", "A:", \\boxed{}), so that "the answer is 16 - 3 = 13 ... The final answer is:
    $\\boxed{18}$" reads 18, where the result after the sentence's last "=" counts ("the answer is
    16 - 3 = 13." reads 13); without a marker, the final number."""
    gsm8k = _GSM8K_CUE.findall(text)
    if gsm8k:
        return parse_number(gsm8k[-1])
    markers = [(found.start(), _stated(text, found)) for cue in _NUMBER_CUES for found in cue.finditer(text)]
    markers += [(found.start(), boxed) for found in _BOXED.finditer(text)
                if (boxed := _braced(text, found.end() - 1)) is not None and parse_number(boxed) is not None]
    if markers:
        return parse_number(max(markers)[1])
    numbers = re.findall(_NUMBER, text)
    return parse_number(numbers[-1]) if numbers else None


def _stated(text: str, marker: re.Match) -> str:
    """The number a final-answer marker states: the result when the model works it out there in
    arithmetic alone ("The answer is 16 - 3 = 13." states 13), else the number after the marker
    ("The answer is 70 since the total = 7 * 10." states 70; "0.5 = 50%" states 0.5)."""
    end = _SENTENCE_END.search(text, marker.end(1))
    sentence = text[marker.start(1) : end.start() if end else len(text)]
    worked = _WORKED.fullmatch(sentence)
    return worked[1] if worked else marker.group(1)


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    starts = [found.end() - 1 for found in _BOXED.finditer(text)]
    return _braced(text, starts[-1]) if starts else None


def _braced(text: str, opened: int) -> str | None:
    """What the brace at `opened` encloses (nested braces balanced), None if it never closes."""
    depth = 0
    for position in range(opened, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[opened + 1 : position].strip()
    return None


def normalize_math(answer: str) -> str:
    """A canonical spelling of a MATH answer: spacing, \\left/\\right, dfrac, degrees, \\text{},
    "x =" and trailing periods removed; \\frac12 and \\sqrt2 braced."""
    text = answer.strip().strip("$").rstrip(".")
    text = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", text)
    text = re.sub(r"\\(?:left|right|!|,|;|:)|\\ |\s+", "", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\^\{?\\circ\}?|\\%|%|\\\$", "", text)
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", text)
    text = re.sub(r"^[a-zA-Z]=", "", text)
    return re.sub(r"(?<![\d.])\.(\d)", r"0.\1", text)


def _math_value(text: str) -> Fraction | None:
    """A normalised MATH answer as a number when it is one (5, 0.5, \\frac{1}{2}, -\\frac{3}{4})."""
    fraction = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", text)
    if fraction and int(fraction[3]) != 0:
        value = Fraction(int(fraction[2]), int(fraction[3]))
        return -value if fraction[1] else value
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", text):
        return Fraction(text.replace(",", ""))
    return None


def extract_math(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    stated = re.findall(r"answer is\s*:?\s*\$?([^\n$]+?)\$?\s*(?:\.\s|\.?$)", text, re.IGNORECASE | re.MULTILINE)
    if stated:
        return stated[-1]
    number = extract_number(text)
    return None if number is None else str(number)


def math_equal(answer: str, target: str) -> bool:
    a, b = normalize_math(answer), normalize_math(target)
    if a == b:
        return True
    value_a, value_b = _math_value(a), _math_value(b)
    return value_a is not None and value_a == value_b


def extract_label(text: str, labels: list[str]) -> str | None:
    """The label stated after "answer is" (or "Answer:"), else the first label the text names."""
    choices = "|".join(re.escape(label) for label in labels)
    stated = re.findall(rf"answer(?: is)?\s*:?\s*\**\s*({choices})\b", text, re.IGNORECASE)
    named = stated[-1:] or re.findall(rf"\b({choices})\b", text, re.IGNORECASE)[:1]
    if not named:
        return None
    return next(label for label in labels if label.lower() == named[0].lower())


def answer_text(generated: str, stop_strings: list[str]) -> str:
    """The model's answer: what it wrote before starting another question."""
    ends = [generated.find(stop) for stop in stop_strings if stop in generated]
    return generated[: min(ends)] if ends else generated


def score(kind: AnswerKind, generated: str, target: str, labels: list[str],
          stop_strings: list[str]) -> tuple[str | None, bool]:
    """(the answer read from the generation, whether it equals `target`)."""
    text = answer_text(generated, stop_strings)
    if kind == "number":
        value = extract_number(text)
        return (None, False) if value is None else (_show(value), value == Fraction(target))
    if kind == "math":
        found = extract_math(text)
        return (None, False) if found is None else (found, math_equal(found, target))
    label = extract_label(text, labels)
    return label, label == target


def _show(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):g}"
