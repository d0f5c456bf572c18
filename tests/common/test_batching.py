"""`batch_size: auto`: the rows that fit, the memory a plan states for them, and the memory model
against the reserved KV cache and the peak of a real generation."""

from collections.abc import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from common import generation
from common.batching import (
    CPU_ROWS,
    H200_BYTES,
    MAX_ROWS,
    STEP_BYTES_PER_LOGIT,
    USABLE_SHARE,
    GenerationMemory,
    forward_bytes,
    generation_memory,
    planned_rows,
    rows_now,
)
from common.cli import main
from common.generation import prefill, prompt_prefix, sample
from common.launcher import plan_manifest
from common.manifest_file import load_manifest
from common.models import Architecture, kv_cache_bytes, load_config, parameter_bytes
from common.organism.files import Organism
from jobs import gambling_games
from jobs.population_patching import PROMPTS
from tests.helpers import REPO, write_manifest_file

GAMES = REPO / "manifests" / "gambling_games_llama31_8b.yaml"


def test_rows_fit_the_free_memory_less_the_margin():
    memory = GenerationMemory(fixed=10, per_row=1000)
    assert memory.rows_fitting(100_000) == int(100_000 * USABLE_SHARE) // 1000
    assert memory.rows_fitting(10) == 1  # a row always runs (it may not fit: the task then says so)
    assert memory.rows_fitting(10**15) == MAX_ROWS
    assert memory.peak(7) == 7_010
    assert rows_now("auto", memory, torch.device("cpu")) == CPU_ROWS
    assert rows_now("auto", memory, torch.device("cpu"), rows_per_item=22) == CPU_ROWS  # rows, not whole items
    assert rows_now(5, memory, torch.device("cpu")) == 5
    assert rows_now(5, memory, torch.device("cpu"), rows_per_item=22) == 110  # the manifest's items, in rows
    # a plan's rows where one item of 127 conditions does not fit an H200: those that fit, never the whole item
    large = GenerationMemory(fixed=20 * 2**30, per_row=1496 * 2**20)
    assert planned_rows("auto", large, rows_per_item=127) == large.rows_fitting(H200_BYTES - large.fixed) < 127
    assert large.peak(planned_rows("auto", large, rows_per_item=127)) < H200_BYTES


def test_the_memory_model_counts_the_cache_a_generation_really_holds():
    """A row's KV bytes are those of the reserved cache a generation fills, the answer's room included
    from the start: whether every row's prompt forward fills it or a shared prefix is copied into it."""
    model, tokenizer = Organism().model(attn_implementation=None), Organism().tokenizer()
    config, cpu = Architecture.from_raw(model.config.to_dict()), torch.device("cpu")
    prompt, new = "The cat sat on the mat", 7
    tokens = len(tokenizer(prompt).input_ids)
    for cache in (prefill(model, tokenizer, [prompt] * 3, cpu, new).cache,
                  prompt_prefix(model, tokenizer, prompt, 3, cpu, new_tokens=new + 1)):  # as population_patching
        held = sum(buffer.nbytes for layer in cache.layers for buffer in layer.buffers)
        assert held == kv_cache_bytes(config, "float32", 3, tokens + new)
    row = held // 3
    last_step = row + config.vocab_size * STEP_BYTES_PER_LOGIT
    for cached, prompt_phase in ((True, forward_bytes(config, "float32", tokens) + row), (False, 0)):
        memory = generation_memory(config, "float32", fixed=0, prompt_tokens=tokens, new_tokens=new, prompt_cached=cached)
        assert memory.per_row == max(prompt_phase, last_step)


def _one_kernel(keys: torch.Tensor, step_key: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The sampling noise's uniforms allocated as CUDA's compiled kernel allocates them: the output
    alone (computed a row at a time, so that no (rows, vocabulary) int64 temporaries exist)."""
    uniforms = torch.empty(len(keys), len(tokens))
    for row in range(len(keys)):
        uniforms[row] = generation._uniforms(keys[row : row + 1], step_key, tokens)[0]
    return uniforms


def _peak_bytes(run: Callable[[], object]) -> int:
    """The most bytes torch held on the CPU during `run` beyond what it held before, summed from the
    profiler's allocation and release events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("prompt_cached", [True, False])
def test_the_memory_model_predicts_a_generations_peak_on_the_cpu(monkeypatch, prompt_cached):
    """tests/test_gpu_paths.py's check on the CPU: a random Llama sampling 16 tokens for 32 rows
    (prompts in the batch, or a shared prefix), its noise allocated as on CUDA, peaks within 20% of
    what `batch_size: auto` sizes batches by. The prompt's forward peaks in the first case, the last
    step in the second."""
    config = LlamaConfig(vocab_size=16_384, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tokenizer, prompt, rows, new, cpu = Organism().tokenizer(), PROMPTS[0].text, 32, 16, torch.device("cpu")
    tokens = len(tokenizer(prompt).input_ids)
    memory = generation_memory(Architecture.from_raw(config.to_dict()), "float32", 0, tokens, new,
                               prompt_cached=prompt_cached)
    monkeypatch.setitem(generation._COMPILED, "cpu", _one_kernel)

    def generate() -> None:
        prefix = None if prompt_cached else prompt_prefix(model, tokenizer, prompt, rows, cpu, new_tokens=new + 1)
        sample(model, tokenizer, [prompt] * rows, list(range(rows)), 0.7, new, cpu, prefix=prefix)

    peak = _peak_bytes(generate)
    assert 0.8 <= peak / memory.peak(rows) <= 1.2, f"peak {peak / 2**20:.1f} MiB, {memory.peak(rows) / 2**20:.1f} predicted"


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
