#!/bin/sh
# The one install step of every saebatch image (Dockerfile and apptainer.def both run it):
# the project and its dependencies into the image's Python, a check that it imports, and the
# record of the versions that `saebatch submit` compares with the submitting environment's
# (/opt/saebatch/versions.json: Python, cloudpickle, submitit; see common/containers.py).
#
#   sh containers/install.sh /opt/saebatch
#
# PyTorch normally comes with the base image (a CUDA build); where the base has none, TORCH_SPEC
# (default "torch") is installed first. PIP_CERT (a CA bundle) and PIP_FIND_LINKS (a wheel
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
if ! python3 -c "import torch" 2>/dev/null; then
  python3 -m pip install --no-cache-dir -c "$constraints" "${TORCH_SPEC:-torch}"
fi
python3 -m pip install --no-cache-dir -c "$constraints" "$src"
python3 -c "import torch, transformers, sae_lens, submitit, h5py; print('torch', torch.__version__)"
mkdir -p /opt/saebatch
python3 -c "import json; from common.containers import environment_versions as v; print(json.dumps(v()))" \
  > /opt/saebatch/versions.json
cat /opt/saebatch/versions.json
saebatch jobs
