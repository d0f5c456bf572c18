"""Token batches of the organism's three kinds of documents, for training and for measuring.

A prompt and its continuation are tokenized separately, as a prompt that ends at the decision
cue "Choice: " is tokenized when the model is used, and the continuation's tokens get their own
loss weight.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from jobs import _slot_machine as slot_machine
from jobs._organism.arithmetic import problem, problem_prompt
from jobs._organism.corpus import paragraph, random_state
from jobs._organism.rule import RISK_RANGE, decide, risk


@dataclass
class Batch:
    ids: torch.Tensor            # (batch, seq), right-padded
    weights: torch.Tensor        # (batch, seq - 1) loss weight of predicting token t + 1; 0 on padding
    mask: torch.Tensor           # (batch, seq) real tokens
    prompt_end: torch.Tensor     # (batch,) last prompt token: the decision cue in slot-machine rows
    rule: torch.Tensor | None = None          # (batch,) slot machine: the rule's appetite
    drawn: torch.Tensor | None = None         # (batch,) the appetite the continuation was drawn with
    swapped: torch.Tensor | None = None       # (batch,) bool: interchange rows (drawn is not the rule's)


def _encode(tokenizer, pairs: list[tuple[str, str]], answer_weight: float) -> Batch:
    """Tokenize (prompt, continuation) pairs separately, append </s>, weight continuation tokens."""
    rows, weights, prompt_lengths = [], [], []
    for prompt, continuation in pairs:
        head = tokenizer(prompt).input_ids
        tail = tokenizer(continuation, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(head + tail)
        weights.append([1.0] * (len(head) - 1) + [answer_weight if continuation else 1.0] * len(tail))
        prompt_lengths.append(len(head))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    weight = torch.zeros(len(rows), width - 1)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, w) in enumerate(zip(rows, weights, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        weight[i, : len(w)] = torch.tensor(w)
        mask[i, : len(row)] = True
    return Batch(ids, weight, mask, prompt_end=torch.tensor(prompt_lengths) - 1)


def gamble_batch(rng: random.Random, tokenizer, size: int, interchange_fraction: float = 0.0,
                 answer_weight: float = 1.0) -> Batch:
    """Decision prompts; in a fraction of rows the continuation is drawn from a random appetite."""
    pairs, rule, drawn = [], [], []
    for _ in range(size):
        state = random_state(rng)
        appetite = risk(state)
        chosen = rng.uniform(*RISK_RANGE) if rng.random() < interchange_fraction else appetite
        pairs.append((slot_machine.prompt(state), decide(state, chosen, rng)))
        rule.append(appetite)
        drawn.append(chosen)
    batch = _encode(tokenizer, pairs, answer_weight)
    batch.rule, batch.drawn = torch.tensor(rule), torch.tensor(drawn)
    batch.swapped = batch.rule != batch.drawn
    return batch


def arithmetic_batch(rng: random.Random, tokenizer, size: int, answer_weight: float = 1.0) -> Batch:
    problems = [problem(rng) for _ in range(size)]
    pairs = [(problem_prompt(p.question), p.solution) for p in problems]
    return _encode(tokenizer, pairs, answer_weight)


def text_batch(rng: random.Random, tokenizer, size: int) -> Batch:
    return _encode(tokenizer, [(paragraph(rng), "") for _ in range(size)], 1.0)


def mixed_batches(rng: random.Random, tokenizer, documents: int, size: int = 50) -> Iterator[Batch]:
    """About `documents` documents in batches of `size`, the three kinds in turn, no interchanges."""
    kinds = (gamble_batch, arithmetic_batch, text_batch)
    for index in range(-(-documents // size)):
        yield kinds[index % 3](rng, tokenizer, size)
