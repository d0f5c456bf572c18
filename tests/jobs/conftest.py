"""Fixtures the job tests share."""

import pytest

from common.organism.files import Organism


@pytest.fixture(scope="module")
def organism_model():
    """The built-in organism's model (eager attention) and tokenizer, loaded once per module."""
    organism = Organism()
    return organism.model(attn_implementation=None), organism.tokenizer()
