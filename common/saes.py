"""SAE loading with sae-lens: a pretrained release, local directories, the organism's, or random.

An SAE spec names one SAE per layer through a `{layer}` template, e.g.
`{release: llama_scope_lxr_8x, id: "l{layer}r_8x"}` or `{path: "saes/L{layer}"}`; `sae: organism`
(or `organism_b`) means the SAEs shipped with that built-in model organism. SAEs are loaded on demand and evicted
when a job moves to another layer (`SaeCache`), so one SAE at a time occupies the GPU.
"""

from __future__ import annotations

import difflib
import gc
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import Field, model_validator
from safetensors import SafetensorError

from common.atomic import write_text_atomic
from common.errors import UserError
from common.layers import hook_name
from common.lazy import lazy_import
from common.manifest import StrictModel
from common.organism.files import BUILTINS, shipped

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE

    from common.models import ModelSpec
else:
    torch = lazy_import("torch")

log = logging.getLogger(__name__)


class RandomSae(StrictModel):
    """Random weights from a seed: for tests, the demo and benchmarks (outputs are noise)."""

    architecture: Literal["jumprelu", "standard", "topk"] = Field("jumprelu", description="sae-lens class")
    d_sae: int = Field(ge=1, description="number of features")
    seed: int = Field(0, description="seed; layer L uses seed * 1000 + L (drawn on the SAE's device: a GPU's "
                      "weights differ from a CPU's, and may from another GPU model's)")
    threshold: float = Field(0.0, description="JumpReLU threshold of every feature")
    k: int = Field(32, ge=1, description="active features per token (topk)")


BuiltinSae = Literal["organism", "organism_b"]  # the SAEs of common.organism.files.BUILTINS


