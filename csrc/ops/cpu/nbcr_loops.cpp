#include "ops/cpu/nbcr_loops.h"

#include <algorithm>

#include "ops/cpu/common.h"

namespace nestsparse::cpu {
namespace {

// Calls f(row, col, p) for every entry of the level in block rows [br0, br1): W[row, col] = values[p].
// A block that breaks a bound is skipped (nothing of it is read) and counted.
template <typename F>
int64_t for_each_entry(const BlocksView& w, int64_t br0, int64_t br1, F&& f) {
  int64_t bad = 0;
  int16_t rows[kMaxBlockRows], cols[kMaxBlockCols];
  for (int64_t i = br0; i < br1; ++i) {
    const int64_t row_lim = std::min(w.bm, w.rows - i * w.bm);
    for (int64_t b = w.block_ptr[i]; b < w.block_ptr[i + 1]; ++b) {
      const int64_t j = w.blocks[3 * b], vo = w.blocks[3 * b + 1], io = w.blocks[3 * b + 2];
      const int64_t r = w.counts[2 * b], c = w.counts[2 * b + 1], r0 = w.counts0[2 * b], c0 = w.counts0[2 * b + 1];
      bool ok = j >= 0 && j < w.block_cols && r0 >= 0 && r0 <= w.bm && c0 >= 0 && c0 <= w.bk && r >= 0 && r <= r0 &&
                c >= 0 && c <= c0 && vo >= 0 && io >= 0 && vo + r0 * c0 <= w.num_values &&
                io + r0 + c0 <= w.num_indices;
      // The block's indices are copied, then checked and used: another thread may rewrite the array meanwhile.
      const int64_t col_lim = std::min(w.bk, w.cols - j * w.bk);
      for (int64_t a = 0; ok && a < r; ++a) rows[a] = w.indices[io + a], ok = rows[a] >= 0 && rows[a] < row_lim;
      for (int64_t q = 0; ok && q < c; ++q) cols[q] = w.indices[io + r0 + q], ok = cols[q] >= 0 && cols[q] < col_lim;
      if (!ok) {
        ++bad;
        continue;
      }
      for (int64_t a = 0; a < r; ++a) {
        for (int64_t q = 0; q < c; ++q) f(i * w.bm + rows[a], j * w.bk + cols[q], vo + a * c0 + q);
      }
    }
  }
  return bad;
}

}  // namespace

SparseBlocks kernel_blocks(const NbcrLevel& w, int64_t K) {
  return SparseBlocks{w.values.const_data_ptr(),
                      value_kind(w.values),
                      w.indices.const_data_ptr<int16_t>(),
                      w.ptr(),
                      w.meta(),
                      w.level_counts(),
                      w.base_counts(),
                      w.values.numel(),
                      w.indices.numel(),
                      w.rows,
                      K,
                      w.bm,
                      w.bk,
                      (K + w.bk - 1) / w.bk};
}

BlocksView loop_view(const NbcrLevel& w, int64_t K, int64_t group_rows) { return {kernel_blocks(w, K), group_rows}; }

template <typename T>
int64_t spmm_strided(const BlocksView& w, const T* v, const T* B, int64_t ldb_k, int64_t ldb_j, int64_t ncols,
                     const T* bias, Act act, T* out, int64_t ors, int64_t ocs, int64_t br0, int64_t br1) {
  const int64_t r_first = br0 * w.bm, r_last = std::min(w.rows, br1 * w.bm);
  for (int64_t r = r_first; r < r_last; ++r) {
    for (int64_t j = 0; j < ncols; ++j) out[r * ors + j * ocs] = T(0);
  }
  const int64_t bad = for_each_entry(w, br0, br1, [&](int64_t r, int64_t k, int64_t p) {
    const T* brow = B + ((r / w.group_rows) * w.cols + k) * ldb_k;
    T* o = out + r * ors;
    for (int64_t j = 0; j < ncols; ++j) o[j * ocs] += v[p] * brow[j * ldb_j];
  });
  for (int64_t r = r_first; r < r_last; ++r) {
    const T b = bias ? bias[r] : T(0);
    for (int64_t j = 0; j < ncols; ++j) out[r * ors + j * ocs] = activate<ExactMath>(act, out[r * ors + j * ocs] + b);
  }
  return bad;
}

template <typename T>
int64_t spmm_transposed(const BlocksView& w, const T* v, const T* A, int64_t lda, T* C, int64_t ldc, int64_t j0,
                        int64_t j1) {
  const int64_t MB = (w.rows + w.bm - 1) / w.bm;
  return for_each_entry(w, 0, MB, [&](int64_t r, int64_t k, int64_t p) {
    const T* a = A + r * lda;
    T* crow = C + ((r / w.group_rows) * w.cols + k) * ldc;
    for (int64_t j = j0; j < j1; ++j) crow[j] += v[p] * a[j];
  });
}

template <typename T>
int64_t sddmm(const BlocksView& w, const T* A, int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b,
              int64_t ncols, int64_t nbatch, T* gv, int64_t br0, int64_t br1) {
  return for_each_entry(w, br0, br1, [&](int64_t r, int64_t k, int64_t p) {
    T acc = T(0);
    for (int64_t n = 0; n < nbatch; ++n) {
      const T* a = A + n * stride_a + r * lda;
      const T* brow = B + n * stride_b + ((r / w.group_rows) * w.cols + k) * ldb;
      for (int64_t j = 0; j < ncols; ++j) acc += a[j] * brow[j];
    }
    gv[p] = acc;
  });
}

#define NESTSPARSE_INSTANTIATE(T)                                                                                     \
  template int64_t spmm_strided<T>(const BlocksView&, const T*, const T*, int64_t, int64_t, int64_t, const T*, Act,   \
                                   T*, int64_t, int64_t, int64_t, int64_t);                                           \
  template int64_t spmm_transposed<T>(const BlocksView&, const T*, const T*, int64_t, T*, int64_t, int64_t, int64_t); \
  template int64_t sddmm<T>(const BlocksView&, const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t,       \
                            int64_t, T*, int64_t, int64_t);
NESTSPARSE_INSTANTIATE(float)
NESTSPARSE_INSTANTIATE(double)
#undef NESTSPARSE_INSTANTIATE

}  // namespace nestsparse::cpu
