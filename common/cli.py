"""The `saebatch` command line: plan, submit, run, status, reduce, demo.

    saebatch demo                                     # every demo manifest, locally (minutes on a laptop)
    saebatch plan manifests/token_tracking_llama31_8b.yaml
    saebatch submit manifests/demo/token_tracking.yaml [--executor local] [--wait]
    saebatch status runs/token_tracking-<id>
    saebatch submit --resume runs/token_tracking-<id>
    saebatch run manifests/demo/token_tracking.yaml --shard 0
    saebatch reduce runs/token_tracking-<id>
    saebatch organism train [--builtin organism_b]    # rebuild a built-in model organism (~10 min, CPU)
    saebatch organism measure [--builtin organism_b]  # re-measure its stated figures
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import UserError
from common.logs import setup_logging
from common.organism.files import BUILTINS as BUILTIN_ORGANISMS
from common.organism.files import DEFAULT as DEFAULT_ORGANISM

if TYPE_CHECKING:
    from common.launcher import Executor  # imported where a run is submitted: it loads submitit

EPILOG = """\
A run lives in runs/<job>-<hash of the manifest>/ (manifest.yaml, plan.json, shards/, logs/,
merged.h5, report/). Submitting the same manifest again resumes its run; a different manifest
never writes into it. Layer L always means the output of transformer block L (0-based).
"""


def _sbatch_options(partition: str | None, gpus: int, cpus: int, mem_gb: float, minutes: int) -> str:
    """The manifest's resources as sbatch options (for the templates in slurm/)."""
    options = [f"--partition={partition}"] if partition else []
    options += [f"--gres=gpu:{gpus}"] if gpus else []
    options += [f"--cpus-per-task={cpus}", f"--mem={int(mem_gb * 1024)}M", f"--time={minutes}"]
    return " ".join(options)


