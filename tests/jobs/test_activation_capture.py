"""activation_capture (the reasoning chain's step 1) on the two organisms: the captured activations
against an independent forward of each, another architecture, and refusals.

The demo chain runs once per session (conftest's `reasoning_chain`).
"""

import h5py
import numpy as np
import pytest
import torch

from common.organism.files import Organism, shipped
from common.plan import WorkUnit
from jobs._reasoning import ModelEntry, units_per_model
from tests.jobs.reasoning import demo_benchmark, read_csv, refused, write_step


@pytest.mark.parametrize("name", ["organism", "organism_b"])  # the demo's two models, each its own weights
@pytest.mark.parametrize("item", [0, 299, 599])  # items of different units and shards
def test_captured_activations_equal_an_independent_forward(reasoning_chain, name, item):
    organism = shipped(name)
    model, tokenizer = organism.model(attn_implementation=None), organism.tokenizer()
    bench = demo_benchmark()
    prompt, solution = bench.prompt(bench.items[item]), bench.continuation(bench.items[item])
    # each tokenized on its own, as when the model writes the solution after the prompt
    ids = torch.tensor([tokenizer(prompt).input_ids + tokenizer(solution, add_special_tokens=False).input_ids])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # [L + 1]: block L's output
    with h5py.File(reasoning_chain.capture.merged_path, "r") as merged:
        group = merged[f"models/{name}"]
        rows = np.flatnonzero((group["item"][()] == item) & (group["benchmark"][()] == 0))  # the arithmetic
        assert group["position"][()][rows].tolist() == list(range(1, ids.shape[1]))  # every token but <bos>
        for layer in (1, 2):
            captured = group[f"L{layer}"][()][rows].astype(np.float32)
            expected = hidden[layer + 1][0, 1:].numpy()
            np.testing.assert_allclose(captured, expected, rtol=2e-3, atol=2e-2)


def test_capture_refuses_bad_models_and_benchmarks(tmp_path, capsys):
    models = [{"name": "organism", "model": "organism", "layers": []}]
    refused(capsys, write_step(tmp_path, "reasoning_1_capture.yaml", "activation_capture", {"models": models}),
            "activation_capture.models[0].layers: model 'organism' has no layers configured")
    missing = [{"name": "gsm8k", "format": "gsm8k", "path": str(tmp_path / "nope.jsonl")}]
    refused(capsys, write_step(tmp_path, "reasoning_1_capture.yaml", "activation_capture", {"benchmarks": missing}),
            f"activation_capture.benchmarks[0].path: {tmp_path / 'nope.jsonl'} does not exist")
    refused(capsys, write_step(tmp_path, "reasoning_1_capture.yaml", "activation_capture", {"max_tokens": 4096}),
            "activation_capture.max_tokens: 4096 exceeds organism's")


def test_another_architecture_and_a_model_no_longer_at_hand(tmp_path, monkeypatch):
    """A tiny GPT-2 (blocks under transformer.h) is captured; when its folder is gone, training
    still runs and reports the CE loss recovered as not measured."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.helpers import run_all

    tokenizer = Organism().tokenizer()
    folder = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    capture = write_step(tmp_path, "reasoning_1_capture.yaml", "activation_capture", {
        "models": [{"name": "tiny-gpt2", "model": {"path": str(folder)}, "layers": [0, 1]}],
        "benchmarks": [{"name": "arithmetic", "builtin": "organism_arithmetic", "n": 40, "max_new_tokens": 8}],
        "items_per_unit": 20})
    captured = run_all(capture)
    with h5py.File(captured.merged_path, "r") as merged:
        assert merged["models/tiny-gpt2/L1"].shape[1] == 32 and merged["models/tiny-gpt2/L1"].shape[0] > 1000
    folder.rename(tmp_path / "moved")
    training = write_step(tmp_path, "reasoning_2_training.yaml", "sae_training", {
        "sae": {"activation": "relu", "expansion_factor": 2, "epochs": 2, "batch_size": 128}})
    metrics = read_csv(run_all(training).report_dir / "metrics.csv")
    assert [row["layer"] for row in metrics] == [0, 1]
    assert all(np.isnan(row["ce_recovered"]) and row["explained_variance"] > 0 for row in metrics)


def test_a_task_visits_each_model_once_with_its_pending_units_only():
    """What every reasoning step's shard loops over: a model whose units are all written (a resumed
    task) is not loaded at all, and each other model gets its own pending units, in order."""
    models = [ModelEntry(name=name, model="organism") for name in ("a", "b", "c")]
    units = [WorkUnit(f"{model}.{bench}", {"model": model, "benchmark": bench}) for model in "abc" for bench in (0, 1)]
    visits = [(entry.name, [unit.id for unit in units_left])
              for entry, units_left in units_per_model(models, units, ["c.1", "a.0", "a.1"])]
    assert visits == [("a", ["a.0", "a.1"]), ("c", ["c.1"])]


def test_a_model_whose_name_begins_another_s_keeps_its_own_tokens(tmp_path, monkeypatch):
    """Models 'organism' and 'organism.b': the merged file holds each one's tokens once, under its
    own name (units are a model's by the model they captured, not by a name's prefix)."""
    from tests.helpers import run_all

    monkeypatch.chdir(tmp_path)
    capture = write_step(tmp_path, "reasoning_1_capture.yaml", "activation_capture", {
        "models": [{"name": "organism", "model": "organism", "layers": [1]},
                   {"name": "organism.b", "model": "organism_b", "layers": [1]}],
        "benchmarks": [{"name": "arithmetic", "builtin": "organism_arithmetic", "n": 20, "max_new_tokens": 8}],
        "items_per_unit": 10})
    with h5py.File(run_all(capture).merged_path, "r") as merged:
        first, second = merged["models/organism"], merged["models/organism.b"]
        assert len(first["item"]) == len(second["item"])  # the same texts, tokenized alike
        keys = list(zip(first["item"][()], first["position"][()], strict=True))
        assert len(keys) == len(set(keys))  # no token twice
        assert not np.allclose(first["L1"][()], second["L1"][()])  # each its own model's activations


def test_activations_beyond_float16_are_refused_and_float32_stores_them(monkeypatch):
    """The organism's embeddings scaled by 10^6: its residual stream exceeds float16's 65,504, which
    a float16 capture refuses (naming the field and the fix) rather than store inf; float32 stores
    the values themselves."""
    from common.errors import UserError
    from jobs.activation_capture import Settings, capture_items

    organism = shipped("organism")
    model, tokenizer = organism.model(attn_implementation=None), organism.tokenizer()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e6)
    entry = ModelEntry(name="organism", model="organism", layers=[0])
    settings = {"models": [entry], "benchmarks": [{"name": "arithmetic", "builtin": "organism_arithmetic", "n": 4}]}
    with pytest.raises(UserError, match=r"activation_capture.dtype: organism's layer 0 reaches \|[\d,]+\|, beyond "
                                        r"float16's range \(65,504\), .* set dtype: float32"):
        capture_items(model, tokenizer, entry, demo_benchmark(), range(2), Settings(**settings))
    captured = capture_items(model, tokenizer, entry, demo_benchmark(), range(2), Settings(**settings, dtype="float32"))
    assert captured["L0"].dtype == np.float32 and np.isfinite(captured["L0"]).all()
    assert np.abs(captured["L0"]).max() > 65504
