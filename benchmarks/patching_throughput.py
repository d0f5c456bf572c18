"""Trials per second of population_patching against the previous path and the seed's way, on the
built-in model organism.

    .venv/bin/python benchmarks/patching_throughput.py

The same trials every way: 4 features of the organism's layer 1, each set to two values, the two
published prompts, 32 trials each (512 answers), temperature 0.7, at most 50 new tokens; each way
timed 3 times, its fastest run counted.

- ours: the job's path, one batched call per prompt holding every feature and condition
  (`row_edits` + `common.generation.sample`: the prompt's cache computed once, each step written
  into room the cache reserved, rows that have ended leaving the batch);
- the generate path, as the job was before its own decode loop: the same call made through
  transformers' `generate` with the seeded noise as a logits processor, the prefix in a
  DynamicCache (copied whole at every step), every row running to the end of the longest answer.
  Same seeds, so the answers must be the same;
- the seed's way, re-implemented: one `generate` call per trial, one feature at a time, its edit
  hooked in, sampling with temperature 0.7.

Rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import Row, record  # noqa: E402

from common.generation import (  # noqa: E402
    SeededNoise,
    end_tokens,
    left_padded,
    prompt_prefix,
    sample,
)
from common.organism.files import Organism  # noqa: E402
from jobs._gambling import ANSWER_ENDS  # noqa: E402
from jobs.population_patching import PROMPTS, row_edits  # noqa: E402
from jobs.population_patching import Row as Trial  # noqa: E402

FEATURES, VALUES, TRIALS, NEW_TOKENS, TEMPERATURE = (402, 90, 108, 182), (0.5, 2.0), 32, 50, 0.7
REPEATS = 3  # each way's fastest run counts: the slower ones waited on the machine, not on the code
CPU = torch.device("cpu")


def trials() -> list[Trial]:
    return [Trial(f"L1_F{feature}", str(value), prompt, trial, layer=1, feature=feature, value=value)
            for feature in FEATURES for value in VALUES for prompt in range(len(PROMPTS)) for trial in range(TRIALS)]


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(model, tokenizer, saes: dict, rows: list[Trial], device: torch.device = CPU,
         new_tokens: int = NEW_TOKENS) -> tuple[float, list[str]]:
    """As the job's shards do: one call per prompt, every feature and value in it; seconds and the
    answers (grouped by prompt, seeded by their place in their prompt's batch)."""
    synchronize(device)
    began, answers = time.perf_counter(), []
    for prompt, batch in by_prompt(rows):
        prefix = prompt_prefix(model, tokenizer, PROMPTS[prompt].text, len(batch), device, new_tokens=new_tokens + 1)
        with row_edits(model, saes, batch, every_token=False) as edited:
            answers += sample(model, tokenizer, [PROMPTS[prompt].text] * len(batch), list(range(len(batch))),
                              TEMPERATURE, new_tokens, device, stop_strings=ANSWER_ENDS, prefix=prefix, batch=edited)
    synchronize(device)
    return time.perf_counter() - began, answers


def generate_path(model, tokenizer, saes: dict, rows: list[Trial], device: torch.device = CPU,
                  new_tokens: int = NEW_TOKENS) -> tuple[float, list[str]]:
    """The job's path before its own decode loop: the calls of `ours` made through `generate`, the
    seeded noise as a logits processor, every row to the last step; seconds and the answers."""
    from transformers import GenerationConfig, LogitsProcessorList

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=end_tokens(model, tokenizer), stop_strings=list(ANSWER_ENDS))
    synchronize(device)
    began, answers = time.perf_counter(), []
    for prompt, batch in by_prompt(rows):
        text = PROMPTS[prompt].text
        noise, steps = SeededNoise(list(range(len(batch))), TEMPERATURE, device), itertools.count()
        encoded = left_padded(tokenizer, [text] * len(batch), device)
        encoded.pop("position_ids")  # generate derives them from the mask
        encoded["cache"] = dynamic_prefix(model, tokenizer, text, len(batch), device)  # generate runs the rest
        # B023: generate calls the lambda within this iteration, so the loop's noise and steps are its own
        perturb = LogitsProcessorList(
            [lambda ids, scores: noise(scores.float(), torch.arange(len(ids)), next(steps))])  # noqa: B023
        with row_edits(model, saes, batch, every_token=False):
            output = model.generate(**encoded, generation_config=config, tokenizer=tokenizer, logits_processor=perturb)
        answers += tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    synchronize(device)
    return time.perf_counter() - began, answers


def dynamic_prefix(model, tokenizer, prompt: str, rows: int, device: torch.device) -> DynamicCache:
    """The shared prefix as the previous path made it: transformers' DynamicCache, which grows by
    copying itself at every step."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
    cache.batch_repeat_interleave(rows)
    return cache


def by_prompt(rows: list[Trial]) -> list[tuple[int, list[Trial]]]:
    """The rows of each prompt that has any: one batched call each."""
    batches = [(prompt, [row for row in rows if row.prompt == prompt]) for prompt in range(len(PROMPTS))]
    return [(prompt, batch) for prompt, batch in batches if batch]


def seeds_way(model, tokenizer, saes: dict, rows: list[Trial], device: torch.device = CPU,
              new_tokens: int = NEW_TOKENS) -> float:
    """The seed's way: one `generate` call per trial, the trial's feature edit hooked in; seconds."""
    synchronize(device)
    began = time.perf_counter()
    for row in rows:  # one feature at a time (rows are grouped by feature), one trial per call
        encoded = tokenizer(PROMPTS[row.prompt].text, return_tensors="pt").to(device)
        with row_edits(model, saes, [row], every_token=False), torch.no_grad():
            model.generate(**encoded, do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                           max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    synchronize(device)
    return time.perf_counter() - began


def main() -> None:
    organism = Organism()
    model, tokenizer, saes = organism.model(attn_implementation=None), organism.tokenizer(), {1: organism.sae(1)}
    rows = trials()
    ours(model, tokenizer, saes, rows[:8])  # warm up
    generate_path(model, tokenizer, saes, rows[:8])
    fast, answers = min((ours(model, tokenizer, saes, rows) for _ in range(REPEATS)), key=lambda timed: timed[0])
    before, previous = min((generate_path(model, tokenizer, saes, rows) for _ in range(REPEATS)),
                           key=lambda timed: timed[0])
    slow = min(seeds_way(model, tokenizer, saes, rows) for _ in range(REPEATS))
    n, same = len(rows), sum(a == b for a, b in zip(answers, previous, strict=True))
    print(f"ours {n / fast:.1f} trials/s; previous generate path {n / before:.1f} ({before / fast:.2f}x); "
          f"seed's way {n / slow:.1f} ({slow / fast:.1f}x); {same}/{n} answers identical to the generate path")
    assert same == n, "the decode loop and generate wrote different answers"
    label = f"population_patching, organism (d128, 4 blocks), {n} trials: 4 features x 2 values x 2 prompts x {TRIALS}"
    mine = f"{n / fast:.1f} trials/s ({fast:.1f} s; batched, finished rows leaving the batch)"
    record([
        Row(f"{label}: trials per second", mine, f"{n / slow:.1f} trials/s ({slow:.1f} s; one generate call per trial, "
            "50 new tokens)", f"{slow / fast:.1f}x"),
        Row(f"{label}: our decode loop against the previous generate path", mine,
            f"{n / before:.1f} trials/s ({before:.1f} s; the same batches through generate, every row to the end); "
            f"{same}/{n} answers identical", f"{before / fast:.1f}x"),
    ])


if __name__ == "__main__":
    main()
