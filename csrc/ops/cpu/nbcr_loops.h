// Plain loops over one level of a nested BCR matrix, templated on the compute type (float or double), for
// float64 (gradient checks) and the backward passes; the float32 forward uses the micro-kernels in isa/.
// The same loops, names and arguments as ncsr_loops.h (overloaded on the view). Conventions as there: a row in group g
// = r / group_rows reads dense rows g*K + col. Every block is checked before use (counts, offsets, block column,
// indices); a bad block is skipped and counted.
#pragma once

#include <cstdint>

#include "formats/nbcr.h"
#include "ops/activation.h"
#include "ops/cpu/isa/kernel_api.h"

namespace nestsparse::cpu {

// The kernels' view of one level (kernel_api.h) for a matrix of K columns; the loops' view adds the groups.
SparseBlocks kernel_blocks(const NbcrLevel& w, int64_t K);

struct BlocksView : SparseBlocks {
  int64_t group_rows;
};

BlocksView loop_view(const NbcrLevel& w, int64_t K, int64_t group_rows);

// out[r*ors + j*ocs] = act(sum W[r, k] * B[(g*K + k)*ldb_k + j*ldb_j] + bias[r]) for the rows of block rows
// [br0, br1), j < ncols.
template <typename T>
int64_t spmm_strided(const BlocksView& w, const T* v, const T* B, int64_t ldb_k, int64_t ldb_j, int64_t ncols,
                     const T* bias, Act act, T* out, int64_t ors, int64_t ocs, int64_t br0, int64_t br1);

// C[(g*K + k), j] += W[r, k] * A[r, j] over the whole level, for columns [j0, j1).
template <typename T>
int64_t spmm_transposed(const BlocksView& w, const T* v, const T* A, int64_t lda, T* C, int64_t ldc, int64_t j0,
                        int64_t j1);

// gv[p] = sum_b sum_j A_b[r, j] * B_b[g*K + k, j] for the level's entries p = (r, k) of block rows [br0, br1).
template <typename T>
int64_t sddmm(const BlocksView& w, const T* A, int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b,
              int64_t ncols, int64_t nbatch, T* gv, int64_t br0, int64_t br1);

}  // namespace nestsparse::cpu
