"""Every job's own shard code at the seeds' shapes on one GPU, with random weights.

    python benchmarks/gpu_paper_scale.py                  # a machine with a CUDA GPU: about 5 minutes on an H200
    python benchmarks/gpu_paper_scale.py --only population_patching,feature_ablation
    python benchmarks/gpu_paper_scale.py --smoke          # the same code at toy widths on the CPU; records nothing

Models are the seeds' architectures (`common/model_configs/`, `model.random_weights: true`) and the
SAEs random TopK SAEs at the releases' widths: LlamaScope 32k for Llama-3.1-8B, Gemma Scope 16k
for Gemma-2-2B, 8x (32k) trained by sae_training for Meta-Llama-3-8B. Nothing is downloaded; the
organism's tokenizer stands in for the models' own (about two characters a token, so prompts are
about twice as long as Llama's tokenizer makes them). Random weights never end an answer early:
every answer runs to `max_new_tokens`, the worst case, which is what these figures measure.

Each job runs through the launcher (`run_shard_task` on shard 0 of a manifest derived from the
paper manifest), so the time includes building the model, loading the SAEs and writing the shard;
population_patching times that build apart and counts it once in its projection, not once per
slice of 32 features.
A row per job goes to benchmarks/RESULTS.md: throughput, peak GPU memory, the GPU-hours of the
seed's full run projected from it, and, where the seed had a method of its own, its speed
re-implemented (one generate call per trial or problem, one position at a time) on a slice.
population_patching adds a row of its decode loop against the path it replaced (transformers'
`generate`, every row to the end) on one batch of 512 trials, both measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ablation_batching import one_at_a_time  # noqa: E402
from patching_throughput import generate_path, ours, seeds_way  # noqa: E402
from results import Row, gpu_machine, machine, record  # noqa: E402
from token_tracking_storage import run_seed_baseline  # noqa: E402

from common.launcher import plan_manifest, prepare_run, reduce_task, run_shard_task  # noqa: E402
from common.logs import setup_logging  # noqa: E402
from common.manifest_file import load_manifest  # noqa: E402
from common.models import ModelSpec, load_model, load_tokenizer  # noqa: E402
from common.rundir import RunDir  # noqa: E402
from common.saes import SaeSpec, load_sae  # noqa: E402
from jobs._reasoning.problems import BenchmarkSpec, load_benchmark  # noqa: E402
from jobs.population_patching import Row as Trial  # noqa: E402
from jobs.sae_training import sae_groups  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO / "manifests" / "data" / "gsm8k" / "test.jsonl"
LLAMA31, LLAMA3, GEMMA2 = "meta-llama/Llama-3.1-8B", "meta-llama/Meta-Llama-3-8B", "google/gemma-2-2b"
SMOKE_WIDTHS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16}
log = logging.getLogger("gpu_paper_scale")


@dataclass
class Bench:
    """Where the runs go and at which scale: the seeds' widths on a GPU, toy widths (--smoke) on the CPU."""

    root: Path
    smoke: bool

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda:0"

    def model(self, hf_id: str, dtype: str = "bfloat16") -> dict:
        """A random-weights model spec: the shipped architecture, or in --smoke the same depth at toy width."""
        spec = {"random_weights": True, "dtype": "float32" if self.smoke else dtype, "device": self.device}
        if not self.smoke:
            return spec | {"id": hf_id}
        folder = self.root / "configs" / hf_id.replace("/", "--")
        if not folder.exists():
            shipped = json.loads((REPO / "common" / "model_configs" / f"{hf_id.replace('/', '--')}.json").read_text())
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(json.dumps(shipped | SMOKE_WIDTHS))
        return spec | {"path": str(folder)}

    def sae(self, d_sae: int, k: int) -> dict:
        return {"random": {"architecture": "topk", "d_sae": 256 if self.smoke else d_sae, "k": 8 if self.smoke else k}}

    def cluster(self) -> dict:
        return {"gpus_per_task": 0 if self.smoke else 1, "mem_gb": 512, "reduce_mem_gb": 512}

    def manifest(self, name: str, job: str, settings: dict, shards: int = 1) -> Path:
        path = self.root / f"{name}.yaml"
        data = {"job": job, "run": {"root": str(self.root / "runs"), "shards": shards}, "cluster": self.cluster(),
                job: settings}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def sync(self) -> None:
        if not self.smoke:
            torch.cuda.synchronize()


