"""Tasks that run inside a container image: the command that starts their Python, and the check
that the image can run what this environment submits.

submitit pickles each task with cloudpickle here and unpickles it in the image, so the image's
Python (major.minor), cloudpickle and submitit must equal the submitting environment's. The
image records its versions at build time (containers/install.sh writes VERSIONS_FILE); an image
is a .sif file (read with `apptainer exec`) or a sandbox folder (read directly).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from common.errors import UserError
from common.manifest import ClusterSettings

VERSIONS_FILE = "/opt/saebatch/versions.json"
CHECKED = ("python", "cloudpickle", "submitit")
IMAGE_PYTHON = ("python3", "-s", "-P")  # see python_command


def environment_versions() -> dict[str, str]:
    """The versions that must match, as containers/install.sh records them."""
    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "cloudpickle": metadata.version("cloudpickle"), "submitit": metadata.version("submitit")}


def image_versions(image: Path) -> dict[str, str]:
    """The versions the image recorded when it was built."""
    if image.is_dir():
        recorded = image / VERSIONS_FILE.lstrip("/")
        if not recorded.is_file():
            raise UserError(f"cluster.image: the sandbox {image} has no {VERSIONS_FILE}; it was not built by "
                            "containers/install.sh. Rebuild it from containers/ (README: Running on a cluster)")
        return json.loads(recorded.read_text())
    if not image.is_file():
        raise UserError(f"cluster.image: {image} does not exist; build it first (README: Running on a cluster)")
    if shutil.which("apptainer") is None:
        raise UserError(f"cluster.image: `apptainer` is not on PATH here, so the versions recorded in {image} "
                        "cannot be read; submit from a node with apptainer (module load apptainer)")
    done = subprocess.run(["apptainer", "exec", str(image), "cat", VERSIONS_FILE], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"cluster.image: cannot read {VERSIONS_FILE} in {image} ({done.stderr.strip()[-300:]}); "
                        "rebuild the image from containers/")
    return json.loads(done.stdout)


def check_image(image: Path) -> None:
    """Refuse an image whose Python, cloudpickle or submitit differ from this environment's."""
    theirs, ours = image_versions(image), environment_versions()
    different = [name for name in CHECKED if theirs.get(name) != ours[name]]
    if different:
        listed = "; ".join(f"{name} {theirs.get(name, 'unrecorded')} in the image, {ours[name]} here"
                           for name in different)
        pins = " ".join(f"{name}=={theirs[name]}" for name in different if name != "python" and name in theirs)
        fix = f"install the image's versions here (pip install {pins})" if pins and "python" not in different \
            else "submit from a Python environment of the image's Python version"
        raise UserError(f"cluster.image: {image} cannot run tasks submitted from here: {listed}. submitit "
                        f"unpickles each task inside the image, so these must be equal: rebuild the image from "
                        f"this checkout, or {fix}")


def python_command(cluster: ClusterSettings, run_root: Path) -> str | None:
    """The command that starts Python for a task on the node: the image's through apptainer (the
    run root and `bind` paths bound in), the manifest's `python`, or None for this Python.

    The image's `python3`, the name containers/install.sh installs with (a Debian base has no
    `python`); `-s -P` keep the user's ~/.local packages and the submitting directory (apptainer
    binds $HOME and the working directory) off its path, so tasks run the image's code."""
    if cluster.image is None:
        return cluster.python
    binds = ",".join(dict.fromkeys([str(run_root), *cluster.bind]))
    return shlex.join(["apptainer", "exec", "--nv", "--bind", binds, str(cluster.image), *IMAGE_PYTHON])
