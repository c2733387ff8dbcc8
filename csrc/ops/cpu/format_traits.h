// What the CPU glue (linear.cpp, conv2d.cpp) needs to know of a format, and nothing else: its views for the ISA
// kernels and the plain loops, which kernel of the table runs a tile or a small batch, its partition (plan), the
// work a level costs, and how a bad index is reported. The loops themselves are overloaded on the view
// (ncsr_loops.h, nbcr_loops.h).
#pragma once

#include <optional>
#include <vector>

#include "ops/cpu/common.h"
#include "ops/cpu/isa/dispatch.h"
#include "ops/cpu/nbcr_loops.h"
#include "ops/cpu/ncsr_loops.h"
#include "ops/weight_args.h"

namespace nestsparse::cpu {

template <typename F>
struct CpuFormat;

template <>
struct CpuFormat<Ncsr> {
  static SparseRows kernel_view(const NcsrLevel& w, int64_t K) {
    return SparseRows{w.values.const_data_ptr(),
                      w.col_idx.const_data_ptr(),
                      value_kind(w.values),
                      static_cast<int32_t>(w.col_idx.element_size()),
                      w.row_start(),
                      w.row_stop(),
                      K};
  }
  static SpmmTileFn tile_kernel(const KernelTable& k, int64_t tn) {
    return tn == 16 ? k.spmm16 : (tn == 32 ? k.spmm32 : k.spmm64);
  }
  static SpmvFn small_batch_kernel(const KernelTable& k) { return k.spmv; }
  // Multiply-adds per output column: the level's non-zeros.
  static int64_t work(const NcsrLevel& w) { return w.nnz; }
  static std::vector<int32_t> chunks(const char* op, const NcsrLevel& w, const std::optional<at::Tensor>& plan) {
    return row_chunks(op, w, plan, default_chunks());
  }
  [[noreturn]] static void fail(const char* op, const NcsrLevel& w, int64_t K) { fail_column_out_of_range(op, w, K); }
  // The gradient of the values writes each entry once: rows own disjoint slices (the checked snapshot).
  static void check_value_slots(const char*, const NcsrLevel&) {}
  // The SDDMM of the backward runs over rows.
  static int64_t sddmm_units(const NcsrLevel& w) { return w.rows; }
  static int64_t sddmm_grain(bool conv) { return conv ? 4 : 16; }
};

template <>
struct CpuFormat<Nbcr> {
  static SparseBlocks kernel_view(const NbcrLevel& w, int64_t K) { return kernel_blocks(w, K); }
  static BlockTileFn tile_kernel(const KernelTable& k, int64_t tn) {
    return tn == 16 ? k.block16 : (tn == 32 ? k.block32 : k.block64);
  }
  static BlockSpmvFn small_batch_kernel(const KernelTable& k) { return k.block_spmv; }
  // Multiply-adds per output column, bounded by the stored (level-0) values: counting a level's r_l x c_l
  // corners would cost a pass over the blocks per call.
  static int64_t work(const NbcrLevel& w) { return w.values.numel(); }
  static std::vector<int32_t> chunks(const char* op, const NbcrLevel& w, const std::optional<at::Tensor>& plan) {
    return block_row_chunks(op, w, plan, default_chunks());
  }
  [[noreturn]] static void fail(const char* op, const NbcrLevel& w, int64_t K) { fail_bad_block(op, w, K); }
  // The gradient of the values writes each block's slots: they must not overlap (check_packed_values).
  static void check_value_slots(const char* op, const NbcrLevel& w) { check_packed_values(op, w); }
  // The SDDMM of the backward runs over block rows (a block's entries span its rows).
  static int64_t sddmm_units(const NbcrLevel& w) { return w.block_rows; }
  static int64_t sddmm_grain(bool) { return 1; }
};

}  // namespace nestsparse::cpu
