"""SAEs trained on captured activations, one per (model, layer) (seed 003, step 2 of 3).

    saebatch submit manifests/demo/reasoning_2_training.yaml --executor local

Reads an activation_capture run, streaming its activations a shuffle buffer at a time (so they
may exceed host and GPU memory). Each work unit trains the SAE of one model's layer, or with
`one_pass` of all its layers at once (each buffer read once for all of them), with the
project's trainer (common/sae_trainer.py, whose docstring defines the loss: reconstruction, L1,
and the decorrelation penalty, a real term of the loss), then measures it on held-out tokens
(L0, explained variance, dead features, mean squared feature correlation) and, when the model can
be loaded, inside the model: the next-token loss it recovers on the benchmark texts. Reduce
writes each SAE in sae-lens's format to saes/<model>/L<layer>/ (`SAE.load_from_disk` reads it),
the metrics and loss curves to merged.h5, and the report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

import h5py
import numpy as np
from pydantic import Field

from common.errors import UserError
from common.layers import hook_name
from common.lazy import lazy_import
from common.manifest import Manifest, StrictModel, UpstreamRun
from common.models import ModelSpec, input_device, load_model, load_tokenizer
from common.plan import Estimate, WorkUnit
from common.report import Report
from common.rundir import RunDir
from common.runtime import Work, model_size, sae_variant
from common.sae_quality import ce_loss_recovered
from common.sae_settings import TrainingConfig
from common.shards import LIBVER, ShardWriter
from jobs._reasoning import (
    DEVICE_FIELD,
    CaptureRun,
    ModelEntry,
    benchmark_size,
    encode_items,
    read_capture_run,
    sae_dir,
    token_limit,
)
from jobs._reasoning.problems import load_benchmark

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from common.sae_trainer import TrainedSae
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")

log = logging.getLogger(__name__)
FIELD = "sae_training"
NOT_MEASURED = float("nan")
LINEAR_LOADING = """# A linear autoencoder (`activation: none`), not a sparse SAE

sae-lens has no architecture "linear", so plain `SAE.load_from_disk` refuses this folder. Either
import saebatch's `common.linear_sae` first, which registers it:

    import common.linear_sae  # noqa: F401 (registers "linear" with sae-lens)
    from sae_lens import SAE
    sae = SAE.load_from_disk("<this folder>")

or compute it from `sae_weights.safetensors` directly (safetensors.torch.load_file):

    f = (x - b_dec) @ W_enc + b_enc        # no ReLU: every feature may be non-zero
    x_hat = f @ W_dec + b_dec
