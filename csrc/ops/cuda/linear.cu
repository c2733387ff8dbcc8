// CUDA kernel of ncsr_linear (ops/linear.h): y = act(x @ W_level^T + bias) with W in nested CSR (formats/ncsr.h).
//
// One warp per (output row r, block of NB batch rows). The warp's lanes stride over the row's entries
// [row_ptr[r], row_end[level, r]); each lane reads a value and its column once and applies it to the NB
// batch rows of the block, accumulating in float32 (float64 for float64 weights). The NB partial sums are
// reduced across the warp and lane 0 writes bias + activation: no second pass over the output.
//
// Memory safety does not rely on the caller: a row slice outside [0, nnz0] or reversed is treated as empty,
// and a column outside [0, K) is skipped, never read. Either is counted in a device flag that the host
// reads after the kernel and turns into an error.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "formats/ncsr.h"
#include "ops/activation.h"
#include "ops/checks.h"
#include "ops/linear.h"

namespace nestsparse::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // 128 threads: 4 output rows per thread block
constexpr int kBatchBlock = 4;     // NB: batch rows sharing one read of a weight row
constexpr int kMaxGridY = 65535;

// flags[0]: rows whose slice is outside [0, nnz] or reversed; flags[1]: column indices outside [0, K).
enum Flag : int { kBadRow = 0, kBadCol = 1 };

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// x (N, K) row-major, y (N, M) row-major, bias and scale (M,) or null, residual (N, M) or null. row_start[r],
// row_stop[r]: slice of row r at the requested level. grid.x covers the rows (kWarpsPerBlock per block), grid.y strides
// over batch blocks.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    ncsr_linear_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ values,
                       const index_t* __restrict__ col_idx, const int32_t* __restrict__ row_start,
                       const int32_t* __restrict__ row_stop, const scalar_t* __restrict__ bias,
                       const scalar_t* __restrict__ scale, const scalar_t* __restrict__ residual,
                       scalar_t* __restrict__ y, int64_t N, int64_t M, int64_t K, int64_t nnz, Act act,
                       int* __restrict__ flags) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= M) return;  // whole warp leaves together: r is uniform within a warp

  int64_t begin = row_start[r];
  int64_t end = row_stop[r];
  if (begin < 0 || end < begin || end > nnz) {
    if (lane == 0 && blockIdx.y == 0) atomicAdd(&flags[kBadRow], 1);
    begin = end = 0;  // computed as an empty row; the host raises afterwards
  }
  const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[r]) : acc_t(0);
  const acc_t s = scale != nullptr ? static_cast<acc_t>(scale[r]) : acc_t(1);

  int bad_cols = 0;
  for (int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBatchBlock; n0 < N;
       n0 += static_cast<int64_t>(gridDim.y) * kBatchBlock) {
    const int nb = N - n0 < kBatchBlock ? static_cast<int>(N - n0) : kBatchBlock;
    const scalar_t* xb = x + n0 * K;
    acc_t acc[kBatchBlock];
#pragma unroll
    for (int i = 0; i < kBatchBlock; ++i) acc[i] = acc_t(0);

    for (int64_t j = begin + lane; j < end; j += kWarp) {
      const int64_t c = static_cast<int64_t>(col_idx[j]);
      if (c < 0 || c >= K) {
        bad_cols += (n0 == 0);  // counted once per entry, in the first batch block
        continue;               // never read x out of bounds
      }
      const acc_t v = static_cast<acc_t>(values[j]);
#pragma unroll
      for (int i = 0; i < kBatchBlock; ++i) {
        if (i < nb) acc[i] += v * static_cast<acc_t>(xb[i * K + c]);
      }
    }

#pragma unroll
    for (int i = 0; i < kBatchBlock; ++i) acc[i] = warp_sum(acc[i]);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kBatchBlock; ++i) {
        if (i < nb) {
          const int64_t o = (n0 + i) * M + r;
          const acc_t res = residual != nullptr ? static_cast<acc_t>(residual[o]) : acc_t(0);
          y[o] = static_cast<scalar_t>(activate<DeviceMath>(act, acc[i] * s + b + res));
        }
      }
    }
  }
  if (bad_cols != 0) atomicAdd(&flags[kBadCol], bad_cols);
}

