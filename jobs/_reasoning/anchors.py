"""Anchor positions: the tokens at stated places of an item's text, found the same way in every
tokenizer, so that models with different tokenizers can be compared token for token.

The text is the prompt followed by the reference solution, each tokenized on its own as when a
model writes the solution after reading the prompt (feature_ablation's teacher forcing). Anchors:

- `question_end`: the prompt's last token, where the model is about to answer;
- `answer_start`: the solution's first token;
- `step_<k>`: the last token of the solution's k-th line (a reasoning step), the final-answer
  line ("#### N") left out;
- `final_answer`: the first token of the final answer (after "####", else the last occurrence of
  the target in the solution).

A token "at" a character is the one whose span holds it (the first token starting after it where
the character falls between tokens, as whitespace a tokenizer drops can).
"""

from __future__ import annotations

from typing import Literal

from jobs._reasoning.problems import Benchmark, Item

AnchorKind = Literal["question_end", "answer_start", "steps", "final_answer"]
ANCHOR_KINDS: tuple[AnchorKind, ...] = ("question_end", "answer_start", "steps", "final_answer")


def anchor_characters(solution: str, target: str, kinds: list[AnchorKind]) -> dict[str, int]:
    """Character offsets, within the solution text, of its anchors (question_end is the prompt's)."""
    found: dict[str, int] = {}
    if "answer_start" in kinds:
        found["answer_start"] = len(solution) - len(solution.lstrip())
    if "steps" in kinds:
        start, step = 0, 0
        for line in solution.split("\n"):
            text = line.rstrip()
            if text.strip() and not text.lstrip().startswith("####"):
                step += 1
                found[f"step_{step}"] = start + len(text) - 1
            start += len(line) + 1
    if "final_answer" in kinds:
        marker = solution.rfind("####")
        if marker >= 0:
            rest = solution[marker + 4 :]
            found["final_answer"] = marker + 4 + len(rest) - len(rest.lstrip())
        elif target and target in solution:
            found["final_answer"] = solution.rfind(target)
    return found


def anchor_order(name: str) -> tuple[int, int]:
    """A sort key putting an item's anchors in text order: question_end, answer_start, step_1,
    step_2, ..., step_10, final_answer."""
    if name.startswith("step_"):
        return ANCHOR_KINDS.index("steps"), int(name.removeprefix("step_"))
    return ANCHOR_KINDS.index(name), 0


def token_at(offsets: list[tuple[int, int]], character: int) -> int | None:
    """The index of the token whose span holds `character` (or the first after it); None past the end."""
    for index, (start, end) in enumerate(offsets):
        if end > character and end > start:
            return index
    return None


def anchor_positions(tokenizer, bench: Benchmark, item: Item, kinds: list[AnchorKind]) -> dict[str, int]:
    """Each anchor's token position in prompt + solution, tokenized as teacher forcing does."""
    prompt = tokenizer(bench.prompt(item)).input_ids
    solution_text = bench.continuation(item)
    solution = tokenizer(solution_text, add_special_tokens=False, return_offsets_mapping=True)
    positions = {"question_end": len(prompt) - 1} if "question_end" in kinds else {}
    for name, character in anchor_characters(solution_text, item.target, kinds).items():
        index = token_at(solution["offset_mapping"], character)
        if index is not None:
            positions[name] = len(prompt) + index
    return positions
