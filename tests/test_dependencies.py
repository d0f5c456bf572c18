"""Dependencies that keep working: no deprecated transformers API on the cached paths, and bounds in
pyproject.toml that agree with the exact pins of containers/constraints.txt."""

import random
import re
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement

from common.choices import NumberReader
from common.generation import prompt_prefix, sample
from common.organism.files import Organism
from jobs import _slot_machine as slot_machine
from jobs._organism import corpus
from jobs.population_patching import Row, expected_bets
from tests.helpers import REPO

CPU = torch.device("cpu")
CONSTRAINTS = REPO / "containers" / "constraints.txt"


# A deprecated argument still works until the release that removes it: failing on its warning now
# is what keeps a later install from breaking (transformers warns with FutureWarning).
@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
def test_the_cached_forwards_use_no_deprecated_argument():
    organism = Organism()
    model, tokenizer = organism.model(attn_implementation=None), organism.tokenizer()
    prompt = slot_machine.prompt(corpus.random_state(random.Random(5)))
    prefix = prompt_prefix(model, tokenizer, prompt, 2, CPU)  # a forward filling a cache
    assert len(sample(model, tokenizer, [prompt] * 2, [0, 1], 1.0, 3, CPU, prefix=prefix)) == 2  # generate from it
    settings = SimpleNamespace(bet_amounts=[5, 10], batch_size=4, temperature=0.7, patch_generated=False)
    read = expected_bets(model, tokenizer, {}, [Row("baseline", "none", 0, 0)], prompt,  # a forward reading one
                         NumberReader(tokenizer, "1) Bet ${number}", settings.bet_amounts), settings, CPU)
    assert read["bet_mass"].shape == (1,)


def _pins() -> dict[str, str]:
    """containers/constraints.txt as {normalized name: version}; every line must be an exact pin."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
            assert match, f"not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def test_every_dependency_has_a_tested_upper_bound_that_its_pin_satisfies():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    requirements += [Requirement(line) for extra in project["optional-dependencies"].values() for line in extra]
    pins = _pins()
    assert "saebatch" not in pins  # the project itself is installed from the checkout
    for requirement in requirements:
        if requirement.name == "saebatch":  # an extra that includes another (dev includes test)
            continue
        assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), \
            f"{requirement} has no upper bound"
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement.name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{requirement.name}=={pins[name]} in {CONSTRAINTS.name} is outside pyproject's {requirement.specifier}"

