// <format>_plan: the per-weight partition of every level into `num_chunks` pieces of about equal work, int32
// (L, num_chunks+1), built once per weight (and thread count) and passed to the products as `plan`: the CPU
// kernels' load balance (ops/cpu/plan.cpp). On CUDA, ncsr_plan gives instead each level's rows ordered by length
// for the CUDA kernels' schedule (ops/cuda/plan.cu), (L, header + M), and nbcr_plan each level's block rows ordered
// by work, (L, MB).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "ops/op.h"

namespace nestsparse {

// Row boundaries per level; a row costs its non-zeros plus a fixed overhead.
struct NcsrPlan {
  using Result = at::Tensor;
  struct Call {
    at::Tensor row_ptr, row_end;
    int64_t num_chunks;
  };
  static const char* name() { return "ncsr_plan"; }
  static const char* schema() { return "ncsr_plan(Tensor row_ptr, Tensor row_end, int num_chunks) -> Tensor"; }
  static Call unpack(const at::Tensor& row_ptr, const at::Tensor& row_end, int64_t num_chunks) {
    return {row_ptr, row_end, num_chunks};
  }
  static auto pack(const Call& c) { return std::forward_as_tuple(c.row_ptr, c.row_end, c.num_chunks); }
};

// Block-row boundaries per level; a block costs its r_l x c_l sub-block plus a fixed overhead.
struct NbcrPlan {
  using Result = at::Tensor;
  struct Call {
    at::Tensor block_ptr, counts;
    int64_t rows_per_block, num_chunks;
  };
  static const char* name() { return "nbcr_plan"; }
  static const char* schema() {
    return "nbcr_plan(Tensor block_ptr, Tensor counts, int rows_per_block, int num_chunks) -> Tensor";
  }
  static Call unpack(const at::Tensor& block_ptr, const at::Tensor& counts, int64_t rows_per_block,
                     int64_t num_chunks) {
    return {block_ptr, counts, rows_per_block, num_chunks};
  }
  static auto pack(const Call& c) {
    return std::forward_as_tuple(c.block_ptr, c.counts, c.rows_per_block, c.num_chunks);
  }
};

}  // namespace nestsparse
