// Portable kernels for any x86-64 (and any other target): fixed-width blocks of plain floats that the
// compiler maps onto whatever vector unit the baseline flags allow.
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

namespace nestsparse::cpu {
namespace generic {
namespace {

struct Simd {
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


template <typename VT, typename IT, int NB>
static int64_t spmv_rows(const SparseRows& w, const Epilogue& ep, const SpmvBatch& s, int64_t r0, int64_t r1) {
  const VT* vals = static_cast<const VT*>(w.values);
  const IT* cols = static_cast<const IT*>(w.col_idx);
  const uint64_t K = static_cast<uint64_t>(w.cols);
  constexpr int U = NB == 1 ? 8 : (NB == 2 ? 4 : 2);  // independent partial sums per input row
  int64_t bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    float acc[NB][U] = {};
    bool ok = true;
    int64_t p = w.row_start[r];
    const int64_t e = w.row_stop[r];
    for (; p + U <= e; p += U) {
      uint64_t c[U];
      float v[U];
      bool in = true;
      for (int u = 0; u < U; ++u) {
        c[u] = static_cast<uint64_t>(static_cast<int64_t>(cols[p + u]));
        v[u] = to_float(vals[p + u]);
        in &= c[u] < K;
      }
      if (__builtin_expect(!in, 0)) {
        ok = false;
        break;
      }
      for (int b = 0; b < NB; ++b) {
        const float* xb = s.x + b * s.ldx;
        for (int u = 0; u < U; ++u) acc[b][u] += v[u] * xb[c[u]];
      }
    }
    for (; ok && p < e; ++p) {
      const uint64_t c = static_cast<uint64_t>(static_cast<int64_t>(cols[p]));
      if (c >= K) {
        ok = false;
        break;
      }
      const float v = to_float(vals[p]);
      for (int b = 0; b < NB; ++b) acc[b][0] += v * s.x[b * s.ldx + c];
    }
    if (!ok) {
      ++bad;
      continue;
    }
    const float bias = ep.bias ? ep.bias[r] : 0.f;
    for (int b = 0; b < NB; ++b) {
      float sum = 0.f;
      for (int u = 0; u < U; ++u) sum += acc[b][u];
      s.out[b * s.ldo + r] = activate(sum + bias, ep.act);
    }
  }
  return bad;
}

}  // namespace
}  // namespace generic

const KernelTable* generic_kernels() { return generic::make_table("generic"); }

}  // namespace nestsparse::cpu