@dataclass
class Measured:
    run: RunDir
    seconds: float
    peak_bytes: int

    def peak(self) -> str:
        return f"{self.peak_bytes / 2**30:.1f} GiB" if self.peak_bytes else "-"


def run_shard(bench: Bench, manifest: Path) -> Measured:
    """Shard 0 of the manifest's run through the launcher, timed, with the GPU's peak memory."""
    free_memory()
    run = prepare_run(load_manifest(manifest))
    if not bench.smoke:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run_shard_task(str(run.path), 0)
    bench.sync()
    seconds = time.perf_counter() - started
    return Measured(run, seconds, 0 if bench.smoke else torch.cuda.max_memory_allocated())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_hours(seconds_per_item: float, items: float) -> str:
    seconds = seconds_per_item * items
    return f"{seconds / 3600:.2f} GPU-h" if seconds >= 360 else f"{seconds:.0f} GPU-s"


# ---------------------------------------------------------------- seed 001: token tracking


def token_tracking(bench: Bench) -> list[Row]:
    """10 scenarios, all 32 layers of Llama-3.1-8B, eager attention and 32k-wide SAE features."""
    settings = {"model": bench.model(LLAMA31), "sae": bench.sae(32_768, 64), "layers": "all",
                "mode": "features_and_attention", "batch_size": 10}
    measured = run_shard(bench, bench.manifest("token_tracking", "token_tracking", settings))
    scenarios = load_manifest(measured.run.manifest_path).settings.scenarios
    with h5py.File(measured.run.shard_path(0)) as shard:
        tokens = sum(len(shard["units"][name]["token_ids"]) for name in shard["units"])
    rate = len(scenarios) / measured.seconds

    slice_ = [scenario.model_dump() for scenario in scenarios[:2]]  # the seed's loop on two scenarios
    baseline_manifest = bench.manifest("token_tracking_seed", "token_tracking", settings | {"scenarios": slice_})
    free_memory()
    seed = run_seed_baseline(baseline_manifest, bench.root / "seed_token_tracking")
    seed_rate = len(slice_) / seed.total_s
    return [Row(f"GPU paper scale, token_tracking: Llama-3.1-8B shapes (random weights, bf16), 32 layers, "
                f"attention + random TopK SAEs 32,768 wide (k 64), the seed's 10 scenarios ({tokens} tokens)",
                ours=f"{rate:.2f} scenarios/s ({measured.seconds:.1f} s, model built in it); peak {measured.peak()}; "
                     f"seed's full run (10 scenarios): {gpu_hours(1 / rate, 10)}",
                baseline=f"{seed_rate:.2f} scenarios/s (the seed's method on 2 scenarios: one position at a time, "
                         f"dense features to npz; {seed.total_s:.1f} s, model built in it)",
                ratio=f"{rate / seed_rate:.1f}x")]


# ---------------------------------------------------------------- seed 002: the correlation graph


