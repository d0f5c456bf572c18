"""Live progress of a submission's tasks in the terminal, read from what the tasks write.

A task's tqdm bars and log lines go to its submitit log (`logs/submitit/<job>_0_log.err`), not to
the terminal that waits for it. While `saebatch submit --executor local` (or `--wait`, or `demo`)
waits, the board reads each task's log every second: the units its shard has written (the lines
ShardWriter logs), the task's latest tqdm bar, and whether it has finished. On a terminal it draws
one tqdm line per task; elsewhere (a pipe, a file, CI) it logs a line when a task's state or unit
count changes, and at most every 30 s otherwise, so a log file gets a record, not a bar a second.
"""

from __future__ import annotations

import codecs
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self, TextIO

from tqdm import tqdm

from common.tasklog import TaskProgress, exception_summary, task_exception

log = logging.getLogger(__name__)

QUIET_SECONDS = 30.0  # without a change of state or units, a non-terminal line at most this often
RESULT_GRACE_SECONDS = 15.0  # a Slurm task's result file may show this late on a shared file system (submitit's wait)
_UTF8 = codecs.getincrementaldecoder("utf-8")


def eta_seconds(progress: TaskProgress, now: float) -> float | None:
    """Seconds left for a shard: its units still to write at the pace of those written so far in
    this attempt (from the first unit on, so that loading the model does not count as a unit's
    work; with one unit written, from the attempt's start), less the time since the latest."""
    first, last = progress.first_unit, progress.last_unit
    if first is None or last is None or progress.total is None:
        return None
    if last[1] > first[1]:
        per_unit = (last[0] - first[0]) / (last[1] - first[1])
    elif progress.began is not None and progress.initial is not None and first[1] > progress.initial:
        per_unit = (first[0] - progress.began) / (first[1] - progress.initial)
    else:
        return None
    return max(0.0, (progress.total - last[1]) * per_unit - (now - last[0]))


