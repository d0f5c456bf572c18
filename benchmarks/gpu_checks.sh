#!/usr/bin/env bash
# Every check that needs a CUDA GPU, each step under its own time limit, so that a step that fails
# or runs long leaves the others' results:
#   tests     pytest -m gpu: every job's shard on CUDA against the CPU, and submit --executor local
#   trainer   benchmarks/sae_trainer_gpu.py: SAE training in bf16 against float32
#   paper     benchmarks/gpu_paper_scale.py: each job at the seeds' shapes (paper:<job,job> for some)
#   contexts  benchmarks/feature_contexts_throughput.py on the GPU
#   demo      saebatch demo through the local executor, each task on a GPU
#
#   bash benchmarks/gpu_checks.sh [OUT] [STEP ...]      (default: gpu-checks/, every step)
#
# OUT gets each step's log, the tests' JUnit XML, a copy of benchmarks/RESULTS.md (the benchmarks'
# rows), the demo's runs and summary.txt (each step's exit status). PYTHON runs the steps
# (default: the README's .venv, else python3). Steps run in the order given, each stopped at its
# limit (tests 7 minutes, paper 10, demo 15, the others 4): name the steps that fit the time at hand.
set -uo pipefail
out=$(realpath -m "${1:-gpu-checks}")
shift $(( $# > 0 ? 1 : 0 ))
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests trainer paper contexts demo)
cd "$(dirname "$0")/.."
case $(basename "$out") in
  tests | trainer | paper | paper:* | contexts | demo) echo "the first argument is OUT, the folder for the results; steps follow it" >&2; exit 2 ;;
esac
for step in "${steps[@]}"; do
  case $step in
    tests | trainer | paper | paper:?* | contexts | demo) ;;
    *) echo "unknown step '$step': choose from tests, trainer, paper, paper:<jobs>, contexts, demo" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA GPU is visible to $python (torch sees none): these checks need one" >&2
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
for step in "${steps[@]}"; do
  case $step in
    tests) run_step tests 420 "$python" -m pytest -m gpu -q -p no:cacheprovider -rs --junitxml="$out/gpu-tests.xml" ;;
    trainer) run_step trainer 240 "$python" benchmarks/sae_trainer_gpu.py ;;
    paper) run_step paper 600 "$python" benchmarks/gpu_paper_scale.py --budget-s 480 ;;
    paper:*) run_step paper 600 "$python" benchmarks/gpu_paper_scale.py --budget-s 480 --only "${step#paper:}" ;;
    contexts) run_step contexts 240 "$python" benchmarks/feature_contexts_throughput.py --device cuda --tokens 262144 ;;
    demo) run_step demo 900 "$python" -m common.cli demo --root "$out/demo-runs" ;;
  esac
done
echo "logs, gpu-tests.xml, RESULTS.md and summary.txt in $out"
! grep -qv ": exit 0," "$out/summary.txt"
