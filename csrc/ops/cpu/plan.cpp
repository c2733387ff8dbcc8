// The per-weight plans (ops/plan.h): for every level, boundaries that split the rows (NCSR) or block rows (NBCR)
// into chunks of about equal work. Real pruned weights have very uneven rows (the DLMC ResNet-50 layers vary by
// 10x), so equal row counts would leave one thread waiting for the other.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "formats/nbcr.h"
#include "formats/ncsr.h"
#include "ops/plan.h"

namespace nestsparse {
namespace {

constexpr int64_t kRowCost = 8;     // a CSR row's fixed cost (pointer loads, epilogue), in non-zero equivalents
constexpr int64_t kBlockCost = 16;  // per stored block (metadata, index checks), in multiply-add equivalents

// Row r costs its non-zeros plus kRowCost; chunk c ends at the last row that ends before c/P of the total
// (less half a row's fixed cost).
void chunk_rows(const int32_t* start, const int32_t* stop, int64_t M, int64_t P, int32_t* out) {
  // In int64: ncsr_plan reads the arrays after checking them, and another thread may have rewritten them since.
  const auto len = [&](int64_t r) { return static_cast<int64_t>(stop[r]) - static_cast<int64_t>(start[r]); };
  int64_t total = 0;
  for (int64_t r = 0; r < M; ++r) total += len(r) + kRowCost;
  out[0] = 0;
  int64_t acc = 0, r = 0;
  for (int64_t c = 1; c < P; ++c) {
    const int64_t target = total * c / P;
    while (r < M && acc + len(r) + kRowCost / 2 <= target) acc += len(r) + kRowCost, ++r;
    out[c] = static_cast<int32_t>(r);
  }
  out[P] = static_cast<int32_t>(M);
}

// Block row i costs its epilogue plus, per block, kBlockCost and its r_l x c_l sub-block; chunk k ends at the
// last block row whose middle lies before k/P of the total.
// Block ranges are clamped to [0, B): block_ptr may be rewritten by another thread after it was checked.
void chunk_block_rows(const int32_t* ptr, const int32_t* cnt, int64_t MB, int64_t B, int64_t bm, int64_t P,
                      int32_t* out) {
  std::vector<int64_t> cost(MB);
  int64_t total = 0;
  for (int64_t i = 0; i < MB; ++i) {
    int64_t c = 4 * bm;  // the block row's epilogue
    const int64_t lo = std::clamp<int64_t>(ptr[i], 0, B), hi = std::clamp<int64_t>(ptr[i + 1], lo, B);
    for (int64_t b = lo; b < hi; ++b) {
      // Counts clamped to the block: they are checked per block by the kernels, not here.
      c += kBlockCost +
           std::clamp<int64_t>(cnt[2 * b], 0, kMaxBlockDim) * std::clamp<int64_t>(cnt[2 * b + 1], 0, kMaxBlockDim);
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

// The boundaries of `level` from a cached plan over `units` rows or block rows, checked.
std::vector<int32_t> level_of_plan(const char* op, const char* from, const char* units_name, const at::Tensor& p,
                                   int64_t num_levels, int64_t level, int64_t units) {
  TORCH_CHECK(p.scalar_type() == at::kInt && p.dim() == 2 && p.size(0) == num_levels && p.size(1) >= 2 &&
                  p.is_contiguous() && p.device().is_cpu(),
              op, ": plan must be a contiguous int32 CPU tensor of shape (L=", num_levels, ", chunks+1) from ", from,
              ", got ", p.scalar_type(), " ", p.sizes(), " on ", p.device());
  const int64_t n = p.size(1);
  const int32_t* row = p.const_data_ptr<int32_t>() + level * n;
  const std::vector<int32_t> b(row, row + n);  // copied first: the kernels use exactly what is checked here
  TORCH_CHECK(b[0] == 0 && b[n - 1] == units, op, ": plan row ", level, " must run from 0 to ", units_name, "=", units,
              ", got ", b[0], " .. ", b[n - 1], " (was it built for another weight?)");
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(b[i - 1] <= b[i], op, ": plan row ", level, " is not non-decreasing at ", i);
  }
  return b;
}

at::Tensor ncsr_plan(const NcsrPlan::Call& c) {
  const at::Tensor &row_ptr = c.row_ptr, &row_end = c.row_end;
  const int64_t num_chunks = c.num_chunks;
  TORCH_CHECK(num_chunks >= 1, "ncsr_plan: num_chunks must be >= 1, got ", num_chunks);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.numel() >= 1,
              "ncsr_plan: row_ptr must be a 1-D int32 tensor of length M+1, got ", row_ptr.scalar_type(), " ",
              row_ptr.sizes());
  TORCH_CHECK(row_end.dim() == 2 && row_end.size(0) >= 1, "ncsr_plan: row_end must have shape (L, M), got ",
              row_end.sizes());
  TORCH_CHECK(row_ptr.device().is_cpu() && row_end.device().is_cpu(), "ncsr_plan: plans are for the CPU kernels; ",
              "row_ptr and row_end are on ", row_ptr.device(), " and ", row_end.device());
  TORCH_CHECK(row_end.scalar_type() == at::kInt, "ncsr_plan: row_end must be int32, got ", row_end.scalar_type());
  TORCH_CHECK(row_ptr.is_contiguous(), "ncsr_plan: row_ptr must be contiguous");
  TORCH_CHECK(row_end.is_contiguous(), "ncsr_plan: row_end must be contiguous");
  const int64_t L = row_end.size(0), M = row_ptr.numel() - 1;
  TORCH_CHECK(row_end.size(1) == M, "ncsr_plan: row_end must have shape (L, M=", M, "), got ", row_end.sizes());
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max() && num_chunks <= std::max<int64_t>(M, 1) + 1024,
              "ncsr_plan: ", num_chunks, " chunks for ", M, " rows; ask for at most M + 1024");
  for (int64_t l = 0; l < L; ++l) {
    check_row_slices("ncsr_plan", row_ptr.const_data_ptr<int32_t>(), row_end.const_data_ptr<int32_t>() + l * M, M, l,
                     std::numeric_limits<int64_t>::max());
  }
  at::Tensor plan = at::empty({L, num_chunks + 1}, at::kInt);
  for (int64_t l = 0; l < L; ++l) {
    chunk_rows(row_ptr.const_data_ptr<int32_t>(), row_end.const_data_ptr<int32_t>() + l * M, M, num_chunks,
               plan.data_ptr<int32_t>() + l * (num_chunks + 1));
  }
  return plan;
}

at::Tensor nbcr_plan(const NbcrPlan::Call& c) {
  constexpr const char* op = "nbcr_plan";
  const at::Tensor &block_ptr = c.block_ptr, &counts = c.counts;
  const int64_t num_chunks = c.num_chunks, block_rows_size = c.rows_per_block;
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
    chunk_block_rows(p, counts.const_data_ptr<int32_t>() + l * B * 2, MB, B, block_rows_size, num_chunks,
                     plan.data_ptr<int32_t>() + l * (num_chunks + 1));
  }
  return plan;
}

}  // namespace

