"""Exact option probabilities at the decision cue and expected bets: which tokens count, and the
probabilities they give, against independent forwards and sampled answers."""

import random

import numpy as np
import pytest
import torch
from scipy import stats

from common.choices import NumberReader, OptionReader
from common.generation import prompt_prefix, sample
from common.organism.files import Organism
from jobs import _slot_machine as slot_machine
from jobs._gambling import OPTION_LABELS
from jobs._gambling_parser import parse
from jobs._organism import corpus


@pytest.fixture(scope="module")
def organism():
    return Organism().model(attn_implementation=None), Organism().tokenizer()


def test_an_option_counts_the_tokens_that_start_its_label(organism):
    _, tokenizer = organism
    reader = OptionReader(tokenizer, OPTION_LABELS)
    texts = {token: tokenizer.decode([token]) for token in range(len(tokenizer))}
    for option, label in OPTION_LABELS.items():
        counted = {texts[int(token)] for token in reader.tokens[option]}
        assert counted and all(text.lstrip().startswith(label) for text in counted)
        assert not any(text.lstrip()[len(label):][:1].isdigit() for text in counted)  # "10" is not option 1
        missed = [text for token, text in texts.items() if text.lstrip().startswith(label)
                  and not text.lstrip()[len(label):][:1].isdigit() and int(token) not in reader.tokens[option]]
        assert missed == []
    assert any(text.startswith(" ") for text in (texts[int(t)] for t in reader.tokens["bet"]))  # " 1" counts


def test_probabilities_are_the_options_softmax_mass_renormalised(organism):
    _, tokenizer = organism
    reader = OptionReader(tokenizer, OPTION_LABELS)
    logits = torch.randn(3, len(tokenizer), generator=torch.Generator().manual_seed(0)) * 3
    read = reader(logits, temperature=0.7)
    softmax = np.exp(logits.double().numpy() / 0.7)
    softmax /= softmax.sum(1, keepdims=True)
    bet, stop = (softmax[:, reader.tokens[o].numpy()].sum(1) for o in ("bet", "stop"))
    np.testing.assert_allclose(read["stop"].numpy(), stop / (bet + stop), rtol=1e-12)
    np.testing.assert_allclose(read["coverage"].numpy(), bet + stop, rtol=1e-12)
    np.testing.assert_allclose(read["bet"].numpy() + read["stop"].numpy(), 1.0)


def test_exact_probability_predicts_how_sampled_answers_start(organism):
    """600 sampled first tokens at the cue: the share that starts option 2 matches P(stop) x coverage."""
    model, tokenizer = organism
    prompt = slot_machine.prompt(corpus.random_state(random.Random(11)))
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits[:, -1]
    read = OptionReader(tokenizer, OPTION_LABELS)(logits, temperature=0.7)
    first = sample(model, tokenizer, [prompt] * 600, list(range(600)), 0.7, 1, torch.device("cpu"))
    stops = sum(text.lstrip().startswith("2") for text in first)
    expected = float(read["stop"][0] * read["coverage"][0])
    assert 0.05 < expected < 0.95  # a prompt where both options are live
    assert stats.binomtest(stops, 600, expected).pvalue > 1e-3


def _variable_prompt(seed: int) -> str:
    rng = random.Random(seed)
    while True:
        state = corpus.random_state(rng)
        if state.bet_type == "variable":
            return slot_machine.prompt(state)


def test_number_reader_is_the_teacher_forced_chance_of_each_whole_amount(organism):
    """Against an independent forward per candidate answer, on the full prompt and answer."""
    model, tokenizer = organism
    prompt, amounts = _variable_prompt(3), [5, 10, 15, 20, 50, 100]
    reader = NumberReader(tokenizer, "1) Bet ${number}", amounts)
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    cache = prompt_prefix(model, tokenizer, prompt, len(amounts), torch.device("cpu"))
    with torch.no_grad():
        read = reader(model(input_ids=reader.inputs(int(prompt_ids[0, -1])), cache=cache).logits, 0.7)
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
    continues = torch.tensor([text[:1].isdigit() or (text[:1] in ".," and text[1:2].isdigit()) for text in texts])
    chances = []
    for amount in amounts:
        answer = tokenizer(f"1) Bet ${amount}", add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt_ids, answer], 1)).logits[0, prompt_ids.shape[1] - 1:]
        probabilities = torch.softmax(logits.double() / 0.7, -1)
        written = probabilities[torch.arange(answer.shape[1]), answer[0]].prod()
        chances.append(float(written * (1 - probabilities[-1, continues].sum())))
    chances = np.array(chances)
    assert read["mass"][0] == pytest.approx(chances.sum(), rel=1e-4)  # float32 logits, cached or not
    assert read["expected"][0] == pytest.approx((chances * amounts).sum() / chances.sum(), rel=1e-4)
    with pytest.raises(ValueError, match="must end with its number"):
        NumberReader(tokenizer, "Bet ${number} now", amounts)
    with torch.no_grad():  # a model whose logits are wider than the tokenizer (padded vocabularies, stand-ins)
        logits = model(input_ids=reader.inputs(int(prompt_ids[0, -1])),
                       cache=prompt_prefix(model, tokenizer, prompt, len(amounts), torch.device("cpu"))).logits
    padded = reader(torch.cat([logits, torch.full((*logits.shape[:2], 300), -30.0)], dim=-1), 0.7)
    assert float(padded["expected"][0]) == pytest.approx(float(read["expected"][0]), rel=1e-6)


def test_the_expected_bet_predicts_the_sampled_bets(organism):
    """The organism bets in $5 steps: over $5-$100 the candidates hold nearly all of its bets, and
    400 sampled bets average what the reader expects."""
    model, tokenizer = organism
    prompt, amounts = _variable_prompt(8), list(range(5, 101, 5))
    reader = NumberReader(tokenizer, "1) Bet ${number}", amounts)
    cache = prompt_prefix(model, tokenizer, prompt, len(amounts), torch.device("cpu"))
    last = int(tokenizer(prompt, return_tensors="pt").input_ids[0, -1])
    with torch.no_grad():
        read = reader(model(input_ids=reader.inputs(last), cache=cache).logits, 0.7)
        options = OptionReader(tokenizer, OPTION_LABELS)(model(**tokenizer(prompt, return_tensors="pt")).logits[:, -1], 0.7)
    assert read["mass"][0] > 0.9 * options["bet"][0] * options["coverage"][0]
    answers = sample(model, tokenizer, [prompt] * 400, list(range(400)), 0.7, 8, torch.device("cpu"))
    bets = np.array([parse(answer, "variable").bet for answer in answers if parse(answer, "variable").action == "bet"],
                    dtype=float)
    assert len(bets) > 100
    assert abs(bets.mean() - float(read["expected"][0])) < 3 * bets.std() / np.sqrt(len(bets))