"""
ITEMS_PER_BENCHMARK = 2**32  # group id of a captured token: benchmark index x this + item index
METRICS = ("tokens", "l0", "explained_variance", "dead_fraction", "mse_per_token", "mean_squared_correlation",
           "ce_clean", "ce_spliced", "ce_zeroed", "ce_recovered", "tokens_per_second")


class Settings(StrictModel):
    """The `sae_training:` section of a manifest."""

    activations: UpstreamRun = Field(description="the activation_capture run: its directory, or its manifest "
                                     "(a relative path is read beside this manifest)")
    models: list[str] | None = Field(None, description="models to train SAEs for (None: every captured model)")
    sae: TrainingConfig = Field(default_factory=TrainingConfig, description="the SAE and its training")
    one_pass: bool = Field(False, description="train all of a model's layers in one pass over its activations: one "
                           "work unit per model, each buffer of tokens read once for every layer, the same SAEs as "
                           "layer by layer (device memory: a buffer and an SAE per layer)")
    ce_items: int = Field(32, ge=0, description="benchmark items on which the CE loss recovered is measured "
                          "(0: not measured)")
    device: str = DEVICE_FIELD


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """A unit per (model, captured layer), or per model with `one_pass`; checks the SAE fits and
    every layer has a batch of tokens."""
    s = manifest.settings
    _check_checkpoints(s.sae, manifest.cluster.timeout_min)
    capture = read_capture_run(s.activations, f"{FIELD}.activations")
    shapes = capture.shapes(f"{FIELD}.activations")
    units = []
    for entry in capture.select(s.models, f"{FIELD}.models"):
        for layer in entry.layers:
            tokens, d_in = shapes[(entry.name, layer)]
            _check_fits(s.sae, entry.name, layer, None if capture.estimated else tokens, d_in)
        if s.one_pass:
            units.append(WorkUnit(entry.name, {"model": entry.name, "layers": list(entry.layers)}))
        else:
            units += [WorkUnit(sae_id(entry.name, layer), {"model": entry.name, "layers": [layer]})
                      for layer in entry.layers]
    return units


def sae_id(model: str, layer: int) -> str:
    return f"{model}.L{layer}"


def _check_checkpoints(config: TrainingConfig, timeout_min: int) -> None:
    """The batch system's warning before a time limit saves the state (common/preemption.py), but a
    task stopped without one (no `--signal`, a lost node) keeps only its last checkpoint: one that
    waits half the limit or more between checkpoints could be requeued forever without one."""
    if config.checkpoint_every and config.checkpoint_minutes * 2 >= timeout_min:
        raise UserError(f"{FIELD}.sae.checkpoint_minutes: {config.checkpoint_minutes:g} is half of "
                        f"cluster.timeout_min ({timeout_min}) or more, so a task stopped without warning could "
                        f"reach its time limit before its first checkpoint and be requeued with nothing saved; lower "
                        f"checkpoint_minutes below {timeout_min / 2:g}, or raise cluster.timeout_min")


def _check_fits(config: TrainingConfig, model: str, layer: int, tokens: int | None, d_in: int) -> None:
    """The SAE's k fits its width, and the captured tokens (None: not captured yet) fill a batch."""
    d_sae = config.d_sae(d_in)
    if config.activation == "topk" and config.k > d_sae:
        raise UserError(f"{FIELD}.sae.k: {config.k} is larger than the SAE width {d_sae} "
                        f"(expansion_factor {config.expansion_factor} x d_in {d_in}); lower k")
    if tokens is None:
        return
    training = tokens - max(1, int(tokens * config.validation_fraction))
    if training < config.batch_size:
        raise UserError(f"{FIELD}.sae.batch_size: {model} layer {layer} has {training:,} training tokens, fewer than "
                        f"one batch of {config.batch_size:,}; lower batch_size or capture more items")


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    capture = read_capture_run(s.activations, f"{FIELD}.activations")
    shapes = capture.shapes(f"{FIELD}.activations")
    stored = capture.value_bytes
    out = memory = 0
    work: list[Work] = []
    for unit in units:
        unit_memory = 0
        for layer in unit.payload["layers"]:
            tokens, d_in = shapes[(unit.payload["model"], layer)]
            sae_bytes = 2 * d_in * s.sae.d_sae(d_in) * 4
            out += sae_bytes + s.sae.epochs * tokens // s.sae.batch_size // s.sae.log_every * 6 * 8
            batch = s.sae.batch_size * s.sae.d_sae(d_in) * 4 * 6 + s.sae.batch_size**2 * 4 * 2
            train = int(tokens * (1 - s.sae.validation_fraction))
            buffers = (1 if train <= s.sae.shuffle_buffer_tokens else 2) * min(train, s.sae.shuffle_buffer_tokens)
            unit_memory += (buffers + tokens - train) * d_in * stored + 4 * sae_bytes + batch  # held out: as stored
            # the scaling pass, then the buffers: once when one holds every token, else every epoch
            read = tokens * d_in * stored * (1 + (1 if train <= s.sae.shuffle_buffer_tokens else s.sae.epochs))
            work += [Work("load", read, label=f"{sae_id(unit.payload['model'], layer)}: activations"),
                     Work("sae_training", train * s.sae.epochs, width=d_in * s.sae.d_sae(d_in),
                          variant=sae_variant(s.sae.activation, s.sae.decorrelation),
                          label=f"{sae_id(unit.payload['model'], layer)}: {train * s.sae.epochs:,} training tokens "
                                f"({s.sae.epochs} epochs)")]
        memory = max(memory, unit_memory)
    if s.ce_items:
        work += _ce_work(s, capture, units)
    return Estimate(output_bytes=out, task_memory_bytes=memory, work=tuple(work),
                    notes=("memory per layer trained: its shuffle buffer of activations (two while the next is read), "
                           "its held-out tokens, the SAE with Adam's moments, one batch"
                           + ("; the model itself is loaded for the CE loss recovered" if s.ce_items
                              else "; no model is loaded"),))