@dataclass
class TaskView:
    """One task on the board: where its log is, what it says, and how it ended."""

    name: str
    total: int | None  # planned units (None: the reduce)
    job: Any = None  # its submitit job, None until it is started
    state: str = "waiting"  # waiting | pending | running | done | failed
    progress: TaskProgress = field(default_factory=TaskProgress)
    error: str = ""
    _seen: float | None = None  # when its log was first read
    _offset: int = 0
    _cut: str = ""  # the end of the last read, after its last line break: read again with what follows
    _decoder: codecs.IncrementalDecoder = field(default_factory=lambda: _UTF8("replace"))  # a split "█" waits
    _ended: float | None = None  # when the job was first seen done (time.monotonic())

    def attach(self, job: Any) -> None:
        """Follow `job` (a new task, or the same shard started again) from the start of its log."""
        self.job, self.state, self._offset, self._cut, self._ended = job, "pending", 0, "", None
        self._decoder.reset()

    def poll(self) -> None:
        """Read what the task's log gained, and whether the task has ended."""
        if self.job is None or self.state in ("done", "failed"):
            return
        if self._read() is None and not self.job.done():  # a Slurm task that has not started yet
            self.state = "pending"
            return
        self.state = "running"
        self._seen = self._seen or time.time()
        if self.job.done():
            self._read()  # what it wrote since the read above
            self._ended = self._ended or time.monotonic()
            if not _result_visible(self.job) and time.monotonic() - self._ended < _result_grace(self.job):
                return  # as submitit's result(): a shared file system may show the result file late
            self.error = task_exception(self.job.paths) or ""
            finished = self.job.paths.result_pickle.exists() and not self.error
            self.state = "done" if finished else "failed"
            if finished and self.total is not None:
                self.progress.done = self.total

    def _read(self) -> str | None:
        """Feed the log's new text to `progress`; None when there is no log yet."""
        try:
            with open(self.job.paths.stderr, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return None
        self._offset += len(data)
        text = self._cut + self._decoder.decode(data)
        self.progress.feed(text)
        cut = max(text.rfind("\n"), text.rfind("\r"))
        self._cut = text[cut + 1:]
        return text

    def status(self, now: float) -> str:
        """The state, time left and the task's own latest bar, in a few words."""
        if self.state == "failed":
            return "failed: " + (exception_summary(self.error) if self.error else "ended without a result")
        if self.state in ("waiting", "pending", "done"):
            return {"waiting": "waiting to start", "pending": "not started yet", "done": "done"}[self.state]
        text = "running" + (f" {tqdm.format_interval(max(0.0, now - self._seen))}" if self._seen else "")
        left = eta_seconds(self.progress, now)
        eta = tqdm.format_interval(left) if left is not None else self.progress.bar_remaining()
        text += f", ~{eta} left" if eta else ""
        return text + (f" | {self.progress.bar}" if self.progress.bar else "")

    def line(self, now: float) -> str:
        """One log line: 'shard 0: 2/5 units, ~01:03 left | shard 0: 40% 2/5 [00:10<00:15, 5.00s/it]'."""
        p = self.progress
        units = f"{p.done if p.done is not None else 0}/{self.total} units, " if self.total is not None else ""
        return f"{self.name}: {units}{self.status(now)}"


class ProgressBoard:
    """The tasks of one wait, refreshed every `poll_seconds` until all have ended."""

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None):
        self.stream = stream or sys.stderr
        self.interactive = _is_terminal(self.stream) if interactive is None else interactive
        self.views: dict[str, TaskView] = {}
        self._bars: dict[str, tqdm] = {}
        self._said: dict[str, tuple[tuple, float]] = {}  # name -> (what was said, when)

    def add(self, name: str, total: int | None) -> None:
        """A task to show (in the order added), before or after it starts."""
        self.views.setdefault(name, TaskView(name, total))

    def refresh(self, jobs: Mapping[str, Any]) -> None:
        """Attach the jobs started so far, read their logs, and show what changed."""
        now = time.time()
        for name, job in jobs.items():
            view = self.views.setdefault(name, TaskView(name, None))
            if view.job is not job:
                view.attach(job)
        for view in self.views.values():
            view.poll()
            if self.interactive:
                self._draw(view, now)
            else:
                self._say(view, now)

    def follow(self, jobs: Mapping[str, Any], poll_seconds: float = 1.0,
               stop: Callable[[], bool] | None = None) -> None:
        """Refresh until every job in `jobs` has ended (or `stop()` says to stop waiting)."""
        while True:
            self.refresh(jobs)
            if all(self.views[name].state in ("done", "failed") for name in jobs):
                return
            if stop is not None and stop():
                return
            time.sleep(poll_seconds)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _draw(self, view: TaskView, now: float) -> None:
        bar = self._bars.get(view.name)
        if bar is None:
            shape = "{desc}: {percentage:3.0f}%|{bar:16}| {n}/{total} units{postfix}" if view.total is not None \
                else "{desc}"
            bar = tqdm(total=view.total, desc=view.name, position=len(self._bars), file=self.stream,
                       bar_format=shape, leave=True, mininterval=0)
            self._bars[view.name] = bar
        bar.n = view.progress.done or 0
        width = shutil.get_terminal_size((100, 20)).columns  # COLUMNS, the terminal, else 100 (a pty may say 0)
        bar.ncols = width
        room = max(10, width - len(view.name) - (40 if view.total is not None else 4))
        if view.total is None:
            bar.set_description_str(f"{view.name}: {_clip(view.status(now), room)}", refresh=False)
        else:
            bar.set_postfix_str(_clip(view.status(now), room), refresh=False)
        bar.refresh()

    def _say(self, view: TaskView, now: float) -> None:
        key = (view.state, view.progress.done or 0)
        said = self._said.get(view.name)
        quiet = said is not None and said[0] == key and (now - said[1] < QUIET_SECONDS or
                                                           view.state not in ("running", "pending"))
        if view.state == "waiting" or quiet:
            return
        self._said[view.name] = (key, now)
        log.info("%s", view.line(now))


def _result_grace(job: Any) -> float:
    """How long a job that has ended may take to show its result file: none for a local job (its
    controller exits after the file is written, on this machine)."""
    import submitit

    return 0.0 if isinstance(job, submitit.LocalJob) else RESULT_GRACE_SECONDS


def _result_visible(job: Any) -> bool:
    """Whether the job's result file exists, after refreshing the folder's entry in the NFS client's
    cache as submitit does (a chmod to the same mode)."""
    folder = job.paths.result_pickle.parent
    try:
        folder.chmod(folder.stat().st_mode)
    except OSError:  # not ours to chmod, or gone
        pass
    return job.paths.result_pickle.exists()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _is_terminal(stream: TextIO) -> bool:
    """Bars only on a terminal that can move its cursor (not a pipe, a file or TERM=dumb)."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False
