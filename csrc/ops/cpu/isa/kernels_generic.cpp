// Portable kernels for any x86-64 (and any other target): fixed-width blocks of plain floats that the
// compiler maps onto whatever vector unit the baseline flags allow.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

namespace nestsparse::cpu {
namespace generic {
namespace {

struct Simd {
  static constexpr int kAccRegs = 4;  // vector registers a micro-kernel may hold as accumulators
  static constexpr int W = 8;
  struct V {
    float f[8];
  };
  using Mask = int64_t;  // number of valid lanes
  static V zero() { return V{}; }
  static V bcast(float v) {
    V r;
    for (int i = 0; i < W; ++i) r.f[i] = v;
    return r;
  }
  static V load(const float* p) {
    V r;
    for (int i = 0; i < W; ++i) r.f[i] = p[i];
    return r;
  }
  static V load_masked(const float* p, Mask n) {
    V r{};
    for (int i = 0; i < W && i < n; ++i) r.f[i] = p[i];
    return r;
  }
  static V fma(V a, V b, V c) {
    for (int i = 0; i < W; ++i) c.f[i] += a.f[i] * b.f[i];
    return c;
  }
  static V add(V a, V b) {
    for (int i = 0; i < W; ++i) a.f[i] += b.f[i];
    return a;
  }
  static V max(V a, V b) {
    for (int i = 0; i < W; ++i) a.f[i] = a.f[i] > b.f[i] ? a.f[i] : b.f[i];
    return a;
  }
  static V min(V a, V b) {
    for (int i = 0; i < W; ++i) a.f[i] = a.f[i] < b.f[i] ? a.f[i] : b.f[i];
    return a;
  }
  static void store(float* p, V v) {
    for (int i = 0; i < W; ++i) p[i] = v.f[i];
  }
  static float reduce(V v) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += v.f[i];
    return s;
  }
  static constexpr int kReduceRows = 4;
  static void reduce_rows(const V* d, float* out) {
    for (int i = 0; i < kReduceRows; ++i) out[i] = reduce(d[i]);
  }
  static Mask tail_mask(int64_t n) { return n; }
};

// IEEE half to float without F16C.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#include "kernels_impl.inc"
#include "kernels_nbcr.inc"

template <typename VT, typename IT, int NB>
static int64_t spmv_rows(const SparseRows& w, const Epilogue& ep, const SpmvBatch& s, int64_t r0, int64_t r1) {
  return spmv_rows_scalar<VT, IT, NB>(w, ep, s, r0, r1);
}

}  // namespace
}  // namespace generic

const KernelTable* generic_kernels() { return generic::make_table("generic"); }

}  // namespace nestsparse::cpu
