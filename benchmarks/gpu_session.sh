#!/usr/bin/env bash
# One device call: GPU tests, linear benchmark, transformer benchmark. Usage (from the repo root,
# with the wheels of /work/shared/gpu-wheels.sh in .whl/):  bash benchmarks/gpu_session.sh STAGES...
# STAGES: tests actq attn gemm linear eager fused model code compile (env vars tune each; see the case below); outputs go to $OUT.
# Stamp the commit first (git rev-parse --short HEAD > .device_commit) and carry it with .whl: the
# device's git metadata can lag behind the copied tree.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
# Two sessions at once (one per GPU of a two-GPU machine): benchmarks/gpu_lanes.sh installs once, sets SKIP_WHEELS=1.
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
# SM clock, power and temperature twice a second through the whole call: the same kernels ran up to
# ~8% apart between runs (6b vs 8b), so each run keeps what the GPU was doing.
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader -lms 500 > "$OUT/smi.csv" 2>/dev/null & smi=$!
for stage in "$@"; do
  start=$(date +%s)
  case $stage in
    # SIGINT at the limit: pytest stops like on Ctrl-C and still prints its summary and the failures.
    tests) timeout -s INT -k 30 ${TESTS_T:-240} python3 -m pytest ${TEST_PATHS:-tests/quantization/test_triton_kernels.py} \
             -m gpu -q -rfE -p no:cacheprovider --maxfail=30 -k "${TESTK:-not nothing}" > "$OUT/pytest.txt" 2>&1
           rc=$?; echo "pytest exit $rc$([ $rc = 124 ] && echo ' (cut by the stage timeout)')"
           grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | cut -c1-200 | head -8; tail -2 "$OUT/pytest.txt";;
    actq) timeout ${ACTQ_T:-150} python3 benchmarks/bench_act_quant.py --out "$OUT" > "$OUT/actq.log" 2>&1
          grep -E "wrote|Error" "$OUT/actq.log" | tail -3;;
    attn) timeout ${ATTN_T:-150} python3 benchmarks/bench_attention.py --out "$OUT" > "$OUT/attn.log" 2>&1
          grep -E "wrote|Error" "$OUT/attn.log" | tail -3;;
    gemm) timeout ${GEMM_T:-150} python3 benchmarks/bench_gemm_kernels.py --out "$OUT" > "$OUT/gemm.log" 2>&1
          tail -16 "$OUT/gemm.log";;
    linear) timeout ${LINEAR_T:-150} python3 benchmarks/bench_linear.py --out "$OUT" ${LINEAR_ARGS:-} > "$OUT/linear.log" 2>&1
            tail -3 "$OUT/linear.log";;
    eager) timeout ${EAGER_T:-200} python3 benchmarks/bench_transformer.py --tag eager --out "$OUT" \
             --variants ${EAGER_VARIANTS:-bf16 fp8 int8 ao-fp8 ao-int8} --profile ${PROFILE:-fp8} \
             > "$OUT/eager.log" 2>&1; grep -E "^\{|Error|error" "$OUT/eager.log" | cut -c1-400 | tail -12;;
    fused) timeout ${FUSED_T:-100} python3 benchmarks/bench_transformer.py --tag eager_fusedqkv --fuse-qkv --out "$OUT" \
             --variants ${FUSED_VARIANTS:-bf16 fp8 int8} --profile ${FUSED_PROFILE:-} \
             > "$OUT/fused.log" 2>&1; grep -E "^\{|Error|error" "$OUT/fused.log" | cut -c1-300 | tail -12;;
    model) timeout ${MODEL_T:-300} python3 benchmarks/bench_transformer.py --model ${MODEL_NAME:-flux1-dev} --reps ${REPS:-10} \
             --tag ${MODEL_TAG:-final} --out "$OUT" \
             --variants ${EAGER_VARIANTS:-bf16 fp8 int8 ao-fp8 ao-int8} --compile ${COMPILE_VARIANTS:-bf16 fp8 int8} \
             --profile ${PROFILE:-fp8} --profile-compiled ${PROFILE_COMPILED:-} --profile-timed ${PROFILE_TIMED:-} \
             > "$OUT/model.log" 2>&1
           grep -E "^\{|Error|error" "$OUT/model.log" | cut -c1-330 | tail -14;;
    # Kernel-level A/B on a few blocks (fast compiles): inductor's generated code (TORCH_LOGS=output_code)
    # and a profile per variant, one process each. CODE_CONFIG: the model config override.
    code) for v in ${CODE_VARIANTS:-fp8+graph ao-fp8+graph}; do
            TORCH_LOGS=output_code timeout ${CODE_T:-150} python3 benchmarks/bench_transformer.py \
              --config ${CODE_CONFIG:-num_layers=1 num_single_layers=2} --reps 20 --tag "code_${v//+/_}" --out "$OUT" \
              --variants --compile $v --profile-timed $v > "$OUT/code_${v//+/_}.log" 2>&1
            echo "$v: $(grep -c '^def triton_' "$OUT/code_${v//+/_}.log") kernels"; done;;
    compile) timeout ${COMPILE_T:-400} python3 benchmarks/bench_transformer.py --tag compiled --out "$OUT" \
             --variants --compile ${COMPILE_VARIANTS:-bf16 fp8 int8 ao-fp8} > "$OUT/compile.log" 2>&1
             grep -E "^\{|Error|error" "$OUT/compile.log" | cut -c1-400 | tail -12;;
  esac
  echo "== stage $stage rc=$? $(( $(date +%s) - start ))s"
done
kill $smi 2>/dev/null
# The device returns at most 8 files: pack everything into one archive.
tgz=$(mktemp /tmp/results.XXXXXX); (cd "$OUT" && tar czf "$tgz" . && rm -rf ./* && mv "$tgz" results.tgz)
