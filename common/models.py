"""Model and tokenizer loading: a Hugging Face id, a local directory, or the built-in model organism."""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Literal

import torch
from pydantic import Field, model_validator
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

from common.errors import UserError
from common.manifest import AbsolutePath, StrictModel
from common.organism.files import shipped

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # 'auto': every visible GPU (inputs on the first), else the CPU
ORGANISM = "builtin:organism"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


class ModelSpec(StrictModel):
    """Which language model to run, and how to place it. `model: organism` is short for the organism."""

    id: str | None = Field(
        None, description=f"Hugging Face id (read from the local HF cache) or '{ORGANISM}' (shipped)"
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
        return {"id": ORGANISM} if data == "organism" else data

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.id is None) == (self.path is None):
            raise ValueError(f"give exactly one of `id` (HF id or {ORGANISM}) and `path` (a local directory)")
        if self.id and self.id.startswith("builtin:") and self.id != ORGANISM:
            raise ValueError(f"unknown built-in model {self.id!r}; the built-in model is {ORGANISM}")
        return self

    @property
    def name(self) -> str:
        return self.id or str(self.path)

    @property
    def is_organism(self) -> bool:
        return self.id == ORGANISM

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

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


def load_config(spec: ModelSpec) -> tuple[PretrainedConfig, str]:
    """The model's config without weights, and where it came from.

    Reads only local files (the HF cache, a directory, the built-ins); for planning on a machine
    without the cache it falls back to the architecture copies shipped in common/model_configs.
    """
    if spec.is_organism:
        return shipped().config(), "the built-in model organism"
    spec.check_tokenizer_files()
    try:
        config = AutoConfig.from_pretrained(spec._source(), revision=spec.revision, local_files_only=True)
        return config, "local files"
    except OSError:
        copy = resources.files("common") / "model_configs" / (spec.name.replace("/", "--") + ".json")
        if spec.id and copy.is_file():
            data = json.loads(copy.read_text())
            config = AutoConfig.for_model(data.pop("model_type"), **data)
            return config, f"saebatch's copy of {spec.id}'s architecture (not in the local HF cache)"
        raise UserError(
            f"model {spec.name!r}: no config.json in the local HF cache or folder. On a machine "
            f"with internet run `hf download {spec.name} config.json tokenizer.json` (or set "
            "model.path to a local copy), then retry"
        ) from None


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config (multimodal configs nest it)."""
    return config.get_text_config()


def load_tokenizer(spec: ModelSpec, local_only: bool = False) -> PreTrainedTokenizerFast:
    """A fast tokenizer (character offsets are needed to map text spans to tokens)."""
    if spec.random_weights and not spec.is_organism:
        return _stand_in_tokenizer(spec)
    if spec.is_organism:
        tokenizer = shipped().tokenizer()
    else:
        spec.check_tokenizer_files()
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                spec._source(), revision=spec.revision, local_files_only=local_only
            )
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
    try:
        return load_tokenizer(spec, local_only=True)
    except (UserError, OSError):
        return None


def load_model(spec: ModelSpec, attn_implementation: str | None = "eager") -> torch.nn.Module:
    """The causal LM in eval mode; eager attention (the default) returns attention weights, None
    lets transformers choose the fastest the architecture supports."""
    if spec.device == "auto" and not torch.cuda.is_available():
        log.warning("no GPU is visible: %s runs on the CPU (set model.device to silence this)", spec.name)
    if spec.random_weights:
        model = _random_model(spec, attn_implementation)
    elif spec.is_organism:
        model = shipped().model(spec.torch_dtype, attn_implementation).to(input_device(spec))
    else:
        device_map = "auto" if spec.device == "auto" and torch.cuda.is_available() else {"": str(input_device(spec))}
        log.info("loading %s (%s) onto %s", spec.name, spec.dtype, device_map)
        model = AutoModelForCausalLM.from_pretrained(
            spec._source(), revision=spec.revision, dtype=spec.torch_dtype,
            device_map=device_map, attn_implementation=attn_implementation,
        )
    model.eval()
    model.requires_grad_(False)
    return model


def _random_model(spec: ModelSpec, attn_implementation: str | None) -> torch.nn.Module:
    """The architecture of `spec` with seeded random weights, initialised on its device (an 8B model
    takes seconds on a GPU, nothing is read from disk)."""
    config, source = load_config(spec)
    device = input_device(spec)
    log.info("building %s with random weights (%s, architecture from %s) on %s", spec.name, spec.dtype, source, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=spec.torch_dtype, attn_implementation=attn_implementation)


def parameter_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Exact weight size, from a model built on the meta device (no memory, no download)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * itemsize


def kv_cache_bytes(config: PretrainedConfig, dtype: torch.dtype, rows: int, tokens: int) -> int:
    """The keys and values a generation of `rows` sequences of `tokens` tokens caches."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # GPT-2, NeoX: no GQA
    itemsize = torch.empty((), dtype=dtype).element_size()
    return rows * tokens * config.num_hidden_layers * 2 * kv_heads * head_dim * itemsize
