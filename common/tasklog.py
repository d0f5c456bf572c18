"""What a task wrote: its log files as a terminal shows them, its progress, and its exception.

submitit sends a task's stdout and stderr to `logs/submitit/<job>_0_log.out|.err` and its outcome
to `<job>_0_result.pkl`. tqdm rewrites one line with carriage returns, so a log holds every state
of a bar; the reader wants the last one. `saebatch logs` and the live progress read logs here.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from submitit.core.utils import JobPaths

# A tqdm bar with a total, as tqdm writes it: "desc:  40%|████      | 2/5 [00:10<00:15,  5.00s/it]".
_TQDM = re.compile(r"\s*(?:(?P<desc>[^|\r\n]*?):\s*)?(?P<pct>\d+)%\|[^|\r\n]*\|\s*(?P<counts>\S+/\S+)\s*"
                   r"\[(?P<times>[^\]\r\n]*)\]")
# What ShardWriter and run_shard_task log (common/shards.py, common/launcher.py).
_WRITTEN = re.compile(r"shard \d+: unit \S+ written \((\d+)/(\d+)\)")
_TO_WRITE = re.compile(r"shard \d+: (\d+) of (\d+) units to write")
_RESUMING = re.compile(r"shard \d+: resuming, (\d+) of (\d+) units already written")
_COMPLETE = re.compile(r"shard \d+ (?:is already complete|complete):")
_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+) ")
_TAIL_BYTES = 512 * 1024  # enough for hundreds of lines, even with tqdm's rewrites


def job_paths(folder: Path, job_id: str) -> JobPaths:
    """submitit's paths of a job's first task (logs and result), for a local or a Slurm job id."""
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id, task_id=0)


def screen_lines(text: str) -> list[str]:
    """The lines as a terminal shows them: of a line tqdm rewrote, its last state; no blank lines."""
    lines = []
    for line in text.splitlines():
        shown = [part for part in line.split("\r") if part.strip()]
        if shown:
            lines.append(shown[-1].rstrip())
    return lines


def read_end(path: Path, max_bytes: int = _TAIL_BYTES) -> str:
    """The last `max_bytes` of a text file ('' when it does not exist), decoded leniently."""
    try:
        with open(path, "rb") as file:
            file.seek(0, 2)
            size = file.tell()
            file.seek(max(0, size - max_bytes))
            data = file.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text if size <= max_bytes else text.split("\n", 1)[-1]  # drop the cut first line


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` screen lines of a log."""
    return screen_lines(read_end(path))[-lines:] if lines > 0 else []


def task_exception(paths: JobPaths) -> str | None:
    """The task's traceback from its result pickle, or None when it succeeded or left no result."""
    from submitit.core.utils import pickle_load

    if not paths.result_pickle.exists():
        return None
    try:
        outcome, value = pickle_load(paths.result_pickle)
    except Exception as error:  # noqa: BLE001  a pickle written by another version, or cut short
        return f"(its result file {paths.result_pickle} cannot be read: {error})"
    return str(value).strip() if outcome == "error" else None


def exception_summary(traceback: str) -> str:
    """The last line of a traceback that names the exception ("ValueError: ..."), for one-line views."""
    lines = [line for line in traceback.splitlines() if line.strip()]
    named = [line for line in lines if line[0] != " " and not line.startswith("Traceback")]
    return (named or lines or [""])[-1].removeprefix("common.errors.UserError: ")


@dataclass
class TaskProgress:
    """What a shard task's log says so far: units written (absolute, so re-reading is harmless),
    when its current attempt began, and its latest tqdm bar."""

    done: int | None = None
    total: int | None = None
    initial: int | None = None  # units already written when the current attempt began
    began: float | None = None  # epoch seconds of the current attempt's start (from the log's stamp)
    first_unit: tuple[float, int] | None = None  # (when, units done) at the attempt's first unit written
    last_unit: tuple[float, int] | None = None  # the same at its latest
    bar: str = ""  # the latest tqdm bar, without its drawing: "shard 0: 40% 2/5 [00:10<00:15, 5.00s/it]"

    def feed(self, text: str) -> None:
        """Read more of the log (whole lines or tqdm states; a cut line is read again later)."""
        for segment in re.split(r"[\r\n]", text):
            self._line(segment)

    def _line(self, segment: str) -> None:
        if match := _TQDM.match(segment):
            desc = f"{match['desc'].strip()}: " if match["desc"] else ""
            self.bar = f"{desc}{match['pct']}% {match['counts']} [{match['times'].strip()}]"
        for match in _WRITTEN.finditer(segment):
            self.done, self.total = int(match[1]), int(match[2])
            stamp = _stamp(segment)
            if stamp is not None:
                self.last_unit = (stamp, self.done)
                self.first_unit = self.first_unit or self.last_unit
        if match := _TO_WRITE.search(segment):
            self.total = int(match[2])
            self.done = self.initial = self.total - int(match[1])
            self.began, self.first_unit, self.last_unit = _stamp(segment), None, None
        if match := _RESUMING.search(segment):
            self.done, self.total = int(match[1]), int(match[2])
        if _COMPLETE.search(segment):
            self.done = self.total if self.total is not None else self.done

    def bar_remaining(self) -> str | None:
        """The remaining time the task's own tqdm bar estimates ('01:15'), if it has one yet."""
        found = re.search(r"<(\d[\d:]*)", self.bar)
        return found[1] if found else None


def _stamp(line: str) -> float | None:
    """The time of a log line (our logging format: '2026-01-31 12:00:00,123 INFO ...'), local time."""
    found = _STAMP.search(line)
    if not found:
        return None
    return datetime.datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(found[2]) / 1000
