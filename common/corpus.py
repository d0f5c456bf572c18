"""Text corpora cut into token windows: plain text, JSONL, a `datasets` folder, or the organism's.

Each document is tokenized on its own and cut into consecutive windows, so no window spans two
documents. Every window starts with the tokenizer's special prefix (e.g. <bos>), as the model saw
in training; the rest of it is content. The token budget counts content tokens: windows are taken
in corpus order until the budget is reached, the last one cut to fit. Nothing is downloaded: the
corpus is read from the path given, or drawn from the organism's text generator.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from common.errors import UserError
from common.manifest import AbsolutePath, StrictModel, shown
from common.plan import WorkUnit, assume, only_estimating

if TYPE_CHECKING:
    import torch

BUILTIN_TEXT = {"organism": "the organism's synthetic text", "organism_decisions": "the organism's decision prompts",
                "organism_plain": "the organism's plain sentences"}


class CorpusSpec(StrictModel):
    """Where the text comes from and how much of it to use."""

    path: AbsolutePath | None = Field(None, description="a .txt file, a folder of .txt files, a .jsonl file, "
                                      "or a folder written by datasets' save_to_disk")
    builtin: Literal["organism", "organism_decisions", "organism_plain"] | None = Field(
        None, description="'organism': the model organisms' synthetic text, the same for both (gambling prompts, arithmetic, "
        "plain sentences), drawn without end from `seed`; 'organism_decisions' or 'organism_plain': only its "
        "decision prompts (with their answers) or only its plain sentences")
    seed: int = Field(0, description="seed of the builtin text")
    format: Literal["auto", "text", "jsonl", "datasets"] = Field(
        "auto", description="auto: datasets folder, folder of .txt, .jsonl file, else plain text")
    text_field: str = Field("text", description="JSONL key or dataset column holding the text")
    window: int = Field(128, ge=1, description="tokens per window, prefix included (a window never spans two documents)")
    tokens: int = Field(ge=1, description="token budget: content tokens, taken in corpus order")
    allow_short: bool = Field(False, description="run on the whole corpus when it holds fewer tokens than the budget")

    @model_validator(mode="after")
    def _one_source(self) -> CorpusSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of `path` (local files) and `builtin` (e.g. `builtin: organism`)")
        return self

    def describe(self) -> str:
        source = f"{BUILTIN_TEXT[self.builtin]} (seed {self.seed})" if self.builtin else str(self.path)
        return f"{self.tokens:,} tokens of {source} in windows of {self.window}"


@dataclass(frozen=True)
class Window:
    """Token ids of one window: `prefix` special tokens, then content."""

    start: int        # content tokens of the corpus before this window
    ids: list[int]
    prefix: int

    @property
    def content(self) -> int:
        return len(self.ids) - self.prefix


def pad_windows(batch: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of windows, right-padded: (batch, longest) token ids, the attention mask (1 on real
    tokens) and the content mask (True on content tokens: not the prefix, not padding)."""
    import torch

    length = max(len(w.ids) for w in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    real = torch.zeros((len(batch), length), dtype=torch.long)
    content = torch.zeros((len(batch), length), dtype=torch.bool)
    for i, window in enumerate(batch):
        ids[i, : len(window.ids)] = torch.tensor(window.ids)
        real[i, : len(window.ids)] = 1
        content[i, window.prefix : len(window.ids)] = True
    return ids, real, content


def _format(spec: CorpusSpec) -> str:
    if spec.format != "auto":
        return spec.format
    assert spec.path is not None  # _one_source: a corpus without `builtin` has a path
    if spec.path.is_dir():
        is_dataset = any((spec.path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))
        return "datasets" if is_dataset else "text"
    return "jsonl" if spec.path.suffix == ".jsonl" else "text"


def read_documents(spec: CorpusSpec, field: str = "corpus") -> Iterator[str | tuple[str, ...]]:
    """The corpus's documents in order (a text file is one document). The organism's come as
    pieces to tokenize one by one, as it was trained on them (a prompt, then its continuation)."""
    if spec.builtin is not None:
        # The organism's text is the experiment side's (its decision prompts are the slot-machine
        # task's); common only dispatches to it, as the registry does to the jobs.
        from jobs._organism.corpus import DOCUMENTS

        rng = random.Random(spec.seed)
        draw = DOCUMENTS[spec.builtin]
        while True:
            yield draw(rng).pieces
    assert spec.path is not None  # _one_source: a corpus without `builtin` has a path
    if not spec.path.exists():
        raise UserError(f"{field}.path: {spec.path} does not exist")
    kind = _format(spec)
    if kind == "text":
        files = sorted(spec.path.glob("*.txt")) if spec.path.is_dir() else [spec.path]
        if not files:
            raise UserError(f"{field}.path: {spec.path} holds no .txt files (format: text)")
        for file in files:
            yield _text_of(file, field)
    elif kind == "jsonl":
        yield from _jsonl(spec, field)
    else:
        yield from _dataset(spec, field)


def _text_of(file: Path, field: str) -> str:
    """A text file's content; a binary file (NUL bytes, or bytes that are not UTF-8) is refused."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{field}.path: {file} is not UTF-8 text (byte {data[error.start]:#04x} at offset "
                        f"{error.start}); give a text, JSONL or datasets corpus") from None
    if "\x00" in text:
        raise UserError(f"{field}.path: {file} holds NUL bytes at offset {text.index(chr(0))}: a binary file, not "
                        "text; give a text, JSONL or datasets corpus")
    return text


def _jsonl(spec: CorpusSpec, field: str) -> Iterator[str]:
    assert spec.path is not None  # read_documents reads files only for a corpus with a path
    with spec.path.open("rb") as lines:  # streamed: a corpus may be larger than memory
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{field}.path: line {number} of {spec.path} is not UTF-8 text (byte "
                                f"{raw[error.start]:#04x}); give a JSONL file of UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{field}.path: line {number} of {spec.path} is not JSON ({error.msg})") from None
            if not isinstance(record, dict) or spec.text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{field}.text_field: line {number} of {spec.path} has no {spec.text_field!r} "
                                f"(it has {keys}); set {field}.text_field to the key that holds the text")
            yield str(record[spec.text_field])


def _dataset(spec: CorpusSpec, field: str) -> Iterator[str]:
    from datasets import Dataset, load_from_disk

    try:
        data = load_from_disk(str(spec.path))
    except Exception as error:  # an incomplete folder fails anywhere inside datasets (KeyError, JSON errors, ...)
        raise UserError(f"{field}.path: {spec.path} is not a folder written by datasets' save_to_disk "
                        f"({type(error).__name__}: {error}); save the dataset again with save_to_disk, or point "
                        f"{field}.path at a .jsonl file or a folder of .txt files") from None
    if not isinstance(data, Dataset):
        raise UserError(f"{field}.path: {spec.path} holds the splits {sorted(data)}; point it at one split's "
                        f"folder, e.g. {spec.path / sorted(data)[0]}")
    if spec.text_field not in data.column_names:
        raise UserError(f"{field}.text_field: the dataset has no column {spec.text_field!r} "
                        f"(columns: {data.column_names})")
    for batch in data.iter(batch_size=1000):  # a column at a time would load it whole
        for text in batch[spec.text_field]:
            yield str(text)


def check_source(spec: CorpusSpec, field: str = "corpus") -> None:
    """Fail now if the corpus is missing, empty or unreadable (reads up to its first text)."""
    if not any(_joined(text).strip() for text in read_documents(spec, field)):
        raise UserError(f"{field}.path: {spec.path} holds no text")


def _joined(document: str | tuple[str, ...]) -> str:
    return document if isinstance(document, str) else "".join(document)


def windows(spec: CorpusSpec, tokenizer, field: str = "corpus") -> Iterator[Window]:
    """Windows up to the budget, lazily; refuses a corpus smaller than the budget unless allowed."""
    prefix = tokenizer("").input_ids  # what the tokenizer puts before any text (<bos>), if anything
    content = spec.window - len(prefix)
    if content < 1:
        raise UserError(f"{field}.window: {spec.window} tokens leave no room after the tokenizer's "
                        f"{len(prefix)} prefix token(s); raise {field}.window")
    total = 0
    for text in read_documents(spec, field):
        pieces = (text,) if isinstance(text, str) else text
        if not _joined(pieces).strip():
            continue
        ids = [token for piece in pieces for token in tokenizer(piece, add_special_tokens=False).input_ids]
        for start in range(0, len(ids), content):
            chunk = ids[start : start + content][: spec.tokens - total]
            yield Window(total, prefix + chunk, len(prefix))
            total += len(chunk)
            if total == spec.tokens:
                return
    if total == 0:
        raise UserError(f"{field}.path: {spec.path} holds no text")
    if not spec.allow_short:
        raise UserError(f"{field}.tokens: the corpus holds only {total:,} tokens of the {spec.tokens:,} asked; "
                        f"lower {field}.tokens, or set {field}.allow_short: true to run on what exists")


# ---------------------------------------------------------------- work units of corpus tokens


def token_units(spec: CorpusSpec, tokenizer, tokens_per_unit: int, field: str) -> list[WorkUnit]:
    """Units of `tokens_per_unit` consecutive content tokens (a unit takes the windows that start in
    its range). The corpus is counted when the tokenizer is at hand; otherwise it is only checked to
    exist and taken to hold the budget. A corpus file that is missing is refused, unless planning
    ahead (common.plan.estimating), where it is taken to hold the tokens asked for."""
    missing = spec.path is not None and not spec.path.exists()
    if tokenizer is not None and not missing:  # count what the corpus holds (refuses a short one unless allowed)
        tokens = sum(w.content for w in windows(spec, tokenizer, field))
    else:
        try:
            check_source(spec, field)
        except UserError as error:
            if not missing:
                raise
            only_estimating(error)
            assert spec.path is not None  # `missing` is a corpus file that is not there
            assume(f"{field}: {shown(spec.path)} is not here; taken to hold the {spec.tokens:,} tokens asked for")
        tokens = spec.tokens
    digits = len(str(tokens))
    return [WorkUnit(f"tokens_{start:0{digits}d}", {"start": start, "stop": min(start + tokens_per_unit, tokens)})
            for start in range(0, tokens, tokens_per_unit)]


def windows_by_unit(spec: CorpusSpec, tokenizer, units: list[WorkUnit], field: str) -> Iterator[tuple[WorkUnit, list[Window]]]:
    """Each of `token_units`' units with the windows that start in its token range, in corpus order."""
    queue = sorted(units, key=lambda unit: unit.payload["start"])
    if not queue:
        return
    collected: list[Window] = []
    for window in windows(spec, tokenizer, field):
        while queue and window.start >= queue[0].payload["stop"]:
            yield queue.pop(0), collected
            collected = []
        if not queue:
            return
        if window.start >= queue[0].payload["start"]:
            collected.append(window)
    for unit in queue:  # the corpus ended (allow_short): what was found, then nothing
        yield unit, collected
        collected = []
