// AVX2 + FMA + F16C kernels. Built with -mavx2 -mfma -mf16c; only reached when the processor has them.
#include <immintrin.h>

#include <cstdint>

#include "kernel_api.h"

namespace nestsparse::cpu {
namespace avx2 {
namespace {

struct Simd {
  static constexpr int W = 8;
  using V = __m256;
  using Mask = __m256i;
  static V zero() { return _mm256_setzero_ps(); }
  static V bcast(float v) { return _mm256_set1_ps(v); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  // maskload touches no memory in the masked-off lanes, so a narrow last tile never reads past its end.
  static V load_masked(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static Mask tail_mask(int64_t n) {
    const int32_t k = n >= 8 ? 8 : n <= 0 ? 0 : static_cast<int32_t>(n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

#include "kernels_impl.inc"

inline __m256i load_cols(const int16_t* p) { return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256i load_cols(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256 load_vals(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_vals(const bf16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m256 load_vals(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}


// Eight non-zeros at a time with a checked gather, the row's last < 8 entries one by one.
template <typename VT, typename IT, int NB>
static int64_t spmv_rows(const SparseRows& w, const Epilogue& ep, const SpmvBatch& s, int64_t r0, int64_t r1) {
  const VT* vals = static_cast<const VT*>(w.values);
  const IT* cols = static_cast<const IT*>(w.col_idx);
  const int64_t K = w.cols;
  const __m256i kvec = _mm256_set1_epi32(K > 0x7fffffff ? 0x7fffffff : static_cast<int32_t>(K));
  const __m256i minus1 = _mm256_set1_epi32(-1);
  int64_t bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[NB];
    float tail[NB];
    for (int b = 0; b < NB; ++b) {
      acc[b] = _mm256_setzero_ps();
      tail[b] = 0.f;
    }
    int64_t p = w.row_start[r];
    const int64_t e = w.row_stop[r];
    bool ok = true;
    for (; p + 8 <= e; p += 8) {
      const __m256i idx = load_cols(cols + p);
      const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(idx, minus1), _mm256_cmpgt_epi32(kvec, idx));
      if (__builtin_expect(_mm256_movemask_epi8(in) != -1, 0)) {
        ok = false;
        break;
      }
      const __m256 v = load_vals(vals + p);
      for (int b = 0; b < NB; ++b) acc[b] = _mm256_fmadd_ps(v, _mm256_i32gather_ps(s.x + b * s.ldx, idx, 4), acc[b]);
    }
    for (; ok && p < e; ++p) {
      const int64_t c = cols[p];
      if (c < 0 || c >= K) {
        ok = false;
        break;
      }
      const float v = to_float(vals[p]);
      for (int b = 0; b < NB; ++b) tail[b] += v * s.x[b * s.ldx + c];
    }
    if (!ok) {
      ++bad;
      continue;
    }
    const float bias = ep.bias ? ep.bias[r] : 0.f;
    for (int b = 0; b < NB; ++b) s.out[b * s.ldo + r] = activate(hsum(acc[b]) + tail[b] + bias, ep.act);
  }
  return bad;
}

}  // namespace
}  // namespace avx2

const KernelTable* avx2_kernels() { return avx2::make_table("avx2"); }

}  // namespace nestsparse::cpu
