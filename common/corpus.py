"""Local text corpora cut into token windows: plain text, JSONL, or a `datasets` folder.

Each document is tokenized on its own (with the tokenizer's special tokens, e.g. <bos>) and cut
into consecutive windows of at most `window` tokens, so no window spans two documents. Windows
are taken in corpus order until the token budget is reached; the last one is cut to fit it.
Nothing is downloaded: the corpus is read from the path given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from common.errors import UserError
from common.manifest import AbsolutePath, StrictModel


class CorpusSpec(StrictModel):
    """Where the text comes from and how much of it to use."""

    path: AbsolutePath = Field(description="a .txt file, a folder of .txt files, a .jsonl file, "
                               "or a folder written by datasets' save_to_disk")
    format: Literal["auto", "text", "jsonl", "datasets"] = Field(
        "auto", description="auto: datasets folder, folder of .txt, .jsonl file, else plain text")
    text_field: str = Field("text", description="JSONL key or dataset column holding the text")
    window: int = Field(128, ge=2, description="tokens per window (a window never spans two documents)")
    tokens: int = Field(ge=1, description="token budget: windows are taken until this many tokens")
    allow_short: bool = Field(False, description="run on the whole corpus when it holds fewer tokens than the budget")


def _format(spec: CorpusSpec) -> str:
    if spec.format != "auto":
        return spec.format
    if spec.path.is_dir():
        is_dataset = any((spec.path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))
        return "datasets" if is_dataset else "text"
    return "jsonl" if spec.path.suffix == ".jsonl" else "text"


def read_documents(spec: CorpusSpec, field: str = "corpus") -> Iterator[str]:
    """The corpus's documents in order (a text file is one document)."""
    if not spec.path.exists():
        raise UserError(f"{field}.path: {spec.path} does not exist")
    kind = _format(spec)
    if kind == "text":
        files = sorted(spec.path.glob("*.txt")) if spec.path.is_dir() else [spec.path]
        if not files:
            raise UserError(f"{field}.path: {spec.path} holds no .txt files (format: text)")
        for file in files:
            yield file.read_text(encoding="utf-8", errors="replace")
    elif kind == "jsonl":
        yield from _jsonl(spec, field)
    else:
        yield from _dataset(spec, field)


def _jsonl(spec: CorpusSpec, field: str) -> Iterator[str]:
    with spec.path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
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
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"{field}.path: {spec.path} is not a folder written by datasets' save_to_disk ({error})") from None
    if not isinstance(data, Dataset):
        raise UserError(f"{field}.path: {spec.path} holds the splits {sorted(data)}; point it at one split's "
                        f"folder, e.g. {spec.path / sorted(data)[0]}")
    if spec.text_field not in data.column_names:
        raise UserError(f"{field}.text_field: the dataset has no column {spec.text_field!r} "
                        f"(columns: {data.column_names})")
    for text in data[spec.text_field]:
        yield str(text)


def token_windows(spec: CorpusSpec, tokenizer, field: str = "corpus") -> list[list[int]]:
    """Token windows up to the budget; refuses a corpus smaller than the budget unless allowed."""
    windows: list[list[int]] = []
    total = 0
    for text in read_documents(spec, field):
        if not text.strip():
            continue
        ids = tokenizer(text).input_ids
        for start in range(0, len(ids), spec.window):
            window = ids[start : start + spec.window][: spec.tokens - total]
            windows.append(window)
            total += len(window)
            if total == spec.tokens:
                return windows
    if total == 0:
        raise UserError(f"{field}.path: {spec.path} holds no text")
    if not spec.allow_short:
        raise UserError(f"{field}.tokens: the corpus holds only {total} tokens of the {spec.tokens} asked; "
                        f"lower {field}.tokens, or set {field}.allow_short: true to run on what exists")
    return windows
