"""Residual-stream activations on reasoning benchmarks (seed 003, step 1 of 3).

    saebatch submit manifests/demo/reasoning_1_capture.yaml --executor local

For every model of the manifest, the outputs of its chosen blocks (layer L = block L's output,
`blocks.L.hook_resid_post`) on the prompts of every benchmark: real forward passes, nothing
random. A work unit is one model on one slice of a benchmark's items; units of a model sit
together so that a shard loads each model once. Captured are the tokens of the item itself (its
question, and with `text: prompt_and_solution` the reference solution after it, the text the
model is asked to produce); few-shot examples, identical in every prompt, and special tokens such
as <bos>, whose outlying norm would dominate an SAE, are left out. Stored as float16 (`dtype`),
which holds values up to 65,504: a model whose residual stream goes beyond is refused with the
fix (float32), never stored as inf.

merged.h5 holds, per model: `L<layer>` (tokens, d_model) activations and, per token, the index of
its benchmark, item and position. sae_training reads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h5py
import numpy as np
from pydantic import Field
from tqdm import tqdm

from common.errors import UserError
from common.layers import CONVENTION, capture_residuals
from common.lazy import lazy_import, no_grad
from common.manifest import Manifest, StrictModel
from common.models import (
    input_device,
    load_config,
    load_model,
    load_tokenizer,
    parameter_bytes,
    text_config,
)
from common.plan import Estimate, WorkUnit
from common.report import Report
from common.runtime import CHARS_PER_TOKEN, Work, model_size
from common.shards import LIBVER, ShardWriter
from jobs._reasoning import (
    ModelEntry,
    benchmark_size,
    check_models,
    encode_items,
    token_limit,
    units_per_model,
)
from jobs._reasoning.problems import Benchmark, BenchmarkSpec, load_benchmark

if TYPE_CHECKING:
    import pandas as pd
    import torch
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")

log = logging.getLogger(__name__)
FIELD = "activation_capture"


class Settings(StrictModel):
    """The `activation_capture:` section of a manifest."""

    models: list[ModelEntry] = Field(min_length=1, description="the models and their layers")
    benchmarks: list[BenchmarkSpec] = Field(min_length=1, description="the benchmarks whose prompts are run")
    text: Literal["prompt", "prompt_and_solution"] = Field(
        "prompt_and_solution", description="capture the item's prompt, or the prompt and its reference solution")
    items_per_unit: int = Field(64, ge=1, description="benchmark items per work unit")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")
    max_tokens: int | None = Field(None, ge=8, description="longer texts keep their last max_tokens tokens "
                                   "(None: the model's positions)")
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="how activations are stored: float16 halves the disk and SAE training's reads; "
        "float32 for a model whose residual stream exceeds float16's range (65,504), which a float16 capture refuses")


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """A unit per (model, benchmark, slice of items); checks models, layers and benchmark files."""
    s = manifest.settings
    check_models(s.models, f"{FIELD}.models")
    for entry in s.models:
        positions = text_config(load_config(entry.model)[0]).max_position_embeddings
        if s.max_tokens is not None and s.max_tokens > positions:
            raise UserError(f"{FIELD}.max_tokens: {s.max_tokens} exceeds {entry.name}'s {positions} positions; "
                            f"set it to at most {positions}")
    names = [b.name for b in s.benchmarks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"{FIELD}.benchmarks: names must be unique; repeated: {', '.join(repeated)}")
    sizes = {b.name: benchmark_size(b, f"{FIELD}.benchmarks[{i}]").items for i, b in enumerate(s.benchmarks)}
    units = []
    for entry in s.models:
        for bench_index, bench in enumerate(s.benchmarks):
            for start in range(0, sizes[bench.name], s.items_per_unit):
                stop = min(start + s.items_per_unit, sizes[bench.name])
                units.append(WorkUnit(f"{entry.name}.{bench.name}.{start:06d}",
                                      {"model": entry.name, "benchmark": bench_index, "items": [start, stop]}))
    return units


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    entries = {entry.name: entry for entry in s.models}
    sizes = [benchmark_size(spec, f"{FIELD}.benchmarks[{index}]") for index, spec in enumerate(s.benchmarks)]
    solution = s.text == "prompt_and_solution"
    out, memory, work = 0, 0, []
    for name in dict.fromkeys(unit.payload["model"] for unit in units):
        entry = entries[name]
        config = text_config(load_config(entry.model)[0])
        limit = token_limit(s.max_tokens, config)
        read = kept = 0.0  # tokens forwarded (with the few-shot examples), tokens captured
        for unit in (u for u in units if u.payload["model"] == name):
            size, (start, stop) = sizes[unit.payload["benchmark"]], unit.payload["items"]
            read += (stop - start) * min(size.prompt_tokens + (size.solution_tokens if solution else 0), limit)
            kept += (stop - start) * min(size.own_tokens - (0 if solution else size.solution_tokens), limit)
        out += int(kept) * len(entry.layers) * config.hidden_size * np.dtype(s.dtype).itemsize
        activations = s.batch_size * limit * config.hidden_size * 4 * (len(entry.layers) + 4)
        memory = max(memory, parameter_bytes(config, entry.model.dtype) + activations)
        model = model_size(entry.model)
        depth = (max(entry.layers) + 1) / config.num_hidden_layers  # the forward stops after the last captured block
        work += [Work("load", model.weight_bytes, label=name),
                 Work("forward", read * depth, model, label=f"{name}: {read:,.0f} tokens through {depth:.0%} of the blocks")]
    return Estimate(output_bytes=out, task_memory_bytes=memory, work=tuple(work),
                    notes=(f"tokens counted from the benchmarks' texts at {CHARS_PER_TOKEN} characters a token; "
                           f"activations stored as {s.dtype}",))


# ---------------------------------------------------------------- the work (GPU)


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    shard.set_attrs(layer_convention=CONVENTION, text=s.text, dtype=s.dtype)
    benchmarks: dict[int, Benchmark] = {}
    for entry, units_left in units_per_model(s.models, units, shard.pending()):
        model, tokenizer = load_model(entry.model, attn_implementation=None), load_tokenizer(entry.model)
        for unit in tqdm(units_left, desc=f"{entry.name} shard {shard.shard_index}", unit="unit"):
            index = unit.payload["benchmark"]
            if index not in benchmarks:
                benchmarks[index] = load_benchmark(s.benchmarks[index], f"{FIELD}.benchmarks[{index}]")
            start, stop = unit.payload["items"]
            captured = capture_items(model, tokenizer, entry, benchmarks[index], range(start, stop), s)
            with shard.unit(unit.id) as group:
                group.attrs.update(model=entry.name, benchmark=s.benchmarks[index].name)
                for name, values in captured.items():
                    group.create_dataset(name, data=values)
        del model


@no_grad
def capture_items(model, tokenizer, entry: ModelEntry, bench: Benchmark, items: range,
                  s: Settings) -> dict[str, np.ndarray]:
    """{`L<layer>`: (tokens, d_model) in `s.dtype`, `item`, `position`} for the items' own tokens."""
    device = input_device(entry.model)
    parts: dict[str, list[np.ndarray]] = {"item": [], "position": [], **{f"L{layer}": [] for layer in entry.layers}}
    for start in range(items.start, items.stop, s.batch_size):
        chosen = [bench.items[i] for i in range(start, min(start + s.batch_size, items.stop))]
        encoded, keep = encode_items(tokenizer, bench, chosen, s.text, token_limit(s.max_tokens, model.config))
        rows, positions = np.nonzero(keep)
        with capture_residuals(model, entry.layers, stop=True) as residuals:
            model(input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device))
        for layer in entry.layers:
            parts[f"L{layer}"].append(_stored(residuals[layer][rows, positions], s.dtype, entry.name, layer))
        parts["item"].append(np.asarray([chosen[r].index for r in rows], dtype=np.int32))
        parts["position"].append(positions.astype(np.int32))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _stored(values: torch.Tensor, dtype: str, model: str, layer: int) -> np.ndarray:
    """`values` in the dtype they are stored in; float16 refuses what it cannot hold (inf where the
    model wrote a finite value: an SAE trained on it would learn NaN)."""
    stored = values.to(getattr(torch, dtype))
    if dtype == "float16" and bool(torch.isinf(stored).any()) and not bool(torch.isinf(values).any()):
        largest = float(values.abs().max())
        raise UserError(f"{FIELD}.dtype: {model}'s layer {layer} reaches |{largest:,.0f}|, beyond float16's range "
                        "(65,504), where it would be stored as inf; set dtype: float32 (twice the disk)")
    return stored.cpu().numpy()


