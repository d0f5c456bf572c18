"""What the reasoning-circuit jobs (seed 003) share: the models with their layers, the benchmarks'
sizes as planning sees them, the texts as captured, and reading the runs of earlier steps
(activation_capture -> sae_training -> feature_ablation) where they keep what they wrote."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from pydantic import Field

from common.errors import UserError
from common.layers import resolve_layers
from common.lazy import lazy_import
from common.manifest import StrictModel, shown
from common.models import DEVICE_PATTERN, ModelSpec, load_config, text_config
from common.plan import WorkUnit, assume, only_estimating
from common.rundir import open_run
from common.runtime import CHARS_PER_TOKEN
from common.upstream import upstream_to_estimate
from jobs._reasoning.problems import Benchmark, BenchmarkSpec, Item, load_benchmark

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
GUESSED_TOKENS_PER_ITEM = 256  # planning only: an item of a benchmark whose file is not at hand


DEVICE_FIELD = Field("auto", pattern=DEVICE_PATTERN, description="where this step runs the model and SAEs: "
                     "'auto' (the task's GPUs, else the CPU), 'cpu', 'cuda:0'; the capture's model.device is not used")


class ModelEntry(StrictModel):
    """A model of the study and the layers (block outputs) whose residual stream is captured."""

    name: str = Field(pattern=NAME_PATTERN, description="label in unit ids and reports, e.g. gpt2-medium")
    model: ModelSpec = Field(description="the model: {id: <HF id>} or `organism`")
    layers: list[int] = Field(default_factory=list, description="blocks whose output is captured, e.g. [6, 12]")

    def placed(self, device: str) -> ModelSpec:
        """The model as a later step loads it: on that step's own device, not the capture's."""
        return self.model.model_copy(update={"device": device})


def check_models(models: list[ModelEntry], field: str) -> dict[str, int]:
    """Each model's d_model, after checking names, layers and configs (no weights loaded)."""
    names = [entry.name for entry in models]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"{field}: model names must be unique; repeated: {', '.join(repeated)}")
    widths = {}
    for index, entry in enumerate(models):
        where = f"{field}[{index}].layers"
        if not entry.layers:
            raise UserError(f"{where}: model {entry.name!r} has no layers configured; list the blocks to "
                            "capture, e.g. layers: [6, 12]")
        config = text_config(load_config(entry.model)[0])
        resolve_layers(entry.layers, config.num_hidden_layers, where)
        widths[entry.name] = config.hidden_size
    return widths


def units_per_model(models: list[ModelEntry], units: list[WorkUnit],
                    pending: Iterable[str]) -> Iterator[tuple[ModelEntry, list[WorkUnit]]]:
    """Each model with its units still to do, in order; a model with none is left out, so that a
    task loads each model once, and not at all when a resume left it nothing."""
    pending = set(pending)
    for entry in models:
        units_left = [unit for unit in units if unit.payload["model"] == entry.name and unit.id in pending]
        if units_left:
            yield entry, units_left


def check_prompt_lengths(bench: Benchmark, tokenizer, config, model: str, field: str) -> None:
    """Refuse a benchmark whose longest prompt plus its answer does not fit the model's positions."""
    positions = config.max_position_embeddings  # GPT-2's n_positions answers to this name too
    longest = max(len(tokenizer(bench.prompt(item)).input_ids) for item in bench.items)
    if longest + bench.spec.max_new_tokens > positions:
        raise UserError(f"{field}: {bench.spec.name}'s longest prompt has {longest} tokens; with max_new_tokens "
                        f"{bench.spec.max_new_tokens} that exceeds {model}'s {positions} positions. Lower few_shot "
                        "or max_new_tokens")


class BenchmarkSize(StrictModel):
    """What planning needs of a benchmark: its items evaluated, and their tokens (mean per item),
    counted from the texts at CHARS_PER_TOKEN where the file is at hand."""

    items: int
    prompt_tokens: float  # the few-shot examples and the question: what a model reads before answering
    solution_tokens: float  # the reference solution after it
    own_tokens: float  # the item's own question and solution, without the examples


