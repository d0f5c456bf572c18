"""Model and tokenizer loading: a Hugging Face id, a local directory, or a built-in model organism."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from pydantic import Field, model_validator

from common.errors import UserError
from common.lazy import lazy_import
from common.manifest import AbsolutePath, StrictModel
from common.organism.files import BUILTINS, Organism, shipped

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
else:
    torch = lazy_import("torch")

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # 'auto': every visible GPU (inputs on the first), else the CPU
ORGANISM = "builtin:organism"
ORGANISMS = {f"builtin:{name}": name for name in BUILTINS}  # model id: built-in organism (common.organism)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


class ModelSpec(StrictModel):
    """Which language model to run, and how to place it. `model: organism` is short for
    `{id: builtin:organism}`, and `model: organism_b` for the second organism."""

    id: str | None = Field(
        None, description=f"Hugging Face id (read from the local HF cache) or a shipped organism: {', '.join(ORGANISMS)}"
    )
    path: AbsolutePath | None = Field(None, description="local directory with config + weights")
    revision: str | None = Field(None, description="HF revision (branch, tag or commit)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="weights dtype")
    device: str = Field("auto", pattern=DEVICE_PATTERN,
                        description="'auto' (all visible GPUs, else CPU), 'cpu', 'cuda', 'cuda:1'...")
    random_weights: bool = Field(
        False, description="build the architecture with random weights (seed 0) instead of loading its weights: "
        "dry runs and benchmarks at paper shapes, nothing downloaded, every output noise. Without the model's "
        "tokenizer at hand the organism's stands in"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: object) -> object:
        return {"id": f"builtin:{data}"} if isinstance(data, str) and data in BUILTINS else data

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.id is None) == (self.path is None):
            raise ValueError(f"give exactly one of `id` (HF id or {ORGANISM}) and `path` (a local directory)")
        if self.id and self.id.startswith("builtin:") and self.id not in ORGANISMS:
            raise ValueError(f"unknown built-in model {self.id!r}; the built-in models are {', '.join(ORGANISMS)}")
        return self

    @property
    def name(self) -> str:
        return self.id or str(self.path)

    @property
    def is_organism(self) -> bool:
        """A built-in model organism (either of them)."""
        return self.id in ORGANISMS

    @property
    def organism(self) -> Organism:
        """The built-in organism's checked files (only for is_organism)."""
        return shipped(ORGANISMS[cast(str, self.id)])

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def _source(self) -> str:
        if self.path is not None and not self.path.is_dir():
            raise UserError(f"model.path {self.path} is not a directory (give a folder with config.json)")
        return str(self.path) if self.path is not None else self.id  # type: ignore[return-value]

    def check_tokenizer_files(self) -> None:
        """A model folder must hold its tokenizer: without it, transformers would build an empty one."""
        if self.path is not None and not self.random_weights and self.path.is_dir() and not any(
                (self.path / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"model.path {self.path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the "
                            "model's tokenizer files into it")


def input_device(spec: ModelSpec) -> torch.device:
    """Where the model's inputs go: `auto` is the first visible GPU, else the CPU (a task that asked
    for GPUs has already failed when it sees none: common.gpus.require_gpus)."""
    if spec.device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec.device)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"model.device is {spec.device}, but this process sees {torch.cuda.device_count()} "
                        "GPU(s): give the task a GPU (cluster.gpus_per_task), or set model.device: auto")
    return device


# Names some architectures give the fields read here (GPT-2's n_layer, ...), as transformers maps them.
_ALIASES = {"num_hidden_layers": ("n_layer",), "hidden_size": ("n_embd",), "num_attention_heads": ("n_head",),
            "max_position_embeddings": ("n_positions",)}
# config.json entries that do not change the weights (left out of the parameter-count key)
_NOT_ARCHITECTURE = ("_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version", "use_cache")
_PARAMETER_COUNTS = "parameter_counts.json"


