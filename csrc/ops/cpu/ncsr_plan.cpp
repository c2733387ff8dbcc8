// The per-weight plan: for every level, row boundaries that split the rows into chunks of about equal work
// (a row costs its non-zeros plus a fixed overhead). Real pruned weights have very uneven rows (the DLMC
// ResNet-50 layers vary by 10x), so equal row counts would leave one thread waiting for the other.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "formats/ncsr.h"

namespace nestsparse {
namespace {

constexpr int64_t kRowCost = 8;  // a row's fixed cost (pointer loads, epilogue), in non-zero equivalents

void chunk_level(const int32_t* start, const int32_t* stop, int64_t M, int64_t P, int32_t* out) {
  int64_t total = 0;
  for (int64_t r = 0; r < M; ++r) total += (stop[r] - start[r]) + kRowCost;
  out[0] = 0;
  int64_t acc = 0, r = 0;
  for (int64_t c = 1; c < P; ++c) {
    const int64_t target = total * c / P;
    while (r < M && acc + (stop[r] - start[r]) + kRowCost / 2 <= target) acc += (stop[r] - start[r]) + kRowCost, ++r;
    out[c] = static_cast<int32_t>(r);
  }
  out[P] = static_cast<int32_t>(M);
}

at::Tensor ncsr_plan_cpu(const at::Tensor& row_ptr, const at::Tensor& row_end, int64_t num_chunks) {
  TORCH_CHECK(num_chunks >= 1, "ncsr_plan: num_chunks must be >= 1, got ", num_chunks);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.numel() >= 1,
              "ncsr_plan: row_ptr must be a 1-D int32 tensor of length M+1, got ", row_ptr.scalar_type(), " ",
              row_ptr.sizes());
  TORCH_CHECK(row_end.dim() == 2 && row_end.size(0) >= 1, "ncsr_plan: row_end must have shape (L, M), got ",
              row_end.sizes());
  TORCH_CHECK(row_ptr.device().is_cpu() && row_end.device().is_cpu(), "ncsr_plan: plans are for the CPU kernels; ",
              "row_ptr and row_end are on ", row_ptr.device(), " and ", row_end.device());
  TORCH_CHECK(row_end.scalar_type() == at::kInt && row_ptr.is_contiguous() && row_end.is_contiguous(),
              "ncsr_plan: row_end must be int32 and both arrays contiguous");
  const int64_t L = row_end.size(0), M = row_ptr.numel() - 1;
  TORCH_CHECK(row_end.size(1) == M, "ncsr_plan: row_end must have shape (L, M=", M, "), got ", row_end.sizes());
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max() && num_chunks <= std::max<int64_t>(M, 1) + 1024, "ncsr_plan: ",
              num_chunks, " chunks for ", M, " rows; ask for at most M + 1024");
  for (int64_t l = 0; l < L; ++l) {
    check_row_slices("ncsr_plan", row_ptr.const_data_ptr<int32_t>(), row_end.const_data_ptr<int32_t>() + l * M, M, l,
                     std::numeric_limits<int64_t>::max());
  }
  at::Tensor plan = at::empty({L, num_chunks + 1}, at::kInt);
  for (int64_t l = 0; l < L; ++l) {
    chunk_level(row_ptr.const_data_ptr<int32_t>(), row_end.const_data_ptr<int32_t>() + l * M, M, num_chunks,
                plan.data_ptr<int32_t>() + l * (num_chunks + 1));
  }
  return plan;
}

}  // namespace

std::vector<int32_t> row_chunks(const char* op, const NcsrLevel& w, const std::optional<at::Tensor>& plan,
                                int64_t default_chunks) {
  const int64_t M = w.rows;
  if (!plan.has_value()) {
    std::vector<int32_t> b(default_chunks + 1);
    chunk_level(w.row_start(), w.row_stop(), M, default_chunks, b.data());
    return b;
  }
  const at::Tensor& p = *plan;
  TORCH_CHECK(p.scalar_type() == at::kInt && p.dim() == 2 && p.size(0) == w.num_levels && p.size(1) >= 2 &&
                  p.is_contiguous() && p.device().is_cpu(),
              op, ": plan must be a contiguous int32 CPU tensor of shape (L=", w.num_levels,
              ", chunks+1) from ncsr_plan, got ", p.scalar_type(), " ", p.sizes(), " on ", p.device());
  const int64_t n = p.size(1);
  const int32_t* b = p.const_data_ptr<int32_t>() + w.level * n;
  TORCH_CHECK(b[0] == 0 && b[n - 1] == M, op, ": plan row ", w.level, " must run from 0 to M=", M, ", got ", b[0],
              " .. ", b[n - 1], " (was it built for another weight?)");
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(b[i - 1] <= b[i], op, ": plan row ", w.level, " is not non-decreasing at ", i);
  }
  return std::vector<int32_t>(b, b + n);
}

TORCH_LIBRARY_IMPL(nestsparse, CPU, m) { m.impl("ncsr_plan", &ncsr_plan_cpu); }

}  // namespace nestsparse
