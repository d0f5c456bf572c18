"""Seeded sampling: the right distribution, a row's draw independent of its batch, and the decode
loop writing what transformers' generate writes while finished rows leave the batch."""

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from scipy import stats

from common.edits import (
    BatchRows,
    edit_block_output,
    edit_prompt_position,
    set_feature,
    zero_features,
)
from common.generation import (
    SeededNoise,
    decode,
    end_tokens,
    greedy,
    left_padded,
    prefill,
    prompt_prefix,
    row_key,
    sample,
    seed_of,
    uniform_noise,
)
from common.layers import decoder_blocks
from common.organism.files import Organism
from common.saes import SaeSpec, load_sae
from jobs import _slot_machine as slot_machine
from jobs._gambling import ANSWER_ENDS
from jobs._organism import arithmetic, corpus
from jobs.population_patching import PROMPTS, row_edits
from jobs.population_patching import Row as PatchRow

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def organism():
    return Organism().model(attn_implementation=None), Organism().tokenizer()


def test_first_tokens_follow_softmax_at_the_temperature(organism):
    model, tokenizer = organism
    prompt = slot_machine.prompt(corpus.random_state(random.Random(3)))
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
    prompts = [slot_machine.prompt(corpus.random_state(rng)) for _ in range(8)]
    together = sample(model, tokenizer, prompts, list(range(8)), 1.0, 20, CPU)
    reversed_batch = sample(model, tokenizer, prompts[::-1], list(range(8))[::-1], 1.0, 20, CPU)[::-1]
    alone = [sample(model, tokenizer, [p], [seed], 1.0, 20, CPU)[0] for seed, p in enumerate(prompts)]
    assert together == reversed_batch == alone
    other_seeds = sample(model, tokenizer, prompts, list(range(100, 108)), 1.0, 20, CPU)
    assert other_seeds != together


def test_a_stop_string_ends_each_row_where_it_writes_it(organism):
    model, tokenizer = organism
    rng = random.Random(1)
    prompts = [arithmetic.problem_prompt(arithmetic.problem(rng).question) for _ in range(4)]
    whole = sample(model, tokenizer, prompts, [0, 1, 2, 3], 0.7, 40, CPU)
    cut = sample(model, tokenizer, prompts, [0, 1, 2, 3], 0.7, 40, CPU, stop_strings=("####",))
    assert all("####" in text and len(text.strip().splitlines()) == 2 for text in whole)  # working, then answer
    assert cut == [text[: text.index("####") + 4] for text in whole]
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sample(model, tokenizer, ["a", "b"], [0], 1.0, 5, CPU)


