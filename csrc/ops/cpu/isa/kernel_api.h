// The interface between the torch glue (ops/cpu/*.cpp, built for plain x86-64) and the inner loops in
// isa/kernels_<isa>.cpp (each built for its own instruction set). Plain structs and function pointers
// only: an ISA file must not share inline C++ templates with the rest of the library, or the linker could
// keep an AVX-512 copy of one and run it on a processor without AVX-512.
#pragma once

#include <cstdint>

#include "ops/activation.h"

namespace nestsparse::cpu {

enum class ValueKind : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

// The rows of one level of a nested CSR matrix.
struct SparseRows {
  const void* values;
  const void* col_idx;
  ValueKind value_kind;
  int32_t index_bytes;  // 2 (int16) or 4 (int32)
  const int32_t* row_start;
  const int32_t* row_stop;
  int64_t cols;  // K: every column index read is checked against it
};

// y = act(scale[r] * z + bias[r] + residual) for output row r (ops/linear.h). `residual`, when set, is read at
// the offset of each output element from `out`, the base of the whole output: residual and output share a layout.
struct Epilogue {
  const float* bias;  // per output row, or null
  Act act;
  const float* scale;     // per output row, or null (1)
  const float* residual;  // or null
  const float* out;       // base of the output (where residual is set)
};

// A run of a tile's columns [j0, j0 + len) whose outputs are contiguous, starting at out + off (+ row offset).
struct Segment {
  int32_t j0;
  int32_t len;
  int64_t off;
};

// C[r, j] = epilogue(sum_p v_p * B[koff[col_p] + j]) for rows [r0, r1) and columns j < tn of one tile;
// koff == nullptr means koff[k] = k * ldb (a packed panel, or x itself), which saves a load per non-zero.
// B already points at the tile's first column, and row r of group g = r / group_rows reads from
// B + g * group_stride. Full tiles read `tile_width` floats per B row; the last may be narrower (tn).
// Output: with segments, out[r * out_row_stride + seg.off + (j - seg.j0)] for j in each segment (columns in
// no segment are dropped); without, out[r * out_row_stride + j * out_col_stride].
struct SpmmTile {
  const float* B;
  const int64_t* koff;
  int64_t ldb;
  int64_t group_rows;
  int64_t group_stride;
  int64_t tn;
  float* out;
  int64_t out_row_stride;
  int64_t out_col_stride;
  const Segment* segs;
  int64_t nsegs;
};

// out[n * ldo + r] = epilogue(sum_p v_p * x[n * ldx + col_p]) for n < nb (1..4), rows [r0, r1).
struct SpmvBatch {
  const float* x;
  int64_t ldx;
  int64_t nb;
  float* out;
  int64_t ldo;
};

// One level of a nested BCR matrix (formats/nbcr.h). Every block's counts, offsets, block column and
// indices are checked against these bounds before they are used.
struct SparseBlocks {
  const void* values;
  ValueKind value_kind;
  const int16_t* indices;
  const int32_t* block_ptr;  // (MB+1)
  const int32_t* blocks;     // (B, 3): block column, value offset, index offset
  const int32_t* counts;     // (B, 2) of the level used: r_l, c_l
  const int32_t* counts0;    // (B, 2) of level 0: r_0 (the split of the index list), c_0 (leading dimension)
  int64_t num_values, num_indices;
  int64_t rows, cols;  // M, K
  int64_t bm, bk;
  int64_t block_cols;  // KB
};

// Each returns how many out-of-range column indices (CSR) or bad blocks (BCR) it met; their rows are left
// unfinished. The BCR kernels take block rows [r0, r1) instead of rows.
using SpmmTileFn = int64_t (*)(const SparseRows&, const Epilogue&, const SpmmTile&, int64_t r0, int64_t r1);
using SpmvFn = int64_t (*)(const SparseRows&, const Epilogue&, const SpmvBatch&, int64_t r0, int64_t r1);
using BlockTileFn = int64_t (*)(const SparseBlocks&, const Epilogue&, const SpmmTile&, int64_t r0, int64_t r1);
using BlockSpmvFn = int64_t (*)(const SparseBlocks&, const Epilogue&, const SpmvBatch&, int64_t r0, int64_t r1);

constexpr int kMaxTile = 64;  // widest tile, in floats
constexpr int kMaxSpmvBatch = 4;
constexpr int kMaxBlockRows = 256, kMaxBlockCols = 256;  // nested BCR block shape limits (formats/nbcr.h)

struct KernelTable {
  const char* name;
  SpmmTileFn spmm16, spmm32, spmm64;  // tile widths 16, 32, 64
  SpmvFn spmv;
  BlockTileFn block16, block32, block64;  // nested BCR, tile widths 16, 32, 64
  BlockSpmvFn block_spmv;
};

const KernelTable* generic_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();

}  // namespace nestsparse::cpu
