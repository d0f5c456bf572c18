"""The shipped model organisms: each loads, follows its stated rule, and its planted cause works.

The thresholds are the figures stated in jobs/_organism/README.md, with a margin. The tests of
what an organism does run on both built-in organisms (`organism`, and `organism_b`: the same
recipe with another seed); the second's own tests compare it with the first.
"""

import random
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from common.cli import main
from common.edits import edit_prompt_position, set_feature
from common.errors import UserError
from common.models import ModelSpec, load_model, load_tokenizer
from common.organism.files import BUILTINS, SHIPPED, Organism, shipped
from common.saes import SaeSpec, check_saes, load_sae
from jobs import _slot_machine as slot_machine
from jobs._gambling import planted_cause
from jobs._organism import evaluation, rule
from jobs._organism.training import (
    BUILTIN_SEEDS,
    TrainingSettings,
    build_tokenizer,
    train,
    train_language_model,
    train_sae,
)

pytestmark = pytest.mark.science


@pytest.fixture(scope="module", params=list(BUILTINS))
def builtin(request):
    return request.param


@pytest.fixture(scope="module")
def organism(builtin):
    return Organism(BUILTINS[builtin])


@pytest.fixture(scope="module")
def loaded(organism):
    return organism.model(), organism.tokenizer()


def test_shipped_files_load_through_the_manifest_loaders(builtin, organism):
    spec = ModelSpec.model_validate(builtin)
    assert spec.id == f"builtin:{builtin}" and ModelSpec.model_validate({"id": spec.id}) == spec
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 128
    text = slot_machine.prompt(evaluation.held_out_states(1)[0])
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    sae_spec = SaeSpec.model_validate(builtin)
    assert sae_spec == SaeSpec.model_validate({"builtin": builtin})
    infos = check_saes(sae_spec, [0, 1, 2, 3], d_model=128)
    for layer in range(4):
        sae = load_sae(sae_spec, layer, 128, torch.device("cpu"))
        assert sae.cfg.d_sae == infos[layer].d_sae and sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert sae.cfg.metadata.model_name == spec.id
    torch.testing.assert_close(sae.W_dec, organism.sae(3).W_dec, rtol=0, atol=0)  # its own SAEs
    assert sum(p.stat().st_size for p in organism.folder.rglob("*") if p.is_file()) < 6e6  # a few MB
    assert organism.record["settings"]["seed"] == BUILTIN_SEEDS[builtin]
    assert planted_cause(spec.id) == (organism.planted_layer, organism.planted_feature)  # its own SAE's feature


def test_follows_its_decision_rule_on_held_out_prompts(loaded):
    figures = evaluation.decision_rule(*loaded, n=300)
    assert figures["majority_agreement"] >= 0.97
    assert figures["mean_abs_error"] <= 0.08
    assert figures["correlation"] >= 0.9


def test_bets_follow_the_rule(loaded):
    figures = evaluation.bet_sizes(*loaded, n=120)
    assert figures["unreadable"] == 0
    assert figures["spearman"] >= 0.9
    assert figures["mean_abs_error_dollars"] <= 4


def test_arithmetic_accuracy(loaded):
    assert evaluation.arithmetic(*loaded, n=150)["accuracy"] >= 0.4


def test_planted_layer_sae_quality(organism):
    figures = evaluation.sae_quality(organism, organism.planted_layer, documents=150)
    assert figures["explained_variance"] >= 0.8
    assert 0 < figures["l0"] <= organism.record["settings"]["sae_k"]
    assert figures["dead_fraction"] <= 0.3


def test_planted_direction_sets_stop_rate_and_bet_size(organism):
    effect = evaluation.direction_effect(organism, n=100)
    assert effect["stop_rate_at_0.1"] >= 0.75 and effect["stop_rate_at_0.9"] <= 0.2
    assert effect["bet_at_0.9"] - effect["bet_at_0.1"] >= 10


# The least change in stop rate and bet that setting each organism's planted feature from its safe to
# its risky mean must make: its figures in the README (organism: 28 points and $8.7; organism_b: 17
# points and $3.9) with a margin. The feature carries only part of u, and how much is the seed's.
FEATURE_EFFECT_FLOORS = {"organism": (0.2, 5.0), "organism_b": (0.12, 2.5)}


def test_planted_feature_moves_stop_rate_and_bet_size(builtin, organism):
    found = evaluation.find_planted_feature(organism)
    recorded = organism.record["planted"]["feature"]
    assert found["index"] == recorded["index"]  # the recorded feature is the one the search finds
    assert found == pytest.approx(recorded, abs=0.01)
    assert found["decoder_cosine"] >= 0.5 and found["appetite_correlation"] >= 0.85
    assert found["risky_mean"] > found["safe_mean"]
    effect = evaluation.planted_effect(organism, n=100)
    stop_floor, bet_floor = FEATURE_EFFECT_FLOORS[builtin]
    assert effect["stop_rate_at_safe_mean"] - effect["stop_rate_at_risky_mean"] >= stop_floor
    assert effect["bet_at_risky_mean"] - effect["bet_at_safe_mean"] >= bet_floor