def _ce_work(s: Settings, capture: CaptureRun, units: list[WorkUnit]) -> list:
    """The CE loss recovered: each model loaded once, and per layer three forwards (clean, with the
    SAE spliced in, zeroed) of up to `ce_items` held-out items of each benchmark."""
    sizes = [benchmark_size(spec, f"{FIELD}: the capture's benchmarks[{index}]")
             for index, spec in enumerate(capture.settings.benchmarks)]
    tokens = sum(min(s.ce_items, round(size.items * s.sae.validation_fraction)) *
                 (size.prompt_tokens + size.solution_tokens) for size in sizes)
    work = []
    for name in dict.fromkeys(unit.payload["model"] for unit in units):
        model = model_size(capture.models[name].model)
        layers = sum(len(unit.payload["layers"]) for unit in units if unit.payload["model"] == name)
        work += [Work("load", model.weight_bytes, label=f"{name} for the CE loss"),
                 Work("forward", 3 * tokens * layers, model, label=f"{name}: CE loss recovered at {layers} layer(s)")]
    return work


# ---------------------------------------------------------------- the work (GPU)


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    from common.sae_trainer import (  # with sae-lens: seconds to import, so not at planning
        LayerToTrain,
        train_saes,
    )

    s = manifest.settings
    capture = read_capture_run(s.activations, f"{FIELD}.activations")
    shard.set_attrs(activations=str(s.activations), training=s.sae.model_dump_json())
    pending = set(shard.pending())
    loaded: dict[str, tuple | None] = {}  # model name -> (model, tokenizer), None if it cannot be loaded
    for unit in units:
        if unit.id not in pending:
            continue
        entry, layers = capture.models[unit.payload["model"]], unit.payload["layers"]
        device = input_device(entry.placed(s.device))
        checkpoints = [checkpoint_path(shard, sae_id(entry.name, layer)) for layer in layers]
        with h5py.File(capture.merged, "r") as merged:  # streamed: open while training
            captured = merged[f"models/{entry.name}"]
            items = torch.from_numpy(captured["benchmark"][()].astype(np.int64) * ITEMS_PER_BENCHMARK
                                     + captured["item"][()].astype(np.int64))
            trained = train_saes([LayerToTrain(captured[f"L{layer}"], hook_name(layer), checkpoint)
                                  for layer, checkpoint in zip(layers, checkpoints, strict=True)],
                                 s.sae, entry.model.name, device, desc=unit.id, groups=items,  # held out: whole items
                                 save_at_end=bool(s.ce_items))  # a warning while the CE loss is measured: no retraining
        with shard.unit(unit.id) as group:
            for layer, sae in zip(layers, trained, strict=True):
                metrics = {**sae.metrics, "tokens_per_second": sae.tokens_per_second}
                metrics |= _ce_metrics(s, capture, entry, layer, sae, device, loaded)
                _write_sae(group.create_group(f"L{layer}"), entry.name, layer, sae, metrics, len(torch.unique(items)))
        for checkpoint in checkpoints:
            checkpoint.unlink(missing_ok=True)  # the SAEs are in the shard now


def _ce_metrics(s: Settings, capture: CaptureRun, entry: ModelEntry, layer: int, trained: TrainedSae,
                device: torch.device,
                loaded: dict[str, tuple | None]) -> dict[str, float]:
    """The CE loss recovered by the SAE of `layer`, NOT_MEASURED when not asked or the model is not at hand."""
    if s.ce_items and entry.name not in loaded:
        loaded.clear()  # one model in memory at a time
        loaded[entry.name] = _model_at_hand(entry.placed(s.device), entry.name)
    if not s.ce_items or loaded[entry.name] is None:
        return dict.fromkeys(("ce_clean", "ce_spliced", "ce_zeroed", "ce_recovered"), NOT_MEASURED)
    model, tokenizer = cast(tuple, loaded[entry.name])  # not None: returned above
    batches = _ce_batches(capture, model, tokenizer, s.ce_items, device, trained.held_out_groups)
    return ce_loss_recovered(model, batches, layer, trained.sae.to(device))


