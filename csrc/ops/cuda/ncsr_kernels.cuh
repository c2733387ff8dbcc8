// The CUDA kernels of the nested CSR products (linear.cu, conv2d.cu), over one level of the matrix W (M, K): the
// level is a prefix of every row (formats/ncsr.h), so each kernel reads the slice [row_ptr[r], row_end[level, r])
// of the one buffer and nothing is re-packed per level.
//
//   spmv_kernel   linear, batch N <= 32 (bound by reading values and indices). A sub-warp of G lanes per row, G
//                 from the row's length at this level (the plan orders the rows by length and splits them into
//                 classes, so the lanes of a warp get equal work); 16-byte loads of values and indices on the
//                 aligned body of a row, scalar loads on its unaligned head and tail; NB accumulators per lane,
//                 one per batch row; x read as (K, N) so the N values an entry meets are adjacent.
//   spmm_kernel   linear at N > 32 and every convolution: a block computes one row x 128 output columns. The
//                 row's entries are staged in shared memory, 128 at a time (value, and where its column sits in the
//                 dense operand), and every thread reuses them against its own column: the dense reads of a warp
//                 are 32 adjacent elements. The dense operand (Operand) is x (K, N) for linear, or the NCHW input
//                 read through implicit im2col for a convolution (no column matrix: a tap outside the padded
//                 input reads zero).
//   spmm_kernel<Scatter>  the same schedule, backward: grad_x[col(c, j)] += v * grad_z[r, j], float32 (float64)
//                 atomics into an accumulation buffer (the col2im of a convolution is the same scatter).
//   sddmm_kernel  backward, grad_values[p] = sum_j grad_z[r, j] * B[col_p, j] for the level's entries: a warp
//                 per entry, lanes over the columns j.
// Memory safety does not rely on the caller (errors.h): row slices outside [0, nnz0] are empty rows, columns
// outside [0, K) and plan entries outside [0, M) are skipped; all are counted.
#pragma once

#include <ATen/AccumulateType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "ops/activation.h"
#include "ops/cuda/dense_operand.cuh"
#include "ops/cuda/errors.h"