def benchmark_size(spec: BenchmarkSpec, field: str) -> BenchmarkSize:
    """The benchmark's size; while planning, a missing file whose `n` is given is estimated."""
    try:
        bench = load_benchmark(spec, field)
    except UserError as missing:
        if spec.path is None or spec.path.exists() or spec.n is None:
            raise
        only_estimating(missing)
        assume(f"benchmark {spec.name}: {shown(spec.path)} is not here; taken as n = {spec.n} items of about "
               f"{GUESSED_TOKENS_PER_ITEM} tokens, with {spec.few_shot} example(s) as long")
        guess = GUESSED_TOKENS_PER_ITEM
        return BenchmarkSize(items=spec.n, prompt_tokens=(spec.few_shot + 1) * guess / 2, solution_tokens=guess / 2,
                             own_tokens=guess)
    count = len(bench.items)
    prompts = sum(len(bench.prompt(item)) for item in bench.items) / count / CHARS_PER_TOKEN
    solutions = sum(len(bench.continuation(item)) for item in bench.items) / count / CHARS_PER_TOKEN
    questions = sum(len(bench.question_prompt(item)) for item in bench.items) / count / CHARS_PER_TOKEN
    return BenchmarkSize(items=count, prompt_tokens=prompts, solution_tokens=solutions, own_tokens=questions + solutions)


@dataclass(frozen=True)
class CaptureRun:
    """An activation_capture run: its settings (models, benchmarks) and merged activations; or,
    while planning before it exists (`estimated`), what its manifest says it will capture."""

    path: Path
    settings: Any  # jobs.activation_capture.Settings
    estimated: bool = False

    @property
    def merged(self) -> Path:
        return self.path / "merged.h5"

    @property
    def value_bytes(self) -> int:
        """Bytes of one stored activation value (the capture's `dtype`)."""
        return np.dtype(self.settings.dtype).itemsize

    def shapes(self, field: str) -> dict[tuple[str, int], tuple[int, int]]:
        """(tokens, d_model) captured per (model name, layer): as stored, or estimated from the
        benchmarks' sizes (each item's own tokens, at most max_tokens) before the run exists."""
        if not self.estimated:
            with h5py.File(self.merged, "r") as merged:
                return {(entry.name, layer): merged[f"models/{entry.name}/L{layer}"].shape
                        for entry in self.settings.models for layer in entry.layers}
        sizes = [benchmark_size(spec, f"{field}: the capture's benchmarks[{index}]")
                 for index, spec in enumerate(self.settings.benchmarks)]
        shapes: dict[tuple[str, int], tuple[int, int]] = {}
        for entry in self.settings.models:
            config = text_config(load_config(entry.model)[0])
            limit = self.settings.max_tokens or config.max_position_embeddings
            per_item = [size.own_tokens if self.settings.text == "prompt_and_solution" else
                        size.own_tokens - size.solution_tokens for size in sizes]
            tokens = int(sum(size.items * min(n, limit) for size, n in zip(sizes, per_item, strict=True)))
            shapes |= {(entry.name, layer): (tokens, config.hidden_size) for layer in entry.layers}
        return shapes

    @property
    def models(self) -> dict[str, ModelEntry]:
        return {entry.name: entry for entry in self.settings.models}

    def select(self, names: list[str] | None, field: str) -> list[ModelEntry]:
        """The named models (None: all), each of which the capture must have layers for."""
        if names is None:
            return list(self.models.values())
        unknown = [name for name in names if name not in self.models]
        if unknown:
            raise UserError(f"{field}: model(s) {unknown} have no layers configured in the capture run {self.path}, "
                            f"which captured {sorted(self.models)}; name those, or capture the others first")
        return [self.models[name] for name in names]


def read_capture_run(path: Path, field: str) -> CaptureRun:
    """The capture run at `path`; while planning before it is merged, its manifest's plan."""
    if (path / "merged.h5").is_file():
        read_upstream(path, "activation_capture", field)
        return CaptureRun(path, open_run(path).load_manifest().settings)
    missing = UserError(f"{field}: {path} has no merged.h5; run activation_capture first (saebatch submit <its "
                        "manifest>) and wait for its reduce")
    manifest, where = upstream_to_estimate(path, "activation_capture", field, missing)
    assume(f"{field}: run {path.name} does not exist yet; taken from {where}: its models, layers and benchmarks, "
           "the tokens it will capture estimated from the benchmarks")
    return CaptureRun(path, manifest.settings, estimated=True)


