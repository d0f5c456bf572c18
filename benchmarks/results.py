"""Keep benchmarks/RESULTS.md as one Markdown table that every benchmark script adds rows to.

    from results import Row, record   # scripts in benchmarks/ have this folder on sys.path
    record([Row("my benchmark", ours="1.2 s", baseline="3.4 s", ratio="2.8x")])

`record` replaces the rows whose `benchmark` cell matches a new row and keeps every other row, so
each script owns its own rows and re-running it refreshes them in place. Text above (and below)
the table is kept as it is.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
REPO = RESULTS.parent.parent
COLUMNS = ("benchmark", "ours", "baseline", "speed-up or size ratio", "machine", "date", "command")
HEADER = "| " + " | ".join(COLUMNS) + " |"
INTRO = (
    "# Benchmark results\n\n"
    "Measured figures of saebatch against the baseline each benchmark names (usually the seed "
    "write-up's method, re-implemented in the benchmark script). Every row was produced by the "
    "command in its last column, on the machine and date given; ratios are baseline / ours, so "
    "above 1 means saebatch is faster or smaller. Re-running a script replaces its own rows.\n"
)


def machine() -> str:
    """A short description of this machine: CPU model, core count, and whether a GPU was used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, CPU"


def gpu_machine() -> str:
    """The GPU this process computes on, then the host's CPU (for rows measured on a GPU)."""
    import torch

    gpu = torch.cuda.get_device_properties(0)
    return f"{gpu.name} ({gpu.total_memory / 2**30:.0f} GiB), " + machine().removesuffix(", CPU")


def command_line() -> str:
    """The command that is running, with paths inside the repository made relative to it."""

    def short(arg: str) -> str:
        path = Path(arg)
        if path.is_absolute():
            try:
                return str(path.relative_to(REPO))
            except ValueError:
                return arg
        return arg

    return shlex.join([short(sys.executable), *(short(a) for a in sys.argv)])


@dataclass
class Row:
    benchmark: str
    ours: str
    baseline: str
    ratio: str
    machine: str = field(default_factory=machine)
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())
    command: str = field(default_factory=command_line)

    def cells(self) -> list[str]:
        return [self.benchmark, self.ours, self.baseline, self.ratio, self.machine, self.date, self.command]


def _escape(cell: str) -> str:
    return cell.replace("|", r"\|").replace("\n", " ")


def _split(line: str) -> list[str]:
    """Cells of a table line, honouring escaped pipes (kept escaped)."""
    cells, current, i = [], "", 0
    body = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            current += r"\|"
            i += 2
            continue
        if body[i] == "|":
            cells.append(current.strip())
            current = ""
        else:
            current += body[i]
        i += 1
    cells.append(current.strip())
    return cells


def _format(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def record(rows: list[Row], path: Path = RESULTS) -> None:
    """Put `rows` into the table at `path`: replace rows with the same benchmark, append new ones."""
    before, table, after = INTRO, [], ""
    if path.exists():
        lines = path.read_text().splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.strip() == HEADER)
        except StopIteration:
            raise ValueError(f"{path} has no line `{HEADER}`; fix or remove the file") from None
        end = start + 2  # header and separator
        while end < len(lines) and lines[end].strip().startswith("|"):
            end += 1
        before = "\n".join(lines[:start]).rstrip("\n") + "\n"
        table = [_split(line) for line in lines[start + 2 : end]]
        after = "\n".join(lines[end:]).strip("\n")
    new = {_escape(row.benchmark): [_escape(c) for c in row.cells()] for row in rows}
    kept, placed = [], set()
    for cells in table:
        if cells and cells[0] in new:
            if cells[0] not in placed:  # a stale duplicate of a replaced row is dropped
                kept.append(new[cells[0]])
                placed.add(cells[0])
        else:
            kept.append(cells)
    kept.extend(cells for key, cells in new.items() if key not in placed)
    text = before + "\n" + HEADER + "\n" + "|---" * len(COLUMNS) + "|\n"
    text += "".join(_format(cells) + "\n" for cells in kept)
    if after:
        text += "\n" + after + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a reader never sees half a table