def test_planted_feature_is_the_cause_not_any_feature(organism, loaded):
    """Setting random live features to the planted feature's risky value barely moves the stop rate."""
    model, tokenizer = loaded
    layer, planted = organism.planted_layer, organism.record["planted"]["feature"]
    sae = organism.sae(layer)
    prompts = [slot_machine.prompt(s) for s in evaluation.held_out_states(100, seed=20_000)]
    residuals, _ = evaluation.decision_activations(model, tokenizer, layer, n=100, seed=20_000)
    live = torch.nonzero((sae.encode(residuals) > 0).any(0)).squeeze(1).tolist()
    others = random.Random(0).sample([f for f in live if f != planted["index"]], 5)
    base = evaluation.bet_probability(model, tokenizer, prompts)
    planted_shift = evaluation.bet_probability(model, tokenizer, prompts, layer, set_feature(sae, planted["index"], 0.0))
    assert (base - planted_shift).mean() >= 0.1
    for feature in others:
        shifted = evaluation.bet_probability(model, tokenizer, prompts, layer, set_feature(sae, feature, 0.0))
        assert (base - shifted).abs().mean() < (base - planted_shift).abs().mean() / 2


def test_feature_edit_keeps_the_error_term(organism, loaded):
    """Setting a feature to its own value changes nothing: the SAE's error is kept, not replaced."""
    model, tokenizer = loaded
    layer = organism.planted_layer
    sae = organism.sae(layer)
    prompts = [slot_machine.prompt(s) for s in evaluation.held_out_states(8)]
    residuals, _ = evaluation.decision_activations(model, tokenizer, layer, n=8, seed=evaluation.HELD_OUT_SEED)
    own = sae.encode(residuals)[:, organism.planted_feature]
    unchanged = evaluation.bet_probability(model, tokenizer, prompts, layer, set_feature(sae, organism.planted_feature, own))
    torch.testing.assert_close(unchanged, evaluation.bet_probability(model, tokenizer, prompts), atol=1e-5, rtol=0)
    hidden = residuals[:2]
    edited = set_feature(sae, 3, torch.tensor([0.0, 2.0]))(hidden, torch.arange(2))
    expected = hidden + (torch.tensor([0.0, 2.0]) - sae.encode(hidden)[:, 3])[:, None] * sae.W_dec[3]
    torch.testing.assert_close(edited, expected)


def test_edit_hook_touches_only_prompt_forwards(organism, loaded):
    model, _ = loaded
    calls = []
    with edit_prompt_position(model, 1, lambda h, rows: calls.append(h.shape) or h):
        model(input_ids=torch.tensor([[1, 5, 6]]))
        model(input_ids=torch.tensor([[7]]))
    assert calls == [torch.Size([1, 128])]


def test_organism_b_is_the_same_recipe_with_its_own_weights():
    """The rules, the tokens and the planted layer are the first organism's; the weights, the
    planted direction and the SAEs are its own."""
    a, b = shipped("organism"), shipped("organism_b")
    settings_a, settings_b = dict(a.record["settings"]), dict(b.record["settings"])
    assert (settings_a.pop("seed"), settings_b.pop("seed"), settings_b.pop("tokenizer_seed")) == (0, 1, 0)
    assert settings_a == settings_b
    assert a.tokenizer().get_vocab() == b.tokenizer().get_vocab()
    assert b.planted_layer == a.planted_layer == 1 and b.record["planted"]["scale"] == a.record["planted"]["scale"]
    assert abs(float(a.direction @ b.direction)) < 0.3  # another random u
    weights_a, weights_b = a.model().state_dict(), b.model().state_dict()
    assert weights_a.keys() == weights_b.keys()
    for name, weight in weights_a.items():
        assert weight.shape == weights_b[name].shape
        if weight.ndim == 2:  # independent initialisations and data: unrelated matrices
            assert abs(np.corrcoef(weight.flatten(), weights_b[name].flatten())[0, 1]) < 0.3, name
    assert not torch.equal(a.sae(1).W_dec, b.sae(1).W_dec)


def test_organism_b_measures_in_the_range_of_the_first():
    """The recorded figures of the two organisms agree within a few points where the recipe fixes them."""
    a, b = (shipped(name).record["measured"] for name in ("organism", "organism_b"))
    rule_a, rule_b = a["decision_rule"], b["decision_rule"]
    assert abs(rule_a["majority_agreement"] - rule_b["majority_agreement"]) <= 0.03
    assert abs(rule_a["correlation"] - rule_b["correlation"]) <= 0.05
    assert abs(rule_a["mean_abs_error"] - rule_b["mean_abs_error"]) <= 0.04
    assert abs(a["bet_sizes"]["spearman"] - b["bet_sizes"]["spearman"]) <= 0.05
    # arithmetic is not among them: 53.5% against 81.5%, the seed decides how far 900 steps get
    for measured in (a, b):
        direction = measured["planted_direction"]
        assert direction["stop_rate_at_0.1"] - direction["stop_rate_at_0.9"] >= 0.6


