"""Helpers shared by several test modules."""

import itertools
from pathlib import Path

import yaml
from sae_lens import SAE

from common.launcher import prepare_run, reduce_task, run_shard_task
from common.manifest_file import load_manifest
from common.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO / "manifests" / "demo" / "token_tracking.yaml"


def save_random_sae(folder: Path, d_in: int, d_sae: int = 32, hook: str = "blocks.{layer}.hook_resid_post",
                    layers=(0, 1)) -> str:
    """Random JumpReLU SAEs saved in sae-lens's format at folder/L<layer>; returns the path template."""
    for layer in layers:
        sae = SAE.from_dict({"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
                             "device": "cpu", "metadata": {"hook_name": hook.format(layer=layer)}})
        sae.save_model(folder / f"L{layer}")
    return str(folder / "L{layer}")


def write_manifest_file(folder: Path, overrides: dict | None = None, base: Path = DEMO_MANIFEST,
                        name: str = "manifest.yaml") -> Path:
    """`base` with `overrides` merged in (nested dicts merge, None removes a key), runs under folder/runs."""
    data = yaml.safe_load(base.read_text())
    data["run"]["root"] = str(folder / "runs")
    merge_overrides(data, overrides or {})
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def merge_overrides(base: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_overrides(base[key], value)
        else:
            base[key] = value


def run_all(manifest_path: Path) -> RunDir:
    """Every shard in-process, then the reduce; returns the run directory."""
    run = prepare_run(load_manifest(manifest_path))
    for shard in range(len(run.load_plan().shards)):
        run_shard_task(str(run.path), shard)
    reduce_task(str(run.path))
    return run


def failing_on_call(function, call: int):
    """`function`, but its call number `call` (from 0) raises RuntimeError("preempted"): a task
    stopped in the middle of its work."""
    calls = itertools.count()

    def wrapped(*args, **kwargs):
        if next(calls) == call:
            raise RuntimeError("preempted")
        return function(*args, **kwargs)

    return wrapped
