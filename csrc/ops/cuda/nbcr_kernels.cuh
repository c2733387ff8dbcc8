// The CUDA kernels of the nested BCR products (linear.cu, conv2d.cu) over one level of W (M, K) in blocks of
// (bm, bk): what a level keeps of a block is the dense r_l x c_l top-left corner of its level-0 sub-block
// (formats/nbcr.h), read in place, so nothing is re-packed per level.
//
//   tile_kernel<kT = false>  the product y (P, M) = act(scale * X W^T + bias + residual), X the dense operand
//                 (x (K, N) of a linear layer, or a convolution's input through implicit im2col: P output pixels).
//                 A block of 128 threads computes a tile of TN = 128 columns p of X by TM rows of W (TM = 32 for
//                 blocks of up to 32 rows, else 64: one block row, or a TM-slice of one). It walks the block row's
//                 stored blocks in pieces of up to 32: reads their counts, offsets and kept rows and columns once
//                 into shared memory (checked), and lays the pieces' kept columns back to back as reduction slots.
//                 Then, per chunk of KC slots: the KC gathered columns of X (TN x KC: the "sparse load") and the
//                 weight expanded to the tile's rows (KC x TM, zero in the rows a slot's block does not keep) are
//                 staged and multiplied as dense tiles: on tensor cores (wmma 16x16x16, float32 accumulation) for
//                 float16 and bfloat16 on sm_80 and newer, on CUDA cores (one p per thread, TM accumulators) for
//                 float32 and float64. A chunk spans several small blocks, so no multiply runs on padding between
//                 blocks; the accumulators stay in registers across the block row and the epilogue writes each
//                 output once. The cost: a level that keeps r of a block's bm rows runs the tile's TM rows for
//                 each slot, TM / r times the multiply-adds it needs (the benchmark reports the rate on the FLOPs
//                 the level needs).
//   tile_kernel<kT = true>   the input gradient G_X (P, K) = G_Z W, the same kernel over W^T: a tile of 128 p by a
//                 TM-slice of one block column, the blocks of that column taken through a block-column list
//                 (column_lists in nbcr_launch.cuh, per call, no host sync), the reduction over each block's kept
//                 rows. Every element of G_X is owned by one thread, so a linear layer's gradient is a plain store;
//                 a convolution's is added with atomics (the col2im of overlapping taps).
//   block_sddmm_kernel  the values' gradient, G_b[a, q] = sum_p G_Z[p, row a] X[p, column q] over each block's kept
//                 sub-block: a block of threads per stored block, tiles of p staged in shared memory, CUDA cores.
//
// Memory safety does not rely on the caller (errors.h): thread 0 reads a block's counts, offsets and block column
// and checks them, the block's local rows and columns are read once into shared memory and checked there (the
// copies are what the threads use, so a buffer rewritten during the call cannot make them disagree), and a block that
// breaks a bound is skipped and counted, as is a block range outside [0, B] and a plan entry outside [0, MB).
#pragma once

#include <ATen/AccumulateType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "formats/nbcr.h"
#include "ops/cuda/dense_operand.cuh"
#include "ops/cuda/errors.h"

