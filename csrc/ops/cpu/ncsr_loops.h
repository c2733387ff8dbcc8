// Plain (not ISA-specific) loops over one level of a nested CSR matrix, templated on the compute type
// (float or double). They serve float64 (gradient checks) and the backward passes; the float32 forward
// products use the vectorised kernels in isa/. nbcr_loops.h has the same loops, same names and arguments, over
// nested BCR, so the glue (linear.cpp, conv2d.cpp) is written once for both.
//
// Column index `col` of a row in group g = r / group_rows addresses row g * K + col of the dense operand:
// the weight of a grouped convolution only sees its group's input channels. Every loop checks col against K
// before any read and returns how many out-of-range columns it met.
#pragma once

#include <cstdint>

#include "formats/ncsr.h"
#include "ops/activation.h"

namespace nestsparse::cpu {

struct RowsView {
  const int32_t* start;
  const int32_t* stop;
  const int32_t* cols32;  // exactly one of cols32 / cols16 is set
  const int16_t* cols16;
  int64_t M, K;
  int64_t group_rows;
  int64_t col(int64_t p) const { return cols16 ? cols16[p] : cols32[p]; }
};

RowsView loop_view(const NcsrLevel& w, int64_t K, int64_t group_rows);

// out[r*ors + j*ocs] = act(sum_p v[p] * B[(g*K + col_p)*ldb_k + j*ldb_j] + bias[r]), rows [r0, r1), j < ncols.
template <typename T>
int64_t spmm_strided(const RowsView& w, const T* v, const T* B, int64_t ldb_k, int64_t ldb_j, int64_t ncols,
                     const T* bias, Act act, T* out, int64_t ors, int64_t ocs, int64_t r0, int64_t r1);

// C[(g*K + col_p), j] += v[p] * A[r, j] over all rows, for columns [j0, j1). A has row stride lda, C ldc.
template <typename T>
int64_t spmm_transposed(const RowsView& w, const T* v, const T* A, int64_t lda, T* C, int64_t ldc, int64_t j0,
                        int64_t j1);

// gv[p] = sum_b sum_j A_b[r, j] * B_b[g*K + col_p, j] for the level's entries of rows [r0, r1) (the rest of gv
// is left as it is). A_b = A + b*stride_a with row stride lda, likewise B.
template <typename T>
int64_t sddmm(const RowsView& w, const T* A, int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b,
              int64_t ncols, int64_t nbatch, T* gv, int64_t r0, int64_t r1);

}  // namespace nestsparse::cpu
