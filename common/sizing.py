"""What a run costs before it runs: a manifest planned and each shard's estimate timed at the H200
rates of common.runtime, and a chain of such runs summed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from common.launcher import plan_manifest
from common.manifest import Manifest
from common.manifest_file import load_manifest
from common.plan import Estimate, Plan, estimating
from common.runtime import rate_sources, work_seconds


@dataclass
class PlanSize:
    """A manifest planned for its cost: the estimate of every shard (runtime on one H200 each) and
    of the whole run (output), and what was assumed in place of inputs not there yet."""

    path: str
    manifest: Manifest
    plan: Plan
    total: Estimate
    shards: list[Estimate]
    assumed: list[str] = field(default_factory=list)

    @property
    def shard_seconds(self) -> list[float]:
        return [work_seconds(estimate.work) for estimate in self.shards]

    @property
    def seconds(self) -> float:
        return sum(self.shard_seconds)

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.manifest.cluster.gpus_per_task / 3600

    @property
    def gpu_work_without_gpu(self) -> bool:
        """Timed as on an H200, but the tasks ask for no GPU (they would take far longer)."""
        on_gpu = any(work.kind not in ("load", "cpu_read") for estimate in self.shards for work in estimate.work)
        return on_gpu and not self.manifest.cluster.gpus_per_task

    @property
    def peak_memory(self) -> int:
        return max(estimate.task_memory_bytes for estimate in self.shards)

    @property
    def sources(self) -> list[str]:
        return rate_sources([work for estimate in self.shards for work in estimate.work])


def size_manifest(path: str) -> PlanSize:
    """Load, validate and plan a manifest (estimating in place of inputs that do not exist yet),
    then estimate each shard and the whole run."""
    with estimating() as assumed:
        manifest = load_manifest(path)
        job, plan = plan_manifest(manifest)
        shards = [job.estimate(manifest, plan.shard_units(index)) for index in range(len(plan.shards))]
        total = job.estimate(manifest, list(plan.units))
    return PlanSize(path, manifest, plan, total, shards, list(assumed))


def hours(seconds: float) -> str:
    """A duration for people: whole seconds under 90 s, whole minutes under 90 min, else hours to
    one decimal."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def runtime_lines(size: PlanSize) -> list[str]:
    """What `saebatch plan` says of a manifest's runtime: the total, the longest shard against the
    time limit, and the rates and assumptions behind the figures."""
    cluster = size.manifest.cluster
    longest = max(size.shard_seconds)
    if cluster.gpus_per_task:
        kind = f"{size.gpu_hours:.2f} GPU-hours"
    elif size.gpu_work_without_gpu:
        kind = "times on an H200, but the tasks ask for no GPU (cluster.gpus_per_task: 0): CPUs take far longer"
    else:
        kind = "CPU tasks, no GPU"
    lines = [(f"estimated runtime: {hours(longest)} for the longest shard, {hours(size.seconds)} for all "
              f"{len(size.shards)} together: {kind} (estimate: rates and assumptions below)")]
    if longest > cluster.timeout_min * 60:
        lines.append(f"  note: the longest shard's estimate exceeds cluster.timeout_min ({cluster.timeout_min} min): "
                     "raise it or use more shards (run.shards); a task stopped by its limit is requeued and resumes")
    lines += ["runtime rates:", *(f"  - {source}" for source in size.sources)]
    if size.assumed:
        lines += [("estimated in place of inputs that do not exist yet (upstream runs, data files; these figures "
                   "stay estimates until they exist):"),
                  *(f"  - {statement}" for statement in size.assumed)]
    return lines


def chain_report(sizes: list[PlanSize]) -> str:
    """Each step of a chain in brief (what it assumes that no earlier step stated, its estimate's
    notes), then a table of shards, runtime, GPU-hours and output summed over the steps; steps
    marked * rest on inputs that do not exist yet."""
    lines, stated = [], set()
    for step, size in enumerate(sizes, start=1):
        lines.append(f"step {step}: {size.plan.job} ({size.path}), run {size.plan.run_id}: "
                     f"{len(size.plan.units):,} units in {len(size.plan.shards)} shard(s); longest shard "
                     f"{hours(max(size.shard_seconds))}; {human_bytes(size.total.output_bytes)} output")
        lines += [f"  assumed: {statement}" for statement in size.assumed if statement not in stated]
        lines += [f"  note: {note}" for note in size.total.notes]
        stated |= set(size.assumed)
    rows = [(str(step), size.plan.job + ("*" if size.assumed else "") + ("!" if size.gpu_work_without_gpu else ""),
             str(len(size.plan.shards)), hours(size.seconds), f"{size.gpu_hours:.2f}", human_bytes(size.total.output_bytes))
            for step, size in enumerate(sizes, start=1)]
    rows.append(("total", "", str(sum(len(size.plan.shards) for size in sizes)), hours(sum(s.seconds for s in sizes)),
                 f"{sum(size.gpu_hours for size in sizes):.2f}", human_bytes(sum(s.total.output_bytes for s in sizes))))
    lines += ["", _table(["step", "job", "shards", "task time", "GPU-hours", "output"], rows)]
    if any(size.assumed for size in sizes):
        lines.append("* estimated: an input (an upstream run, a data file) does not exist yet; see 'assumed' above")
    if any(size.gpu_work_without_gpu for size in sizes):
        lines.append("! timed as on an H200, but its tasks ask for no GPU (cluster.gpus_per_task: 0): no GPU-hours "
                     "counted, and CPUs take far longer")
    sources = list(dict.fromkeys(source for size in sizes for source in size.sources))
    lines += ["(estimate: task time as on one H200; GPU-hours = task time x cluster.gpus_per_task; from these rates)",
              *(f"  - {source}" for source in sources)]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _table(header: list[str], rows: Sequence[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell; numbers (all but the first two columns) right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(cell.ljust(width) if index < 2 else cell.rjust(width)
                                for index, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
                      for row in [tuple(header), *rows])
