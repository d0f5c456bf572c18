"""Answers per second of feature_ablation's batched generation against one problem at a time.

    .venv/bin/python benchmarks/ablation_batching.py

The same work both ways, on the built-in model organism and its shipped SAEs of layers 1 and 2:
96 arithmetic problems, each answered greedily three ways (unchanged, the 10 features with the
highest attribution zero-ablated, 10 random active features zero-ablated), at most 20 new tokens.

- ours: `jobs._reasoning.ablation.ablate_and_generate` (feature_ablation's path), 32 problems x 3 conditions per generate call;
- one at a time, as the seed's scripts loop: one generate call per problem and condition, the
  condition's ablation hooked in.

Both must give the same answers; rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import Row, record  # noqa: E402

from common.edits import edit_block_output, zero_features  # noqa: E402
from common.organism.files import Organism  # noqa: E402
from jobs._reasoning.ablation import (  # noqa: E402
    ablate_and_generate,
    attribution,
    control_sets,
    top_features,
)
from jobs._reasoning.problems import BenchmarkSpec, load_benchmark  # noqa: E402

PROBLEMS, K, BATCH = 96, 10, 32
CPU = torch.device("cpu")


def one_at_a_time(model, tokenizer, bench, items, saes, ablations, device: torch.device = CPU) -> dict[str, list[str]]:
    """The seeds' loop: one greedy `generate` call per problem and condition, its ablation hooked in."""
    texts = {"baseline": [], **{name: [] for name in ablations}}
    for item in items:
        encoded = tokenizer(bench.prompt(item), return_tensors="pt").to(device)
        for condition in texts:
            with ExitStack() as stack:
                if condition != "baseline":
                    for layer, sae in saes.items():
                        chosen = torch.zeros(1, sae.cfg.d_sae, dtype=torch.bool, device=device)
                        features = ablations[condition]
                        chosen[0, features[features[:, 0] == layer, 1]] = True
                        keep = torch.ones(encoded.input_ids.shape, dtype=torch.bool, device=device)
                        keep[0, 0] = False  # <bos>, as the job leaves special tokens alone
                        stack.enter_context(edit_block_output(model, layer, zero_features(sae, chosen, keep)))
                output = model.generate(**encoded, max_new_tokens=bench.spec.max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, stop_strings=bench.stop_strings,
                                        tokenizer=tokenizer)
            texts[condition].append(tokenizer.decode(output[0, encoded.input_ids.shape[1]:], skip_special_tokens=True))
    return texts


@torch.no_grad()
def main() -> None:
    organism = Organism()
    model, tokenizer = organism.model(attn_implementation=None), organism.tokenizer()
    saes = {layer: organism.sae(layer).requires_grad_(False) for layer in (1, 2)}
    bench = load_benchmark(BenchmarkSpec(name="arithmetic", builtin="organism_arithmetic", n=PROBLEMS + 32,
                                         max_new_tokens=20))
    ranking, items = bench.items[:32], bench.items[32:]

    per_item, active = attribution(model, tokenizer, bench, ranking, saes, CPU)
    top = top_features({layer: values.mean(axis=0) for layer, values in per_item.items()}, K)
    ablations = {"ablated": top, "control": control_sets(active, top, 1, seed=0, unit_id="benchmark")["control_00"]}
    answers = PROBLEMS * 3

    started = time.perf_counter()
    batched = ablate_and_generate(model, tokenizer, bench, items, saes, ablations, BATCH * (1 + len(ablations)), CPU)
    ours = time.perf_counter() - started
    started = time.perf_counter()
    alone = one_at_a_time(model, tokenizer, bench, items, saes, ablations)
    baseline = time.perf_counter() - started

    same = sum(a == b for c in alone for a, b in zip(batched[c][0], alone[c], strict=True))
    accuracy = {c: sum(batched[c][2]) / PROBLEMS for c in batched}
    print(f"batched {answers / ours:.1f} answers/s, one at a time {answers / baseline:.1f} answers/s; "
          f"{same}/{answers} answers identical; accuracy {accuracy}")
    record([Row(f"ablation generation, organism, {PROBLEMS} problems x 3 conditions, k={K}",
                ours=f"{answers / ours:.1f} answers/s ({BATCH} problems x 3 per call)",
                baseline=f"{answers / baseline:.1f} answers/s (one call per problem and condition); "
                         f"{same}/{answers} answers identical",
                ratio=f"{baseline / ours:.1f}x")])


if __name__ == "__main__":
    main()