namespace nestsparse::cuda {

constexpr int kMaxSmallBatch = 32;  // spmv_kernel's batches; larger ones go to spmm_kernel
constexpr int kSpmvThreads = 128;
constexpr int kSpmmThreads = 128;  // output columns per spmm block, and entries staged per round

// The CUDA plan (ncsr_plan on a CUDA tensor, plan.cu), int32 (L, kPlanHeader + M) on the device. Row l:
//   [0, kClasses]            tasks before class k (a task is one warp's rows); entry kClasses = the level's tasks
//   [kClasses+1, 2*kClasses+1]  first position of class k in the order; entry 2*kClasses+1 = M
//   [kPlanHeader, +M)        the rows, longest first (at this level)
// Class k runs G = 32 >> k lanes per row, so 1 << k rows per warp.
constexpr int kClasses = 4;
constexpr int kPlanHeader = 16;
static_assert(2 * kClasses + 2 <= kPlanHeader, "the plan header holds both tables");

// The lanes per row of a row of `len` entries at the level: about 8 entries per lane (one 16-byte fp16 load).
C10_HOST_DEVICE inline int row_class(int64_t len) { return len > 128 ? 0 : (len > 64 ? 1 : (len > 32 ? 2 : 3)); }

// One level of W on the device.
template <typename scalar_t, typename index_t>
struct Rows {
  const scalar_t* values;
  const index_t* cols;
  const int32_t* start;  // row_ptr
  const int32_t* stop;   // row_end[level]
  const int32_t* plan;   // the level's plan row, or null (rows in order, one warp each)
  int64_t M, K, nnz;
  bool aligned;  // values and cols allow 16-byte loads at entry multiples of vec_width
};

// The checked slice of row r ([b, e) empty if outside [0, nnz] or reversed; counted when `count`).
template <typename scalar_t, typename index_t>
__device__ __forceinline__ void row_slice(const Rows<scalar_t, index_t>& w, int64_t r, int64_t& b, int64_t& e,
                                          bool count, int* flags) {
  b = w.start[r];
  e = w.stop[r];
  if (b < 0 || e < b || e > w.nnz) {
    if (count) atomicAdd(&flags[kBadRow], 1);
    b = e = 0;
  }
}

__device__ __forceinline__ void report_bad_column(int64_t p, int* flags) {
  atomicAdd(&flags[kBadCol], 1);
  atomicCAS(&flags[kFirstBadEntry], 0, static_cast<int>(p < INT32_MAX - 1 ? p : INT32_MAX - 2) + 1);
}

// The row at position `pos` of the order (`order` null: position = row), or -1 if the plan names a row outside
// [0, M) (counted when `count`).
__device__ __forceinline__ int64_t ordered_row(const int32_t* order, int64_t pos, int64_t M, bool count, int* flags) {
  if (order == nullptr) return pos;
  const int64_t r = order[pos];
  if (r < 0 || r >= M) {
    if (count) atomicAdd(&flags[kBadPlan], 1);
    return -1;
  }
  return r;
}

template <int Bytes>
struct alignas(Bytes) Chunk {
  unsigned char b[Bytes];
};

// V consecutive elements from an address aligned to V * sizeof(T): one 16-byte load (two for 32 bytes).
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&out)[V]) {
  constexpr int kBytes = V * static_cast<int>(sizeof(T));
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16 || kBytes == 32, "a vector load of 4 to 32 bytes");
  const Chunk<kBytes> c = *reinterpret_cast<const Chunk<kBytes>*>(p);
  const T* t = reinterpret_cast<const T*>(c.b);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = t[i];
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v, int width = kWarp) {
  for (int off = width / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---- small batch ------------------------------------------------------------------------------------------------

// y (N, M) = act(scale * x W^T + bias + residual) for N <= NB, x given as xt (K, N). Warps stride over the plan's
// tasks (or over the rows, one per warp, without a plan); a task is 1 << k rows of class k, G = 32 >> k lanes each.
template <typename scalar_t, typename index_t, int NB>
__global__ void __launch_bounds__(kSpmvThreads)
    spmv_kernel(const Rows<scalar_t, index_t> w, const scalar_t* __restrict__ xt, const int64_t N,
                const Epilogue<scalar_t> ep, int* __restrict__ flags) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));  // values per 16-byte load
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int32_t* hdr = w.plan;
  const int32_t* order = hdr != nullptr ? hdr + kPlanHeader : nullptr;
  // A task count beyond M can only come from a damaged plan: never loop longer than one row per warp.
  const int64_t tasks = hdr != nullptr ? imin(hdr[kClasses] > 0 ? int64_t{hdr[kClasses]} : 0, w.M) : w.M;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; t < tasks;
       t += warps) {
    int k = 0;
    int64_t pos = t, end = w.M;
    if (hdr != nullptr) {
      // Lane 0 reads the header and the warp takes its values: the lanes agree on the class (the shuffle widths
      // below) even if the plan is rewritten during the call.
      int64_t first = 0;
      if (lane == 0) {
        while (k + 1 < kClasses && t >= hdr[k + 1]) ++k;
        first = hdr[kClasses + 1 + k] + (t - hdr[k]) * (int64_t(1) << k);
        end = imin(hdr[kClasses + 2 + k], w.M);
      }
      k = __shfl_sync(0xffffffffu, k, 0);
      first = __shfl_sync(0xffffffffu, first, 0);
      end = __shfl_sync(0xffffffffu, end, 0);
      pos = first + lane / (kWarp >> k);
    }
    const int G = kWarp >> k;  // uniform in the warp: a task is one warp
    const int sl = lane % G;
    const int64_t r = pos >= 0 && pos < end ? ordered_row(order, pos, w.M, sl == 0, flags) : -1;
    int64_t b = 0, e = 0;
    if (r >= 0) row_slice(w, r, b, e, sl == 0, flags);

    acc_t acc[NB];
#pragma unroll
    for (int n = 0; n < NB; ++n) acc[n] = acc_t(0);
    const auto use = [&](int64_t p, acc_t v, int64_t c) {
      if (c < 0 || c >= w.K) {
        report_bad_column(p, flags);
        return;  // never read x out of bounds
      }
      const scalar_t* xc = xt + c * N;
#pragma unroll
      for (int n = 0; n < NB; ++n) {
        if (NB == 1 || n < N) acc[n] += v * static_cast<acc_t>(xc[n]);
      }
    };
    // Unaligned head and tail one entry per lane, the aligned body V entries per lane and load.
    const int64_t body = w.aligned ? imin(e, (b + V - 1) / V * V) : e;
    const int64_t body_end = body + (e - body) / V * V;
    for (int64_t p = b + sl; p < body; p += G) use(p, static_cast<acc_t>(w.values[p]), w.cols[p]);
    for (int64_t p = body + static_cast<int64_t>(sl) * V; p < body_end; p += static_cast<int64_t>(G) * V) {
      scalar_t v[V];
      index_t c[V];
      load_vec<scalar_t, V>(w.values + p, v);
      load_vec<index_t, V>(w.cols + p, c);
#pragma unroll
      for (int i = 0; i < V; ++i) use(p + i, static_cast<acc_t>(v[i]), c[i]);
    }
    for (int64_t p = body_end + sl; p < e; p += G) use(p, static_cast<acc_t>(w.values[p]), w.cols[p]);

#pragma unroll
    for (int n = 0; n < NB; ++n) acc[n] = warp_sum(acc[n], G);
    // Every lane of the sub-warp holds the sums: lane n % G writes batch row n.
#pragma unroll
    for (int n = 0; n < NB; ++n) {
      if (r >= 0 && n < N && n % G == sl) ep.store(r, n * w.M + r, acc[n]);
    }
  }
}

