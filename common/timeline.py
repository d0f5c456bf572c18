"""A run's timeline: when and where each shard and the merge ran, added to every report.

Each shard records in its attributes when it was first opened (`started`), each attempt at it
(`attempts`: start and host, one per task that opened it, so a requeued or resumed shard shows
its parts) and when and where it was finished (`finished`, `host`). The reduce calls
`add_timeline` after the job's own reduce wrote `report/`: it appends a "Timeline" section (a
table, `timeline.csv`, and a Gantt chart, `timeline.png`) to `report/report.md`, for every job
alike.
"""

from __future__ import annotations

import csv
import datetime
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from common.provenance import now


@dataclass
class Span:
    """One row of the timeline: a shard (or the reduce), where and when it ran."""

    name: str
    host: str | None
    start: datetime.datetime | None
    end: datetime.datetime | None
    attempts: list[tuple[datetime.datetime, str]] = field(default_factory=list)  # (start, host) of each

    @property
    def seconds(self) -> float | None:
        """How long its last attempt ran (a resumed shard's earlier attempts and the gap between
        them are not its work time)."""
        began = self.attempts[-1][0] if self.attempts else self.start
        return (self.end - began).total_seconds() if began and self.end else None


def _time(value: object) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def shard_span(index: int, path: Path) -> Span:
    """The span of a finished shard, from its attributes (shards written before these were
    recorded give what they have)."""
    with h5py.File(path, "r") as file:
        attrs = dict(file.attrs)
    recorded = [(_time(a.get("start")), str(a.get("host"))) for a in json.loads(attrs.get("attempts", "[]"))]
    attempts = [(start, host) for start, host in recorded if start is not None]
    host = attrs.get("host")
    return Span(f"shard {index}", str(host) if host is not None else None, _time(attrs.get("started")),
                _time(attrs.get("finished")), attempts)


def reduce_span(began: str) -> Span:
    """The merge, from `began` (when the reduce task started) until now, on this host."""
    host = socket.gethostname()
    start = _time(began)
    return Span("reduce", host, start, _time(now()), [(start, host)] if start else [])


def add_timeline(report_dir: Path, shard_paths: list[Path], reduce: Span) -> None:
    """Append the run's timeline to `report_dir/report.md`, with timeline.csv and timeline.png."""
    spans = [shard_span(k, path) for k, path in enumerate(shard_paths)] + [reduce]
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(report_dir / "timeline.csv", spans)
    plotted = _plot(report_dir / "timeline.png", spans)
    lines = ["## Timeline", "", _summary(spans), "", *_table(spans), "",
             "(also in [timeline.csv](timeline.csv))", ""]
    if plotted:
        lines += ["![When and where each shard ran](timeline.png)", "",
                  "*When and where each shard ran (colour: host; a tick: the task that resumed it).*", ""]
    report = report_dir / "report.md"
    before = report.read_text() if report.exists() else ""
    report.write_text(before.rstrip("\n") + ("\n\n" if before else "") + "\n".join(lines))


def duration(seconds: float | None) -> str:
    """'42 s', '3 min 05 s', '2 h 04 min'."""
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _stamp(moment: datetime.datetime | None) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _summary(spans: list[Span]) -> str:
    shards = [s for s in spans if s.name != "reduce"]
    starts = [s.start for s in spans if s.start]
    ends = [s.end for s in spans if s.end]
    hosts = sorted({s.host for s in shards if s.host})
    if not starts or not ends:
        return f"{len(shards)} shard(s); their times were not recorded (shards written by an older saebatch)."
    wall = (max(ends) - min(starts)).total_seconds()
    busy = sum(s.seconds or 0 for s in shards)
    where = f"{len(hosts)} host{'s' if len(hosts) != 1 else ''} ({', '.join(hosts) or '-'})"
    return (f"{len(shards)} shard{'s' if len(shards) != 1 else ''} on {where}: from the first start to "
            f"the end of the merge {duration(wall)}; the shards' own times (a resumed shard's last attempt) add up to "
            f"{duration(busy)}. Times in UTC.")


def _table(spans: list[Span]) -> list[str]:
    rows = [["task", "host", "start", "end", "duration", "attempts"], ["---", "---", "---", "---", "---:", "---:"]]
    rows += [[s.name, s.host or "-", _stamp(s.start), _stamp(s.end), duration(s.seconds), str(len(s.attempts) or "-")]
             for s in spans]
    return ["| " + " | ".join(row) + " |" for row in rows]


def _write_csv(path: Path, spans: list[Span]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["task", "host", "start", "end", "seconds", "attempts"])
        for s in spans:
            writer.writerow([s.name, s.host or "", s.start.isoformat() if s.start else "",
                             s.end.isoformat() if s.end else "", s.seconds if s.seconds is not None else "",
                             len(s.attempts)])


def _plot(path: Path, spans: list[Span]) -> bool:
    """A Gantt chart of the spans with times (False when none has them)."""
    timed = [s for s in spans if s.start and s.end]
    if not timed:
        return False
    import matplotlib

    matplotlib.use("Agg")  # reduce runs on headless nodes
    import matplotlib.pyplot as plt

    origin = min(s.start for s in timed if s.start)  # every timed span has both times: the filters are for mypy
    total = max((s.end - origin).total_seconds() for s in timed if s.end)
    scale, unit = (60.0, "minutes") if total >= 180 else (1.0, "seconds")
    hosts = sorted({s.host or "-" for s in timed})
    colours = {host: plt.get_cmap("tab10")(k % 10) for k, host in enumerate(hosts)}
    fig, ax = plt.subplots(figsize=(8, min(12.0, 1.2 + 0.28 * len(timed))))
    for row, s in enumerate(timed):
        assert s.start and s.end  # timed
        left = (s.start - origin).total_seconds() / scale
        ax.barh(row, max((s.end - s.start).total_seconds() / scale, total / scale / 500), left=left, height=0.7,
                color=colours[s.host or "-"], label=s.host or "-")
        for resumed, _ in s.attempts[1:]:
            ax.plot([(resumed - origin).total_seconds() / scale] * 2, [row - 0.4, row + 0.4], color="black", lw=1.5)
    ax.set_yticks(range(len(timed)), [s.name for s in timed] if len(timed) <= 60 else [""] * len(timed))
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} since the first start ({_stamp(origin)} UTC)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), title="host", loc="upper left", bbox_to_anchor=(1.01, 1),
              fontsize="small")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
