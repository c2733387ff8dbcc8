// The host side of the CUDA nested BCR kernels (nbcr_kernels.cuh) that linear.cu and conv2d.cu share: the level's
// device view, the plan check, the block-column lists of the backward, the dtype dispatch and the launches.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "formats/nbcr.h"
#include "ops/cuda/errors.h"
#include "ops/cuda/launch_common.cuh"
#include "ops/cuda/nbcr_kernels.cuh"

namespace nestsparse::cuda {

// The level's row of a CUDA plan (nbcr_plan on this device): int32 (L, MB), contiguous, on `device`. Null without a
// plan. Its entries need no check here: the kernel bounds each one.
inline const int32_t* plan_row(const char* op, const std::optional<at::Tensor>& plan, const NbcrLevel& w,
                               c10::Device device) {
  if (!plan.has_value()) return nullptr;
  const at::Tensor& p = *plan;
  TORCH_CHECK(p.scalar_type() == at::kInt && p.dim() == 2 && p.size(0) == w.num_levels && p.size(1) == w.block_rows &&
                  p.is_contiguous() && p.device() == device,
              op, ": plan must be a contiguous int32 tensor of shape (L=", w.num_levels, ", MB=", w.block_rows, ") on ",
              device, " from nbcr_plan on that device, got ", p.scalar_type(), " ", p.sizes(), " on ", p.device());
  return p.const_data_ptr<int32_t>() + w.level * p.size(1);
}

template <typename scalar_t>
Blocks<scalar_t> device_blocks(const NbcrLevel& w, int64_t K, const int32_t* plan) {
  return {w.values.const_data_ptr<scalar_t>(),
          w.indices.const_data_ptr<int16_t>(),
          w.block_ptr.const_data_ptr<int32_t>(),
          w.meta(),
          w.level_counts(),
          w.base_counts(),
          plan,
          w.values.numel(),
          w.indices.numel(),
          w.rows,
          K,
          w.bm,
          w.bk,
          w.block_rows,
          (K + w.bk - 1) / w.bk,
          w.num_blocks};
}

// The blocks of each block column, made on the device per backward call (a stable sort of the B block columns and
// two searches: no host sync). A block column outside [0, KB) falls in no column's run; the SDDMM kernel, which
// walks every block, reports it.
struct ColumnListTensors {
  at::Tensor order, col_ptr, block_row;
  ColumnLists view() const {
    return {order.const_data_ptr<int32_t>(), col_ptr.const_data_ptr<int32_t>(), block_row.const_data_ptr<int32_t>()};
  }
};

inline ColumnListTensors column_lists(const NbcrLevel& w, int64_t K) {
  const int64_t KB = (K + w.bk - 1) / w.bk, B = w.num_blocks;
  const auto opts = w.blocks.options();
  const at::Tensor j = w.blocks.select(1, 0).contiguous();
  const auto [sorted, order] = at::sort(j, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor col_ptr = at::searchsorted(sorted, at::arange(KB + 1, opts), /*out_int32=*/true);
  const at::Tensor block_row =
      at::searchsorted(w.block_ptr, at::arange(B, opts), /*out_int32=*/true, /*right=*/true).sub_(1);
  return {order.to(at::kInt), col_ptr, block_row};
}

// Whether tile_kernel may read the (., N) operand at `p` 16 bytes at a time.
template <typename scalar_t>
bool vector_loads(const void* p, int64_t N) {
  constexpr int64_t V = 16 / sizeof(scalar_t);
  return N % V == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// fn.template operator()<scalar_t>() for the values' type.
template <typename Fn>
void dispatch_values(const NbcrLevel& w, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.values.scalar_type(), "nbcr_cuda",
                                  [&] { fn.template operator()<scalar_t>(); });
}

// tile_kernel over W (kT = false: the product, one line per block row) or W^T (kT = true: one per block column),
// TM = 32 for blocks of up to 32 along the tile, 64 above (float64: always 32, its finished tile would not fit in
// shared memory).
template <bool kT, typename scalar_t, typename Operand, typename Sink>
void launch_tiles(const Blocks<scalar_t>& w, const ColumnLists& lists, const Operand& op, const scalar_t* dense,
                  const Sink& sink, TileGrid g, int* flags, cudaStream_t stream) {
  const int64_t span = kT ? w.bk : w.bm, lines = kT ? w.KB : w.MB;
  if (lines == 0 || g.P == 0) return;
  const auto go = [&](auto tm) {
    constexpr int TM = decltype(tm)::value;
    g.tiles = (span + TM - 1) / TM;
    g.zspan = kT ? g.groups : std::min<int64_t>(g.groups, TM / g.group_rows + 2);
    const int64_t x = lines * g.tiles;
    TORCH_CHECK(x <= INT32_MAX, "nestsparse: ", x, " tiles of rows are more than a CUDA grid holds");
    const dim3 grid(static_cast<unsigned>(x),
                    static_cast<unsigned>(std::min((g.P + kTileThreads - 1) / kTileThreads, kMaxGridY)),
                    static_cast<unsigned>(std::min(g.zspan, kMaxGridY)));
    tile_kernel<scalar_t, Operand, kT, TM, Sink>
        <<<grid, kTileThreads, 0, stream>>>(w, lists, op, dense, sink, g, flags);
  };
  if constexpr (sizeof(scalar_t) == 8) {
    go(std::integral_constant<int, 32>{});
  } else if (span <= 32) {
    go(std::integral_constant<int, 32>{});
  } else {
    go(std::integral_constant<int, kMaxTileRows>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// block_sddmm_kernel: at most 16 thread blocks per multiprocessor, striding over the stored blocks.
template <typename scalar_t, typename Operand>
void launch_block_sddmm(const Blocks<scalar_t>& w, const ColumnLists& lists, const Operand& op, const scalar_t* gz,
                        const scalar_t* x, scalar_t* gv, const TileGrid& g, int* flags, cudaStream_t stream) {
  if (w.B == 0 || g.P == 0) return;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto blocks = static_cast<unsigned>(std::min(w.B, sms * 16));
  block_sddmm_kernel<scalar_t, Operand><<<blocks, kSddmmThreads, 0, stream>>>(w, lists, op, gz, x, gv, g, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward of either product, for the dense operand `op` (x and grad_z are read through it): grad_x by
// tile_kernel over W^T into `gx` (acc_t, in x's layout as `op` sees it; atomics when taps `overlap`), grad_values by
// block_sddmm_kernel into `gv`. `grid.vec` asks for 16-byte loads of grad_z where its alignment allows them.
template <typename Operand>
void launch_nbcr_backward(const NbcrLevel& w, int64_t K, const Operand& op, const TileGrid& grid, const at::Tensor& gz,
                          const at::Tensor& x, at::Tensor& gx, at::Tensor& gv, bool overlap, const CallFlags& flags) {
  const ColumnListTensors lists = column_lists(w, K);
  const cudaStream_t stream = stream_of(x);
  dispatch_values(w, [&]<typename scalar_t>() {
    using acc_t = at::acc_type<scalar_t, true>;
    const Blocks<scalar_t> blocks = device_blocks<scalar_t>(w, K, nullptr);
    TileGrid g = grid;
    g.vec = g.vec && vector_loads<scalar_t>(gz.const_data_ptr(), g.P);
    launch_tiles<true>(blocks, lists.view(), op, gz.const_data_ptr<scalar_t>(),
                       GradSink<acc_t>{gx.mutable_data_ptr<acc_t>(), overlap}, g, flags.ptr, stream);
    launch_block_sddmm(blocks, lists.view(), op, gz.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                       gv.mutable_data_ptr<scalar_t>(), g, flags.ptr, stream);
  });
}

}  // namespace nestsparse::cuda
