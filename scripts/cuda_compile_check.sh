#!/usr/bin/env bash
# Compile-and-link check of the CUDA build, for machines without a GPU.
#
# 1. Creates .venv-cuda (once) with the CUDA build of torch and the build requirements.
# 2. Builds and installs nestsparse into it with NESTSPARSE_CUDA=ON, in its own build directory
#    (build/cuda-check) so that it never clashes with the CPU build under build/.
# 3. Imports the installed package from outside the repository and checks that the library was built with
#    CUDA and that every op of both formats has a CUDA kernel registered. Nothing runs on a GPU.
#
# Idempotent: a re-run reuses the environment and the CMake build directory (an incremental build).
# Environment:
#   MAX_JOBS           parallel compile jobs (default: number of cores); sets CMAKE_BUILD_PARALLEL_LEVEL
#   TORCH_SPEC         torch requirement for the environment (default torch==2.14.1, a +cu130 build)
#   CUDA_HOME          CUDA toolkit with nvcc (default /usr/local/cuda)
#   TORCH_CUDA_ARCH_LIST  architectures to compile for (default from cmake/cuda_setup.cmake: "8.0;9.0")
#   VENV               environment directory (default .venv-cuda in the repository)
#   VERBOSE=1          stream the full build log instead of only showing its tail on failure
set -euo pipefail

t_start=$(date +%s)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

venv="${VENV:-$repo/.venv-cuda}"
torch_spec="${TORCH_SPEC:-torch==2.14.1}"
deps=("$torch_spec" scikit-build-core numpy safetensors tqdm)
marker="$venv/.nestsparse-deps-ok"
build_dir="build/cuda-check"
log="$repo/$build_dir.log"

die() { echo "cuda_compile_check: FAIL: $*" >&2; exit 1; }
step() { echo "cuda_compile_check: $*"; }

# --- environment -------------------------------------------------------------------------------------------
if [[ ! -x "$venv/bin/python" ]]; then
  step "creating $venv"
  python3 -m venv "$venv" || die "python3 -m venv $venv failed"
fi
py="$venv/bin/python"
# The marker records what was installed; a different requirement list reinstalls.
if [[ ! -f "$marker" ]] || [[ "$(cat "$marker")" != "${deps[*]}" ]]; then
  step "installing ${deps[*]} into $venv (a CUDA torch is several GB; this takes minutes)"
  "$py" -m pip install --quiet --upgrade pip
  "$py" -m pip install "${deps[@]}"
  printf '%s' "${deps[*]}" > "$marker"
else
  step "reusing $venv (${deps[*]})"
fi
torch_cuda="$("$py" -c 'import torch; print(torch.version.cuda or "")')"
[[ -n "$torch_cuda" ]] || die "the torch in $venv is a CPU-only build; a CUDA build is needed (TORCH_SPEC=$torch_spec)"
step "torch $("$py" -c 'import torch; print(torch.__version__)') (CUDA $torch_cuda)"

# --- toolkit -----------------------------------------------------------------------------------------------
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
[[ -x "$CUDA_HOME/bin/nvcc" ]] || die "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
step "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -n 1)"

# --- build -------------------------------------------------------------------------------------------------
jobs="${MAX_JOBS:-$(nproc)}"
export MAX_JOBS="$jobs"
export CMAKE_BUILD_PARALLEL_LEVEL="$jobs"
export NESTSPARSE_CUDA=ON
mkdir -p "$(dirname "$log")"
step "building with NESTSPARSE_CUDA=ON, $jobs job(s), build dir $build_dir (log: $log)"
t_build=$(date +%s)
build_cmd=("$py" -m pip install --no-build-isolation --no-deps -v
           --config-settings=build-dir="$build_dir" .)
if [[ "${VERBOSE:-0}" == 1 ]]; then
  "${build_cmd[@]}" 2>&1 | tee "$log" || die "build failed (log: $log)"
else
  if ! "${build_cmd[@]}" > "$log" 2>&1; then
    echo "----- last 80 lines of $log -----" >&2
    tail -n 80 "$log" >&2
    die "build failed (log: $log)"
  fi
fi
step "build took $(( $(date +%s) - t_build )) s"

# --- import from outside the repository, so the installed package is the one loaded -----------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(
  cd "$tmp"
  "$py" - <<'EOF'
import os, sys
import torch
import nestsparse
where = nestsparse.library_path()
assert "site-packages" in where, f"loaded {where}, not the installed package's library"
assert torch.ops.nestsparse.with_cuda(), f"{where} was built without CUDA (with_cuda() is False)"
ops = [f"{fmt}_{op}" for fmt in ("ncsr", "nbcr")
       for op in ("linear", "linear_backward", "conv2d", "conv2d_backward", "plan")]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"nestsparse::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
assert torch.ops.nestsparse.cuda_plan_header() > 0 and hasattr(torch.ops.nestsparse, "cuda_check_errors")
print(f"CUDA kernels: {', '.join(ops)}")
print(f"op library: {where}")
print(f"built against torch {torch.ops.nestsparse.torch_version()}, running torch {torch.__version__}, "
      f"cuda available here: {torch.cuda.is_available()}")
EOF
) || die "import check failed"

echo "cuda_compile_check: PASS (CUDA build compiles, links, imports; every op of both formats has a CUDA kernel) in $(( $(date +%s) - t_start )) s"