class SaeSpec(StrictModel):
    """One SAE per layer, from exactly one source; `{layer}` in id/path is the layer index."""

    builtin: BuiltinSae | None = Field(
        None, description="a built-in model organism's own SAEs: 'organism' or 'organism_b' (the model's name)")
    release: str | None = Field(None, description="sae-lens release, e.g. llama_scope_lxr_8x")
    id: str | None = Field(None, description="SAE id template within the release, e.g. 'l{layer}r_8x'")
    path: str | None = Field(None, description="local sae-lens directory template, e.g. 'saes/L{layer}'")
    random: RandomSae | None = Field(None, description="random SAE (tests, demo, benchmarks)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="SAE weights dtype")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: object) -> object:
        return {"builtin": data} if isinstance(data, str) and data in BUILTINS else data

    @model_validator(mode="after")
    def _one_source(self) -> SaeSpec:
        sources = [self.release is not None, self.path is not None, self.random is not None, self.builtin is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one SAE source: `release` + `id`, `path`, `builtin`, or `random`")
        if (self.release is None) != (self.id is None):
            raise ValueError("`release` and `id` go together (id is a template such as 'l{layer}r_8x')")
        if self.path is not None:
            self.path = str(Path(self.path).expanduser().absolute())
        if self.random and self.random.architecture == "topk" and self.random.k > self.random.d_sae:
            raise ValueError(f"random.k ({self.random.k}) is larger than random.d_sae ({self.random.d_sae})")
        return self

    def describe(self, layer: int) -> str:
        if self.release is not None:
            return f"{self.release}/{self.id.format(layer=layer)}"  # type: ignore[union-attr]
        if self.path is not None:
            return self.path.format(layer=layer)
        if self.builtin == "organism":
            return f"the model organism's SAE of layer {layer}"
        if self.builtin is not None:
            return f"the model organism {self.builtin}'s SAE of layer {layer}"
        r = self.random
        return f"random {r.architecture} d_sae={r.d_sae} seed={r.seed} layer={layer}"  # type: ignore[union-attr]


@dataclass(frozen=True)
class SaeInfo:
    """What is known about a layer's SAE before loading it (for checks and estimates)."""

    d_sae: int | None
    expected_l0: float | None


def check_saes(spec: SaeSpec, layers: list[int], d_model: int, field: str = "sae",
               model: ModelSpec | None = None, edited: bool = False) -> dict[int, SaeInfo]:
    """Check without loading weights that every layer has an SAE that fits the model (`model`,
    where given: a built-in organism's SAEs fit that organism only, though every organism has
    the same shapes), and one whose features a job can edit (`edited`, see `check_editable`)."""
    if spec.builtin is not None and model is not None and model.is_organism and model.id != f"builtin:{spec.builtin}":
        own = model.id.removeprefix("builtin:")  # type: ignore[union-attr]
        raise UserError(f"{field}.builtin: {spec.builtin}'s SAEs were trained on builtin:{spec.builtin}, but the model "
                        f"is {model.id}; set {field}: {own} (its own SAEs)")
    if spec.random is not None:
        return {layer: SaeInfo(spec.random.d_sae, None) for layer in layers}
    if spec.release is not None:
        directory = pretrained_releases()
        if spec.release not in directory:
            close = difflib.get_close_matches(spec.release, list(directory), n=3)
            raise UserError(f"{field}.release: sae-lens has no release {spec.release!r}"
                            + (f"; did you mean {', '.join(close)}?" if close else ""))
        lookup = directory[spec.release]
        ids = {layer: spec.id.format(layer=layer) for layer in layers}  # type: ignore[union-attr]
        absent = [layer for layer, sae_id in ids.items() if sae_id not in lookup.expected_l0]
        if absent:
            raise UserError(
                f"{field}.id: release {spec.release} has no SAE for layer(s) {absent} "
                f"(looked for {[ids[a] for a in absent]}); choose other layers or another release"
            )
        _check_release_model(spec.release, lookup.model, d_model, field)
        return {layer: SaeInfo(None, lookup.expected_l0.get(sae_id)) for layer, sae_id in ids.items()}
    infos = {}
    for layer in layers:
        cfg = _read_local_cfg(_local_folder(spec, layer), layer, field)
        _check_fit(cfg.get("d_in"), cfg.get("metadata", {}).get("hook_name") or cfg.get("hook_name"),
                   layer, d_model, spec.describe(layer))
        if edited:
            check_editable(cfg.get("normalize_activations"), spec.describe(layer))
        infos[layer] = SaeInfo(cfg.get("d_sae"), None)
    return infos


@dataclass(frozen=True)
class Release:
    """One of sae-lens's pretrained releases: the model its SAEs were trained on, and each SAE id
    with the L0 sae-lens records for it."""

    model: str
    expected_l0: dict[str, float | None]


@cache
def pretrained_releases() -> dict[str, Release]:
    """sae-lens's directory of pretrained releases, read from the YAML file it ships without
    importing sae-lens (seconds), and kept in the user's cache after the first read (parsing the
    1.5 MB file takes a second): planning must answer at once."""
    package = importlib.util.find_spec("sae_lens")
    if package is None or not package.submodule_search_locations:
        raise UserError("sae-lens is not installed: pip install saebatch's dependencies")
    source = Path(package.submodule_search_locations[0]) / "pretrained_saes.yaml"
    stat = source.stat()
    cached = user_cache() / f"sae-lens-releases-{stat.st_size}-{stat.st_mtime_ns}.json"
    try:
        releases = json.loads(cached.read_text())
    except (OSError, ValueError):
        data = yaml.load(source.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        releases = {release: {"model": value["model"], "l0": {sae["id"]: sae.get("l0") for sae in value["saes"]}}
                    for release, value in data.items()}
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cached, json.dumps(releases))
        except OSError:  # a read-only home (some containers): read the YAML each time
            pass
    return {release: Release(value["model"], value["l0"]) for release, value in releases.items()}


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saebatch"


def _check_release_model(release: str, release_model: str, d_model: int, field: str) -> None:
    """A residual SAE's d_in is its model's d_model: compare when that model's config is at hand."""
    from common.models import ModelSpec, load_config, text_config

    try:
        theirs = text_config(load_config(ModelSpec(id=release_model))[0]).hidden_size
    except UserError:
        log.info("%s: d_in is checked when the SAEs load (no config of %s here)", release, release_model)
        return
    if theirs != d_model:
        raise UserError(f"{field}.release: {release} holds SAEs of {release_model} (d_in {theirs}), but this "
                        f"model's residual stream has d_model {d_model}; use SAEs trained on this model")


def _local_folder(spec: SaeSpec, layer: int) -> Path:
    return shipped(spec.builtin).sae_dir(layer) if spec.builtin is not None else Path(spec.describe(layer))


def _read_local_cfg(folder: Path, layer: int, field: str) -> dict:
    cfg_path = folder / "cfg.json"
    if not cfg_path.is_file():
        raise UserError(f"{field}.path: no SAE for layer {layer}: {cfg_path} does not exist "
                        "(a sae-lens directory holds cfg.json and sae_weights.safetensors)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{field}.path: {cfg_path} is not valid JSON ({error})") from None


# sae-lens's normalizations that rescale each token at run time (the others are folded into the
# weights when loaded, or scale nothing)
RUN_TIME_NORMALIZATIONS = ("constant_norm_rescale", "layer_norm")


def check_editable(normalization: str | None, where: str) -> None:
    """Refuse an SAE whose features are in each token's own scale: an edit adds f_i x W_dec[i] to
    the residual stream as it is, which such an SAE never decodes into."""
    if normalization in RUN_TIME_NORMALIZATIONS:
        raise UserError(f"SAE {where} rescales each token's activations at run time (normalize_activations: "
                        f"{normalization}), so its features cannot be edited in the residual stream's own scale "
                        "(f_i x W_dec[i]); pick an SAE with normalize_activations none or expected_average_only_in")


def _check_fit(d_in: int | None, hook: str | None, layer: int, d_model: int, where: str) -> None:
    if d_in is not None and d_in != d_model:
        raise UserError(f"SAE {where} has d_in {d_in} but the model's residual stream has "
                        f"d_model {d_model}; use SAEs trained on this model")
    if hook and hook.startswith("blocks.") and hook != hook_name(layer):
        raise UserError(f"SAE {where} was trained on {hook}, but layer {layer} here means "
                        f"{hook_name(layer)} (the output of block {layer}); pick the matching SAE")


def load_sae(spec: SaeSpec, layer: int, d_model: int, device: torch.device) -> SAE:
    """Load (or build) the SAE of one layer onto `device`, checking that it fits the model."""
    from sae_lens import SAE  # seconds to import: loaded where SAEs are

    import common.linear_sae  # noqa: F401 (registers "linear": sae_training's `activation: none`)

    if spec.random is not None:
        sae = _random_sae(spec.random, layer, d_model, spec.dtype, device)
    elif spec.release is not None:
        sae = SAE.from_pretrained(spec.release, spec.id.format(layer=layer), device="cpu", dtype=spec.dtype)  # type: ignore[union-attr]
    else:
        folder = _local_folder(spec, layer)
        try:
            sae = SAE.load_from_disk(folder, device="cpu", dtype=spec.dtype)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise UserError(f"cannot load the SAE in {folder}: {error}. Re-create it, or point "
                            "sae.path at a directory with cfg.json and sae_weights.safetensors") from None
    _check_fit(sae.cfg.d_in, sae.cfg.metadata.hook_name, layer, d_model, spec.describe(layer))
    _fold_decoder_norms(sae)
    sae.eval()
    sae.requires_grad_(False)
    return sae.to(device)


def _fold_decoder_norms(sae: SAE) -> None:
    """A TopK SAE that decodes with W_dec's rows divided by their norms (rescale_acts_by_decoder_norm)
    gets those unit rows in W_dec and the norms in its encoder (sae-lens's fold, the same features
    and reconstruction): an edit then adds f_i x W_dec[i], what the SAE decodes. Rows already of
    unit norm (to 0.1%) are left as they are."""
    norms = sae.W_dec.detach().float().norm(dim=-1)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) and \
            not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        sae.fold_W_dec_norm()
        sae.cfg.rescale_acts_by_decoder_norm = False  # the norms are 1 now


def _random_sae(random: RandomSae, layer: int, d_model: int, dtype: str, device: torch.device) -> SAE:
    """Drawn where it runs: a GPU draws a paper-wide SAE at once where a CPU takes seconds (its
    weights then differ from the CPU's for the same seed, as its random generator does)."""
    from sae_lens import SAE

    cfg = {"architecture": random.architecture, "d_in": d_model, "d_sae": random.d_sae,
           "dtype": dtype, "device": str(device), "metadata": {"hook_name": hook_name(layer)}}
    if random.architecture == "topk":
        cfg["k"] = random.k
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(random.seed * 1000 + layer)
        sae = SAE.from_dict(cfg)
    if random.architecture == "jumprelu":
        with torch.no_grad():
            sae.threshold.fill_(random.threshold)
    return sae


class SaeCache:
    """Holds the SAE of one layer at a time: asking for another layer evicts the current one."""

    def __init__(self, spec: SaeSpec, d_model: int, device: torch.device):
        self.spec, self.d_model, self.device = spec, d_model, device
        self.layer: int | None = None
        self.sae: SAE | None = None

    def get(self, layer: int) -> SAE:
        if self.layer != layer:
            self.evict()
            log.info("loading SAE %s", self.spec.describe(layer))
            self.sae = load_sae(self.spec, layer, self.d_model, self.device)
            self.layer = layer
        return self.sae

    def evict(self) -> None:
        if self.sae is not None:
            self.sae, self.layer = None, None
            if torch.cuda.is_available():  # hand the SAE's memory back before the next one loads
                gc.collect()
                torch.cuda.empty_cache()
