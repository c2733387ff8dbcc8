// Nested BCR (NBCR): block-based column-row sparsity (GRIM) with every level of a matrix W (M, K) in one
// buffer.
//
// W is tiled into blocks of (bm, bk), 1 <= bm, bk <= kMaxBlockDim; the grid has MB = ceil(M/bm) block rows
// and KB = ceil(K/bk) block columns (the last ones may be partial). Inside a block whole rows and whole
// columns are kept or pruned, so what a level keeps of a block is a dense sub-block. Every kept row and
// column of a block has a tag (the sparsest level keeping it); an element's tag is min(row tag, column tag).
//
// Contract (the per-call checks in formats/nbcr.cpp, the in-kernel block checks and NestedBCR.validate()
// in Python test this same list):
//   values  (V,)        float32 | float16 | bfloat16 (float64 too, for gradient checks). The level-0
//                       sub-blocks of the stored blocks, back to back in block order; block b's is r0 x c0,
//                       row-major with leading dimension c0, at values[blocks[b, 1] ...].
//   indices (I,)        int16. Block b's kept rows (r0 local row numbers in [0, bm)) followed by its kept
//                       columns (c0 local column numbers in [0, bk)), at indices[blocks[b, 2] ...]. Each list
//                       is ordered sparsest level first (descending tag), then by number; no repeats. The
//                       global row i*bm + row must be < M and the global column j*bk + col < K.
//   block_ptr (MB+1,)   int32. The stored blocks of block row i are [block_ptr[i], block_ptr[i+1]), sorted
//                       by block column without repeats. block_ptr[0] == 0, non-decreasing, block_ptr[MB] == B.
//   blocks  (B, 3)      int32. Per stored block: block column j, value offset, index offset. The offsets
//                       are the running sums of r0*c0 and r0+c0 (blocks are packed in order, no gaps).
//   counts  (L, B, 2)   int32. counts[l, b] = (r_l, c_l), the rows and columns block b keeps at level l.
//                       Level l is the top-left r_l x c_l corner of the level-0 sub-block (a strided view,
//                       leading dimension still c0). bm >= r_0 >= r_1 >= ... >= r_{L-1} >= 0, same for c;
//                       r_l == 0 exactly when c_l == 0; r_0 >= 1 (a block with nothing kept is not stored).
//
// The ops check per call what memory safety needs (O(MB) for block_ptr; inside the loops, per block, that
// its counts, offsets and block column are in range and every index read lies in its block and the matrix).
// A violation raises after the kernel, naming the block, without any out-of-bounds read. On the CPU, block_ptr
// is read once into a snapshot the kernels use, and each block's counts, offsets and indices are copied before
// they are checked: a buffer rewritten by another thread during a call gives a wrong result or an error, never
// a wild read. The complete list
// (nesting across levels, ordering, packing, canonical counts) is NestedBCR.validate()'s job, once per weight.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace nestsparse {

constexpr int64_t kMaxBlockDim = 256;

// The arrays of one level of a nested BCR matrix, checked for the op named `op`.
struct NbcrLevel {
  at::Tensor values, indices, block_ptr, blocks, counts;
  int64_t level = 0;
  int64_t num_levels = 0;
  int64_t rows = 0;        // M
  int64_t bm = 0, bk = 0;  // block shape
  int64_t block_rows = 0;  // MB
  int64_t num_blocks = 0;  // B
  // CPU: block_ptr as checked, (MB+1,) int32: what the CPU kernels read.
  at::Tensor ptr_snapshot;
  const int32_t* ptr() const {
    return ptr_snapshot.defined() ? ptr_snapshot.const_data_ptr<int32_t>() : block_ptr.const_data_ptr<int32_t>();
  }
  const int32_t* meta() const { return blocks.const_data_ptr<int32_t>(); }
  const int32_t* level_counts() const { return counts.const_data_ptr<int32_t>() + level * num_blocks * 2; }
  const int32_t* base_counts() const { return counts.const_data_ptr<int32_t>(); }
};

// Checks dtypes, devices, shapes, contiguity, the level, the block shape against `rows`, and (on CPU)
// block_ptr.
NbcrLevel check_nbcr(const char* op, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& block_ptr,
                     const at::Tensor& blocks, const at::Tensor& counts, int64_t level, int64_t rows,
                     at::IntArrayRef block_shape, c10::Device device);

// Raises naming the first block of `w`'s level that breaks what the kernels rely on, for a matrix with K
// columns (called once a kernel reported one).
[[noreturn]] void fail_bad_block(const char* op, const NbcrLevel& w, int64_t K);

// Raises unless the stored blocks' value offsets are the running sums of their level-0 sizes r0 x c0 (packed,
// as the contract says): the gradient of the values writes every block's slots, and blocks that shared slots
// would overwrite each other's gradients. O(B), for the backward ops.
void check_packed_values(const char* op, const NbcrLevel& w);

// The block-row boundaries of `w`'s level from a cached plan (nbcr_plan), or freshly computed.
std::vector<int32_t> block_row_chunks(const char* op, const NbcrLevel& w, const std::optional<at::Tensor>& plan,
                                      int64_t default_chunks);

}  // namespace nestsparse
