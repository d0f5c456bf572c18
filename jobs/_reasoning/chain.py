"""The reasoning chain as its later steps read it: an sae_training run's SAEs and the capture run
they were trained on (models, layers, benchmarks), and a feature_ablation run on top of them;
estimated from the manifests while a chain is planned ahead of its runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import h5py
import numpy as np

from common.errors import UserError
from common.lazy import lazy_import
from common.models import load_config, text_config
from common.plan import assume
from common.rundir import open_run
from common.saes import SaeSpec, check_saes, load_sae
from common.upstream import upstream_manifest, upstream_to_estimate
from jobs._gambling import planted_direction
from jobs._reasoning import CaptureRun, ModelEntry, read_capture_run, read_upstream, sae_path_template

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")


@dataclass(frozen=True)
class TrainedSaes:
    """An sae_training run (or its manifest, while planning ahead of it) and the capture run it
    trained on; `field` names the manifest field that led here (in messages)."""

    run: Path
    settings: Any  # jobs.sae_training.Settings
    capture: CaptureRun
    field: str

    @property
    def models(self) -> list[str] | None:
        """The models it trains (None: every model of the capture)."""
        return self.settings.models

    def sae_spec(self, entry: ModelEntry) -> SaeSpec:
        return SaeSpec(path=sae_path_template(self.run, entry.name))

    def sae_widths(self, entry: ModelEntry) -> list[int]:
        """Each layer's SAE width: of the trained SAEs (checked against the model), or, planning
        ahead of the training run, its expansion factor x d_model."""
        d_model = text_config(load_config(entry.model)[0]).hidden_size
        if (self.run / "merged.h5").is_file():
            infos = check_saes(self.sae_spec(entry), entry.layers, d_model, self.field)
            return [cast(int, info.d_sae) for info in infos.values()]  # sae_training's cfg.json records d_sae
        expansion = self.settings.sae.expansion_factor
        assume(f"{self.field}: an SAE of {expansion} x d_model features at each captured layer")
        return [expansion * d_model] * len(entry.layers)


def read_trained(run: Path, field: str) -> TrainedSaes:
    """The sae_training run (or manifest) `run`, read for `field`."""
    training = settings_of(run, "sae_training", field)
    return TrainedSaes(run, training, read_capture_run(training.activations, f"{field} (its activations)"), field)


@dataclass(frozen=True)
class Chain:
    """The ablation's settings and the SAEs it tested; `field` names the manifest field that led
    here (in messages)."""

    ablation: Any  # jobs.feature_ablation.Settings
    saes: TrainedSaes
    field: str

    @property
    def capture(self) -> CaptureRun:
        return self.saes.capture

    @property
    def models(self) -> list[ModelEntry]:
        return self.capture.select(self.ablation.models or self.saes.models, f"{self.field} (its models)")

    @property
    def benchmarks(self) -> list:
        """The capture's benchmarks (all of them, also those the ablation left out)."""
        return self.capture.settings.benchmarks

    def sae_spec(self, entry: ModelEntry) -> SaeSpec:
        return self.saes.sae_spec(entry)

    def sae_widths(self, entry: ModelEntry) -> list[int]:
        return self.saes.sae_widths(entry)


def read_chain(ablation: Path, field: str) -> Chain:
    """The chain behind the feature_ablation run (or manifest) `ablation`, read for `field`."""
    settings = settings_of(ablation, "feature_ablation", field)
    return Chain(settings, read_trained(settings.saes, f"{field} (its SAEs)"), field)


def settings_of(run: Path, job: str, field: str) -> Any:
    """The settings of a finished run of `job`; while planning ahead of it, of its manifest."""
    if (run / "merged.h5").is_file():
        read_upstream(run, job, field)
        return open_run(run).load_manifest().settings
    missing = UserError(f"{field}: {run} has no merged.h5; run {job} first (saebatch submit <its manifest>) and "
                        "wait for its reduce")
    manifest, where = upstream_to_estimate(run, job, field, missing)
    assume(f"{field}: run {run.name} does not exist yet; its settings taken from {where}")
    return manifest.settings


def importance(ablation: Path, model: str, field: str) -> dict[int, np.ndarray]:
    """Per layer, each SAE feature's attribution to the correct answer in the ablation run, averaged
    over the benchmarks it ablated on."""
    with h5py.File(read_upstream(ablation, "feature_ablation", field), "r") as merged:
        units = [unit for unit in merged["units"].values() if unit.attrs["model"] == model]
        layers = sorted(int(name[1:]) for name in units[0]["attribution"])
        return {layer: np.mean([unit[f"attribution/L{layer}"][()] for unit in units], axis=0) for layer in layers}


def tested_model(run: Path, model: str | None, field: str) -> tuple[ModelEntry, SaeSpec]:
    """The model named `model` that a feature_ablation or circuit_discovery run (or its manifest,
    while planning ahead of it) studied, and its SAEs; `model` may be left out when the run
    studied one model."""
    chain, entry = tested_chain(run, model, field)
    return entry, chain.sae_spec(entry)


def tested_chain(run: Path, model: str | None, field: str) -> tuple[Chain, ModelEntry]:
    """The chain behind a feature_ablation or circuit_discovery run, and its model named `model`."""
    manifest, where = upstream_manifest(run, UserError(f"{field}: {run} is not a run directory and no manifest names "
                                                       "it; name the run's manifest"))
    if manifest.job == "feature_ablation":
        chain = read_chain(run, field)
        names = [entry.name for entry in chain.models]
    elif manifest.job == "circuit_discovery":
        chain = read_chain(manifest.settings.ablation, field)
        names = manifest.settings.models or [entry.name for entry in chain.models]
    else:
        raise UserError(f"{field}: {where} is a {manifest.job} run, whose SAEs are not known here; give `sae` "
                        "(the SAEs its features come from)")
    return chain, chain.capture.models[one_model(names, model, field)]


def one_model(models: list[str], model: str | None, field: str) -> str:
    """`model`, checked to be one of `models`; or the only one of them."""
    if model is None and len(models) > 1:
        raise UserError(f"{field}: that run studied {models}; set from_model to one of them")
    chosen = model or models[0]
    if chosen not in models:
        raise UserError(f"{field}: that run studied {models}, not {chosen!r}; set from_model to one of them")
    return chosen


def planted_feature(saes: SaeSpec, entry: ModelEntry) -> tuple[int, int] | None:
    """(layer, feature) of the model's SAE feature whose decoder direction is nearest (|cosine|) its
    planted direction, when the model is a built-in organism whose planted layer has an SAE: what
    stands for the planted cause in SAEs trained on it."""
    planted = planted_direction(entry.model.name)
    if planted is None or planted[0] not in entry.layers:
        return None
    d_model = text_config(load_config(entry.model)[0]).hidden_size
    decoder = load_sae(saes, planted[0], d_model, torch.device("cpu")).W_dec.detach().double()
    cosine = decoder @ torch.tensor(planted[1], dtype=torch.float64) / decoder.norm(dim=1)
    return planted[0], int(cosine.abs().argmax())
