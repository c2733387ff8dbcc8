// The per-weight plan of nested BCR: for every level, block-row boundaries that split the block rows into
// chunks of about equal work (a block costs its r_l x c_l sub-block plus a fixed overhead, a block row its
// epilogue). Built once per weight by nbcr_plan and cached by the module.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "formats/nbcr.h"

namespace nestsparse {
namespace {

constexpr int64_t kBlockCost = 16;  // per stored block (metadata, index checks), in multiply-add equivalents

void chunk_level(const int32_t* ptr, const int32_t* cnt, int64_t MB, int64_t bm, int64_t P, int32_t* out) {
  std::vector<int64_t> cost(MB);
  int64_t total = 0;
  for (int64_t i = 0; i < MB; ++i) {
    int64_t c = 4 * bm;  // the block row's epilogue
    for (int64_t b = ptr[i]; b < ptr[i + 1]; ++b) {
      c += kBlockCost + std::max<int64_t>(cnt[2 * b], 0) * std::max<int64_t>(cnt[2 * b + 1], 0);
    }
    cost[i] = c;
    total += c;
  }
  out[0] = 0;
  int64_t acc = 0, i = 0;
  for (int64_t k = 1; k < P; ++k) {
    const int64_t target = total * k / P;
    while (i < MB && acc + cost[i] / 2 <= target) acc += cost[i], ++i;
    out[k] = static_cast<int32_t>(i);
  }
  out[P] = static_cast<int32_t>(MB);
}

at::Tensor nbcr_plan_cpu(const at::Tensor& block_ptr, const at::Tensor& counts, int64_t block_rows_size,
                         int64_t num_chunks) {
  constexpr const char* op = "nbcr_plan";
  TORCH_CHECK(num_chunks >= 1, op, ": num_chunks must be >= 1, got ", num_chunks);
  TORCH_CHECK(block_rows_size >= 1 && block_rows_size <= kMaxBlockDim, op, ": block rows must lie in [1, ",
              kMaxBlockDim, "], got ", block_rows_size);
  TORCH_CHECK(block_ptr.scalar_type() == at::kInt && counts.scalar_type() == at::kInt && block_ptr.is_contiguous() &&
                  counts.is_contiguous() && block_ptr.device().is_cpu() && counts.device().is_cpu(),
              op, ": block_ptr and counts must be contiguous int32 CPU tensors, got ", block_ptr.scalar_type(), " on ",
              block_ptr.device(), " and ", counts.scalar_type(), " on ", counts.device());
  TORCH_CHECK(block_ptr.dim() == 1 && block_ptr.numel() >= 1, op, ": block_ptr must be 1-D of length MB+1, got ",
              block_ptr.sizes());
  TORCH_CHECK(counts.dim() == 3 && counts.size(0) >= 1 && counts.size(2) == 2, op,
              ": counts must have shape (L, B, 2), got ", counts.sizes());
  const int64_t MB = block_ptr.numel() - 1, L = counts.size(0), B = counts.size(1);
  TORCH_CHECK(MB <= std::numeric_limits<int32_t>::max() && num_chunks <= MB + 1024, op, ": ", num_chunks,
              " chunks for ", MB, " block rows; ask for at most MB + 1024");
  const int32_t* p = block_ptr.const_data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[MB] == B, op, ": block_ptr must run from 0 to B=", B, ", got ", p[0], " .. ", p[MB]);
  for (int64_t i = 0; i < MB; ++i) {
    TORCH_CHECK(p[i] <= p[i + 1], op, ": block_ptr is not non-decreasing at ", i);
  }
  at::Tensor plan = at::empty({L, num_chunks + 1}, at::kInt);
  for (int64_t l = 0; l < L; ++l) {
    chunk_level(p, counts.const_data_ptr<int32_t>() + l * B * 2, MB, block_rows_size, num_chunks,
                plan.data_ptr<int32_t>() + l * (num_chunks + 1));
  }
  return plan;
}

}  // namespace

std::vector<int32_t> block_row_chunks(const char* op, const NbcrLevel& w, const std::optional<at::Tensor>& plan,
                                      int64_t default_chunks) {
  const int64_t MB = w.block_rows;
  if (!plan.has_value()) {
    std::vector<int32_t> b(default_chunks + 1);
    chunk_level(w.ptr(), w.level_counts(), MB, w.bm, default_chunks, b.data());
    return b;
  }
  const at::Tensor& p = *plan;
  TORCH_CHECK(p.scalar_type() == at::kInt && p.dim() == 2 && p.size(0) == w.num_levels && p.size(1) >= 2 &&
                  p.is_contiguous() && p.device().is_cpu(),
              op, ": plan must be a contiguous int32 CPU tensor of shape (L=", w.num_levels,
              ", chunks+1) from nbcr_plan, got ", p.scalar_type(), " ", p.sizes(), " on ", p.device());
  const int64_t n = p.size(1);
  const int32_t* b = p.const_data_ptr<int32_t>() + w.level * n;
  TORCH_CHECK(b[0] == 0 && b[n - 1] == MB, op, ": plan row ", w.level, " must run from 0 to MB=", MB, ", got ", b[0],
              " .. ", b[n - 1], " (was it built for another weight?)");
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(b[i - 1] <= b[i], op, ": plan row ", w.level, " is not non-decreasing at ", i);
  }
  return std::vector<int32_t>(b, b + n);
}

TORCH_LIBRARY_IMPL(nestsparse, CPU, m) { m.impl("nbcr_plan", &nbcr_plan_cpu); }

}  // namespace nestsparse
