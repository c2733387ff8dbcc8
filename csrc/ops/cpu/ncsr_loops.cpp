#include "ops/cpu/ncsr_loops.h"

namespace nestsparse::cpu {

RowsView loop_view(const NcsrLevel& w, int64_t K, int64_t group_rows) {
  const bool i16 = w.col_idx.scalar_type() == at::kShort;
  return RowsView{w.row_start(),
                  w.row_stop(),
                  i16 ? nullptr : w.col_idx.const_data_ptr<int32_t>(),
                  i16 ? w.col_idx.const_data_ptr<int16_t>() : nullptr,
                  w.rows,
                  K,
                  group_rows};
}

template <typename T>
int64_t spmm_strided(const RowsView& w, const T* v, const T* B, int64_t ldb_k, int64_t ldb_j, int64_t ncols,
                     const T* bias, Act act, T* out, int64_t ors, int64_t ocs, int64_t r0, int64_t r1) {
  int64_t bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* Bg = B + (r / w.group_rows) * w.K * ldb_k;
    T* o = out + r * ors;
    const T b = bias ? bias[r] : T(0);
    for (int64_t j = 0; j < ncols; ++j) o[j * ocs] = T(0);
    bool ok = true;
    for (int64_t p = w.start[r]; p < w.stop[r]; ++p) {
      const int64_t c = w.col(p);
      if (c < 0 || c >= w.K) {
        ok = false;
        break;
      }
      const T* brow = Bg + c * ldb_k;
      for (int64_t j = 0; j < ncols; ++j) o[j * ocs] += v[p] * brow[j * ldb_j];
    }
    bad += !ok;
    for (int64_t j = 0; j < ncols; ++j) o[j * ocs] = activate<ExactMath>(act, o[j * ocs] + b);
  }
  return bad;
}

template <typename T>
int64_t spmm_transposed(const RowsView& w, const T* v, const T* A, int64_t lda, T* C, int64_t ldc, int64_t j0,
                        int64_t j1) {
  int64_t bad = 0;
  for (int64_t r = 0; r < w.M; ++r) {
    const T* a = A + r * lda;
    T* Cg = C + (r / w.group_rows) * w.K * ldc;
    for (int64_t p = w.start[r]; p < w.stop[r]; ++p) {
      const int64_t c = w.col(p);
      if (c < 0 || c >= w.K) {
        ++bad;
        break;
      }
      T* crow = Cg + c * ldc;
      const T vp = v[p];
      for (int64_t j = j0; j < j1; ++j) crow[j] += vp * a[j];
    }
  }
  return bad;
}

template <typename T>
int64_t sddmm(const RowsView& w, const T* A, int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b,
              int64_t ncols, int64_t nbatch, T* gv, int64_t r0, int64_t r1) {
  int64_t bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t g = r / w.group_rows;
    for (int64_t p = w.start[r]; p < w.stop[r]; ++p) {
      const int64_t c = w.col(p);
      if (c < 0 || c >= w.K) {
        ++bad;
        break;
      }
      T acc = T(0);
      for (int64_t b = 0; b < nbatch; ++b) {
        const T* a = A + b * stride_a + r * lda;
        const T* brow = B + b * stride_b + (g * w.K + c) * ldb;
        for (int64_t j = 0; j < ncols; ++j) acc += a[j] * brow[j];
      }
      gv[p] = acc;
    }
  }
  return bad;
}

#define NESTSPARSE_INSTANTIATE(T)                                                                                      \
  template int64_t spmm_strided<T>(const RowsView&, const T*, const T*, int64_t, int64_t, int64_t, const T*, Act, T*,  \
                                   int64_t, int64_t, int64_t, int64_t);                                                \
  template int64_t spmm_transposed<T>(const RowsView&, const T*, const T*, int64_t, T*, int64_t, int64_t, int64_t);    \
  template int64_t sddmm<T>(const RowsView&, const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, int64_t, \
                            T*, int64_t, int64_t);
NESTSPARSE_INSTANTIATE(float)
NESTSPARSE_INSTANTIATE(double)
#undef NESTSPARSE_INSTANTIATE

}  // namespace nestsparse::cpu
