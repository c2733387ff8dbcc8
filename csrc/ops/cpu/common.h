// Helpers shared by the CPU ops' torch glue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "ops/cpu/isa/kernel_api.h"

namespace nestsparse::cpu {

constexpr int64_t kNoGroups = std::numeric_limits<int64_t>::max();

inline ValueKind value_kind(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kBFloat16: return ValueKind::BF16;
    case at::kHalf: return ValueKind::F16;
    default: return ValueKind::F32;
  }
}

// Tile width for n dense columns: the narrowest of 16/32/64 that holds them, so small batches waste no lanes.
inline int64_t tile_width(int64_t n) { return n <= 16 ? 16 : (n <= 32 ? 32 : 64); }

// Tile width for a dense operand of `ncols` columns whose rows are `K` long. Every weight row of a tile re-reads
// the K x TN panel, so it must stay in L2 (about 512 KB) next to the streaming weights: narrower for long rows.
inline int64_t panel_width(int64_t ncols, int64_t K) {
  return std::min(tile_width(ncols), K <= 2048 ? int64_t{64} : (K <= 4096 ? int64_t{32} : int64_t{16}));
}

// Grain for at::parallel_for over `items` pieces of a product with `work` multiply-adds in all: below about
// 10 us of work, waking the other threads costs more than it saves, so the whole range runs inline.
inline int64_t grain_for(int64_t items, int64_t work) {
  return work < (int64_t{1} << 15) ? std::max<int64_t>(items, 1) : 1;
}

inline int64_t default_chunks() { return 4 * static_cast<int64_t>(at::get_num_threads()); }

// float64 weights compute in float64 (gradient checks); every other value type computes in float32.
inline at::ScalarType compute_type(const at::Tensor& values) {
  return values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace nestsparse::cpu