def _write_sae(group: h5py.Group, model: str, layer: int, trained: TrainedSae, metrics: dict[str, float],
               items: int) -> None:
    """One trained SAE in its shard group: weights, curves, metrics and the held-out items."""
    group.attrs.update(model=model, layer=layer, cfg=json.dumps(trained.sae.cfg.to_dict()), scale=trained.scale,
                       precision=trained.precision, **{name: float(metrics[name]) for name in METRICS},
                       held_out_items=len(trained.held_out_groups), items=items)
    for name, value in trained.sae.state_dict().items():
        group.create_dataset(f"weights/{name}", data=value.detach().cpu().numpy())
    for name, values in trained.curves.items():
        group.create_dataset(f"curves/{name}", data=np.asarray(values))
    group.create_dataset("held_out_items", data=np.asarray(trained.held_out_groups, dtype=np.int64))


def checkpoint_path(shard: ShardWriter, sae: str) -> Path:
    """Where the training state of SAE `sae` (<model>.L<layer>) is saved while it trains:
    `checkpoints/` of the run, beside its shards, so that a requeued task resumes where the
    preempted one stopped."""
    return RunDir.of_shard(shard.path).checkpoints_dir / f"{sae}.pt"


def _model_at_hand(spec: ModelSpec, name: str) -> tuple | None:
    """The model and tokenizer for the CE loss recovered, or None (logged) when they cannot be loaded here."""
    try:
        return load_model(spec, attn_implementation=None), load_tokenizer(spec)
    except (UserError, OSError) as error:
        log.warning("%s: the CE loss recovered is not measured, the model cannot be loaded here (%s)", name, error)
        return None