def feature_correlation(bench: Bench) -> list[Row]:
    """Gemma-2-2B, all 26 layers with 16k-wide SAEs, a measured slice projected to 1M tokens."""
    slice_tokens, top = (4_096, 32) if bench.smoke else (65_536, 256)
    settings = {"model": bench.model(GEMMA2), "sae": bench.sae(16_384, 64), "layers": "all",
                "corpus": {"builtin": "organism", "window": 1024, "tokens": slice_tokens},
                "features": {"top": top, "min_support": 1, "selection_tokens": slice_tokens // 4},
                "tokens_per_unit": slice_tokens // 2, "batch_size": 8}
    measured = run_shard(bench, bench.manifest("feature_correlation", "feature_correlation", settings))
    rate = slice_tokens / measured.seconds
    return [Row(f"GPU paper scale, feature_correlation: Gemma-2-2B shapes (random weights, bf16), all 26 layers with "
                f"random TopK SAEs 16,384 wide (k 64), top {top} features per layer ({26 * top:,} in the graph), "
                f"{slice_tokens:,} tokens measured",
                ours=f"{rate:,.0f} tokens/s ({measured.seconds:.1f} s, with its first pass over "
                     f"{slice_tokens // 4:,} tokens and the model built); peak {measured.peak()}; 1M tokens: "
                     f"{gpu_hours(1 / rate, 1e6)}",
                baseline="-", ratio="-")]


def feature_contexts(bench: Bench) -> list[Row]:
    """Llama-3.1-8B, 256 features of layers 25-31 (32k-wide SAEs), top 20 contexts each, a measured
    slice projected to 1M tokens."""
    slice_tokens, count, width = (4_096, 16, 256) if bench.smoke else (65_536, 256, 32_768)
    rng = np.random.default_rng(0)
    features = [[int(layer), int(feature)] for layer, feature in zip(rng.integers(25, 32, count),
                                                                      rng.integers(0, width, count), strict=True)]
    settings = {"model": bench.model(LLAMA31), "sae": bench.sae(32_768, 64), "features": features,
                "corpus": {"builtin": "organism", "window": 1024, "tokens": slice_tokens},
                "tokens_per_unit": slice_tokens // 2, "batch_size": 8}
    measured = run_shard(bench, bench.manifest("feature_contexts", "feature_contexts", settings))
    rate = slice_tokens / measured.seconds
    return [Row(f"GPU paper scale, feature_contexts: Llama-3.1-8B shapes (random weights, bf16), {count} features of "
                f"layers 25-31 with random TopK SAEs 32,768 wide (k 64), top 20 contexts each, {slice_tokens:,} tokens "
                "measured",
                ours=f"{rate:,.0f} tokens/s ({measured.seconds:.1f} s, with the logit effects and the model built); "
                     f"peak {measured.peak()}; 1M tokens: {gpu_hours(1 / rate, 1e6)}",
                baseline="-", ratio="-")]


# ---------------------------------------------------------------- seed 000: games, patching


def gambling_games(bench: Bench) -> list[Row]:
    """A shard of the paper manifest's size (256 games; 64 in --smoke) at `batch_size: auto`,
    Llama-3.1-8B, SAE features of layers 25-31 at every decision."""
    settings = {"model": bench.model(LLAMA31), "sae": bench.sae(32_768, 64), "layers": list(range(25, 32)),
                "components": "GMRWP", "repetitions": 2, "max_new_tokens": 50, "retries": 3, "batch_size": "auto"}
    measured = run_shard(bench, bench.manifest("gambling_games", "gambling_games", settings,
                                               shards=4 if bench.smoke else 1))
    with h5py.File(measured.run.shard_path(0)) as shard:
        games, at_once = len(shard["units"]), int(shard.attrs["batch_size"])
        answers = sum(len(shard["units"][game]["decisions/response"]) for game in shard["units"])
    rate = answers / measured.seconds
    full_games = 2**5 * 2 * 2 * 50
    return [Row(f"GPU paper scale, gambling_games: Llama-3.1-8B shapes (random weights, bf16), {games} games x "
                f"{answers // games} answers of 50 tokens (random answers are unreadable: asked again 3 times), "
                f"batch_size auto ({min(at_once, games)} games at once), random TopK SAEs 32,768 wide at layers 25-31",
                ours=f"{rate:.1f} answers/s ({measured.seconds:.1f} s, model built in it); peak {measured.peak()}; "
                     f"seed's full run ({full_games:,} games): {gpu_hours(1 / rate, full_games * 10)} at 10 answers "
                     f"a game, {gpu_hours(1 / rate, full_games * 100)} if every game played 100 rounds",
                baseline="-", ratio="-")]


def feature_table(bench: Bench, features: int, name: str) -> Path:
    """Random features of layers 25-31 with random safe and bankrupt means, as feature_contrast writes them."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"layer": np.arange(features) % 7 + 25, "feature": rng.choice(256 if bench.smoke else 32_768,
                          features, replace=False), "mean_safe": rng.uniform(0.5, 3, features),
                          "mean_bankrupt": rng.uniform(0.5, 3, features), "selected": True,
                          "cohens_d": rng.normal(0, 1, features)})
    table.to_csv(bench.root / name, index=False)
    return bench.root / name


def population_patching(bench: Bench) -> list[Row]:
    """32 features of layers 25-31 x 2 conditions x 2 prompts x 50 trials at `batch_size: auto`, its
    peak memory against the plan's; then the seed's whole run (1,340 features) with exact decisions alone."""
    features = 4 if bench.smoke else 32
    table = pd.read_csv(feature_table(bench, features, "patching_features.csv"))
    settings = {"model": bench.model(LLAMA31), "sae": bench.sae(32_768, 64),
                "feature_table": str(bench.root / "patching_features.csv"), "trials": 50, "max_new_tokens": 50,
                "batch_size": "auto", "decisions": "sampled"}  # exact decisions: the run below
    manifest = bench.manifest("population_patching", "population_patching", settings)
    job, plan = plan_manifest(load_manifest(manifest))
    planned = job.estimate(load_manifest(manifest), list(plan.shard_units(0))).task_memory_bytes
    with logged("common.batching") as messages:
        measured = run_shard(bench, manifest)
    batch = next((message for message in messages if message.startswith("batch_size auto")), "batch_size auto: ?")
    trials = features * 2 * 2 * 50 + 2 * 50
    full = 1_340 * 2 * 2 * 50 + 2 * 50

    free_memory()
    started = time.perf_counter()
    spec = ModelSpec(**settings["model"])
    model, tokenizer = load_model(spec, attn_implementation=None), load_tokenizer(spec)
    saes = {layer: load_sae(SaeSpec(**settings["sae"]), layer, model.config.hidden_size, torch.device(bench.device))
            for layer in sorted(set(table.layer))}
    bench.sync()
    setup = time.perf_counter() - started  # what the shard spent before its first answer, once per task
    rate = trials / max(measured.seconds - setup, 1e-9)
    rows = patching_trials(table, prompts=2, trials=2)[:16]
    seed_seconds = seeds_way(model, tokenizer, saes, rows, torch.device(bench.device), new_tokens=50)
    seed_rate = len(rows) / seed_seconds
    loop_row = decode_loop(bench, model, tokenizer, saes, patching_trials(table, prompts=1, trials=50), full)
    del model, saes

    full_features = 40 if bench.smoke else 1_340
    exact_settings = settings | {"feature_table": str(feature_table(bench, full_features, "patching_all.csv")),
                                 "decisions": "exact"}
    exact = run_shard(bench, bench.manifest("population_patching_exact", "population_patching", exact_settings))
    exact_row = Row(f"GPU paper scale, population_patching with exact decisions alone: the seed's whole run at "
                    f"Llama-3.1-8B shapes (random weights, bf16), {full_features:,} features of layers 25-31 x 2 "
                    "conditions x 2 prompts, one forward each (P(stop) at the cue), random TopK SAEs 32,768 wide",
                    ours=f"{exact.seconds:.1f} s for the whole run ({exact.seconds / 3600:.3f} GPU-h, the model built in "
                         f"it); peak {exact.peak()}",
                    baseline=f"{gpu_hours(1, setup + full / rate)} sampling 50 trials per condition and prompt (the row above)",
                    ratio=f"{(setup + full / rate) / exact.seconds:.0f}x")
    against_plan = (f" against the plan's {planned / 2**30:.1f} GiB ({measured.peak_bytes / planned:.2f}x)"
                    if measured.peak_bytes and planned else "")  # no peak on a CPU
    return [exact_row, Row(f"GPU paper scale, population_patching: Llama-3.1-8B shapes (random weights, bf16), {features} "
                f"features of layers 25-31 x 2 conditions x 2 prompts x 50 trials + the shared baseline ({trials:,} "
                "answers of 50 tokens), random TopK SAEs 32,768 wide, batch_size auto",
                ours=f"{rate:.1f} answers/s ({measured.seconds:.1f} s, of which {setup:.1f} s building the model and "
                     f"SAEs); seed's full run (1,340 features, {full:,} answers, sampled decisions, one task): "
                     f"{gpu_hours(1, setup + full / rate)}; {batch}; peak {measured.peak()}{against_plan}",
                baseline=f"{seed_rate:.2f} answers/s (the seed's method on {len(rows)} answers: one generate call per "
                         f"trial, 50 tokens); the full run at that rate: {gpu_hours(1 / seed_rate, full)} (the seed "
                         "itself estimated 78 GPU-h at 0.7 s a trial)",
                ratio=f"{rate / seed_rate:.1f}x"), loop_row]


@contextmanager
def logged(name: str) -> Iterator[list[str]]:
    """The messages logger `name` writes while inside."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger(name).addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger(name).removeHandler(handler)


def patching_trials(table: pd.DataFrame, prompts: int, trials: int) -> list[Trial]:
    """Each feature of `table` at its safe and at its bankrupt mean, on the first `prompts` prompts, `trials` times."""
    return [Trial(f"L{r.layer}_F{r.feature}", condition, prompt, trial, layer=int(r.layer), feature=int(r.feature),
                  value=float(getattr(r, f"mean_{condition}")))
            for r in table.itertuples() for condition in ("safe", "bankrupt") for prompt in range(prompts)
            for trial in range(trials)]


def decode_loop(bench: Bench, model, tokenizer, saes: dict, trials: list[Trial], full: int) -> Row:
    """The job's decode loop against the path it replaced (`generate` with the seeded noise, every
    row to the end) on one batch of the first prompt, 50 tokens: random weights almost never end
    early (only by writing a stop string by chance), so nearly every row writes 50 tokens and this
    is the loop's cost per step, not what early ends save."""
    batch, device, steps = trials[: 32 if bench.smoke else 512], torch.device(bench.device), 50
    for path in (ours, generate_path):  # warm up
        path(model, tokenizer, saes, batch[:8], device, steps)
    new, answers = ours(model, tokenizer, saes, batch, device, steps)  # each synchronizes around its timing
    old, previous = generate_path(model, tokenizer, saes, batch, device, steps)
    same = sum(a == b for a, b in zip(answers, previous, strict=True))

    def figures(seconds: float) -> str:
        return (f"{seconds / steps * 1e3:.1f} ms a step at batch {len(batch)}, {len(batch) / seconds:.1f} answers/s "
                f"({seconds:.1f} s); seed's full run ({full:,} answers): {gpu_hours(seconds / len(batch), full)}")

    layers = f"{min(row.layer for row in batch)}-{max(row.layer for row in batch)}"
    return Row(f"GPU paper scale, population_patching's decode loop against the previous generate path: Llama-3.1-8B "
               f"shapes (random weights, bf16), one call of {len(batch)} trials of prompt 0 (its cache shared), "
               f"per-row feature edits at layers {layers}, random TopK SAEs 32,768 wide, {steps} tokens a row (random "
               "weights almost never end early), measured in the same run",
               ours=f"{figures(new)} (our decode loop, rows that end leaving the batch)",
               baseline=f"{figures(old)} (transformers' generate, the seeded noise as a logits processor, every row "
                        f"to the end); {same}/{len(batch)} answers identical",
               ratio=f"{old / new:.2f}x")


# ---------------------------------------------------------------- seed 003: capture, training, ablation


@dataclass
class ReasoningRuns:
    """The reasoning chain's runs, each step reading the one before (filled as they finish)."""

    capture: RunDir | None = None
    training: RunDir | None = None


REASONING = ReasoningRuns()
ITEMS = 64  # GSM8K problems captured (and, after 32 for attribution, the 32 answered under ablation)


def gsm8k(bench: Bench, n: int, max_new_tokens: int = 256) -> dict:
    return {"name": "gsm8k", "format": "gsm8k", "path": str(GSM8K), "few_shot": 4, "n": n,
            "max_new_tokens": 16 if bench.smoke else max_new_tokens}


def activation_capture(bench: Bench) -> list[Row]:
    """Meta-Llama-3-8B (the largest of the seed's five models) at layers 8, 16, 24 on GSM8K, 4-shot."""
    settings = {"models": [{"name": "llama-3-8b", "model": bench.model(LLAMA3), "layers": [8, 16, 24]}],
                "benchmarks": [gsm8k(bench, ITEMS)], "text": "prompt_and_solution", "items_per_unit": ITEMS,
                "batch_size": 8, "max_tokens": 1024}
    measured = run_shard(bench, bench.manifest("activation_capture", "activation_capture", settings))
    reduce_task(str(measured.run.path))
    REASONING.capture = measured.run
    with h5py.File(measured.run.merged_path) as merged:
        tokens = merged["models/llama-3-8b/L8"].shape[0]
    rate = ITEMS / measured.seconds
    full_items = 5 * (532 + 132 + 204)
    return [Row(f"GPU paper scale, activation_capture: Meta-Llama-3-8B shapes (random weights, bf16), layers 8/16/24, "
                f"{ITEMS} GSM8K problems 4-shot, batch 8 ({tokens:,} question and solution tokens kept)",
                ours=f"{rate:.1f} problems/s, {tokens / measured.seconds:,.0f} kept tokens/s ({measured.seconds:.1f} s, "
                     f"model built in it); peak {measured.peak()}; the seed's 5 models x 868 problems at this "
                     f"(the largest model's) rate: {gpu_hours(1 / rate, full_items)}",
                baseline="-", ratio="-")]


def sae_training(bench: Bench) -> list[Row]:
    """An 8x SAE (32,768 features on d_model 4,096) per captured layer, the seed's settings."""
    if REASONING.capture is None:
        raise RuntimeError("sae_training reads activation_capture's run: list that job before it in --only")
    settings = {"activations": str(REASONING.capture.path), "device": bench.device, "ce_items": 0,
                "sae": {"activation": "none", "expansion_factor": 8, "l1_coefficient": 1e-4, "decorrelation": 0.01,
                        "epochs": 20, "lr": 1e-3, "batch_size": 4096}}
    measured = run_shard(bench, bench.manifest("sae_training", "sae_training", settings))
    with h5py.File(measured.run.shard_path(0)) as shard:
        saes = sae_groups(shard).values()
        rates = [sae.attrs["tokens_per_second"] for sae in saes]
        held_out = int(next(iter(saes)).attrs["tokens"])  # the metrics' tokens: those held out of training
    reduce_task(str(measured.run.path))
    REASONING.training = measured.run
    with h5py.File(REASONING.capture.merged_path) as merged:
        captured = merged["models/llama-3-8b/L8"].shape[0]
    tokens_per_item = captured / ITEMS
    rate = float(np.mean(rates))
    full_tokens = 5 * 3 * 868 * tokens_per_item * 20  # models x layers x problems x tokens x epochs
    return [Row(f"GPU paper scale, sae_training: 8x SAE on Meta-Llama-3-8B shapes (d_in 4,096, 32,768 features, "
                f"linear as the seed's, decorrelation 0.01, batch 4,096, 20 epochs), layers 8/16/24: "
                f"{captured - held_out:,} training tokens per layer (and {held_out:,} held out)",
                ours=f"{rate:,.0f} training tokens/s, every epoch counted ({measured.seconds:.1f} s for 3 SAEs); peak {measured.peak()}; "
                     f"the seed's 15 SAEs (5 models x 3 layers, 868 problems, 20 epochs) at this rate: "
                     f"{gpu_hours(1 / rate, full_tokens)}",
                baseline="-", ratio="-")]


def feature_ablation(bench: Bench) -> list[Row]:
    """Top 10 features zero-ablated against 20 matched random sets, 22 rows per GSM8K problem, 256 greedy tokens."""
    if REASONING.training is None:
        raise RuntimeError("feature_ablation reads sae_training's run: list that job before it in --only")
    settings = {"saes": str(REASONING.training.path), "device": bench.device, "k": 10, "attribution_items": 32,
                "control_sets": 20, "batch_size": "auto", "benchmarks": [gsm8k(bench, ITEMS)]}
    measured = run_shard(bench, bench.manifest("feature_ablation", "feature_ablation", settings))
    with h5py.File(measured.run.shard_path(0)) as shard:
        at_once = int(shard["units"][next(iter(shard["units"]))].attrs["rows_at_once"])
    answers = (ITEMS - 32) * 22  # unchanged, top 10, 20 control sets
    rate = answers / measured.seconds
    full = 5 * (532 + 132 + 204 - 3 * 32) * 22

    free_memory()
    with h5py.File(measured.run.shard_path(0)) as shard:
        unit = shard["units"][next(iter(shard["units"]))]
        top = np.stack([unit["top/layer"][()], unit["top/feature"][()]], axis=1)
        random = np.stack([unit["control_00/layer"][()], unit["control_00/feature"][()]], axis=1)
    spec = ModelSpec(**bench.model(LLAMA3))
    model, tokenizer = load_model(spec, attn_implementation=None), load_tokenizer(spec)
    device = torch.device(bench.device)
    saes = {layer: load_sae(SaeSpec(path=str(REASONING.training.path / "saes" / "llama-3-8b" / "L{layer}")), layer,
                            model.config.hidden_size, device) for layer in (8, 16, 24)}
    problems = load_benchmark(BenchmarkSpec(**gsm8k(bench, ITEMS)))
    started = time.perf_counter()
    one_at_a_time(model, tokenizer, problems, problems.items[32:33], saes, {"ablated": top, "control": random}, device)
    bench.sync()
    seed_rate = 3 / (time.perf_counter() - started)
    del model, saes
    return [Row(f"GPU paper scale, feature_ablation: Meta-Llama-3-8B shapes (random weights, bf16) with its 8x SAEs at "
                f"layers 8/16/24, {ITEMS - 32} GSM8K problems 4-shot x 22 conditions (unchanged, top 10, 20 matched "
                f"random sets of 10), 256 greedy tokens, batch_size auto ({at_once} rows a call), attribution on 32 "
                "problems",
                ours=f"{rate:.2f} answers/s ({measured.seconds:.1f} s, attribution and model build in it); peak "
                     f"{measured.peak()}; the seed's 5 models x 3 benchmarks at this rate: {gpu_hours(1 / rate, full)}",
                baseline=f"{seed_rate:.2f} answers/s (one generate call per problem and condition, 1 problem x 3)",
                ratio=f"{rate / seed_rate:.1f}x")]


JOBS: dict[str, Callable[[Bench], list[Row]]] = {
    "token_tracking": token_tracking, "feature_correlation": feature_correlation,
    "feature_contexts": feature_contexts, "gambling_games": gambling_games,
    "population_patching": population_patching, "activation_capture": activation_capture,
    "sae_training": sae_training, "feature_ablation": feature_ablation,
}


def compile_sampling_noise() -> None:
    """Compile the sampling noise's kernel once, before any job's clock starts: on a fresh machine
    the compile takes tens of seconds, which would land in the first sampling job's rate."""
    from common.generation import uniform_noise

    started = time.perf_counter()
    uniform_noise(torch.zeros((4, 2), dtype=torch.int64, device="cuda"), 0, 4096)
    torch.cuda.synchronize()
    print(f"sampling noise compiled in {time.perf_counter() - started:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated jobs (default all): {', '.join(JOBS)}")
    parser.add_argument("--smoke", action="store_true", help="toy widths on the CPU, to check the script; records nothing")
    parser.add_argument("--keep", help="folder for the runs (default: a temporary folder, removed)")
    parser.add_argument("--budget-s", type=float, help="start no job after this many seconds (the jobs left are "
                        "named as skipped); each job's rows are recorded as soon as it ends")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(JOBS)
    unknown = [name for name in chosen if name not in JOBS]
    if unknown:
        parser.error(f"--only: unknown job(s) {unknown}; choose from {', '.join(JOBS)}")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU is visible (torch sees none): this benchmark measures GPUs and records nothing here. "
              "Run it on a GPU machine, or with --smoke to check the script on the CPU.", file=sys.stderr)
        return 2
    began = time.perf_counter()  # --budget-s counts the noise's compile too
    setup_logging()
    on = "the CPU (--smoke: toy widths)" if args.smoke else gpu_machine()
    print(f"gpu_paper_scale on {on}: {', '.join(chosen)}")
    if not args.smoke:
        compile_sampling_noise()
    rows, failed, skipped = [], [], []
    with tempfile.TemporaryDirectory(prefix="gpu_paper_scale-") as scratch:
        bench = Bench(Path(args.keep or scratch).absolute(), args.smoke)
        bench.root.mkdir(parents=True, exist_ok=True)
        for name in chosen:
            started = time.perf_counter()
            if args.budget_s is not None and started - began > args.budget_s:
                skipped.append(name)
                continue
            try:
                new = JOBS[name](bench)
            except Exception:  # one job's failure must not cost the others' figures
                traceback.print_exc()
                failed.append(name)
                continue
            for row in new:
                row.machine = machine() if args.smoke else gpu_machine()
                print(f"\n{row.benchmark}\n  ours: {row.ours}\n  baseline: {row.baseline}\n  ratio: {row.ratio}")
            print(f"[{name}: {time.perf_counter() - started:.0f} s]", flush=True)
            if not args.smoke:
                record(new)  # now: a run stopped by its time limit keeps what it measured
            rows += new
    if rows and not args.smoke:
        print(f"\n{len(rows)} row(s) written to benchmarks/RESULTS.md")
    if skipped:
        print(f"skipped, past --budget-s {args.budget_s:g}: {', '.join(skipped)}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
