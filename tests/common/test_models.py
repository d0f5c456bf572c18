"""Models with random weights at an architecture's shapes (dry runs and benchmarks), and tokenizer errors."""

import json
from importlib import resources

import numpy as np
import pytest
import torch

from common.errors import UserError
from common.models import (
    Architecture,
    ModelSpec,
    architecture_key,
    count_parameters,
    hf_config,
    load_config,
    load_model,
    load_tokenizer,
    parameter_bytes,
    parameter_count,
)
from common.organism.files import shipped

TOY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 256}


def test_random_weights_build_the_architecture_the_same_every_time(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TOY))
    spec = ModelSpec(path=tmp_path, random_weights=True, device="cpu", dtype="bfloat16")
    first, second = load_model(spec, attn_implementation=None), load_model(spec, attn_implementation=None)
    assert len(first.model.layers) == 3 and first.config.hidden_size == 32 and first.dtype == torch.bfloat16
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name  # seeded: a benchmark measures the same model each run
    assert first.model.layers[0].mlp.up_proj.weight.float().std() > 0.005  # initialised, not zeros


def test_a_shipped_architecture_with_random_weights_needs_no_download():
    spec = ModelSpec(id="meta-llama/Llama-3.1-8B", random_weights=True, device="cpu")
    config, source = load_config(spec)
    assert config.hidden_size == 4096 and config.num_hidden_layers == 32 and "saebatch's copy" in source
    tokenizer = load_tokenizer(spec)  # no tokenizer of Llama's here: the organism's stands in
    assert tokenizer.get_vocab() == shipped().tokenizer().get_vocab()


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TOY))
    for load in (load_tokenizer, load_config):  # transformers 5 would build an empty tokenizer: refused at plan
        with pytest.raises(UserError, match=r"model.path .* has no tokenizer \(tokenizer.json, "):
            load(ModelSpec(path=tmp_path))


def _shipped_configs() -> list[tuple[str, dict]]:
    folder = resources.files("common") / "model_configs"
    configs = [(f.name, json.loads(f.read_text())) for f in sorted(folder.iterdir(), key=lambda f: f.name)
               if f.name.endswith(".json") and f.name != "parameter_counts.json"]
    return [*configs, ("organism", json.loads(shipped().config_path.read_text()))]


@pytest.mark.parametrize(("name", "raw"), _shipped_configs(), ids=lambda value: value if isinstance(value, str) else "")
def test_the_architecture_read_from_json_is_what_transformers_reads(name, raw):
    """Planning reads config.json without transformers; every field it reads must match."""
    ours, theirs = Architecture.from_raw(raw), hf_config(raw).get_text_config()
    heads = theirs.num_attention_heads
    assert (ours.num_hidden_layers, ours.hidden_size, heads, ours.max_position_embeddings) == (
        theirs.num_hidden_layers, theirs.hidden_size, ours.num_attention_heads, theirs.max_position_embeddings)
    assert ours.num_key_value_heads == (getattr(theirs, "num_key_value_heads", None) or heads)
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or theirs.hidden_size // heads)


@pytest.mark.parametrize(("name", "raw"), _shipped_configs()[:-1], ids=lambda value: value if isinstance(value, str) else "")
def test_the_parameter_count_table_holds_each_shipped_architecture(name, raw):
    table = json.loads((resources.files("common") / "model_configs" / "parameter_counts.json").read_text())
    entry = table.get(architecture_key(raw))
    assert entry is not None, f"{name} is not in parameter_counts.json: add {architecture_key(raw)}"
    assert entry["parameters"] == count_parameters(raw), f"{name}: recount with common.models.count_parameters"
    assert parameter_bytes(Architecture.from_raw(raw), "bfloat16") == 2 * entry["parameters"]


def test_an_architecture_not_in_the_table_is_counted_exactly(tmp_path):
    model = load_model(ModelSpec(path=_toy_folder(tmp_path), random_weights=True, device="cpu"), None)
    assert parameter_count(Architecture.from_raw(TOY)) == sum(p.numel() for p in model.parameters())


def _toy_folder(folder):
    (folder / "config.json").write_text(json.dumps(TOY))
    return folder


def test_the_parameters_of_a_model_folder_are_read_from_its_weight_files():
    config, _ = load_config(ModelSpec(id="builtin:organism"))
    assert config.folder is not None and any(config.folder.glob("*.safetensors"))
    assert parameter_count(config) == sum(p.numel() for p in shipped().model().parameters())


def test_a_damaged_config_is_a_clear_error(tmp_path):
    _toy_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(UserError, match=r"config.json cannot be read as JSON .*download it again"):
        load_config(ModelSpec(path=tmp_path))


def test_only_the_weight_files_transformers_loads_are_counted(tmp_path):
    """An index names the shards; other safetensors files (a `consolidated` copy) and partial
    downloads do not count: then the architecture is counted on the meta device."""
    from safetensors.numpy import save_file

    save_file({"a": np.zeros((3, 4), np.float32)}, tmp_path / "model-1.safetensors")
    save_file({"b": np.zeros(5, np.float32)}, tmp_path / "model-2.safetensors")
    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}, tmp_path / "consolidated.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    assert parameter_count(Architecture.from_raw(TOY, tmp_path)) == 17
    (tmp_path / "model-2.safetensors").unlink()
    (tmp_path / "toy").mkdir()
    toy = load_model(ModelSpec(path=_toy_folder(tmp_path / "toy"), random_weights=True, device="cpu"), None)
    assert parameter_count(Architecture.from_raw(TOY, tmp_path)) == sum(p.numel() for p in toy.parameters())


def test_the_built_in_organisms_are_named_and_an_unknown_one_lists_them():
    assert ModelSpec.model_validate("organism_b").id == "builtin:organism_b"
    assert ModelSpec.model_validate({"id": "builtin:organism_b"}).is_organism
    with pytest.raises(ValueError, match=r"unknown built-in model 'builtin:organism_c'; the built-in models are "
                       r"builtin:organism, builtin:organism_b"):
        ModelSpec.model_validate({"id": "builtin:organism_c"})
