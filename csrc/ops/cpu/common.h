// Helpers shared by the CPU ops' torch glue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <limits>
#include <optional>
#include <string>

#include "formats/nbcr.h"
#include "formats/ncsr.h"
#include "ops/cpu/isa/kernel_api.h"
#include "ops/cpu/sparse_loops.h"

namespace nestsparse::cpu {

constexpr int64_t kNoGroups = std::numeric_limits<int64_t>::max();

inline ValueKind value_kind(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kBFloat16: return ValueKind::BF16;
    case at::kHalf: return ValueKind::F16;
    default: return ValueKind::F32;
  }
}

inline SparseRows sparse_rows(const NcsrLevel& w, int64_t K) {
  return SparseRows{w.values.const_data_ptr(), w.col_idx.const_data_ptr(), value_kind(w.values),
                    static_cast<int32_t>(w.col_idx.element_size()), w.row_start(), w.row_stop(), K};
}

// The input `name` must be a CPU tensor of the values' dtype, contiguous.
inline void check_dense_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& values) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; this is the CPU kernel");
  TORCH_CHECK(t.scalar_type() == values.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but values are ",
              values.scalar_type(), "; cast one of them so they match");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first)");
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& values, int64_t M) {
  if (!bias.has_value()) return;
  check_dense_input(op, "bias", *bias, values);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == M, op, ": bias must have shape (", M, ",), got ", bias->sizes());
}

// Tile width for n dense columns: the narrowest of 16/32/64 that holds them, so small batches waste no lanes.
inline int64_t tile_width(int64_t n) { return n <= 16 ? 16 : (n <= 32 ? 32 : 64); }

// Tile width for a dense operand of `ncols` columns whose rows are `K` long. Every weight row of a tile re-reads
// the K x TN panel, so it must stay in L2 (about 512 KB) next to the streaming weights: narrower for long rows.
inline int64_t panel_width(int64_t ncols, int64_t K) {
  return std::min(tile_width(ncols), K <= 2048 ? int64_t{64} : (K <= 4096 ? int64_t{32} : int64_t{16}));
}

inline SpmmTileFn spmm_for_width(const KernelTable& k, int64_t tn) {
  return tn == 16 ? k.spmm16 : (tn == 32 ? k.spmm32 : k.spmm64);
}

inline BlockTileFn block_fn_for_width(const KernelTable& k, int64_t tn) {
  return tn == 16 ? k.block16 : (tn == 32 ? k.block32 : k.block64);
}

// Grain for at::parallel_for over `items` pieces of a product with `work` multiply-adds in all: below about
// 10 us of work, waking the other threads costs more than it saves, so the whole range runs inline.
inline int64_t grain_for(int64_t items, int64_t work) { return work < (int64_t{1} << 15) ? std::max<int64_t>(items, 1) : 1; }

inline int64_t default_chunks() { return 4 * static_cast<int64_t>(at::get_num_threads()); }

inline at::ScalarType compute_type(const at::Tensor& values) {
  return values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace nestsparse::cpu
