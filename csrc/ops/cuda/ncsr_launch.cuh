// The host side of the CUDA nested CSR kernels (ncsr_kernels.cuh) that linear.cu and conv2d.cu share: the level's
// device view, the plan check, the dtype dispatch and the launches.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "formats/ncsr.h"
#include "ops/cuda/errors.h"
#include "ops/cuda/launch_common.cuh"
#include "ops/cuda/ncsr_kernels.cuh"

namespace nestsparse::cuda {

// The level's row of a CUDA plan (ncsr_plan on this device), checked to be one: int32 (L, kPlanHeader + M),
// contiguous, on `device`. Null without a plan. Its contents need no check here: the kernels bound every entry.
inline const int32_t* plan_row(const char* op, const std::optional<at::Tensor>& plan, const NcsrLevel& w,
                               c10::Device device) {
  if (!plan.has_value()) return nullptr;
  const at::Tensor& p = *plan;
  TORCH_CHECK(p.scalar_type() == at::kInt && p.dim() == 2 && p.size(0) == w.num_levels &&
                  p.size(1) == kPlanHeader + w.rows && p.is_contiguous() && p.device() == device,
              op, ": plan must be a contiguous int32 tensor of shape (L=", w.num_levels, ", ", kPlanHeader + w.rows,
              ") on ", device, " from ncsr_plan on that device, got ", p.scalar_type(), " ", p.sizes(), " on ",
              p.device());
  return p.const_data_ptr<int32_t>() + w.level * p.size(1);
}

template <typename scalar_t, typename index_t>
Rows<scalar_t, index_t> device_rows(const NcsrLevel& w, int64_t K, const int32_t* plan) {
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  const auto* v = w.values.const_data_ptr<scalar_t>();
  const auto* c = w.col_idx.const_data_ptr<index_t>();
  const bool aligned =
      reinterpret_cast<uintptr_t>(v) % 16 == 0 && reinterpret_cast<uintptr_t>(c) % (V * sizeof(index_t)) == 0;
  TORCH_CHECK(w.rows <= INT32_MAX, "nestsparse: more than 2^31 - 1 rows");
  return {v, c, w.row_start(), w.row_stop(), plan, w.rows, K, w.values.numel(), aligned};
}

// fn.template operator()<scalar_t, index_t>() for the values' and the column indices' types.
template <typename Fn>
void dispatch_types(const NcsrLevel& w, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.values.scalar_type(), "ncsr_cuda", [&] {
    if (w.col_idx.scalar_type() == at::kShort) {
      fn.template operator()<scalar_t, int16_t>();
    } else {
      fn.template operator()<scalar_t, int32_t>();
    }
  });
}

// One block per row (in the plan's order) and 128-column tile.
inline dim3 spmm_grid(int64_t M, int64_t ncols) {
  const int64_t tiles = (ncols + kSpmmThreads - 1) / kSpmmThreads;
  return dim3(static_cast<unsigned>(M), static_cast<unsigned>(std::min(tiles, kMaxGridY)));
}

template <typename scalar_t, typename index_t, typename Operand>
void launch_spmm(const Rows<scalar_t, index_t>& w, const Operand& op, int64_t ncols, const scalar_t* x,
                 const Epilogue<scalar_t>& ep, int* flags, cudaStream_t stream) {
  spmm_kernel<scalar_t, index_t, Operand><<<spmm_grid(w.M, ncols), kSpmmThreads, 0, stream>>>(w, op, x, ep, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t, typename Operand, typename acc_t>
void launch_scatter(const Rows<scalar_t, index_t>& w, const Operand& op, int64_t ncols, const scalar_t* gz, acc_t* gx,
                    int* flags, cudaStream_t stream) {
  spmm_scatter_kernel<scalar_t, index_t, Operand, acc_t>
      <<<spmm_grid(w.M, ncols), kSpmmThreads, 0, stream>>>(w, op, gz, gx, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t, typename Operand>
void launch_sddmm(const Rows<scalar_t, index_t>& w, const Operand& op, const scalar_t* gz, const scalar_t* x,
                  scalar_t* gv, int* flags, cudaStream_t stream) {
  sddmm_kernel<scalar_t, index_t, Operand>
      <<<dim3(static_cast<unsigned>(w.M)), kSpmmThreads, 0, stream>>>(w, op, gz, x, gv, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// spmv_kernel with NB = the smallest power of two >= N (N <= kMaxSmallBatch). Enough warps for one row each, at
// most 16 blocks per multiprocessor (the warps stride over the tasks).
template <typename scalar_t, typename index_t>
void launch_spmv(const Rows<scalar_t, index_t>& w, const scalar_t* xt, int64_t N, const Epilogue<scalar_t>& ep,
                 int* flags, cudaStream_t stream) {
  constexpr int64_t kWarpsPerBlock = kSpmvThreads / kWarp;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto blocks =
      static_cast<unsigned>(std::max<int64_t>(1, std::min((w.M + kWarpsPerBlock - 1) / kWarpsPerBlock, sms * 16)));
  const auto go = [&](auto nb) {
    spmv_kernel<scalar_t, index_t, decltype(nb)::value><<<blocks, kSpmvThreads, 0, stream>>>(w, xt, N, ep, flags);
  };
  if (N <= 1) {
    go(std::integral_constant<int, 1>{});
  } else if (N <= 2) {
    go(std::integral_constant<int, 2>{});
  } else if (N <= 4) {
    go(std::integral_constant<int, 4>{});
  } else if (N <= 8) {
    go(std::integral_constant<int, 8>{});
  } else if (N <= 16) {
    go(std::integral_constant<int, 16>{});
  } else {
    go(std::integral_constant<int, 32>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace nestsparse::cuda