template <typename scalar_t, typename index_t>
void launch_ncsr_linear(const scalar_t* x, const scalar_t* values, const index_t* col_idx, const int32_t* row_start,
                        const int32_t* row_stop, const scalar_t* bias, const scalar_t* scale, const scalar_t* residual,
                        scalar_t* y, int64_t N, int64_t M, int64_t K, int64_t nnz, Act act, int* flags,
                        cudaStream_t stream) {
  const int64_t grid_x = (M + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t batch_blocks = (N + kBatchBlock - 1) / kBatchBlock;
  TORCH_CHECK(grid_x <= INT32_MAX, "ncsr_linear: too many output rows for one launch (M=", M, ")");
  const dim3 grid(static_cast<unsigned>(grid_x),
                  static_cast<unsigned>(batch_blocks < kMaxGridY ? batch_blocks : kMaxGridY));
  const dim3 block(kWarp * kWarpsPerBlock);
  ncsr_linear_kernel<scalar_t, index_t><<<grid, block, 0, stream>>>(x, values, col_idx, row_start, row_stop, bias,
                                                                    scale, residual, y, N, M, K, nnz, act, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor linear(const Linear<Ncsr>::Call& c) {
  const char* op = Linear<Ncsr>::name();
  const at::Tensor& x = c.x;
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_linear_input(op, x, c.w.values);
  const NcsrLevel w = Ncsr::check(op, c.w, x.device());
  check_bias(op, c.bias, c.w.values, w.rows);
  const int64_t K = x.size(-1), N = batch_rows(x), M = w.rows;
  const std::vector<int64_t> out_sizes = linear_output_sizes(x, M);
  check_epilogue(op, c.scale, c.residual, c.w.values, M, out_sizes);
  at::Tensor y = new_output(out_sizes, x.options());
  if (N == 0 || M == 0) return y;

  at::Tensor flags = at::zeros({2}, x.options().dtype(at::kInt));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
  const int64_t nnz = w.values.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.values.scalar_type(), "ncsr_linear_cuda", [&] {
    const auto ptr = [](const std::optional<at::Tensor>& t) {
      return t.has_value() ? t->const_data_ptr<scalar_t>() : static_cast<const scalar_t*>(nullptr);
    };
    const scalar_t *bp = ptr(c.bias), *sp = ptr(c.scale), *rp = ptr(c.residual);
    if (w.col_idx.scalar_type() == at::kShort) {
      launch_ncsr_linear<scalar_t, int16_t>(x.const_data_ptr<scalar_t>(), w.values.const_data_ptr<scalar_t>(),
                                            w.col_idx.const_data_ptr<int16_t>(), w.row_start(), w.row_stop(), bp, sp,
                                            rp, y.mutable_data_ptr<scalar_t>(), N, M, K, nnz, c.activation,
                                            flags.mutable_data_ptr<int>(), stream);
    } else {
      launch_ncsr_linear<scalar_t, int32_t>(x.const_data_ptr<scalar_t>(), w.values.const_data_ptr<scalar_t>(),
                                            w.col_idx.const_data_ptr<int32_t>(), w.row_start(), w.row_stop(), bp, sp,
                                            rp, y.mutable_data_ptr<scalar_t>(), N, M, K, nnz, c.activation,
                                            flags.mutable_data_ptr<int>(), stream);
    }
  });

  // One small device-to-host copy (it waits for the kernel): the price of raising on a malformed weight.
  const at::Tensor h = flags.cpu();
  const int* hf = h.const_data_ptr<int>();
  TORCH_CHECK(hf[kBadRow] == 0, op, ": ", hf[kBadRow], " row(s) of level ", w.level,
              " have a slice [row_ptr[r], row_end[level, r]) outside [0, nnz0=", nnz, "] or reversed");
  // The row slices are known good now, so the host-side search for the first bad column is safe; it raises
  // the same message as the CPU kernel.
  if (hf[kBadCol] != 0) fail_column_out_of_range(op, w, K);
  return y;
}

}  // namespace
}  // namespace nestsparse::cuda

TORCH_LIBRARY_IMPL(nestsparse, CUDA, m) {
  using nestsparse::Linear;
  using nestsparse::Ncsr;
  m.impl(Linear<Ncsr>::name(), nestsparse::impl<Linear<Ncsr>, &nestsparse::cuda::linear>);
}
