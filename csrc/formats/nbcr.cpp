// The checks of nested BCR arguments (see nbcr.h for what is checked where).
#include "formats/nbcr.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

namespace nestsparse {

NbcrLevel check_nbcr(const char* op, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& block_ptr,
                     const at::Tensor& blocks, const at::Tensor& counts, int64_t level, int64_t rows,
                     at::IntArrayRef block_shape, c10::Device device) {
  const auto vd = values.scalar_type();
  TORCH_CHECK(vd == at::kFloat || vd == at::kHalf || vd == at::kBFloat16 || vd == at::kDouble, op,
              ": values must be float32, float16, bfloat16 or float64, got ", vd);
  TORCH_CHECK(indices.scalar_type() == at::kShort, op, ": indices must be int16, got ", indices.scalar_type());
  const std::pair<const char*, const at::Tensor*> ints[] = {
      {"block_ptr", &block_ptr}, {"blocks", &blocks}, {"counts", &counts}};
  for (const auto& [name, t] : ints) {
    TORCH_CHECK(t->scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t->scalar_type());
  }
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"values", &values}, {"indices", &indices}, {"block_ptr", &block_ptr}, {"blocks", &blocks}, {"counts", &counts}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but the input is on ", device);
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(block_shape.size() == 2, op, ": block_shape must have 2 entries, got ", block_shape);
  const int64_t bm = block_shape[0], bk = block_shape[1];
  TORCH_CHECK(bm >= 1 && bm <= kMaxBlockDim && bk >= 1 && bk <= kMaxBlockDim, op, ": block_shape ", block_shape,
              " must lie in [1, ", kMaxBlockDim, "] in each dimension");
  TORCH_CHECK(rows >= 0 && rows <= std::numeric_limits<int32_t>::max(), op, ": rows must lie in [0, 2^31), got ", rows);
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK(indices.dim() == 1, op, ": indices must be 1-D, got shape ", indices.sizes());
  const int64_t MB = (rows + bm - 1) / bm;
  TORCH_CHECK(block_ptr.dim() == 1 && block_ptr.numel() == MB + 1, op, ": block_ptr must have shape (", MB + 1,
              ",) for ", rows, " rows in blocks of ", bm, ", got ", block_ptr.sizes());
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == 3, op, ": blocks must have shape (B, 3), got ", blocks.sizes());
  const int64_t B = blocks.size(0);
  TORCH_CHECK(counts.dim() == 3 && counts.size(0) >= 1 && counts.size(1) == B && counts.size(2) == 2, op,
              ": counts must have shape (L, B=", B, ", 2) with L >= 1, got ", counts.sizes());
  const int64_t L = counts.size(0);
  TORCH_CHECK(level >= 0 && level < L, op, ": level ", level, " is out of range for a model with ", L,
              " levels (0 = densest .. ", L - 1, " = sparsest)");
  NbcrLevel w{values, indices, block_ptr, blocks, counts, level, L, rows, bm, bk, MB, B};
  if (device.is_cpu()) {  // memory safety of the block-row loops: O(MB), each entry read once into the snapshot
    const int32_t* p = block_ptr.const_data_ptr<int32_t>();
    at::Tensor snapshot = at::empty({MB + 1}, block_ptr.options());
    int32_t* s = snapshot.data_ptr<int32_t>();
    s[0] = p[0];
    TORCH_CHECK(s[0] == 0, op, ": block_ptr[0] = ", s[0], " but must be 0");
    for (int64_t i = 0; i < MB; ++i) {
      s[i + 1] = p[i + 1];
      TORCH_CHECK(s[i] <= s[i + 1], op, ": block_ptr is not non-decreasing: block_ptr[", i, "] = ", s[i],
                  " > block_ptr[", i + 1, "] = ", s[i + 1]);
    }
    TORCH_CHECK(s[MB] == B, op, ": block_ptr[", MB, "] = ", s[MB], " but ", B, " blocks are stored");
    w.ptr_snapshot = std::move(snapshot);
  }
  return w;
}

