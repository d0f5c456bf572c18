"""Which GPUs a task gets and sees.

A task is given GPUs by its scheduler: Slurm's `--gres` from `cluster.gpus_per_task`, or, with
`--executor local`, the CUDA_VISIBLE_DEVICES the launcher hands each task from this machine's
GPUs (`gpu_slots`: one slot of `gpus_per_task` GPUs per running task). A task that asked for GPUs
and sees none fails before it loads anything (`require_gpus`): an 8B model must never quietly
run on the CPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from common.errors import UserError
from common.lazy import lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

CPU_FIX = "or set cluster.gpus_per_task: 0 and model.device: cpu to run on the CPU"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them for child processes: its
    indices or UUIDs (GPU-..., MIG-...), so that a task handed an entry gets the same physical GPU
    as here; every GPU by index when it is unset."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range(count)]
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


def gpu_slots(gpus: list[str], gpus_per_task: int) -> list[list[str]]:
    """Disjoint groups of `gpus_per_task` GPUs, one per task that may run at once."""
    if gpus_per_task < 1:
        raise ValueError("gpu slots are for tasks that ask for at least one GPU")
    if len(gpus) < gpus_per_task:
        raise UserError(
            f"cluster.gpus_per_task is {gpus_per_task}, but --executor local sees {len(gpus)} GPU(s) on "
            f"this machine ({_what_torch_sees()}): run where the GPUs are, {CPU_FIX}"
        )
    return [gpus[start : start + gpus_per_task] for start in range(0, len(gpus) - gpus_per_task + 1, gpus_per_task)]


def require_gpus(gpus_per_task: int) -> None:
    """Fail at once when this task asked for GPUs and sees fewer (the scheduler hid them, the
    image lacks CUDA, or the node has none)."""
    seen = torch.cuda.device_count()
    if seen < gpus_per_task:
        raise UserError(
            f"this task asked for {gpus_per_task} GPU(s) (cluster.gpus_per_task) but sees {seen} "
            f"({_what_torch_sees()}); it stops before loading the model instead of running it on the "
            f"CPU. Run it on a GPU node (or an image with CUDA), {CPU_FIX}"
        )


def describe_devices() -> str:
    """What this process computes on, for logs and shard attributes."""
    if not torch.cuda.is_available():
        return "cpu"
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return f"{', '.join(names)} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"


def _what_torch_sees() -> str:
    build = f"torch {torch.__version__}, CUDA build {torch.version.cuda}" if torch.version.cuda else \
        f"torch {torch.__version__} is a CPU-only build"
    return f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, {build}"
