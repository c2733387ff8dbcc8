// AVX2 + FMA + F16C kernels. Built with -mavx2 -mfma -mf16c; only reached when the processor has them.
// The small-batch kernel is the shared scalar one: an AVX2 gather loop measured slower.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernel_api.h"

namespace nestsparse::cpu {
namespace avx2 {
namespace {

struct Simd {
  static constexpr int kAccRegs = 8;  // vector registers a micro-kernel may hold as accumulators
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
  static float reduce(V v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
  // out[i] = sum of the lanes of d[i], i < 8, with a horizontal-add tree.
  static constexpr int kReduceRows = 8;
  static void reduce_rows(const V* d, float* out) {
    const V h0 = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
    const V h1 = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31)));
  }
  static Mask tail_mask(int64_t n) {
    const int32_t k = n >= 8 ? 8 : n <= 0 ? 0 : static_cast<int32_t>(n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

#include "kernels_impl.inc"
#include "kernels_nbcr.inc"

template <typename VT, typename IT, int NB>
static int64_t spmv_rows(const SparseRows& w, const Epilogue& ep, const SpmvBatch& s, int64_t r0, int64_t r1) {
  return spmv_rows_scalar<VT, IT, NB>(w, ep, s, r0, r1);
}

}  // namespace
}  // namespace avx2

const KernelTable* avx2_kernels() { return avx2::make_table("avx2"); }

}  // namespace nestsparse::cpu