namespace nestsparse::cuda {

constexpr int kTileThreads = 128;  // threads of tile_kernel, and TN: the p columns of a tile
constexpr int kTileWarps = kTileThreads / kWarp;
constexpr int kMaxTileRows = 64;  // TM: 32 for blocks of up to 32 (the default 32x32), 64 above
constexpr int kBlockDim = static_cast<int>(kMaxBlockDim);

// One level of a nested BCR matrix on the device (the arrays of formats/nbcr.h).
template <typename scalar_t>
struct Blocks {
  const scalar_t* values;
  const int16_t* indices;
  const int32_t* block_ptr;  // (MB + 1,)
  const int32_t* meta;       // blocks (B, 3): block column, value offset, index offset
  const int32_t* counts;     // counts[level] (B, 2)
  const int32_t* counts0;    // counts[0] (B, 2)
  const int32_t* plan;       // the level's row of nbcr_plan on CUDA (MB block rows, most work first), or null
  int64_t V, I, M, K, bm, bk, MB, KB, B;
};

// The blocks of each block column (tile_kernel<kT = true>): order (B,) the stored blocks sorted by block column,
// col_ptr (KB + 1,) where each column's run starts in order, block_row (B,) each block's block row.
struct ColumnLists {
  const int32_t* order;
  const int32_t* col_ptr;
  const int32_t* block_row;
};

// What thread 0 read of one block, checked, for the whole thread block.
struct BlockInfo {
  int64_t i, j, vo, io;
  int r, c, r0, c0;
  bool ok;
};

// Thread 0: block b of block row i (-1: unknown, taken from `lists` when given) read and checked against the
// contract's bounds; the caller shares it through shared memory. `want_j` >= 0 requires that block column.
template <typename scalar_t>
__device__ __forceinline__ BlockInfo read_block(const Blocks<scalar_t>& w, int64_t b, int64_t i, int64_t want_j) {
  BlockInfo s{};
  s.ok = false;
  if (b < 0 || b >= w.B || i < 0 || i >= w.MB) return s;
  s.i = i;
  s.j = w.meta[3 * b];
  s.vo = w.meta[3 * b + 1];
  s.io = w.meta[3 * b + 2];
  s.r = w.counts[2 * b];
  s.c = w.counts[2 * b + 1];
  s.r0 = w.counts0[2 * b];
  s.c0 = w.counts0[2 * b + 1];
  s.ok = s.j >= 0 && s.j < w.KB && (want_j < 0 || s.j == want_j) && s.r0 >= 0 && s.r0 <= w.bm && s.c0 >= 0 &&
         s.c0 <= w.bk && s.r >= 0 && s.r <= s.r0 && s.c >= 0 && s.c <= s.c0 && s.vo >= 0 && s.io >= 0 &&
         s.vo + int64_t{s.r0} * s.c0 <= w.V && s.io + s.r0 + s.c0 <= w.I;
  return s;
}

// Every thread: reads local row a (< r) or column q (< c) of the block into `rows` / `cols` (global row and column
// numbers), checking each against its block and the matrix. Returns whether this thread found a bad one.
template <typename scalar_t>
__device__ __forceinline__ bool read_lists(const Blocks<scalar_t>& w, const BlockInfo& s, int32_t* rows,
                                           int32_t* cols) {
  bool bad = false;
  const int64_t row_lim = imin(w.bm, w.M - s.i * w.bm), col_lim = imin(w.bk, w.K - s.j * w.bk);
  for (int t = threadIdx.x; t < s.r + s.c; t += blockDim.x) {
    if (t < s.r) {
      const int64_t a = w.indices[s.io + t];
      bad |= a < 0 || a >= row_lim;
      rows[t] = static_cast<int32_t>(s.i * w.bm + a);
    } else {
      const int64_t q = w.indices[s.io + s.r0 + (t - s.r)];
      bad |= q < 0 || q >= col_lim;
      cols[t - s.r] = static_cast<int32_t>(s.j * w.bk + q);
    }
  }
  return bad;
}

// ---- the tile products -----------------------------------------------------------------------------------------

template <typename T>
struct MmaType {
  using type = void;
};
template <>
struct MmaType<c10::Half> {
  using type = __half;
};
template <>
struct MmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Whether the tile product runs on tensor cores: float16 and bfloat16, in the device code for sm_80 and newer (the
// device code for an older architecture runs the CUDA-core product in MmaTile's place).
template <typename scalar_t>
constexpr bool uses_tensor_cores() {
  return !std::is_void_v<typename MmaType<scalar_t>::type>;
}

// The reduction chunk: two 16-deep mma steps for 16-bit types; 16 for float32 / float64 (shared memory stays under
// 48 KB).
template <typename scalar_t>
constexpr int chunk_depth() {
  return sizeof(scalar_t) == 2 ? 32 : 16;
}

constexpr int kPad = 8;  // elements after each staged row: keeps ldm a multiple of 16 bytes, spreads the banks

// The staged operands of one chunk: xs[u][p] the dense operand (KC x TN: column p of the tile, reduction index u),
// ws[u][m] the weight expanded to the tile's TM rows (KC x TM).
template <typename scalar_t, int TM>
struct Staged {
  static constexpr int KC = chunk_depth<scalar_t>();
  alignas(32) scalar_t xs[KC][kTileThreads + kPad];
  alignas(32) scalar_t ws[KC][TM + kPad];
};

// The CUDA-core product: thread p accumulates its column's TM outputs.
template <typename scalar_t, int TM>
struct ScalarTile {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  acc_t acc[TM];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int m = 0; m < TM; ++m) acc[m] = acc_t(0);
  }
  // Reduction slots [0, valid) of the chunk (the rest are zero).
  __device__ __forceinline__ void multiply(const Staged<scalar_t, TM>& s, int valid) {
#pragma unroll 4
    for (int u = 0; u < valid; ++u) {
      const acc_t x = static_cast<acc_t>(s.xs[u][threadIdx.x]);
#pragma unroll
      for (int m = 0; m < TM; ++m) acc[m] += x * static_cast<acc_t>(s.ws[u][m]);  // ws: a broadcast read
    }
  }
  // The finished accumulators to this warp's [m][32 p] block of shared memory.
  __device__ __forceinline__ void flush(acc_t* out) const {
#pragma unroll
    for (int m = 0; m < TM; ++m) out[m * kWarp + threadIdx.x % kWarp] = acc[m];
  }
};

