// What the CUDA kernels of both formats share: the epilogue every product ends with, and the dense operand of the
// staged kernels (ncsr_kernels.cuh, nbcr_kernels.cuh): x of a linear layer read as (K, N), or the NCHW input of a
// convolution read through implicit im2col.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "ops/activation.h"

namespace nestsparse::cuda {

constexpr int kWarp = 32;

// The epilogue every product shares: y[o] = act(scale[r] * z + bias[r] + residual[o]).
template <typename scalar_t>
struct Epilogue {
  const scalar_t* bias;
  const scalar_t* scale;
  const scalar_t* residual;
  scalar_t* y;
  Act act;
  template <typename acc_t>
  __device__ __forceinline__ void store(int64_t r, int64_t o, acc_t z) const {
    if (scale != nullptr) z *= static_cast<acc_t>(scale[r]);
    if (bias != nullptr) z += static_cast<acc_t>(bias[r]);
    if (residual != nullptr) z += static_cast<acc_t>(residual[o]);
    y[o] = static_cast<scalar_t>(activate<DeviceMath>(act, z));
  }
};

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- the dense operand ------------------------------------------------------------------------------------------
// An Operand maps a weight column c to an Entry (staged once per entry), an output column j of row r to a Column
// (once per thread), and (Entry, Column) to the index of the dense element they meet (or -1: a padding tap, or a
// skipped entry). out(Column, r) is the index of the output element.

// Linear: the dense operand is xt (K, N); output element (n, r) at n * out_n + r * out_r.
struct LinearOperand {
  // at() steps by one along n, and so does out() when out_n == 1: the tile kernels may load 16 bytes of n at once.
  static constexpr bool kContiguous = true;
  int64_t N, out_n, out_r;
  struct Entry {
    int64_t off;
  };
  struct Column {
    int64_t n;
  };
  __device__ __forceinline__ int64_t columns() const { return N; }
  __device__ __forceinline__ Entry entry(int64_t c) const { return {c * N}; }
  __device__ __forceinline__ static Entry skip() { return {-1}; }
  __device__ __forceinline__ Column column(int64_t j, int64_t) const { return {j}; }
  __device__ __forceinline__ int64_t at(const Entry& e, const Column& c) const { return e.off < 0 ? -1 : e.off + c.n; }
  __device__ __forceinline__ int64_t out(const Column& c, int64_t r) const { return c.n * out_n + r * out_r; }
};

// Convolution by implicit im2col: the dense operand is x (Nb, Cin, H, W); weight column c = (cin, a, b) of row r
// (group g = r / group_rows) meets x[n, g * Cg + cin, oh * sh - ph + a * dh, ow * sw - pw + b * dw] at output
// column j = (n, oh, ow), zero outside the input. The output is (Nb, M, OH, OW).
struct ConvOperand {
  static constexpr bool kContiguous = false;
  int64_t P, M, OHW, OW, CinHW, CgHW, H, W, group_rows, khw, kw, dh, dw, sh, sw, ph, pw;
  struct Entry {
    int64_t off, dy, dx;
  };
  struct Column {
    int64_t base, out, ih0, iw0;
  };
  __device__ __forceinline__ int64_t columns() const { return P; }
  __device__ __forceinline__ Entry entry(int64_t c) const {
    const int64_t cin = c / khw, tap = c - cin * khw, a = tap / kw, b = tap - a * kw;
    return {cin * H * W, a * dh, b * dw};
  }
  __device__ __forceinline__ static Entry skip() { return {-1, 0, 0}; }
  __device__ __forceinline__ Column column(int64_t j, int64_t r) const {
    const int64_t n = j / OHW, pix = j - n * OHW, oh = pix / OW, ow = pix - oh * OW;
    return {n * CinHW + (r / group_rows) * CgHW, n * M * OHW + pix, oh * sh - ph, ow * sw - pw};
  }
  __device__ __forceinline__ int64_t at(const Entry& e, const Column& c) const {
    const int64_t ih = c.ih0 + e.dy, iw = c.iw0 + e.dx;
    if (e.off < 0 || ih < 0 || ih >= H || iw < 0 || iw >= W) return -1;
    return c.base + e.off + ih * W + iw;
  }
  __device__ __forceinline__ int64_t out(const Column& c, int64_t r) const { return c.out + r * OHW; }
};

}  // namespace nestsparse::cuda