// The row a block of spmm_kernel / its backward works on (grid.x walks the plan's order, longest rows first), and
// its checked slice; -1 if the plan names a bad row. Counted once per row (first column tile). Thread 0 reads them
// and the block shares its copy: a weight rewritten by another stream during the call cannot make the threads of a
// block disagree on the row, the barriers or the staged entries.
template <typename scalar_t, typename index_t>
__device__ __forceinline__ int64_t block_row(const Rows<scalar_t, index_t>& w, int64_t& b, int64_t& e, int* flags) {
  __shared__ int64_t shared[3];
  if (threadIdx.x == 0) {
    const bool count = blockIdx.y == 0;
    const int64_t r = ordered_row(w.plan != nullptr ? w.plan + kPlanHeader : nullptr, static_cast<int64_t>(blockIdx.x),
                                  w.M, count, flags);
    int64_t rb = 0, re = 0;
    if (r >= 0) row_slice(w, r, rb, re, count, flags);
    shared[0] = r, shared[1] = rb, shared[2] = re;
  }
  __syncthreads();
  b = shared[1];
  e = shared[2];
  return shared[0];
}

// Stages entries [p0, p0 + kSpmmThreads) of the row (those before e) in shared memory: value and Entry.
template <typename scalar_t, typename index_t, typename Operand, typename acc_t>
__device__ __forceinline__ void stage(const Rows<scalar_t, index_t>& w, const Operand& op, int64_t p0, int64_t e,
                                      bool count, acc_t* sv, typename Operand::Entry* se, int* flags) {
  const int64_t p = p0 + threadIdx.x;
  if (p >= e) return;
  const int64_t c = w.cols[p];
  if (c < 0 || c >= w.K) {
    if (count) report_bad_column(p, flags);
    sv[threadIdx.x] = acc_t(0);
    se[threadIdx.x] = Operand::skip();
  } else {
    sv[threadIdx.x] = static_cast<acc_t>(w.values[p]);
    se[threadIdx.x] = op.entry(c);
  }
}

// The schedule of spmm_kernel and its backward: one block per (row, 128 output columns; grid.y strides over the
// column tiles). The row's entries are staged 128 at a time; each thread calls body.begin(r, column, active) per
// tile, body.visit(v, index) for every staged entry that meets its column, and body.end(r, column) when active.
template <typename scalar_t, typename index_t, typename Operand, typename acc_t, typename Body>
__device__ __forceinline__ void staged_row(const Rows<scalar_t, index_t>& w, const Operand& op, Body& body,
                                           int* flags) {
  __shared__ acc_t sv[kSpmmThreads];
  __shared__ typename Operand::Entry se[kSpmmThreads];
  int64_t b, e;
  const int64_t r = block_row(w, b, e, flags);
  if (r < 0) return;  // the whole block: r is uniform
  const int64_t ncols = op.columns();
  for (int64_t j0 = static_cast<int64_t>(blockIdx.y) * kSpmmThreads; j0 < ncols;
       j0 += static_cast<int64_t>(gridDim.y) * kSpmmThreads) {
    const int64_t j = j0 + threadIdx.x;
    const bool active = j < ncols;
    const typename Operand::Column col = op.column(active ? j : j0, r);
    body.begin(r, col, active);
    for (int64_t p0 = b; p0 < e; p0 += kSpmmThreads) {
      stage(w, op, p0, e, j0 == 0, sv, se, flags);
      __syncthreads();
      const int cnt = static_cast<int>(imin(e - p0, kSpmmThreads));
      if (active) {
        for (int i = 0; i < cnt; ++i) {
          const int64_t idx = op.at(se[i], col);
          if (idx >= 0) body.visit(sv[i], idx);
        }
      }
      __syncthreads();
    }
    if (active) body.end(r, col);
  }
}

