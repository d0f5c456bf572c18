"""Exact option probabilities at the decision cue: which tokens count, and the probabilities they give."""

import random

import numpy as np
import pytest
import torch
from scipy import stats

from common.choices import OptionReader
from common.generation import sample
from common.organism import synthetic
from common.organism.files import Organism
from jobs._gambling import OPTION_LABELS


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
    prompt = synthetic.prompt(synthetic.random_state(random.Random(11)))
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits[:, -1]
    read = OptionReader(tokenizer, OPTION_LABELS)(logits, temperature=0.7)
    first = sample(model, tokenizer, [prompt] * 600, list(range(600)), 0.7, 1, torch.device("cpu"))
    stops = sum(text.lstrip().startswith("2") for text in first)
    expected = float(read["stop"][0] * read["coverage"][0])
    assert 0.05 < expected < 0.95  # a prompt where both options are live
    assert stats.binomtest(stops, 600, expected).pvalue > 1e-3