// The tensor-core product: warp w holds p rows [32w, 32w + 32) of the tile, as 2 x TM/16 accumulator fragments.
template <typename scalar_t, int TM>
struct MmaTile {
  using mma_t = typename MmaType<scalar_t>::type;
  using acc_t = float;
  static constexpr int kFm = 2, kFn = TM / 16;
  static_assert(kFm * 16 == kWarp, "a warp covers 32 p: the p of its own threads");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[kFm][kFn];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int f = 0; f < kFm; ++f) {
#pragma unroll
      for (int n = 0; n < kFn; ++n) nvcuda::wmma::fill_fragment(acc[f][n], 0.0f);
    }
  }
  // The 16-deep steps that hold slots [0, valid) (the rest of the chunk is zero): `valid` is uniform in the block.
  __device__ __forceinline__ void multiply(const Staged<scalar_t, TM>& s, int valid) {
    namespace wmma = nvcuda::wmma;
    const int p0 = (threadIdx.x / kWarp) * kFm * 16;
#pragma unroll
    for (int u = 0; u < Staged<scalar_t, TM>::KC; u += 16) {
      if (u >= valid) break;
      // A (16 p x 16 u) is xs read column-major, B (16 u x 16 m) is ws read row-major.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::col_major> a[kFm];
#pragma unroll
      for (int f = 0; f < kFm; ++f) {
        wmma::load_matrix_sync(a[f], reinterpret_cast<const mma_t*>(&s.xs[u][p0 + 16 * f]), kTileThreads + kPad);
      }
#pragma unroll
      for (int n = 0; n < kFn; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, reinterpret_cast<const mma_t*>(&s.ws[u][16 * n]), TM + kPad);
#pragma unroll
        for (int f = 0; f < kFm; ++f) wmma::mma_sync(acc[f][n], a[f], bf, acc[f][n]);
      }
    }
  }
  // The finished fragments to this warp's [m][32 p] block of shared memory (fragment (f, n) holds p rows 16f.. and m
  // columns 16n..).
  __device__ __forceinline__ void flush(float* out) const {
#pragma unroll
    for (int f = 0; f < kFm; ++f) {
#pragma unroll
      for (int n = 0; n < kFn; ++n) {
        nvcuda::wmma::store_matrix_sync(out + 16 * n * kWarp + 16 * f, acc[f][n], kWarp, nvcuda::wmma::mem_col_major);
      }
    }
  }
#else
  // An architecture without bfloat16 mma (a build for sm_70 / sm_75): the CUDA-core product, same interface.
  ScalarTile<scalar_t, TM> scalar;
  __device__ __forceinline__ void zero() { scalar.zero(); }
  __device__ __forceinline__ void multiply(const Staged<scalar_t, TM>& s, int valid) { scalar.multiply(s, valid); }
  __device__ __forceinline__ void flush(float* out) const { scalar.flush(out); }
#endif
};

template <typename scalar_t, int TM>
using TileMath = std::conditional_t<uses_tensor_cores<scalar_t>(), MmaTile<scalar_t, TM>, ScalarTile<scalar_t, TM>>;