# ---------------------------------------------------------------- reduce


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    """Concatenate each model's units in plan order (benchmark, then item) into one array per layer."""
    s = manifest.settings
    bench_index = {b.name: i for i, b in enumerate(s.benchmarks)}
    groups = [(path, name, model) for path in shard_paths for name, model in _unit_models(path).items()]
    summary = []
    with h5py.File(out_dir / "merged.h5", "w", libver=LIBVER) as out:
        out.attrs.update(job="activation_capture", format="saebatch-activations/1", layer_convention=CONVENTION,
                         text=s.text, models=json.dumps({e.name: e.model.name for e in s.models}),
                         benchmarks=json.dumps([b.name for b in s.benchmarks]))
        for entry in s.models:
            mine = [(path, name) for path, name, model in groups if model == entry.name]  # not by name: "a" prefixes "a.b"
            model_group = out.create_group(f"models/{entry.name}")
            model_group.attrs.update(model=entry.model.name, layers=entry.layers)
            summary += _concatenate(model_group, mine, entry, bench_index)
    _report(Report(out_dir / "report", "Captured residual-stream activations"), s, pd.DataFrame(summary))


def _unit_models(path: Path) -> dict[str, str]:
    """The shard's units and the model each captured."""
    with h5py.File(path, "r") as shard:
        return {name: unit.attrs["model"] for name, unit in shard["units"].items()}


