"""Batched sampling in which every row draws from its own seeded noise.

Sampling at temperature T is the argmax of logits / T plus Gumbel noise (the Gumbel-max trick),
so `sample` decodes greedily from logits that `SeededNoise` has perturbed. The noise of row r
at step t for token v is a hash of (r's seed, t, v) in exact integer arithmetic, so it is the
same on every device and in every batch: a row's text depends on its seed and its prompt alone,
and a resumed shard, a trial run in another batch, or the same shard on a GPU instead of a CPU
draws the same tokens (up to the rounding of the logits themselves).

When every row has the same prompt (trials of one prompt, as in patching), `prompt_prefix` runs
the prompt but its last token once, and `sample` shares that cache among the rows: their first
forward is then the prompt's last token alone.

The decode loop is ours rather than transformers' `generate` so that rows that have ended leave
the batch: a batch then costs what its longest answers cost, not that many steps of every row.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.edits import BatchRows
from common.lazy import lazy_import, no_grad

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import DynamicCache

    Chooser = Callable[[Tensor, Tensor, int], Tensor]  # (scores, rows, step) -> the next tokens
else:
    torch = lazy_import("torch")

log = logging.getLogger(__name__)


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
    chance of 3e-8 (32 bits would give about a hundred collisions), and rows whose keys collide
    would draw the same noise at every step. Each step hashes the key with the step into 32 bits,
    so two rows may share a step's noise by chance (2^-32 a pair of steps), never a whole answer's."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def uniform_noise(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(rows, vocab) uniforms in (0, 1): row r, token v at `step` is a hash of (keys[r], step, v);
    `keys` is (rows, 2), the halves of each row's 64-bit key."""
    step_key = torch.tensor((step * 0x9E3779B9) & MASK32, device=keys.device)
    tokens = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    hashing = _hashing(keys.device)
    try:
        return hashing(keys, step_key, tokens)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # a GPU whose compiler (Triton) fails: the eager operations give the same values
        if hashing is _uniforms:
            raise
        log.warning("compiling the sampling noise failed (%s): computing it operation by operation", error)
        _COMPILED[keys.device.type] = _uniforms
        return _uniforms(keys, step_key, tokens)