// Where tile_kernel's outputs go. Forward: the epilogue at out(column, row). Transposed: added into the float32
// (float64) gradient of the dense operand at at(entry(column k), column); -1 (a padding tap) is dropped.
template <typename scalar_t>
struct EpilogueSink {
  Epilogue<scalar_t> ep;
  template <typename Operand, typename acc_t>
  __device__ __forceinline__ void put(const Operand& op, const typename Operand::Column& col, int64_t r,
                                      acc_t z) const {
    ep.store(r, op.out(col, r), z);
  }
};

template <typename acc_t>
struct GradSink {
  acc_t* g;
  bool atomic;  // false when no two (k, p) meet the same element (a linear layer, any 1x1 convolution)
  template <typename Operand, typename z_t>
  __device__ __forceinline__ void put(const Operand& op, const typename Operand::Column& col, int64_t k, z_t z) const {
    const int64_t idx = op.at(op.entry(k), col);
    if (idx < 0) return;
    if (atomic) {
      atomicAdd(g + idx, static_cast<acc_t>(z));
    } else {
      g[idx] = static_cast<acc_t>(z);
    }
  }
};

// The launch's geometry, the same for every block.
struct TileGrid {
  int64_t P;           // columns p of the dense operand (batch rows, or output pixels)
  int64_t tiles;       // TM-slices per block row (forward) or block column (transposed)
  int64_t group_rows;  // rows of W per group (M for a linear layer)
  int64_t groups;
  int64_t zspan;  // forward: the most groups one tile of rows meets; transposed: groups
  bool count;     // count bad blocks (off for the backward's tile pass: its SDDMM pass counts them)
  bool vec;       // the operand read is contiguous in p and 16-byte aligned, N a multiple of the vector width
};

constexpr int kPieceBlocks = kWarp;  // blocks whose lists a thread block holds at once (one warp scans them)
constexpr int kPieceSlots = 256;     // the reduction slots they may fill (one block has at most 256)

// A piece: a run of consecutive blocks of the line, read, checked and laid out in shared memory. Its reduction slots
// are the kept columns (forward) or rows (transposed) of its blocks back to back, so a chunk of KC slots spans several
// small blocks and the multiply never runs on padding between blocks. Slot u is index uq[u] of block owner[u]'s
// reduction list and meets the dense operand at red[u] (-1: nothing, e.g. a row of another group). slot[b][m] is the
// tile side's kept index at tile position m, or -1 where block b keeps nothing.
template <typename Entry, int TM, bool kT>
struct Piece {
  BlockInfo blk[kPieceBlocks];
  int32_t nt[kPieceBlocks], nu[kPieceBlocks];  // kept on the tile side, on the reduction side (0: adds nothing)
  int32_t ustart[kPieceBlocks], estart[kPieceBlocks], bad[kPieceBlocks];
  int32_t blocks, slots, entries;
  int16_t slot[kPieceBlocks][TM];
  int32_t red[kPieceSlots];
  int16_t uq[kPieceSlots];
  uint8_t owner[kPieceSlots];
  Entry ent[kT ? 1 : kPieceSlots];  // forward: the dense operand's entry of each slot's column
};

// tile_kernel's shared memory: the piece and the staged chunk while it multiplies, then the finished tile (the same
// bytes), per warp [m][32 p]: each thread writes the outputs of its own p, m by m, so a put is compiled once.
template <typename scalar_t, typename Operand, bool kT, int TM, typename acc_t>
union TileShared {
  struct {
    Staged<scalar_t, TM> st;
    Piece<typename Operand::Entry, TM, kT> pc;
  } work;
  acc_t out[kTileWarps][kWarp * TM];
};