def _concatenate(target: h5py.Group, parts: list[tuple[Path, str]], entry: ModelEntry,
                 bench_index: dict[str, int]) -> list[dict]:
    """Append the parts' arrays to resizable datasets (one unit in memory at a time); per
    benchmark and layer, token count and mean activation norm for the report."""
    names = ["item", "position", *[f"L{layer}" for layer in entry.layers]]
    stats: dict[tuple[str, int], list[float]] = {}
    for path, unit_name in parts:
        with h5py.File(path, "r") as shard:
            unit = shard["units"][unit_name]
            bench = unit.attrs["benchmark"]
            arrays = {name: unit[name][()] for name in names}
        arrays["benchmark"] = np.full(len(arrays["item"]), bench_index[bench], dtype=np.int16)
        for name, values in arrays.items():
            if name not in target:
                target.create_dataset(name, data=values, maxshape=(None, *values.shape[1:]),  # chunks of 4,096
                                      chunks=(4096, *values.shape[1:]))  # tokens whatever the first unit holds
            else:
                dataset = target[name]
                dataset.resize(len(dataset) + len(values), axis=0)
                dataset[-len(values):] = values
        for layer in entry.layers:
            norms = np.linalg.norm(arrays[f"L{layer}"].astype(np.float32), axis=1)
            tokens, total = stats.get((bench, layer), [0, 0.0])
            stats[(bench, layer)] = [tokens + len(norms), total + float(norms.sum())]
    return [{"model": entry.name, "benchmark": bench, "layer": layer, "tokens": int(tokens),
             "mean_norm": total / max(tokens, 1)} for (bench, layer), (tokens, total) in stats.items()]


def _report(report: Report, s: Settings, summary: pd.DataFrame) -> None:
    report.text(f"Residual-stream activations ({CONVENTION}) of {len(s.models)} model(s) on {len(s.benchmarks)} "
                f"benchmark(s), captured over each item's {s.text.replace('_', ' ')} (few-shot examples and "
                f"special tokens left out), {s.dtype}. `merged.h5`: models/<name>/L<layer> (tokens, d_model), with "
                "each token's benchmark, item and position.")
    report.heading("Tokens and mean activation norm")
    report.table(summary, "tokens")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(s.models), figsize=(4.5 * len(s.models), 3.5), squeeze=False)
    for ax, entry in zip(axes[0], s.models, strict=True):
        part = summary[summary["model"] == entry.name]
        for bench, rows in part.groupby("benchmark"):
            ax.plot(rows["layer"], rows["mean_norm"], marker="o", label=bench)
        ax.set_title(entry.name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.set_xlabel("layer")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("mean residual norm")
    report.figure(fig, "norms", "Mean norm of the captured residual stream per layer and benchmark")
    report.write()