std::vector<int32_t> row_chunks(const char* op, const NcsrLevel& w, const std::optional<at::Tensor>& plan,
                                int64_t default_chunks) {
  if (plan.has_value()) return level_of_plan(op, "ncsr_plan", "M", *plan, w.num_levels, w.level, w.rows);
  std::vector<int32_t> b(default_chunks + 1);
  chunk_rows(w.row_start(), w.row_stop(), w.rows, default_chunks, b.data());
  return b;
}

std::vector<int32_t> block_row_chunks(const char* op, const NbcrLevel& w, const std::optional<at::Tensor>& plan,
                                      int64_t default_chunks) {
  if (plan.has_value()) return level_of_plan(op, "nbcr_plan", "MB", *plan, w.num_levels, w.level, w.block_rows);
  std::vector<int32_t> b(default_chunks + 1);
  chunk_block_rows(w.ptr(), w.level_counts(), w.block_rows, w.num_blocks, w.bm, default_chunks, b.data());
  return b;
}

TORCH_LIBRARY_IMPL(nestsparse, CPU, m) {
  m.impl(NcsrPlan::name(), impl<NcsrPlan, &ncsr_plan>);
  m.impl(NbcrPlan::name(), impl<NbcrPlan, &nbcr_plan>);
}

}  // namespace nestsparse
