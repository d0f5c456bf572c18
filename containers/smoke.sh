#!/usr/bin/env bash
# Build containers/Dockerfile with podman and run the demo inside the built image (as root).
#
#   bash containers/smoke.sh            # what .ci/run does
#   bash containers/smoke.sh --record   # also write the build time and image size to benchmarks/RESULTS.md
#
# On a machine without a registry or a Docker engine: the base is a Debian made by debootstrap
# (with Python and pip) and imported into podman; the build runs with `--isolation chroot`; the
# image is run by exporting its file system and chrooting into it (`podman run` needs a container
# runtime these machines lack). Inside the build, pip gets the host's CA bundle and wheel folder
# (the CPU PyTorch wheel) through build arguments that a cluster build leaves empty.
# It then checks the demo's merged outputs inside the image, and that the versions the image
# recorded equal this environment's (what `saebatch submit` checks for cluster.image).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON:-$repo/.venv/bin/python}
work=${SMOKE_DIR:-/var/tmp/saebatch-smoke}
base=localhost/saebatch-base:bookworm
image=localhost/saebatch:smoke
started=$(date +%s)
say() { echo "[smoke] $*"; }

if ! command -v podman > /dev/null || ! command -v debootstrap > /dev/null; then
  say "installing podman and debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman debootstrap > /dev/null
fi
mkdir -p "$work"

if ! podman image exists "$base"; then
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  mirror=${mirror:-http://deb.debian.org/debian}
  say "debootstrap bookworm from $mirror"
  rm -rf "$work/base"
  debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm "$work/base" "$mirror" \
    > "$work/debootstrap.log"
  tar -C "$work/base" -c . | podman import - "$base" > /dev/null
  rm -rf "$work/base"
fi

torch_version=$("$python" -c "import torch; print(torch.__version__.split('+')[0])")
say "podman build (torch==$torch_version from the host's wheel folder)"
build_args=(--build-arg "BASE=$base" --build-arg "TORCH_SPEC=torch==$torch_version")
volumes=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  volumes+=(-v /etc/ssl/certs:/host-certs:ro)
  build_args+=(--build-arg PIP_CERT=/host-certs/ca-certificates.crt)
fi
if [ -d /opt/wheels ]; then
  volumes+=(-v /opt/wheels:/wheels:ro)
  build_args+=(--build-arg PIP_FIND_LINKS=/wheels)
fi
podman build --isolation chroot -f containers/Dockerfile --ignorefile containers/Dockerfile.dockerignore \
  "${build_args[@]}" "${volumes[@]}" -t "$image" . > "$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; exit 1; }
built=$(date +%s)
size=$(podman image inspect --format '{{.Size}}' "$image")

say "exporting the image's file system"
rootfs=$work/rootfs
rm -rf "$rootfs" && mkdir -p "$rootfs"
container=$(podman create "$image")
podman export "$container" | tar -C "$rootfs" -x
podman rm "$container" > /dev/null
mkdir -p "$rootfs/proc" "$rootfs/dev" "$rootfs/work"
cleanup() { umount "$rootfs/dev" "$rootfs/proc" 2> /dev/null || true; }
trap cleanup EXIT
mount -t proc proc "$rootfs/proc"
mount --bind /dev "$rootfs/dev"

say "saebatch demo inside the image"
chroot "$rootfs" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/work HF_HUB_OFFLINE=1 \
  HDF5_USE_FILE_LOCKING=FALSE /bin/sh -c "cd /work && saebatch demo --root /work/runs" | tee "$work/demo.log"
demo_done=$(date +%s)

say "checking the merged outputs inside the image"
chroot "$rootfs" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin python3 - <<'EOF'
import glob
from pathlib import Path

import h5py
import yaml

from common.manifest_file import load_manifest
from common.rundir import RunDir

manifests = sorted(Path(p) for p in glob.glob("/usr/local/lib/python3*/dist-packages/manifests/demo/*.yaml"))
assert manifests, "the image has no demo manifests"
for path in manifests:
    run = RunDir.for_manifest(load_manifest(path, run_root=Path("/work/runs")))
    with h5py.File(run.merged_path, "r") as merged:
        assert merged.attrs["job"] == yaml.safe_load(path.read_text())["job"], path
    assert (run.report_dir / "report.md").stat().st_size > 0, path
    print(f"ok  {path.name}: {run.merged_path}")
EOF
image_python=$("$python" -c "from common.containers import IMAGE_PYTHON; print(' '.join(IMAGE_PYTHON))")
say "the Python a Slurm task starts in the image ($image_python) imports the image's code"
mkdir -p "$rootfs/work/common" && echo 'raise ImportError("the working directory shadows the image")' \
  > "$rootfs/work/common/__init__.py"
chroot "$rootfs" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin /bin/sh -c \
  "cd /work && $image_python -c 'import common, submitit; print(common.__file__)'"
rm -r "$rootfs/work/common"
"$python" -c "import sys; from pathlib import Path; from common.containers import check_image; \
check_image(Path(sys.argv[1])); print('[smoke] the image recorded the versions of this environment')" "$rootfs"

seconds_build=$((built - started)); seconds_demo=$((demo_done - built))
say "image $image: $((size / 1000000)) MB; build ${seconds_build} s, demo inside it ${seconds_demo} s"
if [ "${1:-}" = "--record" ]; then
  "$python" - "$size" "$seconds_build" "$seconds_demo" <<'EOF'
import sys

sys.path.insert(0, "benchmarks")
from results import Row, record

size, build, demo = (int(value) for value in sys.argv[1:])
record([Row("container smoke test: podman build of containers/Dockerfile on a debootstrap Debian base, then "
            "saebatch demo inside the image (chroot)",
            ours=f"image {size / 1e6:,.0f} MB; build {build} s, demo {demo} s", baseline="-", ratio="-",
            command="bash containers/smoke.sh --record")])
EOF
fi
