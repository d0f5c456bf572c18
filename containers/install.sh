#!/bin/sh
# The one install step of every saebatch image (Dockerfile and apptainer.def both run it):
# the project and its dependencies into the image's Python, a check that it imports, and the
# record of the versions that `saebatch submit` compares with the submitting environment's
# (/opt/saebatch/versions.json: Python, cloudpickle, submitit; see common/containers.py).
#
#   sh containers/install.sh /opt/saebatch
#
# PyTorch is installed first, at the version containers/constraints.txt pins: TORCH_SPEC (default
# "torch": PyPI's Linux build, which carries its CUDA libraries; the host needs only the driver).
# A base that brings its own PyTorch must bring that version: pip would otherwise replace it
# with several GB of another CUDA build, beside the base's torchvision built for the old one. PIP_CERT (a CA bundle) and PIP_FIND_LINKS (a wheel
# folder) are passed to pip when set; empty values are dropped. Both installs take the versions
# the tests passed with from containers/constraints.txt (as CI does).
set -eu
src=${1:-/opt/saebatch}
constraints=$src/containers/constraints.txt
for var in PIP_CERT PIP_FIND_LINKS; do
  if [ -z "$(eval echo "\${$var:-}")" ]; then unset "$var"; else export "$var"; fi
done
export PIP_BREAK_SYSTEM_PACKAGES=1  # a distribution's Python (Debian's) calls itself externally managed
python3 -m pip --version
pinned=$(sed -n 's/^torch==//p' "$constraints")
if based=$(python3 -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
  if [ "$based" != "$pinned" ]; then
    echo "install.sh: the base image has torch $based, but saebatch is tested with torch $pinned" \
      "(containers/constraints.txt); use a base without PyTorch (the default) or with torch $pinned" >&2
    exit 1
  fi
else
  python3 -m pip install --no-cache-dir -c "$constraints" "${TORCH_SPEC:-torch}"
fi
python3 -m pip install --no-cache-dir -c "$constraints" "$src"
python3 -c "import torch, transformers, sae_lens, submitit, h5py; print('torch', torch.__version__)"
mkdir -p /opt/saebatch
python3 -c "import json; from common.containers import environment_versions as v; print(json.dumps(v()))" \
  > /opt/saebatch/versions.json
cat /opt/saebatch/versions.json
saebatch jobs
