"""The organism's shipped files: where they are, how they are saved, and a checked load.

Two organisms are shipped, trained by the same recipe with other seeds: `organism` in
common/organism/files/ and `organism_b` in common/organism/files_b/ (BUILTINS). Layout of a folder:

    model/                 config.json, model.safetensors (float16), tokenizer.json, ...
    sae/L<layer>/          cfg.json, sae_weights.safetensors (sae-lens's format)
    organism.json          training settings, the planted direction and feature, measured
                           figures, and the sha256 of every other file
"""

from __future__ import annotations

import hashlib
import json
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import UserError
from common.lazy import lazy_import

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformers import PretrainedConfig, PreTrainedTokenizerFast
else:
    torch = lazy_import("torch")  # torch, transformers and sae-lens load when a file does: `plan` needs none

_PACKAGE = Path(__file__).resolve().parent
BUILTINS = {"organism": _PACKAGE / "files", "organism_b": _PACKAGE / "files_b"}  # name: its shipped folder
DEFAULT = "organism"
SHIPPED = BUILTINS[DEFAULT]
REBUILD = "saebatch organism train"
RECORD = "organism.json"


def rebuild_command(builtin: str = DEFAULT) -> str:
    """The command that rebuilds a built-in organism's shipped files."""
    return REBUILD if builtin == DEFAULT else f"{REBUILD} --builtin {builtin}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(out: Path, model, tokenizer: PreTrainedTokenizerFast, saes: dict[int, SAE]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out / "model")  # halves the files; measured after reloading
    tokenizer.save_pretrained(out / "model")
    for layer, sae in saes.items():
        sae.save_inference_model(out / "sae" / f"L{layer}")


def write_record(out: Path, record: dict) -> None:
    """organism.json, with the checksum of every file beside it."""
    listed = sorted(p for p in out.rglob("*") if p.is_file() and p.name != RECORD)
    record["files"] = {str(p.relative_to(out)): _sha256(p) for p in listed}
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")


class Organism:
    """A trained organism folder, checked file by file before anything is loaded from it."""

    def __init__(self, folder: Path = SHIPPED):
        self.folder = folder

    def _damaged(self, what: str) -> UserError:
        builtin = next((name for name, folder in BUILTINS.items() if folder == self.folder), None)
        command = rebuild_command(builtin) if builtin else f"{REBUILD} --out {self.folder}"
        return UserError(f"the model organism's file {what}; rebuild the organism with `{command}` "
                         "(about 10 minutes on 2 CPU cores)")

    @cached_property
    def record(self) -> dict:
        path = self.folder / RECORD
        if not path.is_file():
            raise self._damaged(f"{path} is missing")
        try:
            record = json.loads(path.read_text())
            files = record["files"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise self._damaged(f"{path} is damaged (not the JSON record it should be)") from None
        for name, digest in files.items():
            file = self.folder / name
            if not file.is_file():
                raise self._damaged(f"{file} is missing")
            if _sha256(file) != digest:
                raise self._damaged(f"{file} is damaged (its checksum differs from {RECORD}'s)")
        return record

    @property
    def model_dir(self) -> Path:
        self.record  # noqa: B018 (checks the files)
        return self.folder / "model"

    def sae_dir(self, layer: int) -> Path:
        folder = self.folder / "sae" / f"L{layer}"
        if f"sae/L{layer}/cfg.json" not in self.record["files"]:
            layers = sorted({int(name.split("/")[1][1:]) for name in self.record["files"] if name.startswith("sae/")})
            raise UserError(f"the model organism has SAEs for layers {layers} only, not layer {layer}")
        return folder

    @property
    def planted_layer(self) -> int:
        return self.record["planted"]["layer"]

    @property
    def planted_feature(self) -> int:
        return self.record["planted"]["feature"]["index"]

    @property
    def direction(self) -> torch.Tensor:
        return torch.tensor(self.record["planted"]["direction"])

    @property
    def config_path(self) -> Path:
        return self.model_dir / "config.json"

    def config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.model_dir)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        from transformers import (
            PreTrainedTokenizerFast,  # AutoTokenizer would import torch (seconds)
        )

        return PreTrainedTokenizerFast.from_pretrained(self.model_dir)

    def model(self, dtype: torch.dtype | None = None, attn_implementation: str | None = "eager"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype or torch.float32,
                                                     attn_implementation=attn_implementation)
        model.eval()
        model.requires_grad_(False)
        return model

    def sae(self, layer: int, dtype: str = "float32") -> SAE:
        from sae_lens import SAE

        sae = SAE.load_from_disk(self.sae_dir(layer), device="cpu", dtype=dtype)
        sae.eval()
        sae.requires_grad_(False)
        return sae


@cache
def shipped(builtin: str = DEFAULT) -> Organism:
    """A built-in organism in the package (BUILTINS), its files checked once per process."""
    return Organism(BUILTINS[builtin])
