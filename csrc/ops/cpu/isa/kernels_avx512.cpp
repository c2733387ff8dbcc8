// AVX-512 kernels (F, BW, VL, DQ). Built with -mavx512*; only reached when the processor has them.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernel_api.h"

namespace nestsparse::cpu {
namespace avx512 {
namespace {

struct Simd {
  static constexpr int kAccRegs = 24;  // vector registers a micro-kernel may hold as accumulators
  static constexpr int W = 16;
  using V = __m512;
  using Mask = __mmask16;
  static V zero() { return _mm512_setzero_ps(); }
  static V bcast(float v) { return _mm512_set1_ps(v); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_masked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static float reduce(V v) { return _mm512_reduce_add_ps(v); }
  // out[i] = sum of the lanes of d[i], i < 16: a transpose-add tree (unpack ps, unpack pd, two 128-bit
  // shuffles), 45 operations for all 16 instead of about 8 per vector.
  static constexpr int kReduceRows = 16;
  static void reduce_rows(const V* d, float* out) {
    V w[8], z[4];
    for (int i = 0; i < 8; ++i) {
      w[i] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_ps(d[2 * i], d[2 * i + 1]));
    }
    for (int i = 0; i < 4; ++i) {  // lane group g of z[i] holds partial sums of rows 4i .. 4i+3
      const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
      z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const V p0 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
    const V p1 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88), _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(p0, p1, 0x88), _mm512_shuffle_f32x4(p0, p1, 0xDD)));
  }
  static Mask tail_mask(int64_t n) { return n >= 16 ? Mask(0xFFFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1u); }
};

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

#include "kernels_impl.inc"
#include "kernels_nbcr.inc"

inline __m512i load_cols(const int16_t* p, __mmask16 m) {
  return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512i load_cols(const int32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }
inline __m512 load_vals(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_vals(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 load_vals(const f16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// Sixteen non-zeros at a time: load their columns, check them against K with an unsigned compare (a negative
// index is huge unsigned), gather x at the valid lanes only, FMA. The weight row is read once for NB inputs.
template <typename VT, typename IT, int NB>
static int64_t spmv_rows(const SparseRows& w, const Epilogue& ep, const SpmvBatch& s, int64_t r0, int64_t r1) {
  const VT* vals = static_cast<const VT*>(w.values);
  const IT* cols = static_cast<const IT*>(w.col_idx);
  const __m512i kvec = _mm512_set1_epi32(w.cols > 0x7fffffff ? 0x7fffffff : static_cast<int32_t>(w.cols));
  int64_t bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    const int64_t e = w.row_stop[r];
    bool ok = true;
    for (int64_t p = w.row_start[r]; p < e; p += 16) {
      __builtin_prefetch(vals + p + kPrefetchEntries);
      __builtin_prefetch(cols + p + kPrefetchEntries);
      const __mmask16 m = Simd::tail_mask(e - p);
      const __m512i idx = load_cols(cols + p, m);
      const __mmask16 in = _mm512_mask_cmplt_epu32_mask(m, idx, kvec);
      if (__builtin_expect(in != m, 0)) {
        ok = false;
        break;
      }
      const __m512 v = load_vals(vals + p, m);
      for (int b = 0; b < NB; ++b) {
        const __m512 xg = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, idx, s.x + b * s.ldx, 4);
        acc[b] = _mm512_fmadd_ps(v, xg, acc[b]);
      }
    }
    if (!ok) {
      ++bad;
      continue;
    }
    const float scale = row_scale(ep, r), bias = row_bias(ep, r);
    for (int b = 0; b < NB; ++b) {
      float* dst = s.out + b * s.ldo + r;
      *dst = finish(ep, _mm512_reduce_add_ps(acc[b]) * scale + bias, dst);
    }
  }
  return bad;
}

}  // namespace
}  // namespace avx512

const KernelTable* avx512_kernels() { return avx512::make_table("avx512"); }

}  // namespace nestsparse::cpu
