"""`batch_size: auto`: the rows that fit, the memory a plan states for them, and the real KV cache
the memory model counts."""

import pytest
import torch
from transformers import DynamicCache

from common.batching import (
    CPU_ROWS,
    H200_BYTES,
    MAX_ROWS,
    USABLE_SHARE,
    GenerationMemory,
    generation_memory,
    rows_now,
)
from common.cli import main
from common.launcher import plan_manifest
from common.manifest_file import load_manifest
from common.models import Architecture, kv_cache_bytes, load_config, parameter_bytes
from common.organism.files import Organism
from jobs import gambling_games
from tests.helpers import REPO, write_manifest_file

GAMES = REPO / "manifests" / "gambling_games_llama31_8b.yaml"


def test_rows_fit_the_free_memory_less_the_margin():
    memory = GenerationMemory(fixed=10, per_row=1000)
    assert memory.rows_fitting(100_000) == int(100_000 * USABLE_SHARE) // 1000
    assert memory.rows_fitting(10) == 1  # a row always runs (it may not fit: the task then says so)
    assert memory.rows_fitting(10**15) == MAX_ROWS
    assert memory.peak(7) == 7_010
    assert rows_now("auto", memory, torch.device("cpu")) == CPU_ROWS
    assert rows_now("auto", memory, torch.device("cpu"), rows_per_item=22) == CPU_ROWS // 22
    assert rows_now(5, memory, torch.device("cpu")) == 5


def test_the_memory_model_counts_the_cache_a_generation_really_holds():
    """The KV part of a row is the bytes of the DynamicCache a forward of that many tokens fills."""
    model, tokenizer = Organism().model(attn_implementation=None), Organism().tokenizer()
    config = Architecture.from_raw(model.config.to_dict())
    cache = DynamicCache(config=model.config)
    ids = torch.randint(4, len(tokenizer), (3, 37))
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == kv_cache_bytes(config, "float32", 3, 37)
    forward = 30 * (3 * config.intermediate_size + 4 * config.hidden_size) * 4
    last_step = held // 3 + config.vocab_size * 40  # the cache of 37 tokens, and the logits with their noise
    for cached, prompt in ((True, forward + kv_cache_bytes(config, "float32", 1, 30)), (False, forward)):
        memory = generation_memory(config, "float32", fixed=0, prompt_tokens=30, new_tokens=7, prompt_cached=cached)
        assert memory.per_row == max(prompt, last_step)


def test_a_plan_with_batch_size_auto_fills_an_h200(tmp_path):
    path = write_manifest_file(tmp_path, {"gambling_games": {"batch_size": "auto"}}, base=GAMES)
    manifest = load_manifest(path)
    _, plan = plan_manifest(manifest)
    estimate = gambling_games.estimate(manifest, list(plan.units))
    config = load_config(manifest.settings.model)[0]
    weights = parameter_bytes(config, manifest.settings.model.dtype)
    assert weights < estimate.task_memory_bytes <= weights + (H200_BYTES - weights) * USABLE_SHARE + 2**31
    assert estimate.task_memory_bytes > 0.8 * H200_BYTES * USABLE_SHARE  # the batch takes what is left
    fixed = load_manifest(write_manifest_file(tmp_path, {"gambling_games": {"batch_size": 8}}, base=GAMES, name="8.yaml"))
    assert gambling_games.estimate(fixed, list(plan.units)).task_memory_bytes < estimate.task_memory_bytes / 4


@pytest.mark.parametrize("value", ["max", 0, 2.5])
def test_a_batch_size_that_is_neither_a_count_nor_auto_is_refused(tmp_path, capsys, value):
    path = write_manifest_file(tmp_path, {"gambling_games": {"batch_size": value}}, base=GAMES)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "auto" in err
