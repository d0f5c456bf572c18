"""Seeded sampling: the right distribution, and a row's draw independent of its batch."""

import random

import numpy as np
import pytest
import torch
from scipy import stats

from common.generation import left_padded, prompt_prefix, row_key, sample, uniform_noise
from common.organism import synthetic
from common.organism.files import Organism

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def organism():
    return Organism().model(attn_implementation=None), Organism().tokenizer()


def test_first_tokens_follow_softmax_at_the_temperature(organism):
    model, tokenizer = organism
    prompt = synthetic.prompt(synthetic.random_state(random.Random(3)))
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].double()
    expected = torch.softmax(logits / 0.7, dim=0).numpy()
    draws = sample(model, tokenizer, [prompt] * 600, list(range(600)), 0.7, 1, CPU)
    ids = [tokenizer(text, add_special_tokens=False).input_ids[0] for text in draws]
    likely = np.flatnonzero(expected > 0.01)
    observed = np.array([sum(i == t for i in ids) for t in likely] + [sum(i not in likely for i in ids)])
    predicted = np.append(expected[likely], 1 - expected[likely].sum()) * len(ids)
    assert len(likely) >= 2 and stats.chisquare(observed, predicted).pvalue > 1e-3


def test_a_rows_text_depends_on_its_seed_not_its_batch(organism):
    model, tokenizer = organism
    rng = random.Random(0)
    prompts = [synthetic.prompt(synthetic.random_state(rng)) for _ in range(8)]
    together = sample(model, tokenizer, prompts, list(range(8)), 1.0, 20, CPU)
    reversed_batch = sample(model, tokenizer, prompts[::-1], list(range(8))[::-1], 1.0, 20, CPU)[::-1]
    alone = [sample(model, tokenizer, [p], [seed], 1.0, 20, CPU)[0] for seed, p in enumerate(prompts)]
    assert together == reversed_batch == alone
    other_seeds = sample(model, tokenizer, prompts, list(range(100, 108)), 1.0, 20, CPU)
    assert other_seeds != together


def test_a_stop_string_ends_each_row_where_it_writes_it(organism):
    model, tokenizer = organism
    rng = random.Random(1)
    prompts = [synthetic.problem_prompt(synthetic.problem(rng).question) for _ in range(4)]
    whole = sample(model, tokenizer, prompts, [0, 1, 2, 3], 0.7, 40, CPU)
    cut = sample(model, tokenizer, prompts, [0, 1, 2, 3], 0.7, 40, CPU, stop_strings=("####",))
    assert all("####" in text and len(text.strip().splitlines()) == 2 for text in whole)  # working, then answer
    assert cut == [text[: text.index("####") + 4] for text in whole]
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sample(model, tokenizer, ["a", "b"], [0], 1.0, 5, CPU)


def test_a_shared_prompt_prefix_draws_what_a_full_prompt_draws(organism):
    model, tokenizer = organism
    prompt = synthetic.prompt(synthetic.random_state(random.Random(5)))
    seeds = list(range(10))
    prefix = prompt_prefix(model, tokenizer, prompt, len(seeds), CPU)
    shared = sample(model, tokenizer, [prompt] * 10, seeds, 1.0, 20, CPU, prefix=prefix)
    assert shared == sample(model, tokenizer, [prompt] * 10, seeds, 1.0, 20, CPU)
    with pytest.raises(ValueError, match="a prefix cache serves rows that all have the prompt it was made of"):
        sample(model, tokenizer, ["Slot Machine Game\n\nChoice: "] * 10, seeds, 1.0, 5, CPU, prefix=prefix)


def test_a_model_that_ignores_the_cache_argument_is_refused(organism):
    """transformers before 5.24 drops `cache=` silently (a --no-deps install on an older image):
    the prefix would then be empty and every patched answer read from the wrong context."""
    model, tokenizer = organism

    class OldTransformers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, cache=None, **kwargs):
            return self.inner(**kwargs)

    with pytest.raises(RuntimeError, match=r"did not fill the prompt's cache: saebatch needs transformers >= 5.24"):
        prompt_prefix(OldTransformers(), tokenizer, "Slot Machine Game\n\nChoice: ", 2, CPU)


def _mix32_reference(x: int) -> int:
    """MurmurHash3's finaliser in Python integers (an independent check of the tensor version)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_noise_is_exact_integer_hashing_and_uniform():
    keys = torch.tensor([row_key(seed) for seed in (0, 7, 10**15)], dtype=torch.int64)
    uniform = uniform_noise(keys, step=3, vocab=70_000)
    step_key = _mix32_reference((3 * 0x9E3779B9) & 0xFFFFFFFF)
    for r in range(3):
        for v in (0, 1, 4_095, 69_999):
            low, high = (int(half) for half in keys[r])
            row = _mix32_reference(_mix32_reference(low ^ step_key) ^ high)
            hashed = _mix32_reference(row ^ _mix32_reference(v))
            assert uniform[r, v].item() == ((hashed >> 9) + 0.5) / 2**23
    assert stats.kstest(uniform.flatten().numpy(), "uniform").pvalue > 1e-3
    assert not torch.equal(uniform, uniform_noise(keys, step=4, vocab=70_000))


def test_a_left_padded_forward_reads_each_prompt_as_it_reads_it_alone():
    """GPT-2 has absolute positions: a padded prompt must keep positions 0, 1, ... from its first
    real token, or its last-token logits shift."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(Organism().tokenizer()),
                                       n_positions=256)).eval()
    tokenizer = Organism().tokenizer()
    prompts = ["Slot Machine Game\n\nChoice: ", "Game history:\nRound 1: Bet $10, Loss, Balance $90\n\nChoice: "]
    encoded = left_padded(tokenizer, prompts, CPU)
    assert encoded["attention_mask"][0].min() == 0  # the short prompt is padded
    with torch.no_grad():
        together = model(**encoded).logits[:, -1]
        alone = [model(**tokenizer(p, return_tensors="pt")).logits[0, -1] for p in prompts]
        unpositioned = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits[:, -1]
    for row, logits in enumerate(alone):
        torch.testing.assert_close(together[row], logits, rtol=1e-5, atol=1e-5)
    assert (unpositioned[0] - alone[0]).abs().max() > 1e-3  # what the gambling forward did before