def test_a_stop_string_is_looked_for_in_the_answer_not_across_the_prompts_end(organism):
    """The prompt's last line break and the answer's first make a blank line, but the answer, read
    without its prompt, has none there: it runs on to its own."""
    model, tokenizer = organism
    newline, seven = (tokenizer(text, add_special_tokens=False).input_ids for text in ("\n", "7"))
    script = torch.tensor(newline + seven + newline + newline + seven + seven)

    def written(scores: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        return script[step].repeat(len(rows))

    assert decode(model, tokenizer, ["Question: 3 + 4?\nAnswer:\n"], written, 6, CPU, ("\n\n",), None, None) == ["\n7\n\n"]


def test_a_shared_prompt_prefix_draws_what_a_full_prompt_draws(organism):
    model, tokenizer = organism
    prompt = slot_machine.prompt(corpus.random_state(random.Random(5)))
    seeds = list(range(10))
    prefix = prompt_prefix(model, tokenizer, prompt, len(seeds), CPU)
    shared = sample(model, tokenizer, [prompt] * 10, seeds, 1.0, 20, CPU, prefix=prefix)
    assert shared == sample(model, tokenizer, [prompt] * 10, seeds, 1.0, 20, CPU)
    with pytest.raises(ValueError, match="a prefix cache serves rows that all have the prompt it was made of"):
        sample(model, tokenizer, ["Slot Machine Game\n\nChoice: "] * 10, seeds, 1.0, 5, CPU, prefix=prefix)


def test_prefilled_prompts_draw_what_the_prompts_draw(organism):
    """gambling_games reads each prompt's last logits and activations, then samples on from that
    forward's cache: the answers must be those of sampling from the prompts."""
    model, tokenizer = organism
    rng = random.Random(6)
    prompts = [slot_machine.prompt(corpus.random_state(rng)) for _ in range(12)]
    seeds = list(range(12))
    prompted = prefill(model, tokenizer, prompts, CPU, new_tokens=20)
    with torch.no_grad():
        alone = model(**tokenizer(prompts[3], return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(prompted.logits[3], alone, rtol=1e-4, atol=1e-4)
    assert sample(model, tokenizer, prompts, seeds, 1.0, 20, CPU, prefix=prompted) == \
        sample(model, tokenizer, prompts, seeds, 1.0, 20, CPU)
    with pytest.raises(ValueError, match="prefilled prompts serve those prompts"):
        sample(model, tokenizer, prompts[::-1], seeds, 1.0, 5, CPU, prefix=prefill(model, tokenizer, prompts, CPU, 5))
    with pytest.raises(ValueError, match="a prefix serves one decode"):
        sample(model, tokenizer, prompts, seeds, 1.0, 20, CPU, prefix=prompted)  # its cache holds the answers now


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

    old = OldTransformers()
    old.generation_config = model.generation_config
    refused = r"did not fill the prompt's cache: saebatch needs transformers >= 5.24"
    with pytest.raises(RuntimeError, match=refused):
        prompt_prefix(old, tokenizer, "Slot Machine Game\n\nChoice: ", 2, CPU)
    with pytest.raises(RuntimeError, match=refused):
        prefill(old, tokenizer, ["Slot Machine Game\n\nChoice: "], CPU, new_tokens=5)
    with pytest.raises(RuntimeError, match=refused):
        sample(old, tokenizer, ["Slot Machine Game\n\nChoice: "], [0], 1.0, 5, CPU)


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


# ---------------------------------------------------------------- the decode loop against transformers' generate


def generate_reference(model, tokenizer, prompts: list[str], seeds: list[int] | None, temperature: float,
                       max_new_tokens: int, stop_strings: tuple[str, ...] = ()) -> list[str]:
    """The path before rows left the batch, as an independent check: transformers' `generate`
    with the same noise as a logits processor (greedy when `seeds` is None), every row to the end."""
    from transformers import GenerationConfig, LogitsProcessorList

    noise = SeededNoise(seeds, temperature, CPU) if seeds is not None else None
    steps = iter(range(max_new_tokens))

    def perturb(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return noise(scores.float(), torch.arange(len(ids)), next(steps))

    encoded = left_padded(tokenizer, prompts, CPU)
    encoded.pop("position_ids")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=end_tokens(model, tokenizer), stop_strings=list(stop_strings) or None)
    with torch.no_grad():
        output = model.generate(**encoded, generation_config=config, tokenizer=tokenizer,
                                logits_processor=LogitsProcessorList([perturb] if noise else []))
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


@contextmanager
def batch_sizes(model) -> Iterator[list[int]]:
    """The number of rows of every forward while inside."""
    sizes: list[int] = []
    handle = decoder_blocks(model)[0].register_forward_pre_hook(lambda _module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


@pytest.mark.parametrize("every_token", [False, True])
def test_patched_answers_equal_generates_while_finished_rows_leave(organism, every_token):
    """population_patching's path (shared prefix, per-row feature edits, rows dropping out) writes
    what generate writes with the full batch to the end, under the same edits."""
    model, tokenizer = organism
    sae = Organism().sae(1)
    text = PROMPTS[1].text  # a fixed bet: "2) Stop" ends 3 tokens before "1) Bet $10"
    batch = [PatchRow(f"L1_F{feature}", "safe", 1, trial, layer=1 if feature else -1, feature=feature, value=value)
             for feature, value in ((402, 0.5), (402, 3.0), (90, 2.0), (0, 0.0)) for trial in range(12)]
    seeds = list(range(len(batch)))
    prefix = prompt_prefix(model, tokenizer, text, len(batch), CPU)
    with row_edits(model, {1: sae}, batch, every_token) as rows, batch_sizes(model) as sizes:
        fast = sample(model, tokenizer, [text] * len(batch), seeds, 0.7, 40, CPU, stop_strings=ANSWER_ENDS,
                      prefix=prefix, batch=rows)
    with row_edits(model, {1: sae}, batch, every_token):
        slow = generate_reference(model, tokenizer, [text] * len(batch), seeds, 0.7, 40, stop_strings=ANSWER_ENDS)
    assert fast == slow
    assert sizes[0] == len(batch) and min(sizes) < len(batch)  # rows that had ended left the batch
    unedited = sample(model, tokenizer, [text] * len(batch), seeds, 0.7, 40, CPU, stop_strings=ANSWER_ENDS)
    assert fast[36:] == unedited[36:] and fast[:36] != unedited[:36]  # the edits took: feature 0's rows are the unedited


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(Organism().tokenizer()), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def test_sampled_answers_of_a_random_llama_equal_generates_under_per_row_edits_of_every_token():
    """Different left-padded prompts, a per-row edit of every generated token on a subset of rows,
    and a stop string that ends rows at scattered steps: the rows that stay keep their own edits."""
    model, tokenizer = tiny_llama(), Organism().tokenizer()
    sae = load_sae(SaeSpec(random={"architecture": "topk", "d_sae": 96, "k": 8}), 1, 64, CPU)
    rng = random.Random(2)
    prompts = [slot_machine.prompt(corpus.random_state(rng))[: rng.randint(40, 200)] for _ in range(24)]
    seeds, edited = [seed_of(7, row) for row in range(24)], torch.arange(0, 24, 2)
    features, values = torch.arange(24) * 3, torch.linspace(0.0, 4.0, 24)

    def answers(fast: bool) -> list[str]:
        rows = BatchRows(len(prompts))
        with edit_prompt_position(model, 1, set_feature(sae, features, values), rows=edited, every_token=True,
                                  batch=rows):
            if fast:
                return sample(model, tokenizer, prompts, seeds, 1.0, 24, CPU, stop_strings=("e",), batch=rows)
            return generate_reference(model, tokenizer, prompts, seeds, 1.0, 24, stop_strings=("e",))

    fast = answers(fast=True)
    assert fast == answers(fast=False)
    assert len({len(tokenizer(text, add_special_tokens=False).input_ids) for text in fast}) > 5  # ends are scattered
    plain = sample(model, tokenizer, prompts, seeds, 1.0, 24, CPU, stop_strings=("e",))
    assert fast[1::2] == plain[1::2] and fast[::2] != plain[::2]


def test_greedy_answers_under_ablation_equal_generates(organism):
    """feature_ablation's path: zero-ablation of per-row feature sets at every position, greedy."""
    model, tokenizer = organism
    sae = Organism().sae(1)
    rng = random.Random(4)
    prompts = [arithmetic.problem_prompt(arithmetic.problem(rng).question) for _ in range(6) for _ in range(3)]
    chosen = torch.zeros(len(prompts), sae.cfg.d_sae, dtype=torch.bool)
    chosen[1::3, :40] = True  # a third of the rows lose 40 features, another third 5, the rest nothing
    chosen[2::3, 100:105] = True
    stops = ("####",)

    def answers(fast: bool) -> list[str]:
        rows = BatchRows(len(prompts))
        with edit_block_output(model, 1, zero_features(sae, chosen), batch=rows):
            if fast:
                return greedy(model, tokenizer, prompts, 48, CPU, stop_strings=stops, batch=rows)
            return generate_reference(model, tokenizer, prompts, None, 1.0, 48, stop_strings=stops)

    fast = answers(fast=True)
    assert fast == answers(fast=False)
    assert fast[1::3] != fast[::3]  # the ablation changed answers


def test_an_edit_refuses_a_batch_that_lost_rows_it_was_not_told_of(organism):
    model, tokenizer = organism
    sae = Organism().sae(1)
    batch = [PatchRow("L1_F402", "safe", 1, trial, layer=1, feature=402, value=2.0) for trial in range(48)]
    with row_edits(model, {1: sae}, batch, every_token=True), pytest.raises(RuntimeError, match="dropped rows"):
        sample(model, tokenizer, [PROMPTS[1].text] * 48, list(range(48)), 1.0, 40, CPU, stop_strings=ANSWER_ENDS)


def test_a_text_ends_at_the_tokens_the_generation_config_names():
    model, tokenizer = tiny_llama(), Organism().tokenizer()
    assert end_tokens(model, tokenizer) == [2]
    model.generation_config.eos_token_id = [2, 7]
    assert end_tokens(model, tokenizer) == [2, 7]
    encoded = tokenizer("Slot Machine Game\n\nChoice: ", return_tensors="pt")
    with torch.no_grad():
        written = model.generate(**encoded, max_new_tokens=30, do_sample=False, pad_token_id=0)[0, encoded.input_ids.shape[1]:]
    end = next(i for i in range(2, 30) if written[i] not in written[:i])  # a token not written before
    model.generation_config.eos_token_id = [2, int(written[end])]
    assert greedy(model, tokenizer, ["Slot Machine Game\n\nChoice: "], 30, CPU) == [tokenizer.decode(written[: end + 1])]


def test_noise_falls_back_to_eager_operations_where_compiling_fails(monkeypatch, caplog):
    """On a GPU the hash is compiled into one kernel; a platform whose compiler fails must still
    sample, with the same values."""
    import common.generation as generation

    def broken(*tensors):
        raise RuntimeError("triton: no compiler found")

    keys = torch.tensor([row_key(seed) for seed in (3, 4)], dtype=torch.int64)
    expected = uniform_noise(keys, step=2, vocab=1000)
    monkeypatch.setattr(generation, "_COMPILED", {"cpu": broken})  # as a GPU's compiled hash that fails
    assert torch.equal(uniform_noise(keys, step=2, vocab=1000), expected)
    assert "compiling the sampling noise failed (triton: no compiler found)" in caplog.text
    assert generation._COMPILED["cpu"] is generation._uniforms  # the later steps go straight to the eager hash
