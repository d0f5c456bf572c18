"""A gambling_games run as the later steps of seed 000 (feature_contrast, population_patching)
read it while planning: its merged.h5, or, before that exists, what its manifest plans."""

from __future__ import annotations

from pathlib import Path

import h5py

from common.errors import UserError
from common.manifest import StrictModel
from common.models import load_config, text_config
from common.plan import assume
from common.registry import get_job
from common.saes import check_saes
from common.upstream import open_merged, upstream_to_estimate

GROUPS = {"bankrupt": "bankrupt", "safe": "stopped"}  # group name -> game outcome
SAE_WIDTH = 32768  # assumed where the SAEs do not state it before loading (LlamaScope 8x of d_model 4096)


def sae_width(settings) -> tuple[int, bool]:
    """The width of the SAEs of gambling_games `settings`, and whether it is assumed (a release
    states it only once loaded)."""
    if settings.sae is None or not settings.layers:
        return 0, False
    infos = check_saes(settings.sae, settings.layers, text_config(load_config(settings.model)[0]).hidden_size,
                       "gambling_games.sae", model=settings.model)
    widths = [info.d_sae for info in infos.values() if info.d_sae]
    return (max(widths), False) if widths else (SAE_WIDTH, True)


def open_games(path: Path, field: str) -> h5py.File:
    """The merged.h5 of the games run at `path` (`field` names it in errors)."""
    return open_merged(path, "gambling_games", field, "run the games first")


def _group_sizes(games: h5py.File) -> dict[str, int]:
    outcomes = [group.attrs["outcome"] for group in games["units"].values()]
    return {group: outcomes.count(outcome) for group, outcome in GROUPS.items()}


class Games(StrictModel):
    """What planning needs of the games run: the layers with features, the games per outcome group
    (None while the run does not exist), all games, the SAE width and the bytes a layer takes."""

    layers: list[int]
    counts: dict[str, int] | None
    games: int
    width: int
    bytes_per_layer: int


def games_of(path: Path, field: str) -> Games:
    """The games run as planning sees it: read from its merged.h5, or, before that exists (when
    planning only), estimated from its manifest."""
    merged = path / "merged.h5"
    if not merged.is_file():
        return _games_from_manifest(path, field)
    with open_games(path, field) as games:
        recorded = [int(layer) for layer in games.attrs["layers"]]
        first = next(iter(games["units"].values()), None)
        width = int(first[f"features/L{recorded[0]}"].attrs["shape"][1]) if first is not None and recorded else 0
        return Games(layers=recorded, counts=_group_sizes(games), games=len(games["units"]), width=width,
                     bytes_per_layer=merged.stat().st_size // max(1, len(recorded)))


def _games_from_manifest(path: Path, field: str) -> Games:
    """Planned from the games' manifest through the job contract (its plan and estimate)."""
    games_job = get_job("gambling_games")
    missing = UserError(f"{field}: {path} has no merged.h5; run the games first "
                        "(saebatch submit <its manifest>) and wait for its reduce")
    manifest, where = upstream_to_estimate(path, "gambling_games", field, missing)
    units = games_job.plan(manifest)
    width, assumed_width = sae_width(manifest.settings)
    layers = manifest.settings.layers
    stored = games_job.estimate(manifest, units).output_bytes
    assume(f"{field}: run {path.name} does not exist yet; taken from {where}: {len(units):,} games with "
           f"features at layers {layers}, {width:,} per layer{' (assumed width)' if assumed_width else ''}, "
           f"at least min_games of each outcome")
    return Games(layers=layers, counts=None, games=len(units), width=width,
                 bytes_per_layer=stored // max(1, len(layers)))
