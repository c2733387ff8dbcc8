#!/usr/bin/env bash
# The GPU check of the CUDA kernels, for a machine with a GPU, a CUDA torch, nvcc and no network (8-10 minutes on
# an H200 with both benchmarks; BENCHES=gpu_nbcr or BENCHES=gpu runs one): builds and installs nestsparse with CUDA, runs the CUDA tests, runs compute-sanitizer memcheck and
# racecheck on a small run of every op (bench/gpu_sanitize.py), runs the GPU benchmarks (bench/gpu.py: nested CSR;
# bench/gpu_nbcr.py: nested BCR on tensor cores) and prints a short table last. Logs go to $OUT (default /tmp/nestsparse-gpu-check).
#
#   bash bench/gpu_check.sh            # PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), QUICK=0 for
#                                      # the full benchmarks, BENCHES (default "gpu gpu_nbcr")
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${OUT:-/tmp/nestsparse-gpu-check}"
mkdir -p "$out"
t0=$(date +%s)
declare -A result

step() { echo "gpu_check: $* ($(( $(date +%s) - t0 )) s)"; }

step "building (log: $out/build.log)"
export NESTSPARSE_CUDA=ON TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
if "$py" -m pip install --no-build-isolation --no-deps -v --config-settings=build-dir=build/gpu . > "$out/build.log" 2>&1 \
   && (cd /tmp && "$py" -c 'import torch, nestsparse; assert torch.ops.nestsparse.with_cuda() and torch.cuda.is_available()'); then
  result[build]="ok in $(( $(date +%s) - t0 )) s"
else
  tail -n 60 "$out/build.log"
  echo "gpu_check: the build failed"; exit 1
fi

step "CUDA tests (log: $out/tests.log)"
timeout 200 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_nbcr.py \
  "tests/test_linear.py::test_every_level_matches_float64_reference" \
  tests/test_bad_input.py -k "cuda or device or test_cuda" > "$out/tests.log" 2>&1
result[tests]="$(tail -n 1 "$out/tests.log")"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -n 20

for tool in memcheck racecheck; do
  step "compute-sanitizer --tool $tool (log: $out/$tool.log)"
  if command -v compute-sanitizer > /dev/null; then
    timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 3 "$py" bench/gpu_sanitize.py > "$out/$tool.log" 2>&1
    rc=$?
    summary="$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/$tool.log" | tail -n 1)"
    result[$tool]="rc=$rc ${summary:-no summary (see log)}; $(grep -c 'sanitize run: ok' "$out/$tool.log") ok line"
  else
    result[$tool]="compute-sanitizer not found"
  fi
done

for b in ${BENCHES:-gpu gpu_nbcr}; do
  step "benchmark bench/$b.py (log: $out/$b.log)"
  timeout 240 "$py" "bench/$b.py" "${quick[@]}" --csv "$out/$b.csv" > "$out/$b.log" 2>&1
  result[$b]="rc=$?"
  grep -v "^\s*$" "$out/$b.log" | tail -n 40
done

echo
echo "## gpu_check summary ($(( $(date +%s) - t0 )) s, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1))"
echo
echo "| step | result |"
echo "|---|---|"
for k in build tests memcheck racecheck ${BENCHES:-gpu gpu_nbcr}; do echo "| $k | ${result[$k]:-not run} |"; done