// Forward: y[out(column, r)] = epilogue(sum v * x[at(entry, column)]).
template <typename scalar_t, typename Operand, typename acc_t>
struct Accumulate {
  const Operand& op;
  const scalar_t* __restrict__ x;
  const Epilogue<scalar_t>& ep;
  acc_t acc;
  __device__ __forceinline__ void begin(int64_t, const typename Operand::Column&, bool) { acc = acc_t(0); }
  __device__ __forceinline__ void visit(acc_t v, int64_t idx) { acc += v * static_cast<acc_t>(x[idx]); }
  __device__ __forceinline__ void end(int64_t r, const typename Operand::Column& col) {
    ep.store(r, op.out(col, r), acc);
  }
};

template <typename scalar_t, typename index_t, typename Operand>
__global__ void __launch_bounds__(kSpmmThreads)
    spmm_kernel(const Rows<scalar_t, index_t> w, const Operand op, const scalar_t* __restrict__ x,
                const Epilogue<scalar_t> ep, int* __restrict__ flags) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  Accumulate<scalar_t, Operand, acc_t> body{op, x, ep, acc_t(0)};
  staged_row<scalar_t, index_t, Operand, acc_t>(w, op, body, flags);
}

// Backward to the input: gx[at(entry, column)] += v * gz[out(column, r)], atomics into an acc_t buffer.
template <typename scalar_t, typename Operand, typename acc_t>
struct Scatter {
  const Operand& op;
  const scalar_t* __restrict__ gz;
  acc_t* __restrict__ gx;
  acc_t g;
  __device__ __forceinline__ void begin(int64_t r, const typename Operand::Column& col, bool active) {
    g = active ? static_cast<acc_t>(gz[op.out(col, r)]) : acc_t(0);
  }
  __device__ __forceinline__ void visit(acc_t v, int64_t idx) { atomicAdd(gx + idx, v * g); }
  __device__ __forceinline__ void end(int64_t, const typename Operand::Column&) {}
};

template <typename scalar_t, typename index_t, typename Operand, typename acc_t>
__global__ void __launch_bounds__(kSpmmThreads)
    spmm_scatter_kernel(const Rows<scalar_t, index_t> w, const Operand op, const scalar_t* __restrict__ gz,
                        acc_t* __restrict__ gx, int* __restrict__ flags) {
  Scatter<scalar_t, Operand, acc_t> body{op, gz, gx, acc_t(0)};
  staged_row<scalar_t, index_t, Operand, acc_t>(w, op, body, flags);
}

// Backward to the values: gv[p] = sum_j gz[out(j, r)] * x[at(entry_p, j)] for the level's entries (the rest of gv
// is left as it is). A warp per entry, lanes over the columns.
template <typename scalar_t, typename index_t, typename Operand>
__global__ void __launch_bounds__(kSpmmThreads)
    sddmm_kernel(const Rows<scalar_t, index_t> w, const Operand op, const scalar_t* __restrict__ gz,
                 const scalar_t* __restrict__ x, scalar_t* __restrict__ gv, int* __restrict__ flags) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  constexpr int kWarps = kSpmmThreads / kWarp;
  int64_t b, e;
  const int64_t r = block_row(w, b, e, flags);
  if (r < 0) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t ncols = op.columns();
  for (int64_t p = b + threadIdx.x / kWarp; p < e; p += kWarps) {
    const int64_t c = __shfl_sync(0xffffffffu, static_cast<int>(w.cols[p]), 0);  // lane 0's read, for the warp
    if (c < 0 || c >= w.K) {
      if (lane == 0) report_bad_column(p, flags);
      continue;  // uniform in the warp
    }
    const typename Operand::Entry ent = op.entry(c);
    acc_t acc = acc_t(0);
    for (int64_t j = lane; j < ncols; j += kWarp) {
      const typename Operand::Column col = op.column(j, r);
      const int64_t idx = op.at(ent, col);
      if (idx >= 0) acc += static_cast<acc_t>(gz[op.out(col, r)]) * static_cast<acc_t>(x[idx]);
    }
    acc = warp_sum(acc);
    if (lane == 0) gv[p] = static_cast<scalar_t>(acc);
  }
}

}  // namespace nestsparse::cuda
