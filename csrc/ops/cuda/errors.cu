// The error flags of the CUDA kernels (errors.h): the per-call and the deferred (per-device, process-wide) flags,
// and the two ops that switch and read the deferred ones.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <climits>
#include <string>

#include "ops/cuda/errors.h"

namespace nestsparse::cuda {
namespace {

// One block of flags per device (a __device__ variable has one instance per device context), zero at load.
__device__ int g_deferred_flags[kNumFlags];

std::atomic<bool> g_deferred{false};

// The address of the current device's flag block, looked up once per device (not during a capture).
int* deferred_flags(c10::DeviceIndex device) {
  static std::array<std::atomic<int*>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "nestsparse: CUDA device index ", device);
  int* p = cache[device].load();
  if (p == nullptr) {
    void* a = nullptr;
    C10_CUDA_CHECK(cudaGetSymbolAddress(&a, g_deferred_flags));
    p = static_cast<int*>(a);
    cache[device].store(p);
  }
  return p;
}

}  // namespace

CallFlags call_flags(const at::Tensor& like) {
  CallFlags f;
  if (g_deferred.load() || c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    f.deferred = true;
    f.ptr = deferred_flags(like.device().index());
  } else {
    f.own = at::zeros({kNumFlags}, like.options().dtype(at::kInt));
    f.ptr = f.own.mutable_data_ptr<int>();
  }
  return f;
}

void raise_if_bad(const char* op, const CallFlags& flags, const NcsrLevel& w, int64_t K) {
  if (flags.deferred) return;
  // One small device-to-host copy (it waits for the kernels): the price of raising at the op.
  const at::Tensor h = flags.own.cpu();
  const int* hf = h.const_data_ptr<int>();
  TORCH_CHECK(hf[kBadRow] == 0, op, ": ", hf[kBadRow], " row(s) of level ", w.level,
              " have a slice [row_ptr[r], row_end[level, r]) outside [0, nnz0=", w.values.numel(), "] or reversed");
  TORCH_CHECK(hf[kBadPlan] == 0, op, ": the plan names ", hf[kBadPlan], " row(s) outside [0, M=", w.rows,
              ") (was it built for another weight? rebuild it with ncsr_plan)");
  // The row slices are known good now, so the host-side search for the first bad column is safe; it raises the
  // same message as the CPU kernels.
  if (hf[kBadCol] != 0) fail_column_out_of_range(op, w, K);
}

void raise_if_bad(const char* op, const CallFlags& flags, const NbcrLevel& w, int64_t K) {
  if (flags.deferred) return;
  const at::Tensor h = flags.own.cpu();
  const int* hf = h.const_data_ptr<int>();
  TORCH_CHECK(hf[kBadRow] == 0, op, ": block_ptr is not non-decreasing from 0 to B=", w.num_blocks, ": ", hf[kBadRow],
              " block row range(s) [block_ptr[i], block_ptr[i+1]) or block(s) lie outside it");
  TORCH_CHECK(hf[kBadPlan] == 0, op, ": the plan names ", hf[kBadPlan], " block row(s) outside [0, MB=", w.block_rows,
              ") (was it built for another weight? rebuild it with nbcr_plan)");
  // The host-side search copies every array and checks each offset before it uses it; it names the first bad block.
  if (hf[kBadBlock] != 0) fail_bad_block(op, w, K);
}

}  // namespace nestsparse::cuda

TORCH_LIBRARY_FRAGMENT(nestsparse, m) {
  using namespace nestsparse::cuda;
  // Deferred index checks on or off (see ops/cuda/errors.h); returns the previous setting.
  m.def("cuda_set_deferred_checks(bool on) -> bool", [](bool on) { return g_deferred.exchange(on); });
  // Raises if a CUDA op on `device` met a bad index since the last check (deferred mode), and clears the flags.
  // Waits for the device.
  m.def("cuda_check_errors(int device) -> ()", [](int64_t device) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    int h[kNumFlags] = {};
    const int zero[kNumFlags] = {};
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    C10_CUDA_CHECK(cudaMemcpyFromSymbol(h, g_deferred_flags, sizeof(h)));
    C10_CUDA_CHECK(cudaMemcpyToSymbol(g_deferred_flags, zero, sizeof(zero)));
    const int first = h[kFirstBadEntry] - 1;
    TORCH_CHECK(h[kBadRow] == 0 && h[kBadCol] == 0 && h[kBadPlan] == 0 && h[kBadBlock] == 0,
                "nestsparse: since the last check, nested sparse ops on cuda:", device, " met ", h[kBadRow],
                " row slice(s) or block range(s) outside the weight's buffers, ", h[kBadCol],
                " column index(es) outside [0, K)",
                first >= 0 ? " (one at col_idx[" + std::to_string(first) + "])" : std::string(), ", ", h[kBadBlock],
                " block(s) outside their bounds and ", h[kBadPlan],
                " plan entries outside the matrix; their outputs are wrong. Validate the weights "
                "(NestedCSR.validate(), NestedBCR.validate()) or run without deferred checks to find the op");
  });
}