// See the top of the file. grid.x: (block row in the plan's order, or block column) x TM-slice; grid.y strides over
// the tiles of p; grid.z over the groups a tile meets. One group per block: a convolution's column of X depends on
// the row's group, so rows of other groups are masked out (zero in ws, not written).
template <typename scalar_t, typename Operand, bool kT, int TM, typename Sink>
__global__ void __launch_bounds__(kTileThreads)
    tile_kernel(const Blocks<scalar_t> w, const ColumnLists lists, const Operand op, const scalar_t* __restrict__ dense,
                const Sink sink, const TileGrid grid, int* __restrict__ flags) {
  using Math = TileMath<scalar_t, TM>;
  using acc_t = typename Math::acc_t;
  constexpr int KC = Staged<scalar_t, TM>::KC;
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));  // elements per 16-byte load
  __shared__ TileShared<scalar_t, Operand, kT, TM, acc_t> sh;
  __shared__ int64_t task[4];  // the tile's first and end index (-1: none), the line's blocks [lo, hi)
  auto& st = sh.work.st;
  auto& pc = sh.work.pc;

  const int64_t x = blockIdx.x;
  const int64_t line = x / grid.tiles, slice = x % grid.tiles;  // block row (forward) or block column (transposed)
  // One thread block of those that read the same blocks counts what is wrong with them.
  const bool counts = grid.count && slice == 0 && blockIdx.y == 0 && blockIdx.z == 0;
  const int64_t span = kT ? w.bk : w.bm;
  const int64_t extent = kT ? w.K : w.M;
  if (threadIdx.x == 0) {
    int64_t idx = line, lo = 0, hi = 0;
    bool ok = true;
    if constexpr (!kT) {
      if (w.plan != nullptr) {
        idx = w.plan[line];
        if (idx < 0 || idx >= w.MB) {
          if (counts) atomicAdd(&flags[kBadPlan], 1);
          ok = false;
        }
      }
      if (ok) {
        lo = w.block_ptr[idx];
        hi = w.block_ptr[idx + 1];
        // Each block row checks its range, the first and last also the ends: together, block_ptr is
        // non-decreasing from 0 to B, as the CPU checks it per call.
        if (lo < 0 || hi < lo || hi > w.B || (idx == 0 && lo != 0) || (idx == w.MB - 1 && hi != w.B)) {
          if (counts) atomicAdd(&flags[kBadRow], 1);
          lo = hi = 0;  // an empty block row: the epilogue of zero
        }
      }
    } else {
      lo = lists.col_ptr[idx];
      hi = lists.col_ptr[idx + 1];
      if (lo < 0 || hi < lo || hi > w.B) lo = hi = 0;  // built per call from sorted block columns: cannot happen
    }
    const int64_t first = idx * span + slice * TM;
    task[0] = ok ? first : -1;
    task[1] = imin(imin(first + TM, (idx + 1) * span), extent);
    task[2] = lo;
    task[3] = hi;
  }
  __syncthreads();
  const int64_t t0 = task[0], t1 = task[1], lo = task[2], hi = task[3];
  if (t0 < 0 || t0 >= t1) return;   // uniform
  const int64_t tline = t0 / span;  // the block row / block column of the tile

  for (int64_t gz = blockIdx.z; gz < grid.zspan; gz += gridDim.z) {
    // The group of this block: forward, the gz-th group the tile's rows meet; transposed, group gz.
    const int64_t g = kT ? gz : t0 / grid.group_rows + gz;
    if (g >= grid.groups || (!kT && g * grid.group_rows >= t1)) break;
    const int64_t grow0 = g * grid.group_rows, grow1 = grow0 + grid.group_rows;  // the group's rows of W

    for (int64_t p0 = static_cast<int64_t>(blockIdx.y) * kTileThreads; p0 < grid.P;
         p0 += static_cast<int64_t>(gridDim.y) * kTileThreads) {
      const int64_t p = p0 + threadIdx.x;
      const bool p_ok = p < grid.P;
      const typename Operand::Column col = op.column(p_ok ? p : p0, grow0);
      const bool counting = counts && p0 == 0 && gz == 0;
      Math math;
      math.zero();

      for (int64_t cur = lo; cur < hi;) {
        __syncthreads();  // the previous piece and chunk are no longer read
        // (a) The first threads read one block each, checked; every thread clears the slot maps.
        const int64_t cnt = imin(hi - cur, kPieceBlocks);
        if (threadIdx.x < cnt) {
          const int lb = threadIdx.x;
          BlockInfo s;
          if constexpr (kT) {
            const int64_t b = lists.order[cur + lb];
            s = read_block(w, b, b >= 0 && b < w.B ? int64_t{lists.block_row[b]} : -1, tline);
          } else {
            s = read_block(w, cur + lb, tline, -1);
          }
          bool use = s.ok && s.r > 0 && s.c > 0;  // an empty block adds nothing at this level
          if (kT && use && (s.i * w.bm >= grow1 || (s.i + 1) * w.bm <= grow0)) use = false;  // another group's rows
          pc.blk[lb] = s;
          pc.nt[lb] = use ? (kT ? s.c : s.r) : 0;
          pc.nu[lb] = use ? (kT ? s.r : s.c) : 0;
          pc.bad[lb] = 0;
        }
        for (int e = threadIdx.x; e < kPieceBlocks * TM; e += blockDim.x) pc.slot[e / TM][e % TM] = -1;
        __syncthreads();
        // (b) Warp 0: the longest run of blocks whose reduction slots fit, and where each block's slots and entries
        // start (inclusive scans over the lanes). The first block always fits: nu <= bk <= 256.
        if (threadIdx.x < kWarp) {
          const int lane = threadIdx.x;
          const int nu = lane < cnt ? pc.nu[lane] : 0, ne = lane < cnt ? pc.nu[lane] + pc.nt[lane] : 0;
          int iu = nu, ie = ne;
          for (int off = 1; off < kWarp; off *= 2) {
            const int a = __shfl_up_sync(0xffffffffu, iu, off), b = __shfl_up_sync(0xffffffffu, ie, off);
            if (lane >= off) iu += a, ie += b;
          }
          const unsigned over = __ballot_sync(0xffffffffu, lane < cnt && iu > kPieceSlots);
          const int nblk = over != 0 ? __ffs(over) - 1 : static_cast<int>(cnt);
          pc.ustart[lane] = iu - nu;
          pc.estart[lane] = ie - ne;
          if (lane == nblk - 1) pc.blocks = nblk, pc.slots = iu, pc.entries = ie;
        }
        __syncthreads();
        const int nblk = pc.blocks, slots = pc.slots, entries = pc.entries;
        if (counting && threadIdx.x == 0) {  // the piece's blocks whose counts or offsets are out of bounds
          for (int lb = 0; lb < nblk; ++lb) {
            if (!pc.blk[lb].ok) atomicAdd(&flags[kBadBlock], 1);
          }
        }
        // (c) Every kept index of the piece, one per thread: read once, checked, then placed (tile side: the slot
        // map; reduction side: the slot's dense position). Forward, the tile side is the rows and the reduction side
        // the columns; transposed, the other way round.
        bool bad = false;
        for (int e = threadIdx.x; e < entries; e += blockDim.x) {
          int lb = 0;  // the last block whose entries start at or before e
          for (int hi_b = nblk - 1; lb < hi_b;) {
            const int mid = (lb + hi_b + 1) / 2;
            if (pc.estart[mid] <= e) {
              lb = mid;
            } else {
              hi_b = mid - 1;
            }
          }
          const BlockInfo& s = pc.blk[lb];
          const int k = e - pc.estart[lb], nt = pc.nt[lb];
          const bool tile_side = k < nt;
          const int idx = tile_side ? k : k - nt;
          const bool is_row = tile_side != kT;
          const int64_t local = w.indices[is_row ? s.io + idx : s.io + s.r0 + idx];
          const int64_t lim = is_row ? imin(w.bm, w.M - s.i * w.bm) : imin(w.bk, w.K - s.j * w.bk);
          const bool ok = local >= 0 && local < lim;
          if (!ok) {
            bad = true;
            pc.bad[lb] = 1;
          }
          const int64_t global = is_row ? s.i * w.bm + local : s.j * w.bk + local;
          if (tile_side) {
            if (ok && global >= t0 && global < t1 && (kT || (global >= grow0 && global < grow1))) {
              pc.slot[lb][global - t0] = static_cast<int16_t>(k);
            }
          } else {
            const int u = pc.ustart[lb] + idx;
            pc.owner[u] = static_cast<uint8_t>(lb);
            pc.uq[u] = static_cast<int16_t>(idx);
            pc.red[u] = ok && (!kT || (global >= grow0 && global < grow1)) ? static_cast<int32_t>(global) : -1;
            if constexpr (!kT) {
              if (ok) pc.ent[u] = op.entry(global);
            }
          }
        }
        if (__syncthreads_or(bad)) {
          // A block with a bad index adds nothing (its slot maps hold only in-range positions, so the value reads
          // below stay inside the block either way).
          if (threadIdx.x == 0 && counting) {
            for (int lb = 0; lb < nblk; ++lb) {
              if (pc.bad[lb]) atomicAdd(&flags[kBadBlock], 1);
            }
          }
          for (int u = threadIdx.x; u < slots; u += blockDim.x) {
            if (pc.bad[pc.owner[u]]) pc.red[u] = -1;
          }
          __syncthreads();
        }
        // (d) The piece's slots in chunks of KC: stage the dense operand and the expanded weight, multiply.
        for (int u0 = 0; u0 < slots; u0 += KC) {
          const int valid = slots - u0 < KC ? slots - u0 : KC;
          if constexpr (Operand::kContiguous) {
            if (grid.vec) {
              // V consecutive p per 16-byte load (P is a multiple of V, so a load is all in or all out).
              for (int e = threadIdx.x; e < KC * (kTileThreads / V); e += blockDim.x) {
                const int u = e / (kTileThreads / V), pv = (e % (kTileThreads / V)) * V;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (u < valid && pc.red[u0 + u] >= 0 && p0 + pv < grid.P) {
                  const typename Operand::Column c = op.column(p0 + pv, grow0);
                  const int64_t idx = kT ? op.out(c, pc.red[u0 + u]) : op.at(pc.ent[u0 + u], c);
                  v = *reinterpret_cast<const uint4*>(dense + idx);
                }
                *reinterpret_cast<uint4*>(&st.xs[u][pv]) = v;
              }
            }
          }
          if (!Operand::kContiguous || !grid.vec) {
            for (int u = 0; u < KC; ++u) {
              scalar_t v = scalar_t(0);
              if (p_ok && u < valid && pc.red[u0 + u] >= 0) {
                const int64_t idx = kT ? op.out(col, pc.red[u0 + u]) : op.at(pc.ent[u0 + u], col);
                if (idx >= 0) v = dense[idx];
              }
              st.xs[u][threadIdx.x] = v;
            }
          }
          for (int e = threadIdx.x; e < KC * TM; e += blockDim.x) {
            // Forward: consecutive threads along u (a kept row of a sub-block is contiguous); transposed along m.
            const int u = kT ? e / TM : e % KC, m = kT ? e % TM : e / KC;
            scalar_t v = scalar_t(0);
            if (u < valid) {
              const int lb = pc.owner[u0 + u], k = pc.slot[lb][m];
              if (k >= 0) {
                // Forward W[row k, column uq] = values[vo + k * c0 + uq]; transposed W[row uq, column k].
                const BlockInfo& b = pc.blk[lb];
                const int64_t q = pc.uq[u0 + u];
                v = w.values[b.vo + (kT ? k + q * b.c0 : int64_t{k} * b.c0 + q)];
              }
            }
            st.ws[u][m] = v;
          }
          __syncthreads();
          math.multiply(st, valid);
          __syncthreads();
        }
        cur += nblk;
      }
      // Outputs: every position of the tile in this group, once (zero where no block contributed).
      __syncthreads();  // the piece and the chunk are no longer read: their bytes take the finished tile
      const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
      math.flush(sh.out[warp]);
      __syncwarp();
      if (p_ok) {
        const int tn = static_cast<int>(t1 - t0);
#pragma unroll 1
        for (int m = 0; m < tn; ++m) {
          const int64_t gi = t0 + m;
          if (!kT && (gi < grow0 || gi >= grow1)) continue;
          sink.put(op, col, gi, sh.out[warp][m * kWarp + lane]);
        }
      }
    }
  }
}

