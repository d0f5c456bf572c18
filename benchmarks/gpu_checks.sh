#!/usr/bin/env bash
# Every check that needs a CUDA GPU, each step under its own time limit, so that a step that fails
# or runs long leaves the others' results:
#   tests     pytest -m gpu, all but the chain tests: jobs' shards on CUDA against the CPU, submit --executor local
#   chains    pytest -m gpu, the tests that first run a demo chain (on the GPU) for their inputs: patching, training, ...
#   trainer   benchmarks/sae_trainer_gpu.py: SAE training in bf16 against float32
#   paper     benchmarks/gpu_paper_scale.py: each job at the seeds' shapes (paper:<job,job> for some)
#   contexts  benchmarks/feature_contexts_throughput.py on the GPU
#   demo      saebatch demo through the local executor, each task on a GPU
#
#   bash benchmarks/gpu_checks.sh [OUT] [STEP ...]      (default: gpu-checks/, every step)
#
# OUT gets each step's log, the tests' JUnit XML, a copy of benchmarks/RESULTS.md (the benchmarks'
# rows) and summary.txt (each step's exit status): few files; the demo's runs go to a temporary
# folder, removed at the end (its log has the table of them). PYTHON runs the steps (default: the
# README's .venv, else python3). It first checks that the packages import (transformers >= 5.24),
# then runs the steps in the order given, each stopped at its limit (9 minutes for chains, paper
# and demo, 5 for tests, 4 for the others, every one below a 10-minute command limit): name the
# steps that fit the time at hand.
set -uo pipefail
out=$(realpath -m "${1:-gpu-checks}")
shift $(( $# > 0 ? 1 : 0 ))
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests chains trainer paper contexts demo)
cd "$(dirname "$0")/.."
case $(basename "$out") in
  tests | chains | trainer | paper | paper:* | contexts | demo) echo "the first argument is OUT, the folder for the results; steps follow it" >&2; exit 2 ;;
esac
for step in "${steps[@]}"; do
  case $step in
    tests | chains | trainer | paper | paper:?* | contexts | demo) ;;
    *) echo "unknown step '$step': choose from tests, chains, trainer, paper, paper:<jobs>, contexts, demo" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # nothing is downloaded: a hub lookup would only stall

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA GPU is visible to $python (torch sees none): these checks need one" >&2
  exit 2
fi
# Seconds, not minutes, to find an install that cannot run the jobs (an image's older transformers
# ignores `cache=`: every generation would fail, step after step).
if ! "$python" - <<'PY'
import sys
from importlib.metadata import version
from packaging.version import Version
import sae_lens, submitit, transformers  # noqa: F401
import common.cli  # noqa: F401
found = {name: version(name) for name in ("torch", "transformers", "sae-lens", "submitit")}
print("packages:", ", ".join(f"{name} {v}" for name, v in found.items()))
if Version(found["transformers"]) < Version("5.24"):
    sys.exit(f"transformers {found['transformers']} is too old: saebatch needs >= 5.24 "
             "(pip install -c containers/constraints.txt -e .)")
PY
then
  echo "the packages above cannot run the checks: install the project's (README set-up) first" >&2
  exit 2
fi

run_step() {  # run_step NAME SECONDS COMMAND...: the command's output to OUT/NAME.log, its status to the summary
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s): $*"
  local started=$SECONDS
  timeout --kill-after=30 "$limit" "$@" > "$out/$name.log" 2>&1
  local status=$?
  local note=""
  [ "$status" -eq 124 ] || [ "$status" -eq 137 ] && note=" (stopped at its ${limit} s limit)"
  echo "$name: exit $status$note, $((SECONDS - started)) s" | tee -a "$out/summary.txt"
  tail -n 5 "$out/$name.log"
  cp benchmarks/RESULTS.md "$out/RESULTS.md"
}

: > "$out/summary.txt"
chains="population_patching or sae_training or feature_ablation or feature_alignment or circuit_discovery"
# A line per test as it ends (-v): a run stopped at its limit still says which passed.
pytest_gpu=("$python" -m pytest -m gpu -v -rs -p no:cacheprovider -o faulthandler_timeout=240)
demo_root=$(mktemp -d)  # the demo's runs: hundreds of files (its log has the table of them)
trap 'rm -rf "$demo_root"' EXIT
for step in "${steps[@]}"; do
  case $step in
    tests) run_step tests 300 "${pytest_gpu[@]}" --junitxml="$out/gpu-tests.xml" -k "not ($chains)" ;;
    chains) run_step chains 540 "${pytest_gpu[@]}" --junitxml="$out/gpu-chains.xml" -k "$chains" ;;
    trainer) run_step trainer 240 "$python" benchmarks/sae_trainer_gpu.py ;;
    paper) run_step paper 540 "$python" benchmarks/gpu_paper_scale.py --budget-s 360 ;;
    paper:*) run_step paper 540 "$python" benchmarks/gpu_paper_scale.py --budget-s 360 --only "${step#paper:}" ;;
    contexts) run_step contexts 240 "$python" benchmarks/feature_contexts_throughput.py --device cuda --tokens 262144 ;;
    demo) run_step demo 540 "$python" -m common.cli demo --root "$demo_root" ;;
  esac
done
echo "logs, JUnit XML, RESULTS.md and summary.txt in $out"
! grep -qv ": exit 0," "$out/summary.txt"
