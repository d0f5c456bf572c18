"""Batched sampling in which every row draws from its own seeded noise.

Sampling at temperature T is the argmax of logits / T plus Gumbel noise (the Gumbel-max trick),
so `generate` runs greedy decoding on logits that `SeededNoise` has perturbed. The noise of row r
at step t for token v is a hash of (r's seed, t, v) in exact integer arithmetic, so it is the
same on every device and in every batch: a row's text depends on its seed and its prompt alone,
and a resumed shard, a trial run in another batch, or the same shard on a GPU instead of a CPU
draws the same tokens (up to the rounding of the logits themselves).

When every row has the same prompt (trials of one prompt, as in patching), `prompt_prefix` runs
the prompt but its last token once, and `sample` shares that cache among the rows: their first
forward is then the prompt's last token alone.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from common.lazy import lazy_import, no_grad

if TYPE_CHECKING:
    from transformers import DynamicCache

torch = lazy_import("torch")


MASK32 = 0xFFFFFFFF


def _times(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x * constant mod 2^32 for int64 tensors of 32-bit values, in two halves so that no product
    overflows int64 (overflow would be the one place CPU and GPU could disagree)."""
    return (x * (constant & 0xFFFF) + (((x * (constant >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of 32-bit values whose every output bit depends
    on every input bit."""
    x = x ^ (x >> 16)
    x = _times(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _times(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def seed_of(*parts: int) -> int:
    """One 64-bit seed of several non-negative integers (game, round, attempt...): distinct tuples
    give distinct seeds, with no packing of one into the digits of another."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def row_key(seed: int) -> tuple[int, int]:
    """A 64-bit key of any integer seed, as two 32-bit halves: a million rows' keys collide with a
    chance of 3e-8 (32 bits would give about a hundred collisions)."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def uniform_noise(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(rows, vocab) uniforms in (0, 1): row r, token v at `step` is a hash of (keys[r], step, v);
    `keys` is (rows, 2), the halves of each row's 64-bit key."""
    step_key = mix32(torch.tensor((step * 0x9E3779B9) & MASK32, device=keys.device))
    rows = mix32(mix32(keys[:, 0] ^ step_key) ^ keys[:, 1])
    tokens = mix32(torch.arange(vocab, device=keys.device, dtype=torch.int64))
    hashed = mix32(rows[:, None] ^ tokens[None, :])
    return ((hashed >> 9).float() + 0.5) * 2.0**-23  # 23 bits and the half: exact in float32, never 0 or 1


class SeededNoise:
    """Adds Gumbel noise seeded by row i's seed (and the step) to row i's logits / temperature
    (a transformers logits processor: `generate` calls it with the ids so far and the scores)."""

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.keys = torch.tensor([row_key(seed) for seed in seeds], dtype=torch.int64, device=device)
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uniform = uniform_noise(self.keys.to(scores.device), self.step, scores.shape[1])
        self.step += 1
        return scores.float() / self.temperature - torch.log(-torch.log(uniform))


def left_padded(tokenizer, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The prompts tokenized with padding on the left, so that every prompt ends in the last column,
    with the position ids that count from each prompt's first real token: without them a model
    with absolute positions (GPT-2) would read a padded prompt as shifted along."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        encoded = dict(tokenizer(prompts, return_tensors="pt", padding=True).to(device))
    finally:
        tokenizer.padding_side = side
    encoded["position_ids"] = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return encoded


@no_grad
def sample(model, tokenizer, prompts: list[str], seeds: list[int], temperature: float, max_new_tokens: int,
           device: torch.device, stop_strings: tuple[str, ...] = (), prefix: DynamicCache | None = None) -> list[str]:
    """One continuation per prompt, sampled at `temperature` with row i's noise seeded by seeds[i]
    until the end of text, `max_new_tokens` or one of `stop_strings` (kept in the text); `prefix`
    is `prompt_prefix` of the one prompt every row has."""
    from transformers import GenerationConfig, LogitsProcessorList

    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    encoded = left_padded(tokenizer, prompts, device)
    encoded.pop("position_ids")  # generate derives them from the mask, step after step
    length = encoded["input_ids"].shape[1]
    if prefix is not None:
        if len(set(prompts)) != 1 or prefix.get_seq_length() != length - 1:
            raise ValueError("a prefix cache serves rows that all have the prompt it was made of")
        encoded["cache"] = prefix  # transformers >= 5.24 calls it `cache` (`past_key_values` is deprecated)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, stop_strings=list(stop_strings) or None)
    output = model.generate(**encoded, generation_config=config, tokenizer=tokenizer,
                            logits_processor=LogitsProcessorList([SeededNoise(seeds, temperature, device)]))
    return tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)


@no_grad
def prompt_prefix(model, tokenizer, prompt: str, rows: int, device: torch.device) -> DynamicCache:
    """The cache of `prompt`'s tokens but its last, repeated for `rows` rows (edits hooked on the
    model must not be active yet: this forward is not the prompt's end)."""
    from transformers import DynamicCache

    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
    if cache.get_seq_length() != ids.shape[1] - 1:  # transformers < 5.24 ignores `cache=` without a word
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} did not fill the prompt's cache: saebatch needs "
                           "transformers >= 5.24 (pip install -c containers/constraints.txt -e .)")
    cache.batch_repeat_interleave(rows)
    return cache
