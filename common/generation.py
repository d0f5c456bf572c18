"""Batched sampling in which every row draws from its own seeded noise.

Sampling at temperature T is the argmax of logits / T plus Gumbel noise (the Gumbel-max trick),
so `generate` runs greedy decoding on logits that `SeededNoise` has perturbed with noise from
one generator per row. A row's text then depends on its seed and its prompt, not on which
other rows share its batch: a resumed shard, or a trial run in another batch, draws the same
tokens (up to the rounding of batched arithmetic).

When every row has the same prompt (trials of one prompt, as in patching), `prompt_prefix` runs
the prompt but its last token once, and `sample` shares that cache among the rows: their first
forward is then the prompt's last token alone.
"""

from __future__ import annotations

import re

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)


class SeededNoise(LogitsProcessor):
    """Adds Gumbel noise from row i's own generator to row i's logits / temperature."""

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uniform = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
        return scores.float() / self.temperature + gumbel


class FirstLineWritten(StoppingCriteria):
    """A row is done once it has written a non-empty line and the line break after it."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([bool(re.search(r"\S[^\n]*\n", text)) for text in texts], device=input_ids.device)


def left_padded(tokenizer, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The prompts tokenized with padding on the left, so that every prompt ends in the last column."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return dict(tokenizer(prompts, return_tensors="pt", padding=True).to(device))
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], seeds: list[int], temperature: float, max_new_tokens: int,
           device: torch.device, first_line_only: bool = False, prefix: DynamicCache | None = None) -> list[str]:
    """One continuation per prompt, sampled at `temperature` with row i's noise seeded by seeds[i];
    `prefix` is `prompt_prefix` of the one prompt every row has."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    encoded = left_padded(tokenizer, prompts, device)
    length = encoded["input_ids"].shape[1]
    if prefix is not None:
        if len(set(prompts)) != 1 or prefix.get_seq_length() != length - 1:
            raise ValueError("a prefix cache serves rows that all have the prompt it was made of")
        encoded["past_key_values"] = prefix
    stopping = StoppingCriteriaList([FirstLineWritten(tokenizer, length)] if first_line_only else [])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    output = model.generate(**encoded, generation_config=config, stopping_criteria=stopping,
                            logits_processor=LogitsProcessorList([SeededNoise(seeds, temperature, device)]))
    return tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)


@torch.no_grad()
def prompt_prefix(model, tokenizer, prompt: str, rows: int, device: torch.device) -> DynamicCache:
    """The cache of `prompt`'s tokens but its last, repeated for `rows` rows (edits hooked on the
    model must not be active yet: this forward is not the prompt's end)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(rows)
    return cache
