"""Token tracking: saebatch's shard against the seed's dense NPZ layout, in bytes and in seconds.

    .venv/bin/python benchmarks/token_tracking_storage.py

For the same model, SAEs, ten scenarios and machine, in one run:

1. Bytes on disk. Ours: the job's HDF5 shard (attention float16 gzip+shuffle, SAE features CSR).
   Baseline: the seed's layout (seeds/001), one `np.savez_compressed` file per scenario and layer
   holding `features` dense float32 (seq, d_sae) and `attention` float16 (heads, seq, seq), built
   from the values read back from our shard, so both hold the SAME arrays; the script fails unless
   the values read back from both layouts are identical. Features, attention and totals apart.
2. Seconds per scenario. Ours: the real job (`prepare_run` + `run_shard_task`, in-process; the
   shard's wall time, model and SAE loading included). Baseline: a RE-IMPLEMENTATION of the seed's
   method in this file (not the seed's code): one scenario at a time through the model (eager
   attention, output_attentions), SAE encoding one token position at a time in a Python loop,
   `np.savez_compressed` per scenario and layer (model and SAE loading included).

Configurations: `demo` = manifests/demo/token_tracking.yaml's settings (the built-in model
organism and its TopK SAEs, d_sae 512); `large` = a seeded random Llama (16 blocks, d_model 1024,
16 heads, 8 KV heads, MLP 2816, the organism's tokenizer) saved to a folder, with random JumpReLU SAEs of width
16384 saved with sae-lens, whose thresholds are calibrated on the scenario prompts for a target
mean L0 (default 75 active features per token). Both run as ONE shard (the demo manifest's
`run.shards: 2` becomes 1), so one file holds all ten scenarios. Both paths use the same torch
thread count (--threads, default 1: see --help). Everything is written in a temporary folder; the
rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml
from results import Row, machine, record  # benchmarks/ is on sys.path when this script runs
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO / "manifests" / "demo" / "token_tracking.yaml"
log = logging.getLogger("benchmark")

# The `large` configuration: a random-init Llama of roughly 200M parameters.
LARGE = {"hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
         "num_key_value_heads": 8, "intermediate_size": 2816}
LARGE_D_SAE = 16384


# ---------------------------------------------------------------- the two configurations


@dataclass
class Config:
    key: str  # "demo" or "large"
    label: str  # names the rows in RESULTS.md
    settings: dict  # the manifest's token_tracking section
    notes: list[str] = field(default_factory=list)


def demo_config() -> Config:
    settings = yaml.safe_load(DEMO_MANIFEST.read_text())["token_tracking"]
    return Config("demo", "demo (builtin:organism 4 blocks d128, its TopK SAEs d_sae 512 k 16, all 4 layers)",
                  settings)


def large_config(folder: Path, layers: list[int], target_l0: float) -> Config:
    """Save a seeded random Llama and per-layer JumpReLU SAEs calibrated to `target_l0`."""
    from sae_lens import SAE
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.layers import capture_residuals, hook_name
    from common.organism.files import Organism
    from jobs.token_tracking import PROMPT_TEMPLATE, SCENARIOS

    tokenizer = Organism().tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **LARGE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    log.info("saved random Llama (%.0fM parameters, float32) to %s",
             sum(p.numel() for p in model.parameters()) / 1e6, model_dir)

    # Calibration: the residuals the job will see (same padded batch), real tokens only. This
    # forward pass also warms up the process before anything is timed.
    prompts = [PROMPT_TEMPLATE.format(**s["fields"]) for s in SCENARIOS]
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    real = encoded["attention_mask"].bool()
    with torch.no_grad(), capture_residuals(model, layers) as residuals:
        model(**encoded)
    n_tokens = int(real.sum())
    k = int(round(target_l0 * n_tokens))
    thresholds = {}
    for layer in tqdm(layers, desc="calibrate SAEs", unit="layer"):
        torch.manual_seed(1000 + layer)
        sae = SAE.from_dict({"architecture": "jumprelu", "d_in": config.hidden_size, "d_sae": LARGE_D_SAE,
                             "dtype": "float32", "device": "cpu",
                             "metadata": {"hook_name": hook_name(layer)}})
        with torch.no_grad():
            pre = sae.process_sae_in(residuals[layer][real]) @ sae.W_enc + sae.b_enc  # (tokens, d_sae)
            # One threshold per layer: the (k+1)-th largest pre-activation, so that k of them,
            # target_l0 per token on average, are above it.
            threshold = float(torch.topk(pre.flatten(), k + 1).values[-1])
            sae.threshold.fill_(threshold)
        thresholds[layer] = threshold
        sae.save_model(folder / "saes" / f"L{layer}")
        del sae, pre
    del model, residuals
    gc.collect()
    settings = {
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "sae": {"path": str(folder / "saes" / "L{layer}")},
        "layers": layers,
        "mode": "features_and_attention",
    }
    tracked = "all 16 layers" if len(layers) == LARGE["num_hidden_layers"] else f"layers {layers}"
    label = (f"large (random Llama 16 blocks d1024, random JumpReLU d_sae {LARGE_D_SAE} at target L0 "
             f"{target_l0:g}, {tracked})")
    notes = [f"thresholds (per layer, for a mean L0 of {target_l0:g} over {n_tokens} tokens): "
             + ", ".join(f"L{layer}={t:.3f}" for layer, t in thresholds.items())]
    return Config("large", label, settings, notes)


# ---------------------------------------------------------------- ours: the real job


def write_manifest(folder: Path, settings: dict) -> Path:
    """A one-shard manifest whose run directory lies in `folder` (never in the repo's runs/)."""
    path = folder / "manifest.yaml"
    data = {"job": "token_tracking", "run": {"dir": str(folder / "run"), "shards": 1}, "token_tracking": settings}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_ours(manifest_path: Path) -> tuple[Path, float]:
    """Plan the manifest, then time one shard written by the real job code, in this process."""
    from common.launcher import prepare_run, run_shard_task
    from common.manifest_file import load_manifest

    run = prepare_run(load_manifest(manifest_path))
    start = time.perf_counter()
    shard = run_shard_task(str(run.path), 0)
    return Path(shard), time.perf_counter() - start


# ---------------------------------------------------------------- baseline: the seed's method


@dataclass
class SeedTiming:
    total_s: float = 0.0
    load_s: float = 0.0  # model, tokenizer and SAEs (safetensors are memory-mapped: most reads land later)
    forward_s: float = 0.0
    encode_s: float = 0.0  # the per-position SAE loop
    save_s: float = 0.0  # np.savez_compressed


@torch.no_grad()
def run_seed_baseline(manifest_path: Path, out_dir: Path) -> SeedTiming:
    """RE-IMPLEMENTATION of the seed's method (seeds/001), not its code, for timing.

    One scenario at a time through the model; per layer, the SAE encodes one token position at a
    time in a Python loop into a dense (seq, d_sae) array, and `np.savez_compressed` writes
    `<scenario>/layer_<L>.npz` with `features` and `attention` (float16), plus one metadata JSON.
    Residuals come from the same block hooks as the job's (the layer convention), so that the
    arrays match; that costs the same as `output_hidden_states`. Every SAE stays loaded for the
    whole run (load once, not per scenario): the most favourable choice for the baseline.
    """
    from common.layers import capture_residuals, resolve_layers
    from common.manifest_file import load_manifest
    from common.models import input_device, load_model, load_tokenizer, text_config
    from common.saes import load_sae
    from jobs.token_tracking import key_positions

    t = SeedTiming()
    start = time.perf_counter()
    s = load_manifest(manifest_path).settings
    model, tokenizer = load_model(s.model, attn_implementation="eager"), load_tokenizer(s.model)
    config = text_config(model.config)
    layers = resolve_layers(s.layers, config.num_hidden_layers, "layers")
    device = input_device(s.model)
    saes = {layer: load_sae(s.sae, layer, config.hidden_size, device) for layer in layers}
    t.load_s = time.perf_counter() - start
    metadata = []
    for scenario in tqdm(s.scenarios, desc="seed baseline", unit="scenario"):
        prompt = s.prompt(scenario)
        tick = time.perf_counter()
        encoded = tokenizer(prompt, return_offsets_mapping=True, return_tensors="pt")
        offsets = encoded.pop("offset_mapping")[0].numpy()
        with capture_residuals(model, layers) as residuals:
            output = model(**{k: v.to(device) for k, v in encoded.items()}, output_attentions=True)
        t.forward_s += time.perf_counter() - tick
        folder = out_dir / scenario.name
        folder.mkdir(parents=True, exist_ok=True)
        for layer in layers:
            tick = time.perf_counter()
            hidden = residuals[layer][0]  # (seq, d_model)
            features = np.zeros((hidden.shape[0], saes[layer].cfg.d_sae), dtype=np.float32)
            for position in range(hidden.shape[0]):
                features[position] = saes[layer].encode(hidden[position : position + 1])[0].float().cpu().numpy()
            attention = output.attentions[layer][0].to(torch.float16).cpu().numpy()  # (heads, seq, seq)
            t.encode_s += time.perf_counter() - tick
            tick = time.perf_counter()
            np.savez_compressed(folder / f"layer_{layer}.npz", features=features, attention=attention)
            t.save_s += time.perf_counter() - tick
        ids = encoded["input_ids"][0].tolist()
        metadata.append({"scenario": scenario.name, "token_ids": ids, "seq_len": len(ids),
                         "tokens": [tokenizer.decode([i]) for i in ids],
                         "key_positions": {span: key_positions(pattern, prompt, offsets).tolist()
                                           for span, pattern in s.key_spans.items()}})
    (out_dir / "metadata.json").write_text(json.dumps({"layers": layers, "scenarios": metadata}))
    t.total_s = time.perf_counter() - start
    return t


# ---------------------------------------------------------------- bytes on disk


@dataclass
class Sizes:
    features: int = 0
    attention: int = 0
    total: int = 0  # whole files: includes tokens, offsets, key positions and format overhead


def _storage_bytes(group: h5py.Group) -> int:
    """Bytes that the (compressed) chunks of every dataset under `group` occupy in the file."""
    sizes: list[int] = []
    group.visititems(lambda _name, obj: sizes.append(obj.id.get_storage_size()) if isinstance(obj, h5py.Dataset) else None)
    return sum(sizes)


def shard_sizes(shard: Path) -> Sizes:
    sizes = Sizes(total=shard.stat().st_size)
    with h5py.File(shard, "r") as data:
        for unit in data["units"].values():
            sizes.features += _storage_bytes(unit["features"])
            sizes.attention += _storage_bytes(unit["attention"])
    return sizes


def read_shard(shard: Path):
    """Yield (scenario, layer, features dense float32, attention float16) as read back from the shard."""
    from common.sparse import read_csr

    with h5py.File(shard, "r") as data:
        layers = [int(layer) for layer in data.attrs["layers"]]
        for name, unit in data["units"].items():
            for layer in layers:
                features = read_csr(unit["features"][f"L{layer}"]).toarray()
                yield name, layer, features, unit["attention"][f"L{layer}"][()]


def write_seed_layout(shard: Path, out_dir: Path) -> Sizes:
    """The seed's layout holding the same arrays as our shard; check both read back identically."""
    with h5py.File(shard, "r") as data:  # the seed's metadata JSON, from the shard's tokens
        metadata = [{"scenario": name, "token_ids": unit["token_ids"][()].tolist(),
                     "tokens": [t.decode() for t in unit["tokens"][()]], "seq_len": len(unit["token_ids"]),
                     "key_positions": {k: v[()].tolist() for k, v in unit["key_positions"].items()}}
                    for name, unit in data["units"].items()]
        n_items = len(data["units"]) * len(data.attrs["layers"])
    out_dir.mkdir(parents=True)
    (out_dir / "metadata.json").write_text(json.dumps({"scenarios": metadata}))
    sizes = Sizes()
    for name, layer, features, attention in tqdm(read_shard(shard), total=n_items, desc="write NPZ", unit="file"):
        if features.dtype != np.float32 or attention.dtype != np.float16:
            raise RuntimeError(f"unexpected dtypes in the shard: features {features.dtype}, attention {attention.dtype}")
        path = out_dir / name / f"layer_{layer}.npz"
        path.parent.mkdir(exist_ok=True)
        np.savez_compressed(path, features=features, attention=attention)
        with zipfile.ZipFile(path) as archive:
            sizes.features += archive.getinfo("features.npy").compress_size
            sizes.attention += archive.getinfo("attention.npy").compress_size
    sizes.total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    # Read both layouts back and compare: a lossy path anywhere must fail the benchmark.
    for name, layer, features, attention in tqdm(read_shard(shard), total=n_items, desc="compare", unit="file"):
        with np.load(out_dir / name / f"layer_{layer}.npz") as npz:
            for key, ours in (("features", features), ("attention", attention)):
                theirs = npz[key]
                if theirs.dtype != ours.dtype or not np.array_equal(theirs, ours):
                    raise RuntimeError(f"{name} layer {layer}: {key} read back from the NPZ differs from the "
                                       f"shard's ({theirs.dtype} {theirs.shape} vs {ours.dtype} {ours.shape})")
    return sizes


@dataclass
class Sparsity:
    mean_l0: float  # active features per token, over every tracked layer and token
    min_l0: int
    median_l0: int
    max_l0: int
    nnz: int  # stored non-zeros in all
    dense_bytes: int  # the same features as uncompressed dense float32


def sparsity(shard: Path) -> Sparsity:
    per_token, dense = [], 0
    with h5py.File(shard, "r") as data:
        for unit in data["units"].values():
            for group in unit["features"].values():
                per_token.append(np.diff(group["indptr"][()]))
                dense += int(np.prod(group.attrs["shape"])) * 4
    counts = np.concatenate(per_token)
    return Sparsity(float(counts.mean()), int(counts.min()), int(np.median(counts)), int(counts.max()),
                    int(counts.sum()), dense)


def compare_to_seed_run(shard: Path, seed_dir: Path) -> dict[str, float]:
    """How close the baseline's own arrays are to ours (batched vs one-by-one float rounding)."""
    found = {"features_max_abs_diff": 0.0, "attention_max_abs_diff": 0.0, "active_differ": 0, "active": 0}
    for name, layer, features, attention in read_shard(shard):
        with np.load(seed_dir / name / f"layer_{layer}.npz") as npz:
            seed_features, seed_attention = npz["features"], npz["attention"]
        if seed_features.shape != features.shape or seed_attention.shape != attention.shape:
            raise RuntimeError(f"{name} layer {layer}: the seed baseline's arrays have other shapes than ours")
        found["features_max_abs_diff"] = max(found["features_max_abs_diff"],
                                             float(np.abs(seed_features - features).max()))
        found["attention_max_abs_diff"] = max(found["attention_max_abs_diff"],
                                              float(np.abs(seed_attention.astype(np.float32) - attention).max()))
        found["active_differ"] += int(((seed_features > 0) != (features > 0)).sum())
        found["active"] += int((features > 0).sum())
    return found


# ---------------------------------------------------------------- one configuration end to end


@dataclass
class Result:
    config: Config
    n_scenarios: int
    ours: Sizes
    seed_layout: Sizes
    seed_run_total: int
    ours_s: float
    seed: SeedTiming
    sparsity: Sparsity
    agreement: dict[str, float]  # the seed method's own arrays vs ours


def warm_up(manifest_path: Path) -> None:
    """One untimed batched forward pass, so that neither timed path pays the process's first-call costs."""
    from common.manifest_file import load_manifest
    from common.models import load_model, load_tokenizer

    s = load_manifest(manifest_path).settings
    model, tokenizer = load_model(s.model), load_tokenizer(s.model)
    with torch.no_grad():
        model(**tokenizer([s.prompt(sc) for sc in s.scenarios], padding=True, return_tensors="pt"),
              output_attentions=True)


def run_config(config: Config, folder: Path, warm: bool) -> Result:
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = write_manifest(folder, config.settings)
    if warm:
        warm_up(manifest_path)
    log.info("[%s] ours: the token_tracking job, one shard", config.key)
    shard, ours_s = run_ours(manifest_path)
    gc.collect()
    log.info("[%s] baseline: the seed's method (re-implemented)", config.key)
    seed = run_seed_baseline(manifest_path, folder / "seed_run")
    gc.collect()
    log.info("[%s] storage: the seed's layout built from the shard's values", config.key)
    seed_layout = write_seed_layout(shard, folder / "seed_layout")
    seed_run_total = sum(p.stat().st_size for p in (folder / "seed_run").rglob("*") if p.is_file())
    with h5py.File(shard, "r") as data:
        n_scenarios = len(data["units"])
    return Result(config, n_scenarios, shard_sizes(shard), seed_layout, seed_run_total, ours_s, seed,
                  sparsity(shard), compare_to_seed_run(shard, folder / "seed_run"))


# ---------------------------------------------------------------- reporting


def mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n < 10e6 else f"{n / 1e6:.1f} MB"


def ratio(baseline: float, ours: float) -> str:
    return f"{baseline / ours:.2f}x" if ours else "n/a"


def rows_for(r: Result, threads: int) -> list[Row]:
    name = f"token_tracking {r.config.label}"
    where = f"{machine()}, {threads} torch thread{'s' if threads > 1 else ''}"
    n, sp = r.n_scenarios, r.sparsity
    return [
        Row(f"{name}: SAE feature bytes (ours CSR float32 in HDF5; baseline dense float32 in NPZ)",
            f"{mb(r.ours.features)} (measured mean L0 {sp.mean_l0:.1f})",
            f"{mb(r.seed_layout.features)} (uncompressed dense: {mb(sp.dense_bytes)})",
            ratio(r.seed_layout.features, r.ours.features), where),
        Row(f"{name}: attention bytes (float16; ours HDF5 gzip+shuffle, baseline NPZ deflate)",
            mb(r.ours.attention), mb(r.seed_layout.attention), ratio(r.seed_layout.attention, r.ours.attention), where),
        Row(f"{name}: total bytes on disk, {n} scenarios (identical values read back)",
            mb(r.ours.total), mb(r.seed_layout.total), ratio(r.seed_layout.total, r.ours.total), where),
        Row(f"{name}: seconds per scenario (job shard vs seed method re-implemented, loading included)",
            f"{r.ours_s / n:.2f} s ({r.ours_s:.1f} s total)",
            f"{r.seed.total_s / n:.2f} s ({r.seed.total_s:.1f} s total)", ratio(r.seed.total_s, r.ours_s), where),
    ]


def summary(r: Result) -> str:
    o, b, n, t, sp, a = r.ours, r.seed_layout, r.n_scenarios, r.seed, r.sparsity, r.agreement
    other_o, other_b = o.total - o.features - o.attention, b.total - b.features - b.attention
    lines = [
        f"== {r.config.label}",
        *(f"   {note}" for note in r.config.notes),
        f"   SAE L0 per token (all tracked layers and tokens): mean {sp.mean_l0:.1f}, min {sp.min_l0}, "
        f"median {sp.median_l0}, max {sp.max_l0}; {sp.nnz} non-zeros in all",
        f"   SAE features per stored non-zero: ours {o.features / sp.nnz:.2f} B, NPZ {b.features / sp.nnz:.2f} B; "
        f"uncompressed dense float32 would be {mb(sp.dense_bytes)} ({ratio(sp.dense_bytes, o.features)} ours)",
        "   bytes on disk            ours (HDF5)      seed layout (NPZ)   baseline/ours   share of NPZ",
        f"     SAE features       {mb(o.features):>14}   {mb(b.features):>16}   {ratio(b.features, o.features):>12}"
        f"   {b.features / b.total:>10.0%}",
        f"     attention          {mb(o.attention):>14}   {mb(b.attention):>16}   {ratio(b.attention, o.attention):>12}"
        f"   {b.attention / b.total:>10.0%}",
        f"     other (tokens, format overhead) {mb(other_o):>10}   {mb(other_b):>10}",
        f"     total              {mb(o.total):>14}   {mb(b.total):>16}   {ratio(b.total, o.total):>12}",
        f"   values read back from both layouts: identical (np.array_equal, {n} scenarios x every layer)",
        f"   (the seed baseline run's own NPZ files: {mb(r.seed_run_total)})",
        f"   time per scenario: ours {r.ours_s / n:.2f} s, seed method {t.total_s / n:.2f} s, "
        f"speed-up {ratio(t.total_s, r.ours_s)}",
        f"     seed method breakdown (s): load {t.load_s:.1f}, forward {t.forward_s:.1f}, "
        f"per-position SAE loop {t.encode_s:.1f}, savez_compressed {t.save_s:.1f}, total {t.total_s:.1f}",
        f"   the seed method's own arrays vs ours (float rounding: padded batch vs one at a time): max |diff| "
        f"features {a['features_max_abs_diff']:.2g}, attention {a['attention_max_abs_diff']:.2g}; "
        f"{a['active_differ']} of {a['active']} active entries on the other side of a JumpReLU threshold",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_layers(text: str) -> list[int]:
    if text == "all":
        return list(range(LARGE["num_hidden_layers"]))
    return sorted({int(x) for x in text.split(",")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--configs", default="demo,large", help="comma-separated: demo, large (default: both)")
    parser.add_argument("--large-layers", default="all",
                        help="layers tracked in `large`: 'all' (16) or a comma-separated list (the model keeps 16 blocks)")
    parser.add_argument("--target-l0", type=float, default=75.0,
                        help="mean active SAE features per token that `large`'s thresholds are calibrated to")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both paths (default 1: on the 2-core test VM a second thread "
                        "did not speed up large matrix products but made the baseline's one-token calls "
                        "several times slower and noisier)")
    parser.add_argument("--workdir", type=Path, help="keep the outputs here instead of a deleted temporary folder")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - {"demo", "large"})
    if unknown:
        parser.error(f"--configs: unknown configuration(s) {unknown}; choose from demo, large")

    from common.logs import setup_logging

    setup_logging()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="token_tracking_storage."))
    workdir = workdir.absolute()
    log.info("working in %s (torch threads: %d)", workdir, torch.get_num_threads())
    results = []
    try:
        for key in configs:
            folder = workdir / key
            if folder.exists():
                sys.exit(f"{folder} exists; give an empty --workdir")
            if key == "demo":
                results.append(run_config(demo_config(), folder, warm=True))
            else:
                config = large_config(folder / "inputs", parse_layers(args.large_layers), args.target_l0)
                results.append(run_config(config, folder, warm=False))  # calibration warmed up the process
            print("\n" + summary(results[-1]) + "\n", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    rows = [row for r in results for row in rows_for(r, args.threads)]
    print("| benchmark | ours | baseline | ratio |\n|---|---|---|---|")
    print("\n".join(f"| {row.benchmark} | {row.ours} | {row.baseline} | {row.ratio} |" for row in rows))
    print(f"\nwhole benchmark: {elapsed:.0f} s wall time")
    if not args.no_record:
        record(rows)
        print(f"recorded {len(rows)} rows in {Path(__file__).with_name('RESULTS.md')}")


if __name__ == "__main__":
    main()
