// Nested CSR (NCSR): one CSR buffer holding every sparsity level of a matrix W of shape (M, K).
//
// Contract (the checks in formats/ncsr.cpp and NestedCSR.validate() in Python test this same list):
//   values  (nnz0,)  float32 | float16 | bfloat16 (float64 too, for gradient checks). nnz0 = non-zeros of
//                    level 0, the densest level.
//   col_idx (nnz0,)  int16 when K <= 32767, else int32. 0 <= col_idx < K, no column twice in a row.
//   row_ptr (M+1,)   int32. row_ptr[0] == 0, non-decreasing, row_ptr[M] == nnz0. Row r of level 0 is
//                    [row_ptr[r], row_ptr[r+1]).
//   row_end (L, M)   int32. Row r of level l is the slice [row_ptr[r], row_end[l, r]): each level is a prefix
//                    of the row at every denser level, because a row's entries are ordered sparsest level
//                    first (descending tag), then by column. So
//                    row_end[0, r] == row_ptr[r+1] and row_ptr[r] <= row_end[L-1, r] <= ... <= row_end[0, r].
//   An empty row (or a row empty at level l) has row_end[l, r] == row_ptr[r]; its output is act(bias).
//   A level with no entries at all is allowed. L >= 1. M >= 0, K >= 0.
//
// The kernels check per call what memory safety needs for the level used (O(M)): the row slices lie in
// [0, nnz0] and are ordered; and inside the loops, that every column index read is in [0, K). A column
// outside raises after the kernel, without any out-of-bounds read. On the CPU the row slices are read once,
// into a snapshot the check and the kernels share, and each column index is read once and used as checked: a
// buffer rewritten by another thread during a call gives a wrong result or an error, never a wild read. The full
// invariant list (nesting across all levels, sorted rows, duplicates) is NestedCSR.validate()'s job: it costs O(nnz)
// and runs once per weight.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace nestsparse {

// The arrays of one level of a nested CSR matrix, checked for the op named `op`.
struct NcsrLevel {
  at::Tensor values, col_idx, row_ptr, row_end;
  int64_t level = 0;
  int64_t num_levels = 0;
  int64_t rows = 0;  // M
  int64_t nnz = 0;   // non-zeros of `level` (set on CPU, where the rows are checked)
  // CPU: the level's checked row slices, (2, M) int32: starts, then stops. What the CPU kernels read.
  at::Tensor slices;
  const int32_t* row_start() const {
    return slices.defined() ? slices.const_data_ptr<int32_t>() : row_ptr.const_data_ptr<int32_t>();
  }
  const int32_t* row_stop() const {
    return slices.defined() ? slices.const_data_ptr<int32_t>() + rows
                            : row_end.const_data_ptr<int32_t>() + level * rows;
  }
};

// Checks dtypes, devices, shapes, contiguity, the level and (on CPU) the row slices of `level`.
NcsrLevel check_ncsr(const char* op, const at::Tensor& values, const at::Tensor& col_idx, const at::Tensor& row_ptr,
                     const at::Tensor& row_end, int64_t level, c10::Device device);

// The O(M) row checks of check_ncsr for one level: the slices lie in [0, nnz] and are ordered. Every entry is
// read once; with `snapshot` (2 * M entries) the checked starts and stops are copied there. Returns the level's
// non-zeros.
int64_t check_row_slices(const char* op, const int32_t* row_ptr, const int32_t* row_stop, int64_t M, int64_t level,
                         int64_t nnz, int32_t* snapshot = nullptr);

// Raises naming the first stored column index of `w` outside [0, K) (called once a kernel reported one).
[[noreturn]] void fail_column_out_of_range(const char* op, const NcsrLevel& w, int64_t K);

// The row boundaries of `w`'s level from a cached plan, or freshly computed when the plan is absent.
std::vector<int32_t> row_chunks(const char* op, const NcsrLevel& w, const std::optional<at::Tensor>& plan,
                                int64_t default_chunks);

}  // namespace nestsparse
