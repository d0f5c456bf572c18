"""Trials per second of population_patching against the seed's way, on the built-in model organism.

    .venv/bin/python benchmarks/patching_throughput.py

The same trials both ways: 4 features of the organism's layer 1, each set to two values, the two
published prompts, 32 trials each (512 answers), temperature 0.7.

- ours: the job's path, one batched generate call per prompt holding every feature and
  condition (`row_edits` + `common.generation.sample`: the prompt's cache computed once, each row
  stopping at the end of its answer, at most 50 new tokens);
- the seed's way, re-implemented: one `generate` call per trial, one feature at a time, its edit
  hooked in, sampling with temperature 0.7 and 50 new tokens.

Rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import Row, record  # noqa: E402

from common.generation import prompt_prefix, sample  # noqa: E402
from common.organism.files import Organism  # noqa: E402
from jobs._gambling import ANSWER_ENDS  # noqa: E402
from jobs.population_patching import PROMPTS, row_edits  # noqa: E402
from jobs.population_patching import Row as Trial  # noqa: E402

FEATURES, VALUES, TRIALS, NEW_TOKENS = (402, 90, 108, 182), (0.5, 2.0), 32, 50
CPU = torch.device("cpu")


def trials() -> list[Trial]:
    return [Trial(f"L1_F{feature}", str(value), prompt, trial, layer=1, feature=feature, value=value)
            for feature in FEATURES for value in VALUES for prompt in range(len(PROMPTS)) for trial in range(TRIALS)]


def ours(model, tokenizer, sae, rows: list[Trial]) -> float:
    """As the job's shards do: one call per prompt, every feature and value in it."""
    began = time.perf_counter()
    for prompt in range(len(PROMPTS)):
        batch = [row for row in rows if row.prompt == prompt]
        if not batch:
            continue
        prefix = prompt_prefix(model, tokenizer, PROMPTS[prompt].text, len(batch), CPU)
        with row_edits(model, {1: sae}, batch, every_token=False):
            sample(model, tokenizer, [PROMPTS[prompt].text] * len(batch), list(range(len(batch))), 0.7, NEW_TOKENS,
                   CPU, stop_strings=ANSWER_ENDS, prefix=prefix)
    return time.perf_counter() - began


def seeds_way(model, tokenizer, saes: dict, rows: list[Trial], device: torch.device = CPU,
              new_tokens: int = NEW_TOKENS) -> float:
    """The seed's way: one `generate` call per trial, the trial's feature edit hooked in; seconds."""
    began = time.perf_counter()
    for row in rows:  # one feature at a time (rows are grouped by feature), one trial per call
        encoded = tokenizer(PROMPTS[row.prompt].text, return_tensors="pt").to(device)
        with row_edits(model, saes, [row], every_token=False), torch.no_grad():
            model.generate(**encoded, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                           pad_token_id=tokenizer.pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def main() -> None:
    organism = Organism()
    model, tokenizer, sae = organism.model(attn_implementation=None), organism.tokenizer(), organism.sae(1)
    rows = trials()
    ours(model, tokenizer, sae, rows[:8])  # warm up
    fast = ours(model, tokenizer, sae, rows)
    slow = seeds_way(model, tokenizer, {1: sae}, rows)
    n = len(rows)
    label = f"population_patching, organism (d128, 4 blocks), {n} trials: 4 features x 2 values x 2 prompts x {TRIALS}"
    baseline = f"{n / slow:.1f} trials/s ({slow:.1f} s; one generate call per trial, 50 new tokens)"
    record([
        Row(f"{label}: trials per second", f"{n / fast:.1f} trials/s ({fast:.1f} s; batched, to the end of the answer)",
            baseline, f"{slow / fast:.1f}x"),
    ])
    print(f"ours {n / fast:.1f} trials/s; seed's way {n / slow:.1f}")


if __name__ == "__main__":
    main()