def _ce_batches(capture: CaptureRun, model, tokenizer, n_items: int, device: torch.device,
                held_out: list[int]) -> list[dict[str, torch.Tensor]]:
    """Up to `n_items` held-out items (never trained on) of each captured benchmark, tokenized as
    they were captured, with the captured positions marked as those the SAE replaces."""
    batches = []
    for index, spec in enumerate(capture.settings.benchmarks):
        bench = load_benchmark(spec, f"{FIELD}: the capture's benchmarks[{index}]")
        mine = {group - index * ITEMS_PER_BENCHMARK for group in held_out if group // ITEMS_PER_BENCHMARK == index}
        chosen = [item for item in bench.items if item.index in mine][:n_items]
        for start in range(0, len(chosen), capture.settings.batch_size):
            encoded, keep = encode_items(tokenizer, bench, chosen[start : start + capture.settings.batch_size],
                                         capture.settings.text, token_limit(capture.settings.max_tokens, model.config))
            batches.append({"input_ids": encoded["input_ids"].to(device),
                            "attention_mask": encoded["attention_mask"].to(device),
                            "edited": torch.from_numpy(keep).to(device)})
    return batches


# ---------------------------------------------------------------- reduce


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    """Each SAE saved for sae-lens, the metrics table and curves in merged.h5, and the report."""
    from sae_lens import SAE

    from common.linear_sae import LinearSAE  # registers "linear" with sae-lens

    s = manifest.settings
    rows, curves = [], {}
    with h5py.File(out_dir / "merged.h5", "w", libver=LIBVER) as out:
        out.attrs.update(job="sae_training", format="saebatch-saes/1", activations=str(s.activations),
                         training=s.sae.model_dump_json(), saes="saes/<model>/L<layer> beside this file")
        for path in shard_paths:
            with h5py.File(path, "r") as shard:
                for group in sae_groups(shard).values():
                    model, layer = str(group.attrs["model"]), int(group.attrs["layer"])
                    sae = SAE.from_dict(json.loads(group.attrs["cfg"]))
                    sae.load_state_dict({name: torch.from_numpy(group[f"weights/{name}"][()])
                                         for name in group["weights"]})
                    sae.save_model(sae_dir(out_dir, model, layer))
                    if isinstance(sae, LinearSAE):
                        (sae_dir(out_dir, model, layer) / "LOADING.md").write_text(LINEAR_LOADING)
                    rows.append({"model": model, "layer": layer, "d_sae": sae.cfg.d_sae,
                                 "precision": str(group.attrs.get("precision", "float32")),
                                 **{name: float(group.attrs[name]) for name in METRICS},
                                 **{name: int(group.attrs.get(name, -1)) for name in ("held_out_items", "items")}})
                    curves[(model, layer)] = {name: group[f"curves/{name}"][()] for name in group["curves"]}
                    for name, values in curves[(model, layer)].items():
                        out.create_dataset(f"curves/{sae_id(model, layer)}/{name}", data=values)
                    # benchmark index x 2^32 + item index, never trained on
                    out.create_dataset(f"held_out_items/{sae_id(model, layer)}", data=group["held_out_items"][()])
        table = pd.DataFrame(rows).sort_values(["model", "layer"], ignore_index=True)
        for column in table.columns:
            values = table[column].to_numpy()
            out.create_dataset(f"metrics/{column}", data=values.astype("S") if values.dtype == object else values)
    _report(Report(out_dir / "report", "SAEs trained on captured activations"), s, table, curves)


def sae_groups(shard: h5py.File) -> dict[str, h5py.Group]:
    """Each SAE's group in a shard, by its id <model>.L<layer> (a unit holds one layer's, or with
    `one_pass` each of its model's layers')."""
    return {sae_id(str(group.attrs["model"]), int(group.attrs["layer"])): group
            for unit in shard["units"].values() for group in unit.values()}


def _report(report: Report, s: Settings, table: pd.DataFrame, curves: dict) -> None:
    config = s.sae
    sparse = config.activation != "none"
    report.text(
        f"Activations: `{s.activations}`. One SAE per model and layer, activation **{config.activation}**, "
        f"expansion factor {config.expansion_factor}, L1 coefficient {config.l1_coefficient}"
        f"{' (not used by topk: k = ' + str(config.k) + ')' if config.activation == 'topk' else ''}, decorrelation "
        f"{config.decorrelation}, {config.epochs} epochs, learning rate {config.lr}, batch {config.batch_size}, "
        f"matmuls in {config.precision} precision (`precision` in the table: what `auto` became on the device). "
        "Loss per batch of activations scaled to mean squared norm d_in: mean ||x - x_hat||^2 + l1 * mean sum_i "
        "|f_i| ||W_dec_i|| + decorrelation * mean over feature pairs i != j of r_ij^2 (r: Pearson correlation over "
        "the batch). "
        f"Split by item, not by token: whole benchmark items holding about {config.validation_fraction:.0%} of the "
        f"tokens are held out (`held_out_items` of `items` in the table) and never trained on; the metrics are "
        f"measured on their tokens, and the CE loss recovered on up to {s.ce_items} of them per benchmark (n/a: not "
        "measured, the model could not be loaded). SAEs in sae-lens's format under `saes/<model>/L<layer>/`."
    )
    if not sparse:
        report.text("**Activation `none` is a linear autoencoder, not a sparse one**: every feature is non-zero on "
                    "almost every token (L0 near the width), so its 'features' are directions of a dense code.")
    report.heading("Quality per model and layer")
    report.table(table, "metrics")
    _plot_curves(report, config, curves)
    report.write()


def _plot_curves(report: Report, config: TrainingConfig, curves: dict) -> None:
    """Loss terms and L0 per step. L0 and the decorrelation term are never negative, so their axes
    start at 0: a constant series (TopK's L0) then shows as a flat line at its value, not as noise
    magnified around an offset."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    for (model, layer), curve in sorted(curves.items()):
        label = f"{model} L{layer}"
        axes[0].plot(curve["step"], curve["reconstruction"], label=label)
        axes[1].plot(curve["step"], curve["l0"], label=label)
        axes[2].plot(curve["step"], curve["decorrelation"], label=label)
    l0 = "L0 (non-zero features per token)" + (f"\nTopK: at most k = {config.k}" if config.activation == "topk" else "")
    for ax, title in zip(axes, ("reconstruction loss", l0, "decorrelation term (weighted)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].set_yscale("log")
    for ax, name in zip(axes[1:], ("l0", "decorrelation"), strict=True):
        highest = max((float(np.max(curve[name])) for curve in curves.values() if len(curve[name])), default=0.0)
        ax.set_ylim(0, 1.1 * highest if highest > 0 else 1)
        ax.ticklabel_format(axis="y", useOffset=False, scilimits=(-3, 5))  # 1.5e-4 as 1.5 x 1e-4, never an offset
    axes[0].legend(fontsize=7)
    report.figure(fig, "curves", "Training curves per model and layer")