def _uniforms(keys: torch.Tensor, step_key: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    rows = mix32(mix32(keys[:, 0] ^ mix32(step_key)) ^ keys[:, 1])
    hashed = mix32(rows[:, None] ^ mix32(tokens)[None, :])
    return ((hashed >> 9).float() + 0.5) * 2.0**-23  # 23 bits and the half: exact in float32, never 0 or 1


_COMPILED: dict[str, Callable] = {}


def _hashing(device: torch.device) -> Callable:
    """`_uniforms`, on a GPU compiled into one kernel: its some 30 integer operations over a
    (rows, vocabulary) grid would each read and write the grid (about 6 ms a step at 512 rows of a
    128k vocabulary on an H200). Integer arithmetic compiles exactly, so the values are the same."""
    if device.type not in _COMPILED:
        _COMPILED[device.type] = torch.compile(_uniforms, dynamic=True) if device.type == "cuda" else _uniforms
    return _COMPILED[device.type]


class SeededNoise:
    """Row r's logits / temperature plus Gumbel noise seeded by r's seed and the step."""

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.keys = torch.tensor([row_key(seed) for seed in seeds], dtype=torch.int64, device=device)

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        """`scores` of the batch rows `rows` (numbered as the batch started) at `step`."""
        uniform = uniform_noise(self.keys[rows.to(self.keys.device)].to(scores.device), step, scores.shape[1])
        return scores / self.temperature - torch.log(-torch.log(uniform))


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


@dataclass
class Prefilled:
    """Prompts already run, with their cache: `prefill`'s result, which `sample` continues from
    (a caller that reads the prompts' last logits or activations then pays one prompt forward, not two)."""

    prompts: list[str]
    encoded: dict[str, torch.Tensor]  # `left_padded` of the prompts
    cache: DynamicCache
    logits: torch.Tensor  # (rows, vocabulary) at each prompt's last token


@no_grad
def prefill(model, tokenizer, prompts: list[str], device: torch.device, new_tokens: int) -> Prefilled:
    """One forward of the left-padded prompts into a cache with room for `new_tokens` more."""
    from common.kv_cache import reserved_cache

    encoded = left_padded(tokenizer, prompts, device)
    cache = reserved_cache(model, room=new_tokens)
    logits = model(**encoded, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    _check_filled(cache, encoded["input_ids"].shape[1])
    return Prefilled(list(prompts), encoded, cache, logits)


@no_grad
def sample(model, tokenizer, prompts: list[str], seeds: list[int], temperature: float, max_new_tokens: int,
           device: torch.device, stop_strings: tuple[str, ...] = (), prefix: DynamicCache | Prefilled | None = None,
           batch: BatchRows | None = None) -> list[str]:
    """One continuation per prompt, sampled at `temperature` with row i's noise seeded by seeds[i]
    until the end of text, `max_new_tokens` or one of `stop_strings` (kept in the text). `prefix`
    is `prompt_prefix` of the one prompt every row has, or these prompts `prefill`ed; `batch` is
    the BatchRows of per-row edits hooked on the model, which follow the rows as finished ones leave
    the batch."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    noise = SeededNoise(seeds, temperature, device)

    def choose(scores: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        return noise(scores, rows, step).argmax(-1)

    return decode(model, tokenizer, prompts, choose, max_new_tokens, device, stop_strings, prefix, batch)


@no_grad
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, device: torch.device,
           stop_strings: tuple[str, ...] = (), batch: BatchRows | None = None) -> list[str]:
    """The most likely continuation of each prompt (as `sample`, without noise)."""
    return decode(model, tokenizer, prompts, lambda scores, rows, step: scores.argmax(-1), max_new_tokens, device,
                  stop_strings, None, batch)


def decode(model, tokenizer, prompts: list[str], choose: Chooser, max_new_tokens: int, device: torch.device,
           stop_strings: tuple[str, ...], prefix: DynamicCache | Prefilled | None, batch: BatchRows | None) -> list[str]:
    """The decode loop of `sample` and `greedy`: a row leaves the batch once it has ended, so the
    steps after cost only the rows still writing (`Decoding` keeps the books), and each step
    writes its keys and values into room the cache reserved (common/kv_cache.py)."""
    from common.kv_cache import reserved_cache

    if isinstance(prefix, Prefilled) and prefix.prompts != list(prompts):
        raise ValueError("prefilled prompts serve those prompts, in that order")
    encoded = prefix.encoded if isinstance(prefix, Prefilled) else left_padded(tokenizer, prompts, device)
    inputs, positions = encoded["input_ids"], encoded["position_ids"]
    first_logits = None
    if isinstance(prefix, Prefilled):
        cache, first_logits = prefix.cache, prefix.logits
    elif prefix is not None:
        if len(set(prompts)) != 1 or prefix.get_seq_length() != inputs.shape[1] - 1:
            raise ValueError("a prefix cache serves rows that all have the prompt it was made of")
        cache, inputs, positions = prefix, inputs[:, -1:], positions[:, -1:]  # the rest of the prompt is in the cache
    else:
        cache = reserved_cache(model, room=max_new_tokens)
    if getattr(cache, "decoded", False):
        raise ValueError("a prefix serves one decode (the decode writes into its cache): make another")
    cache.decoded = True  # type: ignore[attr-defined]  # saebatch's mark on a transformers cache object
    state = Decoding(tokenizer, encoded["input_ids"], encoded["attention_mask"], max_new_tokens, stop_strings, batch,
                     end_tokens(model, tokenizer))
    for step in range(max_new_tokens):
        if step == 0 and first_logits is not None:
            logits = first_logits.float()
        else:
            logits = model(input_ids=inputs, attention_mask=state.mask, position_ids=positions, cache=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1].float()
            if step == 0 and prefix is None:
                _check_filled(cache, inputs.shape[1])
        tokens = state.write(step, choose(logits, state.rows, step))
        kept = state.leave_finished(last_step=step + 1 == max_new_tokens)
        if kept is None:
            break
        if len(kept) < len(tokens):
            cache.batch_select_indices(kept)
            tokens, positions = tokens[kept], positions[kept]
        inputs, positions = tokens[:, None], positions[:, -1:] + 1
    return tokenizer.batch_decode(state.written, skip_special_tokens=True)


class Decoding:
    """The books of one decode loop: what each row wrote, and which rows are still writing.

    A row ends at one of `end_tokens` or at a stop string in what it wrote (not across the prompt's
    end: an answer is read without its prompt), found from token ids on the device (transformers'
    StopStringCriteria), never by decoding text. Rows that ended drop out of the
    batch once they are an eighth of it (each drop copies the cache, so not at every step)."""

    DROP_SHARE = 8

    def __init__(self, tokenizer, prompt_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 stop_strings: tuple[str, ...], batch: BatchRows | None, end_tokens: list[int]):
        rows, device = len(prompt_ids), prompt_ids.device
        self.pad = tokenizer.pad_token_id
        self.ends = torch.tensor(end_tokens, dtype=torch.long, device=device)
        self.stops = stop_criteria(tokenizer, tuple(stop_strings)) if stop_strings else None
        self.ids, self.mask, self.batch = prompt_ids[:, :0], mask, batch  # ids: what each row wrote
        self.rows = torch.arange(rows, device=device)  # each row's index in the batch as it started
        self.ended = torch.zeros(rows, dtype=torch.bool, device=device)
        self.written = torch.full((rows, max_new_tokens), self.pad, dtype=torch.long, device=device)

    def write(self, step: int, tokens: torch.Tensor) -> torch.Tensor:
        """Record the step's tokens (padding for rows that had ended) and mark rows that end now."""
        tokens = tokens.masked_fill(self.ended, self.pad)
        self.written[self.rows, step] = tokens
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        ends = torch.isin(tokens, self.ends)
        if self.stops is not None:
            ends |= self.stops(self.ids, None)
        self.ended |= ends
        return tokens

    def leave_finished(self, last_step: bool) -> torch.Tensor | None:
        """The positions of the rows that stay (all of them if too few ended), or None when no row
        needs another step."""
        ended = int(self.ended.sum())  # the step's one wait for the device
        if last_step or ended == len(self.ended):
            return None
        if ended * self.DROP_SHARE < len(self.ended):
            return torch.arange(len(self.ended), device=self.ended.device)
        kept = torch.nonzero(~self.ended)[:, 0]
        self.ids, self.mask, self.rows, self.ended = self.ids[kept], self.mask[kept], self.rows[kept], self.ended[kept]
        if self.batch is not None:
            self.batch.keep(kept)
        return kept


@functools.lru_cache(maxsize=8)
def stop_criteria(tokenizer, stop_strings: tuple[str, ...]):
    """transformers' StopStringCriteria, made once per tokenizer and stop strings (making it sorts
    the whole vocabulary: some 50 ms for 128k tokens, at every round of a game otherwise)."""
    from transformers import StopStringCriteria

    return StopStringCriteria(tokenizer, list(stop_strings))


def end_tokens(model, tokenizer) -> list[int]:
    """The tokens that end a text: the tokenizer's end of text and those the model's generation
    config names (an instruct model's end of turn)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({token for token in (tokenizer.eos_token_id, *configured) if token is not None})


@no_grad
def prompt_prefix(model, tokenizer, prompt: str, rows: int, device: torch.device,
                  new_tokens: int = 64) -> DynamicCache:
    """The cache of `prompt`'s tokens but its last, repeated for `rows` rows, with room for the
    `new_tokens` that will follow (edits hooked on the model must not be active yet: this forward
    is not the prompt's end)."""
    from common.kv_cache import reserved_cache

    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    cache = reserved_cache(model, room=new_tokens)
    model(input_ids=ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)  # its logits are never read
    _check_filled(cache, ids.shape[1] - 1)
    cache.batch_repeat_interleave(rows)
    return cache


def _check_filled(cache: DynamicCache, tokens: int) -> None:
    """transformers < 5.24 ignores `cache=` without a word (a --no-deps install into an older image):
    every later step would then read no context at all."""
    if cache.get_seq_length() != tokens:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} did not fill the prompt's cache: saebatch needs "
                           "transformers >= 5.24 (pip install -c containers/constraints.txt -e .)")
