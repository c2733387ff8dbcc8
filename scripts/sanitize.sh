#!/usr/bin/env bash
# The library under AddressSanitizer + UndefinedBehaviorSanitizer, on the tests that attack it.
#
# 1. Copies the Python package to build/sanitize/pkg and builds the library there with NESTSPARSE_SANITIZE=ON
#    (plain CMake against the torch of .venv, CPU only, -O1 -g; build/sanitize is its own build directory).
# 2. Runs the hostile tests (bad input, corrupted index arrays, hypothesis properties, threads rewriting buffers,
#    hostile files, the dense-level byte checks, fuzzed exported programs) and the op tests of both formats with
#    that package first on PYTHONPATH and the sanitizer
#    runtimes preloaded into Python (torch itself is not instrumented). The first report ends the run with an
#    error: zero reports is the pass.
#
# Environment: MAX_JOBS (parallel compile jobs), PYTEST_ARGS (extra pytest arguments, e.g. -x).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="$repo/.venv/bin/python"
build="$repo/build/sanitize"
pkg="$build/pkg"

rm -rf "$pkg"
mkdir -p "$pkg"
cp -r python/nestsparse "$pkg/"
rm -rf "$pkg"/nestsparse/libnestsparse.so "$pkg"/nestsparse/_C*.so "$pkg"/nestsparse/_build_info.py
find "$pkg" -depth -name '__pycache__' -exec rm -rf {} +

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNESTSPARSE_SANITIZE=ON -DNESTSPARSE_CUDA=OFF \
  -DNESTSPARSE_PACKAGE_DIR="$pkg/nestsparse" -DPython_EXECUTABLE="$py" >"$build.log" 2>&1 || {
  tail -30 "$build.log"
  exit 1
}
cmake --build "$build" -j "${MAX_JOBS:-$(nproc)}" >>"$build.log" 2>&1 || {
  tail -40 "$build.log"
  exit 1
}
echo "sanitize: built $(ls "$pkg"/nestsparse/libnestsparse.so)"

runtimes="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# detect_leaks=0: CPython and torch keep allocations alive until exit by design, which LeakSanitizer reports.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:print_summary=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$pkg"
LD_PRELOAD="$runtimes" "$py" -c "import nestsparse, sys; p = nestsparse.__file__; \
  sys.exit(0 if p.startswith('$pkg') else f'sanitize: imported {p}, not the instrumented build')"
# shellcheck disable=SC2086
LD_PRELOAD="$runtimes" "$py" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} \
  tests/test_bad_input.py tests/test_corrupted_weights.py tests/test_properties.py tests/test_concurrency.py \
  tests/test_io.py tests/test_linear.py tests/test_conv2d.py tests/test_epilogue.py tests/test_dense_levels.py \
  tests/test_deploy.py::test_fuzzed_saved_programs_are_refused tests/test_deploy.py::test_names_with_spaces_are_exported_and_checked
echo "sanitize: no AddressSanitizer or UndefinedBehaviorSanitizer report"