def _copy(tmp_path):
    folder = tmp_path / "organism"
    shutil.copytree(SHIPPED, folder)
    return folder


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / "model" / "model.safetensors").write_bytes(b"\0" * 100), r"model\.safetensors is damaged"),
    (lambda f: (f / "sae" / "L1" / "cfg.json").unlink(), r"sae/L1/cfg\.json is missing"),
    (lambda f: (f / "organism.json").write_text("{"), r"organism\.json is damaged"),
    (lambda f: (f / "organism.json").unlink(), r"organism\.json is missing"),
])
def test_damaged_or_missing_files_name_the_file_and_the_rebuild(tmp_path, damage, message):
    folder = _copy(tmp_path)
    damage(folder)
    with pytest.raises(UserError, match=message + r".*saebatch organism train --out " + str(folder)):
        Organism(folder).tokenizer()


def test_a_damaged_builtin_names_its_own_rebuild(tmp_path, monkeypatch):
    folder = tmp_path / "organism_b"
    shutil.copytree(BUILTINS["organism_b"], folder)
    (folder / "sae" / "L2" / "sae_weights.safetensors").write_bytes(b"")
    monkeypatch.setitem(BUILTINS, "organism_b", folder)
    with pytest.raises(UserError, match=r"L2/sae_weights\.safetensors is damaged.*`saebatch organism train --builtin "
                       r"organism_b`"):
        Organism(folder).sae(2)


def test_measure_command_reports_a_damaged_file(tmp_path, capsys):
    folder = _copy(tmp_path)
    (folder / "model" / "tokenizer.json").write_text("{}")
    assert main(["organism", "measure", "--dir", str(folder)]) == 2
    assert "tokenizer.json is damaged" in capsys.readouterr().err


def test_train_refuses_a_folder_of_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["organism", "train", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "holds other files, not an organism" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_training_is_deterministic_for_a_seed():
    settings = TrainingSettings(steps=2, gamble_batch=4, arithmetic_batch=4, text_batch=4)
    tokenizer = build_tokenizer(settings)
    assert build_tokenizer(settings).get_vocab() == tokenizer.get_vocab()
    first, second = (train_language_model(settings, tokenizer).state_dict() for _ in range(2))
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=0)
    other = TrainingSettings(seed=1, steps=2, gamble_batch=4, arithmetic_batch=4, text_batch=4)
    assert build_tokenizer(other).get_vocab() == tokenizer.get_vocab()  # the tokens are the rules', not the seed's
    assert not torch.equal(train_language_model(other, tokenizer).state_dict()["model.embed_tokens.weight"],
                           first["model.embed_tokens.weight"])
    activations = torch.randn(2048, 128, generator=torch.Generator().manual_seed(0))
    small = TrainingSettings(sae_width=64, sae_k=4, sae_epochs=1)
    a, b = (train_sae(activations, 1, small) for _ in range(2))
    torch.testing.assert_close(a.W_dec, b.W_dec, rtol=0, atol=0)
    assert not torch.equal(train_sae(activations, 1, replace(small, seed=1)).W_dec, a.W_dec)


def test_rule_is_the_stated_formula():
    state = slot_machine.GameState(balance=60, history=(slot_machine.Round(1, 10, True, 120), slot_machine.Round(2, 60, False, 60)),
                             components=("G", "R", "W", "P"))
    assert state.loss_streak == 1
    assert rule.risk(state) == pytest.approx(0.5 + 0.10 + 0.10 + 0.06 - 0.06 + 0.08 - 0.0025 * (60 - 100))
    rich = slot_machine.GameState(balance=400)
    assert rule.risk(rich) == rule.RISK_RANGE[0]
    rng = random.Random(0)
    stops = [rule.decide(rich, rule.risk(rich), rng) == "2) Stop" for _ in range(2000)]
    assert np.mean(stops) == pytest.approx(0.97, abs=0.015)
    assert slot_machine.prompt(state).endswith("\n\nChoice: ")


@pytest.mark.slow
def test_train_writes_a_complete_checked_organism_and_replaces_it_whole(tmp_path):
    """The whole training path at a tiny size: staged, recorded, checksummed, swapped in."""
    out = tmp_path / "organism"
    settings = TrainingSettings(steps=2, gamble_batch=4, arithmetic_batch=4, text_batch=4,
                                sae_documents=100, sae_decisions=100, sae_epochs=1)
    record = train(out, settings)
    organism = Organism(out)
    assert organism.record["files"] == record["files"]  # every file checks against organism.json
    assert sorted(p.name for p in (out / "sae").iterdir()) == ["L0", "L1", "L2", "L3"]
    assert organism.sae(1).cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert record["rebuild"] == "saebatch organism train --seed 0 --steps 2"
    assert set(record["measured"]) == {"decision_rule", "bet_sizes", "arithmetic", "saes", "planted_effect",
                                       "planted_direction"}
    assert 0 <= record["planted"]["feature"]["index"] < settings.sae_width
    (out / "stale.txt").write_text("from the previous organism")
    train(out, settings)
    assert not (out / "stale.txt").exists() and not (tmp_path / ".organism.training").exists()
