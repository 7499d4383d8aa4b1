#!/usr/bin/env bash
# Two gpu_session.sh lanes at once on a two-GPU machine (nvidia-h200-x2): one per GPU, each with its
# own $OUT subfolder (g0, g1) and half of the cores. Usage, from the repo root:
#   bash benchmarks/gpu_lanes.sh 'MODEL_NAME=wan2.2-a14b COMPILE_VARIANTS="bf16+graph fp8+graph" model' \
#                                'TEST_PATHS=tests TESTS_T=560 tests'
# Each argument: environment assignments for gpu_session.sh (shell-quoted), then its stages.
# Only for GPU-bound work (CUDA-graph rows, long sequences, tests beside tests): host-bound rows
# (eager, default-mode compile) slowed down beside a compiling lane even with the lanes pinned to
# separate cores (run 8d, benchmarks/NOTES.md); time those with the other GPU idle.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 || echo "wheel install failed"
export SKIP_WHEELS=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-8}
half=$(( $(nproc) / 2 ))

run_lane() {  # lane index, spec
  local lane=$1
  eval "set -- $2"
  while [[ ${1:-} == *=* ]]; do export "${1?}"; shift; done
  CUDA_VISIBLE_DEVICES=$lane OUT="$OUT/g$lane" taskset -c "$(( lane * half ))-$(( lane * half + half - 1 ))" \
    bash benchmarks/gpu_session.sh "$@"
}

lane=0
for spec in "$@"; do
  # Eager rows are host-bound: say so in the log when a lane times them beside another lane.
  if [ $# -gt 1 ] && [[ " $spec " =~ \ (model|eager)\  ]] && [[ "$spec" != *'EAGER_VARIANTS=" "'* ]]; then
    echo "WARNING: lane $lane times eager (host-bound) variants beside another lane; its eager rows are not" \
         "comparable with single-lane runs (benchmarks/NOTES.md run 8d)" | tee -a "$OUT/lanes_warning.txt"
  fi
  (run_lane $lane "$spec") > "$OUT/g$lane.log" 2>&1 &
  lane=$(( lane + 1 ))
done
wait
for f in "$OUT"/g*.log; do echo "== $f"; cat "$f"; done