def cmd_jobs(_: argparse.Namespace) -> int:
    from common.registry import available_jobs, get_job

    for name in available_jobs():
        doc = (get_job(name).__doc__ or "").strip().splitlines()
        print(f"{name:24s} {doc[0] if doc else ''}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from common.rundir import RunDir
    from common.sizing import (
        chain_report,
        hours,
        human_bytes,
        runtime_lines,
        size_manifest,
    )

    if args.max_units < 0:
        raise UserError(f"--max-units {args.max_units}: give how many unit ids (and shards) to list, 0 or more")
    if args.chain:
        print(chain_report([size_manifest(path) for path in args.manifests]))
        return 0
    if len(args.manifests) > 1:
        raise UserError(f"plan takes one manifest, not {len(args.manifests)}; to size several steps together, give "
                        f"--chain {' '.join(args.manifests)}")
    path = args.manifests[0]
    size = size_manifest(path)
    manifest, plan = size.manifest, size.plan
    run = RunDir.for_manifest(manifest)
    print(f"job {plan.job}, run {plan.run_id}: {len(plan.units)} work units in {len(plan.shards)} shard(s)"
          + (" (estimate: an input does not exist yet, see below)" if size.assumed else ""))
    print(f"run directory: {run.path} ({'exists' if run.exists() else 'not created yet'})")
    print("\nunits:")
    for unit in plan.units[: args.max_units]:
        print(f"  {unit.id}")
    if len(plan.units) > args.max_units:
        print(f"  ... and {len(plan.units) - args.max_units} more (--max-units to list them)")
    print("\nshards, with the estimated runtime of each:")
    for index, ids in enumerate(plan.shards[: args.max_units]):
        print(f"  shard {index}: {len(ids)} units ({ids[0]} .. {ids[-1]}), about {hours(size.shard_seconds[index])}")
    if len(plan.shards) > args.max_units:
        print(f"  ... and {len(plan.shards) - args.max_units} more")
    print(f"\nestimated output: {human_bytes(size.total.output_bytes)} in all; "
          f"peak memory per task: {human_bytes(size.peak_memory)}")
    cluster = manifest.cluster
    print(f"requested per task: {cluster.gpus_per_task} GPU, {cluster.cpus_per_task} CPUs, "
          f"{cluster.mem_gb:g} GB, {cluster.timeout_min} min")
    for note in size.total.notes:
        print(f"  note: {note}")
    print("\n".join(runtime_lines(size)))
    print(f"\nsubmit:  saebatch submit {path}")
    shard_opts = _sbatch_options(cluster.partition, cluster.gpus_per_task, cluster.cpus_per_task,
                                 cluster.mem_gb, cluster.timeout_min)
    reduce_opts = _sbatch_options(cluster.partition, 0, cluster.reduce_cpus, cluster.reduce_mem_gb,
                                  cluster.reduce_timeout_min)
    if cluster.image is not None:  # the templates run saebatch in the image, as submit does
        binds = ",".join(dict.fromkeys([str(run.path.parent), *cluster.bind]))
        print(f"with sbatch, in the image: export IMAGE={cluster.image} BIND={binds}")
    print(f"or with sbatch: ARRAY=$(sbatch --parsable {shard_opts} --array=0-{len(plan.shards) - 1} "
          f"slurm/array.sbatch {path})")
    print(f"                sbatch {reduce_opts} --dependency=afterok:$ARRAY --kill-on-invalid-dep=yes "
          f"slurm/reduce.sbatch {path}")
    return 0


def _submit_run(run, executor: Executor, wait_for_it: bool) -> int:
    """Submit what a run still lacks; one submission of a run at a time: a second one, started
    while the first is submitting (or, locally, running), leaves the run to it."""
    from common.locks import Held, exclusive

    try:
        with exclusive(run.submit_lock, "another submission of this run", wait=False):
            return _submit_unlocked(run, executor, wait_for_it)
    except Held:
        print(f"another saebatch is submitting or running this run right now; it runs the shards and the merge. "
              f"Watch with: saebatch status {run.path}")
        return 0


def _submit_unlocked(run, executor: Executor, wait_for_it: bool) -> int:
    from common.launcher import submit, wait
    from common.status import ACTIVE, RESUBMIT, active_reduce, reduce_status, shard_states

    states = shard_states(run)
    to_submit = [s.index for s in states if s.state in RESUBMIT]
    active = [s for s in states if s.state in ACTIVE]
    if active and executor == "local":
        raise UserError(f"shards {[s.index for s in active]} are still {active[0].state} under "
                        f"another submission; wait for them (saebatch status {run.path})")
    pending_reduce = active_reduce(run)
    if not to_submit and pending_reduce:
        print(f"nothing to submit: {len(active)} shard(s) still active and reduce job {pending_reduce} "
              f"will merge them (saebatch status {run.path})")
        return 0
    if not to_submit and not active and reduce_status(run, states)[0] == "done":
        print(f"every shard is done and merged: {run.merged_path}\n"
              f"(`saebatch reduce {run.path}` redoes the merge)")
        return 0
    after = _slurm_jobs_of(run, active)  # before anything is queued
    done = sum(s.state == "done" for s in states)
    print(f"run {run.path}: {done} shard(s) done, {len(active)} active, submitting {len(to_submit)}")
    submission = submit(run, executor, to_submit, after=after)
    if executor == "slurm":
        assert submission.reduce_job is not None  # submit queues it on Slurm
        ids = sorted({job.job_id.split("_")[0] for job in submission.shard_jobs.values()})
        print(f"array job(s): {', '.join(ids) or '-'}; reduce job: {submission.reduce_job.job_id}")
        print(f"watch with:  saebatch status {run.path}")
    if executor == "local" or wait_for_it:
        if not wait(run, submission):
            return 1
        print(f"merged: {run.merged_path}\nreport: {run.report_dir / 'report.md'}")
    return 0


def _slurm_jobs_of(run, active: list) -> list[str]:
    """The Slurm jobs writing the active shards, for the reduce to wait for (afterok). A shard
    written outside any recorded Slurm job (`saebatch run --shard K`, slurm/array.sbatch, a local
    task) gives the reduce nothing to wait for: refused, before anything is queued."""
    from common.status import submissions_by_job

    executors = {job: entry["executor"] for job, entry in submissions_by_job(run).items()}
    for s in active:
        if s.job_id is None or executors.get(s.job_id) != "slurm" or s.writer is not None:
            raise UserError(f"shard {s.index} is {s.state}, written by {s.writer or f'local task {s.job_id}'}, "
                            f"which is no Slurm job of this run, so "
                            f"the reduce cannot wait for it: wait for it to finish, or stop it (saebatch cancel "
                            f"{run.path}), then submit again")
    return [s.job_id for s in active if s.job_id is not None]


def _run_for(target: str, resume: bool = False):
    """The run directory given, or the run of a manifest (created when needed)."""
    from common.launcher import prepare_run
    from common.manifest_file import load_manifest
    from common.rundir import open_run

    if resume or Path(target).is_dir():
        return open_run(target)
    return prepare_run(load_manifest(target))


def cmd_submit(args: argparse.Namespace) -> int:
    return _submit_run(_run_for(args.target, resume=args.resume), args.executor, args.wait)


def cmd_run(args: argparse.Namespace) -> int:
    from common.launcher import run_shard_task

    run = _run_for(args.target)
    print(run_shard_task(str(run.path), args.shard))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from common.rundir import open_run
    from common.shards import kept_aside
    from common.status import needs_attention, reduce_state, shard_states

    run = open_run(args.target)
    states = shard_states(run)
    reduce = reduce_state(run, states)
    attention = needs_attention(states, reduce)
    aside = [str(path) for path in kept_aside(run.shards_dir)]
    if args.json:
        print(json.dumps({"run": str(run.path), "shards": [vars(s) for s in states], "reduce": reduce,
                          "needs_attention": attention, "kept_aside": aside}, indent=1))
        return int(attention)
    print(f"run {run.path}")
    for s in states:
        print(f"  shard {s.index:>4}  {s.state:8s} {('job ' + s.job_id) if s.job_id else '':14s} {s.detail}")
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    print("shards: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    print(f"reduce: {reduce}")
    if aside:
        print(f"kept aside, unusable (a task wrote its shard again; look, then delete): {', '.join(aside)}")
    if any(s.state in ("failed", "missing", "partial", "corrupt") for s in states):
        print(f"resubmit what is missing or failed with: saebatch submit --resume {run.path}")
    elif reduce.startswith("out of date"):
        print(f"merge again with: saebatch reduce {run.path}")
    return int(attention)


def cmd_reduce(args: argparse.Namespace) -> int:
    from common.launcher import reduce_task
    from common.rundir import open_run

    run = open_run(args.target)
    reduce_task(str(run.path))
    print(f"merged: {run.merged_path}\nreport: {run.report_dir / 'report.md'}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from common.logview import summary_report, task_report
    from common.rundir import open_run

    if args.tail is not None and args.tail < 0:
        raise UserError(f"--tail {args.tail}: give a number of lines, 0 or more")
    run = open_run(args.target)
    if args.shard is not None or args.reduce:
        print(task_report(run, None if args.reduce else args.shard, args.tail))
    else:
        print(summary_report(run, args.tail))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from common.cancel import cancel_run
    from common.rundir import open_run

    run = open_run(args.target)
    stopped = cancel_run(run)
    if not stopped:
        print(f"nothing to cancel: no shard or reduce of {run.path} is pending or running")
        return 0
    print(f"cancelled in {run.path}:")
    for item in stopped:
        print(f"  {item.task:10s} {('job ' + item.job_id) if item.job_id else '':14s} {item.how}")
    print(f"`saebatch status {run.path}` shows them failed (cancelled); "
          f"`saebatch submit --resume {run.path}` runs them again, continuing their partial shards")
    return 0 if all(item.ok for item in stopped) else 1


def cmd_runs(args: argparse.Namespace) -> int:
    from common.runs import age, as_json, list_runs

    lines = list_runs(Path(args.root))
    if args.json:
        print(as_json(lines))
        return 0
    if not lines:
        print(f"no runs under {args.root} (a run is a folder with manifest.yaml and plan.json)")
        return 0
    now = time.time()
    print(_table(["run", "job", "state", "shards", "age"],
                 [(line.run, line.job, line.state, f"{line.shards_done}/{line.shards}", age(now - line.updated))
                  for line in lines]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from common.gpus import describe_devices, visible_gpus
    from common.launcher import prepare_run
    from common.manifest_file import load_manifest

    # manifests/ lies beside common/, in the source tree and in site-packages alike
    demo_dir = Path(__file__).resolve().parent.parent / "manifests" / "demo"
    paths = sorted(demo_dir.glob("*.yaml"))  # name order: a chain's steps are numbered (gambling_1_games, ...)
    paths = [path for path in paths if not args.only or any(part in path.name for part in args.only)]
    if not paths:
        raise UserError(f"no demo manifest in {demo_dir} matches --only {args.only}" if args.only else
                        f"no demo manifests in {demo_dir}: reinstall saebatch (pip install -e .)")
    on_gpu = not args.cpu and bool(visible_gpus())
    print(f"demo on {describe_devices()}: each task gets one GPU" if on_gpu else
          "demo on the CPU" + (" (--cpu)" if args.cpu else " (no GPU is visible)"))
    rows = []
    failed: list[str] = []
    for path in paths:  # each manifest whose inputs exist runs, whatever happened to the others
        began = time.monotonic()
        print(f"== demo: {path.name}")
        try:
            manifest = load_manifest(path, run_root=Path(args.root).absolute())
            manifest.cluster.gpus_per_task = 1 if on_gpu else 0  # cluster settings are not part of the run id
            run = prepare_run(manifest)
        except UserError as error:  # most often: an earlier step's run is missing
            state = "skipped: inputs missing" if failed else "failed"
            print(f"error: {error}", file=sys.stderr)
            rows.append((path.name, state, time.monotonic() - began, str(error).splitlines()[0]))
            failed.append(path.name)
            continue
        code = _submit_run(run, "local", True)
        rows.append((path.name, "done" if code == 0 else "failed", time.monotonic() - began,
                     str(run.report_dir / "report.md") if code == 0 else f"saebatch status {run.path}"))
        if code:
            failed.append(path.name)
    print("\n" + _table(["manifest", "status", "time", "output"],
                         [(name, state, f"{seconds:.0f} s", output) for name, state, seconds, output in rows]))
    return 1 if failed else 0


def _table(header: list[str], rows: list[tuple]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def cmd_organism_train(args: argparse.Namespace) -> int:
    from common.organism.files import BUILTINS
    from jobs._organism.figures import print_figures
    from jobs._organism.training import BUILTIN_SEEDS, TrainingSettings, train

    out = Path(args.out).absolute() if args.out else BUILTINS[args.builtin]
    seed = BUILTIN_SEEDS[args.builtin] if args.seed is None else args.seed
    record = train(out, TrainingSettings(seed=seed, steps=args.steps), args.builtin)
    print(f"organism written to {out} in {record['training_seconds']['total']:.0f} s")
    print_figures(record["planted"]["feature"], record["measured"])
    return 0


def cmd_organism_measure(args: argparse.Namespace) -> int:
    from common.organism.files import BUILTINS, Organism
    from jobs._organism.evaluation import measure
    from jobs._organism.figures import print_figures

    organism = Organism(Path(args.dir).absolute() if args.dir else BUILTINS[args.builtin])
    print(f"organism in {organism.folder}; recorded when trained:")
    print_figures(organism.record["planted"]["feature"], organism.record["measured"])
    print("\nmeasured now:")
    print_figures(organism.record["planted"]["feature"], measure(organism))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saebatch", description="GPU batch jobs for SAE interpretability experiments on Slurm.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("jobs", help="list the available jobs")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("plan", help="validate a manifest; print work units, shards and estimates (runs nothing)",
                       description="Validate a manifest and print its work units, shards, output size, memory "
                       "and runtime on one H200 per task. A step whose upstream run does not exist yet is "
                       "planned from the upstream manifest, and the figures that rest on it are marked as "
                       "estimates. --chain M1 M2 ... sums the steps of a chain.")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST", help="YAML manifest (several with --chain)")
    p.add_argument("--chain", action="store_true", help="size every manifest given, in order, and sum them: "
                   "shards, runtime, GPU-hours, output")
    p.add_argument("--max-units", type=int, default=20, help="how many unit ids, and shards, to list (default 20)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("submit", help="submit the shards as an array and the reduce after them",
                       description="Submit a manifest's shards as a Slurm array (through submitit) and "
                       "the reduce as a job that runs after all of them succeed (afterok). Shards already "
                       "done are skipped, so submitting again, or --resume, resubmits only what is "
                       "missing or failed.")
    p.add_argument("target", help="manifest (or, with --resume, a run directory)")
    p.add_argument("--resume", action="store_true", help="target is a run directory: resubmit missing/failed shards")
    p.add_argument("--executor", choices=["slurm", "local"], default="slurm",
                   help="slurm (default): sbatch through submitit; local: subprocesses on this machine, then wait")
    p.add_argument("--wait", action="store_true", help="with slurm: wait for the shards and the reduce")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("run", help="run one shard in this process (what an sbatch array line calls)")
    p.add_argument("target", help="manifest or run directory")
    p.add_argument("--shard", type=int, required=True, help="shard index (0-based), e.g. $SLURM_ARRAY_TASK_ID")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="which shards are done, running, failed or missing; exits 1 when one is "
                       "missing, failed, partial or corrupt, or merged.h5 is out of date")
    p.add_argument("target", help="run directory or manifest")
    p.add_argument("--json", action="store_true", help="one JSON object (shards, reduce, needs_attention) for scripts")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("reduce", help="(re)run the merge: merged.h5 and report/")
    p.add_argument("target", help="run directory or manifest")
    p.set_defaults(func=cmd_reduce)

    p = sub.add_parser("logs", help="a task's stdout, stderr and exception; without --shard, every task's last lines",
                       description="Without --shard: each shard's state, job and log, the exception it raised and "
                       "the last lines of its stderr (as a terminal shows them: a tqdm bar's latest state), then "
                       "the reduce's. With --shard K (or --reduce): that task's exception in full and the last "
                       "lines of its stdout and stderr (40; --tail N for more), from logs/submitit/.")
    p.add_argument("target", help="run directory or manifest")
    task = p.add_mutually_exclusive_group()
    task.add_argument("--shard", type=int, metavar="K", help="one shard's exception and last 40 log lines")
    task.add_argument("--reduce", action="store_true", help="the reduce's exception and last 40 log lines")
    p.add_argument("--tail", type=int, metavar="N", help="lines of each log (default 3 per task in the summary, "
                   "40 with --shard)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a run's pending and running shards and its reduce",
                       description="scancel the array tasks and the reduce the run recorded (logs/jobs.json); "
                       "for a local run, stop the task processes of submitit's local executor. The shards "
                       "then show as failed (cancelled) in `saebatch status`, and `saebatch submit --resume` "
                       "runs them again, continuing their partial files. A run with nothing active: says so, exit 0.")
    p.add_argument("target", help="run directory or manifest")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("runs", help="the runs under a folder: job, state, shards done, age (newest first)",
                       description="One line per run directory under ROOT: its job, its state (merged; running: "
                       "a task pending or running; failed; done: every shard done, not merged; incomplete: "
                       "shards missing or partial, nothing running), shards done/total and the time since "
                       "it last changed, the most recent first.")
    p.add_argument("root", nargs="?", default="runs", help="folder holding run directories (default ./runs)")
    p.add_argument("--json", action="store_true", help="a JSON list for scripts")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("demo", help="run every demo manifest locally on the built-in tiny model",
                       description="Run every manifest of manifests/demo/ through the local executor on the "
                       "built-in model organism. Where this machine has a GPU, every task gets one and the "
                       "model runs on it (model.device: auto); else everything runs on the CPU. A manifest that "
                       "fails does not stop the others (those that read its run are skipped); a table of "
                       "manifest, status, time and output ends the demo.")
    p.add_argument("--root", default="runs", help="folder for the demo's run directories (default ./runs)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is visible")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only the manifests whose file name contains one of "
                   "these, e.g. --only reasoning token_tracking")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("organism", help="the built-in model organism: rebuild it or re-measure it")
    organism = p.add_subparsers(dest="organism_command", required=True, metavar="ACTION")
    q = organism.add_parser("train", help="train the organism (language model, SAEs) and measure it; CPU, ~10 min",
                            description="Train the model organism from its synthetic corpus (deterministic for "
                            "a seed on a given machine) and write model/, sae/ and organism.json. Without "
                            "--out it replaces the files shipped in the package.")
    q.add_argument("--builtin", choices=list(BUILTIN_ORGANISMS), default=DEFAULT_ORGANISM,
                   help="which built-in organism to rebuild: the same rules and planted cause, each its own "
                   "seed and shipped folder (default organism)")
    q.add_argument("--out", help="folder to write (default: the built-in organism's folder in the package, "
                   "common/organism/files or files_b)")
    q.add_argument("--seed", type=int, help="seed of the weights, the training data, the planted direction and the "
                   "SAEs (default: the built-in organism's, 0 for organism, 1 for organism_b)")
    q.add_argument("--steps", type=int, default=900, help="language-model training steps (default 900)")
    q.set_defaults(func=cmd_organism_train)
    q = organism.add_parser("measure", help="measure the organism's stated figures again (about a minute)")
    q.add_argument("--builtin", choices=list(BUILTIN_ORGANISMS), default=DEFAULT_ORGANISM,
                   help="which built-in organism to measure (default organism)")
    q.add_argument("--dir", help="organism folder (default: the built-in organism's shipped one)")
    q.set_defaults(func=cmd_organism_measure)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that has gone shows here, not as a traceback at exit
        return code
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `saebatch plan M | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