@dataclass(frozen=True)
class Architecture:
    """A model's decoder shape, read from its config.json without transformers (whose import loads
    torch: seconds), for the checks and estimates that run before any GPU time. `raw` is the whole
    config.json (a multimodal model's too)."""

    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    raw: dict[str, Any]
    folder: Path | None = None  # where config.json lies, with the weights where they are at hand

    @classmethod
    def from_raw(cls, raw: dict[str, Any], folder: Path | None = None) -> Architecture:
        text = raw.get("text_config") or raw
        found: dict[str, Any] = {
            name: next((text[key] for key in (name, *_ALIASES.get(name, ())) if text.get(key) is not None), None)
            for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")}
        if None in found.values():  # left to the class defaults: ask transformers (slow, exact)
            config = hf_config(raw).get_text_config()
            found = {name: getattr(config, name) for name in found}
        heads = found["num_attention_heads"]
        return cls(model_type=raw["model_type"], **found, raw=raw, folder=folder,
                   num_key_value_heads=text.get("num_key_value_heads") or heads,  # GPT-2, NeoX: no GQA
                   head_dim=text.get("head_dim") or found["hidden_size"] // heads)

    def get_text_config(self) -> Architecture:
        return self

    @property
    def vocab_size(self) -> int:
        return int((self.raw.get("text_config") or self.raw)["vocab_size"])

    @property
    def intermediate_size(self) -> int:
        """The MLP's width (GPT-2 names it n_inner, and leaves it at 4 x hidden by default)."""
        text = self.raw.get("text_config") or self.raw
        return int(text.get("intermediate_size") or text.get("n_inner") or 4 * self.hidden_size)


def hf_config(raw: dict[str, Any]) -> PretrainedConfig:
    """The transformers config of a config.json's contents."""
    from transformers import AutoConfig

    data = dict(raw)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def load_config(spec: ModelSpec) -> tuple[Architecture, str]:
    """The model's architecture without weights, and where it came from.

    Reads only local files (the HF cache, a directory, the built-ins); for planning on a machine
    without the cache it falls back to the architecture copies shipped in common/model_configs.
    """
    local = spec.organism.config_path if spec.is_organism else _local_config(spec)
    if local is not None:
        try:
            raw = json.loads(local.read_text())
        except (UnicodeDecodeError, ValueError) as error:
            raise UserError(f"model {spec.name!r}: {local} cannot be read as JSON ({error}); "
                            "download it again") from None
        return (Architecture.from_raw(raw, local.parent),
                "the built-in model organism" if spec.is_organism else "local files")
    copy = resources.files("common") / "model_configs" / (spec.name.replace("/", "--") + ".json")
    if spec.id and copy.is_file():
        return (Architecture.from_raw(json.loads(copy.read_text())),
                f"saebatch's copy of {spec.id}'s architecture (not in the local HF cache)")
    raise UserError(
        f"model {spec.name!r}: no config.json in the local HF cache or folder. On a machine "
        f"with internet run `hf download {spec.name} config.json tokenizer.json` (or set "
        "model.path to a local copy), then retry"
    )


def _local_config(spec: ModelSpec) -> Path | None:
    """config.json of the model's folder, or of its id in the local HF cache."""
    spec.check_tokenizer_files()
    if spec.path is not None:
        path = Path(spec._source()) / "config.json"
        return path if path.is_file() else None
    return _cached(spec, "config.json")


def _cached(spec: ModelSpec, file: str) -> Path | None:
    """A file of the model's id in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec._source(), file, revision=spec.revision)
    return Path(cached) if isinstance(cached, str) else None


@overload
def text_config(config: Architecture) -> Architecture: ...
@overload
def text_config(config: PretrainedConfig) -> PretrainedConfig: ...
def text_config(config: PretrainedConfig | Architecture) -> PretrainedConfig | Architecture:
    """The decoder's config (multimodal configs nest it)."""
    return config.get_text_config()


def load_tokenizer(spec: ModelSpec, local_only: bool = False) -> PreTrainedTokenizerFast:
    """A fast tokenizer (character offsets are needed to map text spans to tokens)."""
    if spec.random_weights and not spec.is_organism:
        return _stand_in_tokenizer(spec)
    if spec.is_organism:
        tokenizer = spec.organism.tokenizer()
    else:
        from transformers import AutoTokenizer

        spec.check_tokenizer_files()
        try:
            tokenizer = cast("PreTrainedTokenizerFast", AutoTokenizer.from_pretrained(  # is_fast: checked below
                spec._source(), revision=spec.revision, local_files_only=local_only
            ))
        except (OSError, ValueError) as error:  # ValueError: a folder with a config but no tokenizer files
            raise UserError(f"model {spec.name!r}: cannot load its tokenizer ({error})") from None
    if not tokenizer.is_fast:
        raise UserError(f"model {spec.name!r}: needs a fast tokenizer (tokenizer.json) for offsets")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _stand_in_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerFast:
    """A random-weights model's own tokenizer when it is at hand, else the organism's (about two
    characters a token: prompts come out about twice as long as a 128k-vocabulary tokenizer's)."""
    try:
        return load_tokenizer(spec.model_copy(update={"random_weights": False}), local_only=True)
    except (UserError, OSError):
        log.info("%s has random weights and no tokenizer here: the organism's tokenizer stands in", spec.name)
        return load_tokenizer(ModelSpec(id=ORGANISM))


def local_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerFast | None:
    """The tokenizer if it is on this machine (folder or HF cache), else None (as on a bare login
    node); the organism's always, so that a damaged organism is reported at planning."""
    if spec.is_organism or spec.random_weights:
        return load_tokenizer(spec)
    if spec.path is None and _cached(spec, "tokenizer_config.json") is None:
        return None  # asked before importing transformers, which takes seconds
    try:
        return load_tokenizer(spec, local_only=True)
    except (UserError, OSError):
        return None


def load_model(spec: ModelSpec, attn_implementation: str | None = "eager") -> PreTrainedModel:
    """The causal LM in eval mode; eager attention (the default) returns attention weights, None
    lets transformers choose the fastest the architecture supports."""
    if spec.device == "auto" and not torch.cuda.is_available():
        log.warning("no GPU is visible: %s runs on the CPU (set model.device to silence this)", spec.name)
    if spec.random_weights:
        model = _random_model(spec, attn_implementation)
    elif spec.is_organism:
        model = spec.organism.model(spec.torch_dtype, attn_implementation).to(input_device(spec))
    else:
        from transformers import AutoModelForCausalLM

        device_map = "auto" if spec.device == "auto" and torch.cuda.is_available() else {"": str(input_device(spec))}
        log.info("loading %s (%s) onto %s", spec.name, spec.dtype, device_map)
        model = AutoModelForCausalLM.from_pretrained(
            spec._source(), revision=spec.revision, dtype=spec.torch_dtype,
            device_map=device_map, attn_implementation=attn_implementation,
        )
    model.eval()
    model.requires_grad_(False)
    return model


def _random_model(spec: ModelSpec, attn_implementation: str | None) -> PreTrainedModel:
    """The architecture of `spec` with seeded random weights, initialised on its device (an 8B model
    takes seconds on a GPU, nothing is read from disk)."""
    from transformers import AutoModelForCausalLM

    config, source = load_config(spec)
    device = input_device(spec)
    log.info("building %s with random weights (%s, architecture from %s) on %s", spec.name, spec.dtype, source, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(hf_config(config.raw), dtype=spec.torch_dtype,
                                                attn_implementation=attn_implementation)


def parameter_count(config: Architecture) -> int:
    """The exact number of weights: looked up for the architectures saebatch ships (the table is
    checked against `count_parameters` by the tests), else read from the shapes in the weight files
    at hand, else counted on the meta device (seconds: torch and the model's code are imported)."""
    known = json.loads((resources.files("common") / "model_configs" / _PARAMETER_COUNTS).read_text())
    entry = known.get(architecture_key(config.raw))
    if entry:
        return entry["parameters"]
    weights = _weight_files(config.folder) if config.folder else []
    return _stored_parameters(weights) if weights else count_parameters(config.raw)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from `folder`: those its index names, or the one
    file; none when a file is missing (a partial download counts nothing)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = [folder / "model.safetensors"]
    return files if all(file.is_file() for file in files) else []


def _stored_parameters(files: list[Path]) -> int:
    """The weights in safetensors files, from their headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(path, "numpy") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def architecture_key(raw: dict[str, Any]) -> str:
    """A digest of what in a config.json shapes the weights."""
    shape = {key: value for key, value in raw.items() if key not in _NOT_ARCHITECTURE}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def count_parameters(raw: dict[str, Any]) -> int:
    """The weights of a model built on the meta device (no memory, no download)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(raw))
    return sum(p.numel() for p in model.parameters())


def parameter_bytes(config: Architecture, dtype: str) -> int:
    """Exact weight size in `dtype` (a ModelSpec.dtype name)."""
    return parameter_count(config) * DTYPE_BYTES[dtype]


def kv_cache_bytes(config: Architecture, dtype: str, rows: int, tokens: int) -> int:
    """The keys and values a generation of `rows` sequences of `tokens` tokens caches."""
    return (rows * tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
            * DTYPE_BYTES[dtype])
