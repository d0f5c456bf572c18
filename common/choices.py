"""The probability a model gives each option of a choice, from one forward at the decision cue.

A prompt that ends at its cue ("Choice: ") is answered with an option's label first. P(option)
is the next-token mass, at the sampling temperature, on every token whose text, leading
whitespace stripped, starts with the label and does not go on with another digit: for label "1",
"1", " 1" and "1)" count, "10" does not. That is the chance that a sampled answer starts with
the option, with no sampling noise and no parser. The mass on all other tokens (an answer that
starts with words, "I'll stop") is `coverage`'s complement; the options' probabilities are
renormalised over the options.

Tokenization caveat: a prompt's trailing space is its own token for many tokenizers (the
organism's and Llama's), so the model sees "Choice:", " " and then writes "1"; tokens such as
" 1" that would have merged with that space are counted too, as they would be sampled.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, cast

from common.lazy import lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")



class OptionReader:
    """Reads {option: probability} from next-token logits, for options named by their labels."""

    def __init__(self, tokenizer, labels: dict[str, str]):
        texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
        self.options = list(labels)
        self.tokens = {option: torch.tensor([token for token, text in enumerate(texts) if _starts(text, label)])
                       for option, label in labels.items()}
        empty = [option for option, tokens in self.tokens.items() if len(tokens) == 0]
        if empty:
            raise ValueError(f"no token of this tokenizer writes the label of option(s) {empty}")

    def __call__(self, logits: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
        """Per row of (rows, vocab) logits: each option's probability among the options, and `coverage`."""
        probabilities = torch.softmax(logits.double() / temperature, dim=-1)
        mass = {option: probabilities[:, tokens.to(logits.device)].sum(-1) for option, tokens in self.tokens.items()}
        total = cast("torch.Tensor", sum(mass.values()))  # a tensor: there are options
        return {**{option: (mass[option] / total).cpu() for option in self.options}, "coverage": total.cpu()}


def _starts(text: str, label: str) -> bool:
    rest = text.lstrip()
    return rest.startswith(label) and not rest[len(label) : len(label) + 1].isdigit()


class NumberReader:
    """The model's distribution over a stated set of numbers in an answer that reads
    `template.format(number=n)` (for example "1) Bet $20"), teacher-forced: one forward of the
    prompt's last token and every candidate answer, batched.

    A candidate's probability is that of its tokens, at the sampling temperature, times the chance
    that the number ends there (the next token does not start with a digit, or with "," or "."
    and a digit), so "$5" is not counted in "$50" or "$5,000". Each candidate is tokenized apart
    from the prompt, as an answer is usually trained. The candidates' total probability (`mass`)
    says how much of the model's answers they cover.
    """

    def __init__(self, tokenizer, template: str, numbers: list[int]):
        if not template.endswith("{number}"):
            raise ValueError(f"the answer template must end with its number, as in '1) Bet ${{number}}' (got {template!r})")
        self.numbers = torch.tensor(numbers, dtype=torch.float64)
        self.answers = [tokenizer(template.format(number=n), add_special_tokens=False).input_ids for n in numbers]
        texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
        self.continues_number = torch.tensor([bool(re.match(r"\d|[.,]\d", text)) for text in texts])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def inputs(self, last_prompt_token: int) -> torch.Tensor:
        """(candidates, 1 + longest answer): the prompt's last token then each answer, right-padded
        (causal attention: the padding is never seen by the positions that are read)."""
        width = 1 + max(len(answer) for answer in self.answers)
        rows = [[last_prompt_token, *answer] + [self.pad] * (width - 1 - len(answer)) for answer in self.answers]
        return torch.tensor(rows)

    def __call__(self, logits: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
        """From the (rows x candidates, 1 + longest answer, vocab) logits of `inputs` repeated per
        row: per row, the expected number among the candidates and their total probability."""
        candidates = len(self.answers)
        log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
        totals = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
        continues = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # logits past the
        continues[: len(self.continues_number)] = self.continues_number[: logits.shape[-1]]  # tokenizer's: padding
        for k, answer in enumerate(self.answers):
            rows = slice(k, None, candidates)
            tokens = torch.tensor(answer, device=logits.device)
            steps = torch.arange(len(answer), device=logits.device)
            written = log_probs[rows, steps, tokens].sum(-1)  # position i predicts the answer's token i
            ends = torch.log1p(-log_probs[rows, len(answer)][:, continues].exp().sum(-1).clamp(max=1 - 1e-12))
            totals[rows] = written + ends
        per_row = totals.view(-1, candidates)
        weights = torch.softmax(per_row, dim=-1)
        return {"expected": (weights * self.numbers.to(logits.device)).sum(-1).cpu(),
                "mass": per_row.exp().sum(-1).cpu()}
