#!/bin/sh
# The one install step of every saebatch image (Dockerfile and apptainer.def both run it):
# the project and its dependencies into the image's Python, then a check that it imports.
#
#   sh containers/install.sh /opt/saebatch
#
# PyTorch normally comes with the base image (a CUDA build); where the base has none, TORCH_SPEC
# (default "torch") is installed first. PIP_CERT may point pip at a CA bundle for the build.
set -eu
src=${1:-/opt/saebatch}
python3 -m pip --version
if ! python3 -c "import torch" 2>/dev/null; then
  python3 -m pip install --no-cache-dir "${TORCH_SPEC:-torch}"
fi
python3 -m pip install --no-cache-dir "$src"
python3 -c "import torch, transformers, sae_lens, submitit, h5py; print('torch', torch.__version__)"
saebatch jobs