// ---- the values' gradient ------------------------------------------------------------------------------------------

constexpr int kSddmmThreads = 128;
constexpr int kSddmmPerThread = 8;  // entries of the sub-block per thread and pass

// gv[vo + a * c0 + q] = sum_p gz[out(column(p), row a)] * x[at(entry(column q), column(p))] for the level's r x c
// entries of each stored block (the rest of gv is left as it is). grid.x strides over the blocks; each block row of a
// block is found through lists.block_row and checked against block_ptr.
template <typename scalar_t, typename Operand>
__global__ void __launch_bounds__(kSddmmThreads)
    block_sddmm_kernel(const Blocks<scalar_t> w, const ColumnLists lists, const Operand op,
                       const scalar_t* __restrict__ gz, const scalar_t* __restrict__ x, scalar_t* __restrict__ gv,
                       const TileGrid grid, int* __restrict__ flags) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  constexpr int TP = 64 / static_cast<int>(sizeof(scalar_t));  // p per staged tile: shared memory under 48 KB
  __shared__ scalar_t gs[kBlockDim][TP + 1];                   // gz of the block's kept rows
  __shared__ scalar_t xs[kBlockDim][TP + 1];                   // x at the block's kept columns
  __shared__ BlockInfo info;
  __shared__ int32_t rows[kBlockDim], cols[kBlockDim];
  __shared__ typename Operand::Entry ent[kBlockDim];

  for (int64_t b = blockIdx.x; b < w.B; b += gridDim.x) {
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t i = lists.block_row[b];
      const bool in_row = i >= 0 && i < w.MB && w.block_ptr[i] <= b && b < w.block_ptr[i + 1];
      info = read_block(w, b, in_row ? i : -1, -1);
      if (!in_row)
        atomicAdd(&flags[kBadRow], 1);
      else if (!info.ok)
        atomicAdd(&flags[kBadBlock], 1);
    }
    __syncthreads();
    const BlockInfo s = info;
    if (!s.ok || s.r == 0 || s.c == 0) continue;
    const bool bad = read_lists(w, s, rows, cols);
    if (__syncthreads_or(bad)) {
      if (threadIdx.x == 0) atomicAdd(&flags[kBadBlock], 1);
      continue;
    }
    for (int q = threadIdx.x; q < s.c; q += blockDim.x) ent[q] = op.entry(cols[q]);
    __syncthreads();
    const int n = s.r * s.c;
    // The groups the block's rows meet (one unless a grouped convolution's groups are narrower than a block).
    const int64_t g_first = s.i * w.bm / grid.group_rows;  // rows[] is ordered by level, not by number
    for (int64_t g = g_first; g < grid.groups && g * grid.group_rows < (s.i + 1) * w.bm; ++g) {
      const int64_t grow0 = g * grid.group_rows, grow1 = grow0 + grid.group_rows;
      for (int e0 = 0; e0 < n; e0 += kSddmmThreads * kSddmmPerThread) {
        acc_t acc[kSddmmPerThread];
#pragma unroll
        for (int k = 0; k < kSddmmPerThread; ++k) acc[k] = acc_t(0);
        for (int64_t p0 = 0; p0 < grid.P; p0 += TP) {
          __syncthreads();
          for (int e = threadIdx.x; e < (s.r + s.c) * TP; e += blockDim.x) {
            const int lane = e % TP, k = e / TP;
            const int64_t p = p0 + lane;
            scalar_t v = scalar_t(0);
            if (p < grid.P) {
              const typename Operand::Column col = op.column(p, grow0);
              if (k < s.r) {
                if (rows[k] >= grow0 && rows[k] < grow1) v = gz[op.out(col, rows[k])];
                gs[k][lane] = v;
              } else {
                const int64_t idx = op.at(ent[k - s.r], col);
                if (idx >= 0) v = x[idx];
                xs[k - s.r][lane] = v;
              }
            } else if (k < s.r) {
              gs[k][lane] = v;
            } else {
              xs[k - s.r][lane] = v;
            }
          }
          __syncthreads();
#pragma unroll
          for (int k = 0; k < kSddmmPerThread; ++k) {
            const int e = e0 + k * kSddmmThreads + threadIdx.x;
            if (e >= n) break;
            const int a = e / s.c, q = e % s.c;
            for (int l = 0; l < TP; ++l) acc[k] += static_cast<acc_t>(gs[a][l]) * static_cast<acc_t>(xs[q][l]);
          }
        }
#pragma unroll
        for (int k = 0; k < kSddmmPerThread; ++k) {
          const int e = e0 + k * kSddmmThreads + threadIdx.x;
          if (e >= n) break;
          const int a = e / s.c, q = e % s.c;
          // Rows of other groups got zero from this group; their own group's pass writes them.
          if (rows[a] >= grow0 && rows[a] < grow1) gv[s.vo + int64_t{a} * s.c0 + q] = static_cast<scalar_t>(acc[k]);
        }
      }
    }
  }
}

}  // namespace nestsparse::cuda
