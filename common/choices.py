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

import torch


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
        total = sum(mass.values())
        return {**{option: (mass[option] / total).cpu() for option in self.options}, "coverage": total.cpu()}


def _starts(text: str, label: str) -> bool:
    rest = text.lstrip()
    return rest.startswith(label) and not rest[len(label) : len(label) + 1].isdigit()