void check_packed_values(const char* op, const NbcrLevel& w) {
  const at::Tensor meta_t = w.blocks.cpu(), cnt_t = w.counts.cpu();
  const int32_t* meta = meta_t.const_data_ptr<int32_t>();
  const int32_t* c0 = cnt_t.const_data_ptr<int32_t>();
  int64_t expected = 0;
  for (int64_t b = 0; b < w.num_blocks; ++b) {
    const int64_t vo = meta[3 * b + 1], r0 = c0[2 * b], cc0 = c0[2 * b + 1];
    TORCH_CHECK(vo == expected, op, ": block ", b, " has value offset ", vo, " but the blocks before it fill ",
                expected, " values: blocks must be packed in order without sharing value slots (validate() the ",
                "weight), or their gradients would overwrite each other");
    expected += std::clamp<int64_t>(r0, 0, kMaxBlockDim) * std::clamp<int64_t>(cc0, 0, kMaxBlockDim);
  }
}

void fail_bad_block(const char* op, const NbcrLevel& w, int64_t K) {
  // Copies (the arrays may have changed since the kernel read them), every offset checked before it is used.
  const at::Tensor idx_t = w.indices.cpu().clone(), meta_t = w.blocks.cpu().clone(), cnt_t = w.counts.cpu().clone();
  const at::Tensor ptr_t = w.ptr_snapshot.defined() ? w.ptr_snapshot : w.block_ptr.cpu().clone();
  const int16_t* idx = idx_t.const_data_ptr<int16_t>();
  const int32_t* meta = meta_t.const_data_ptr<int32_t>();
  const int32_t* ptr = ptr_t.const_data_ptr<int32_t>();
  const int32_t* cl = cnt_t.const_data_ptr<int32_t>() + w.level * w.num_blocks * 2;
  const int32_t* c0 = cnt_t.const_data_ptr<int32_t>();
  const int64_t KB = (K + w.bk - 1) / w.bk, V = w.values.numel(), I = w.indices.numel();
  for (int64_t i = 0; i < w.block_rows; ++i) {
    const int64_t lo = std::clamp<int64_t>(ptr[i], 0, w.num_blocks),
                  hi = std::clamp<int64_t>(ptr[i + 1], lo, w.num_blocks);
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t j = meta[3 * b], vo = meta[3 * b + 1], io = meta[3 * b + 2];
      const int64_t r = cl[2 * b], c = cl[2 * b + 1], r0 = c0[2 * b], cc0 = c0[2 * b + 1];
      TORCH_CHECK(j >= 0 && j < KB, op, ": block ", b, " (block row ", i, ") has block column ", j, ", outside [0, ",
                  KB, ") for K=", K, " in blocks of ", w.bk);
      TORCH_CHECK(r0 >= 0 && r0 <= w.bm && cc0 >= 0 && cc0 <= w.bk, op, ": block ", b, " keeps (", r0, ", ", cc0,
                  ") rows and columns at level 0, outside the ", w.bm, "x", w.bk, " block");
      TORCH_CHECK(r >= 0 && r <= r0 && c >= 0 && c <= cc0, op, ": block ", b, " keeps (", r, ", ", c,
                  ") rows and columns at level ", w.level, ", not nested in level 0's (", r0, ", ", cc0, ")");
      TORCH_CHECK(vo >= 0 && vo + r0 * cc0 <= V, op, ": block ", b, " has value offset ", vo, " for a ", r0, "x", cc0,
                  " sub-block, outside the ", V, " stored values");
      TORCH_CHECK(io >= 0 && io + r0 + cc0 <= I, op, ": block ", b, " has index offset ", io, " for ", r0 + cc0,
                  " indices, outside the ", I, " stored indices");
      const int64_t row_lim = std::min(w.bm, w.rows - i * w.bm), col_lim = std::min(w.bk, K - j * w.bk);
      for (int64_t a = 0; a < r; ++a) {
        TORCH_CHECK(idx[io + a] >= 0 && idx[io + a] < row_lim, op, ": block ", b, " (block row ", i,
                    ") keeps local row ", idx[io + a], " at indices[", io + a, "], outside [0, ", row_lim, ")");
      }
      for (int64_t q = 0; q < c; ++q) {
        const int64_t p = io + r0 + q;
        TORCH_CHECK(idx[p] >= 0 && idx[p] < col_lim, op, ": block ", b, " (block column ", j, ") keeps local column ",
                    idx[p], " at indices[", p, "], outside [0, ", col_lim, ") for K=", K);
      }
    }
  }
  TORCH_CHECK(false, op, ": a block outside its bounds was met");
}

}  // namespace nestsparse
