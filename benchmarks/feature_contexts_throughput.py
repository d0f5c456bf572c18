"""Tokens per second of feature_contexts' streaming top-k against a hand-rolled script, on the
built-in model organism.

    .venv/bin/python benchmarks/feature_contexts_throughput.py [--device cuda] [--tokens N]

The same corpus (the organism's text, windows of 128 tokens) and the same 64 features (16 of each
of the 4 layers' SAEs), the top 20 tokens of each with 12 tokens of context before and 4 after:

- ours: the job's path (jobs.feature_contexts): batches of 16 windows, one forward up to the last
  layer, the features' columns of each SAE's encoding, and the running exact top-k on the device
  (common.top_activations), contexts gathered as tokens enter it;
- baseline, the way such scripts are written: each window forwarded alone, each layer's SAE
  encoding copied to numpy, and a heap of (activation, -position) per feature fed token by token.

Both must find the same top activations (to float32 rounding: batched forwards round otherwise
than single ones); the share of identical top positions is stated beside them, the rest being
near-ties that rounding reorders. Loading is not timed; each way runs twice and its faster run
counts. Rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import heapq
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import Row, gpu_machine, machine, record  # noqa: E402

from common.corpus import CorpusSpec, windows  # noqa: E402
from common.layers import capture_residuals  # noqa: E402
from common.organism.files import Organism  # noqa: E402
from common.top_activations import TopActivations  # noqa: E402
from common.window_encoder import WindowEncoder  # noqa: E402
from jobs._feature_cards import FeatureId  # noqa: E402
from jobs.feature_contexts import FeatureReader, batch_contexts  # noqa: E402

K, BEFORE, AFTER, BATCH = 20, 12, 4, 16
FEATURES = [FeatureId(layer=layer, feature=feature) for layer in range(4) for feature in range(0, 512, 32)]


def ours(encoder: WindowEncoder, found: list) -> tuple[np.ndarray, np.ndarray]:
    reader = FeatureReader(encoder, FEATURES)
    top = TopActivations.zeros(len(FEATURES), K, BEFORE + 1 + AFTER, encoder.device)
    for start in range(0, len(found), BATCH):
        batch = found[start : start + BATCH]
        top.add(reader.activations(batch), *batch_contexts(batch, BEFORE, AFTER))
    return top.value.cpu().numpy(), top.position.cpu().numpy()


@torch.no_grad()
def baseline(model, saes: dict, device: torch.device, found: list) -> tuple[np.ndarray, np.ndarray]:
    heaps: list[list] = [[] for _ in FEATURES]
    for window in found:
        with capture_residuals(model, sorted(saes), stop=True) as residuals:
            model(input_ids=torch.tensor([window.ids], device=device))
        encoded = {layer: sae.encode(residuals[layer][0, window.prefix :]).cpu().numpy() for layer, sae in saes.items()}
        for column, feature in enumerate(FEATURES):
            values = encoded[feature.layer][:, feature.feature]
            for offset, value in enumerate(values):
                if value > 0:
                    ids = window.ids[window.prefix :]
                    entry = (float(value), -(window.start + offset), ids[max(0, offset - BEFORE) : offset + AFTER + 1])
                    if len(heaps[column]) < K:
                        heapq.heappush(heaps[column], entry[:2] + (column, entry[2]))
                    elif entry[:2] > heaps[column][0][:2]:
                        heapq.heapreplace(heaps[column], entry[:2] + (column, entry[2]))
    values, positions = np.full((len(FEATURES), K), -np.inf, dtype=np.float32), np.full((len(FEATURES), K), -1)
    for column, heap in enumerate(heaps):
        best = sorted(heap, reverse=True)
        values[column, : len(best)] = [entry[0] for entry in best]
        positions[column, : len(best)] = [-entry[1] for entry in best]
    return values, positions


def fastest(run) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    times, result = [], None
    for _ in range(2):
        began = time.perf_counter()
        result = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    device = torch.device(args.device)
    organism = Organism()
    model = organism.model(attn_implementation="sdpa").to(device)
    tokenizer = organism.tokenizer()
    saes = {layer: organism.sae(layer).to(device) for layer in range(4)}
    found = list(windows(CorpusSpec(builtin="organism", window=128, tokens=args.tokens), tokenizer))
    encoder = WindowEncoder(model, saes, device, tokenizer.pad_token_id)
    ours_s, ours_top = fastest(lambda: ours(encoder, found))
    base_s, base_top = fastest(lambda: baseline(model, saes, device, found))
    same_values = np.allclose(ours_top[0], base_top[0], rtol=1e-5, atol=1e-6)
    same_positions = (ours_top[1] == base_top[1]).mean()
    label = (f"feature_contexts, organism (4 blocks d128, TopK SAEs 512), {args.tokens:,} tokens, "
             f"{len(FEATURES)} features over 4 layers, top {K} with context: tokens per second")
    record([Row(label, ours=f"{args.tokens / ours_s:,.0f} tok/s ({ours_s:.1f} s; batches of {BATCH} windows, "
                f"top-k on the device); the baseline's top activations: {'yes' if same_values else 'NO'} (within 1e-5), "
                f"its top positions: {same_positions:.1%} (the rest: near-ties)",
                baseline=f"{args.tokens / base_s:,.0f} tok/s ({base_s:.1f} s; a window at a time, a heap per feature)",
                ratio=f"{base_s / ours_s:.1f}x",
                machine=gpu_machine() if device.type == "cuda" else machine())])
    print(f"ours {ours_s:.2f} s, baseline {base_s:.2f} s, same top activations: {same_values}, "
          f"same positions: {same_positions:.1%}")


if __name__ == "__main__":
    main()