def read_upstream(path: Path, job: str, field: str) -> Path:
    """The merged.h5 of a finished run of `job`."""
    merged = path / "merged.h5"
    if not merged.is_file():
        raise UserError(f"{field}: {path} has no merged.h5; run {job} first (saebatch submit <its manifest>) "
                        "and wait for its reduce")
    with h5py.File(merged, "r") as file:
        written_by = file.attrs.get("job")
    if written_by != job:
        raise UserError(f"{field}: {merged} was written by {written_by!r}, not {job}")
    return merged


def token_limit(max_tokens: int | None, config) -> int:
    """The most tokens of one text that are captured: max_tokens, or the model's positions."""
    return max_tokens or text_config(config).max_position_embeddings


def read_as_generated(tokenizer, bench: Benchmark, item: Item, with_solution: bool) -> tuple[list[int], int, list[bool]]:
    """An item as a model reads it: the prompt (with the tokenizer's special tokens) and, with
    `with_solution`, the reference solution, each tokenized on its own, as when the model writes the
    solution after reading the prompt (a prompt ending in a space keeps that token, which joint
    tokenization would fold into the answer's first word). The ids, the prompt's length, and per
    token whether it is the item's own: not special, not the few-shot examples."""
    prompt = tokenizer(bench.prompt(item), return_offsets_mapping=True, return_special_tokens_mask=True)
    own_start = len(bench.prompt(item)) - len(bench.question_prompt(item))
    ids = list(prompt["input_ids"])
    own = [not special and start >= own_start
           for (start, _), special in zip(prompt["offset_mapping"], prompt["special_tokens_mask"], strict=True)]
    if with_solution:
        solution = tokenizer(bench.continuation(item), add_special_tokens=False).input_ids
        ids += solution
        own += [True] * len(solution)
    return ids, len(prompt["input_ids"]), own


def encode_items(tokenizer, bench: Benchmark, items: list[Item], text: str, max_tokens: int) -> tuple[dict, np.ndarray]:
    """The items as read_as_generated reads them, right-padded (a text over `max_tokens` loses its
    beginning after its leading special tokens), and (rows, seq) bool marking the tokens captured:
    real, not special, and the item's own."""
    rows, owns = [], []
    for item in items:
        ids, _, own = read_as_generated(tokenizer, bench, item, text == "prompt_and_solution")
        if len(ids) > max_tokens:  # keep the leading special tokens (<bos>) and the last tokens that fit
            leading = next((i for i, token in enumerate(ids) if token not in tokenizer.all_special_ids), 0)
            cut = len(ids) - (max_tokens - leading)
            ids, own = ids[:leading] + ids[cut:], own[:leading] + own[cut:]
        rows.append(ids)
        owns.append(own)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    keep = np.zeros((len(rows), width), dtype=bool)
    for i, (ids, own) in enumerate(zip(rows, owns, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        keep[i, : len(ids)] = own
    return {"input_ids": input_ids, "attention_mask": attention}, keep


def sae_path_template(run_dir: Path, model: str) -> str:
    """Where a training run keeps the sae-lens folders of one model's layers, `{layer}` left open."""
    return str(run_dir / "saes" / model / "L{layer}")


def sae_dir(run_dir: Path, model: str, layer: int) -> Path:
    return Path(sae_path_template(run_dir, model).format(layer=layer))


def teacher_forced(tokenizer, bench: Benchmark, items: list, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt + reference solution as read_as_generated reads them: ids, attention
    mask, the solution's positions, and the real non-special positions."""
    rows = [read_as_generated(tokenizer, bench, item, with_solution=True) for item in items]
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask, solution, positions = (torch.zeros(len(rows), width, dtype=torch.bool) for _ in range(3))
    for i, (row, prompt_length, _) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
        solution[i, prompt_length : len(row)] = True
        special = tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
        positions[i, : len(row)] = ~torch.tensor(special, dtype=torch.bool)
    return ids.to(device), mask.long().to(device), solution.to(device), positions.to(device)
