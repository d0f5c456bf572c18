"""Models with random weights at an architecture's shapes (dry runs and benchmarks), and tokenizer errors."""

import json

import pytest
import torch

from common.errors import UserError
from common.models import ModelSpec, load_config, load_model, load_tokenizer
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
