// ncsr_plan on CUDA tensors (ops/plan.h): the schedule of the CUDA kernels, built once per weight on the host (one
// copy of row_ptr and row_end there and of the plan back) and cached by the caller. Per level: the rows ordered by
// their length at that level, longest first, split into the classes of ncsr_kernels.cuh (32, 16, 8 or 4 lanes per
// row) with each class's first position and first task (the layout is at kPlanHeader there). `num_chunks` is the
// CPU partition's and is ignored: the kernels' warps stride over the tasks.
//
// Rows ordered by length keep the warps of a block on rows of about equal work (real pruned layers vary by 10x per
// row), and the spmm kernels start the longest rows first, so the last wave is short rows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "ops/cuda/ncsr_kernels.cuh"
#include "ops/plan.h"

namespace nestsparse::cuda {
namespace {

at::Tensor ncsr_plan(const NcsrPlan::Call& c) {
  const char* op = NcsrPlan::name();
  TORCH_CHECK(c.row_ptr.scalar_type() == at::kInt && c.row_end.scalar_type() == at::kInt, op,
              ": row_ptr and row_end must be int32, got ", c.row_ptr.scalar_type(), " and ", c.row_end.scalar_type());
  TORCH_CHECK(c.row_ptr.dim() == 1 && c.row_ptr.numel() >= 1, op, ": row_ptr must be 1-D of length M+1, got shape ",
              c.row_ptr.sizes());
  const int64_t M = c.row_ptr.numel() - 1;
  TORCH_CHECK(c.row_end.dim() == 2 && c.row_end.size(1) == M && c.row_end.size(0) >= 1, op,
              ": row_end must have shape (L, M) = (L, ", M, "), got ", c.row_end.sizes());
  TORCH_CHECK(c.row_end.device() == c.row_ptr.device(), op, ": row_end is on ", c.row_end.device(),
              " but row_ptr is on ", c.row_ptr.device());
  TORCH_CHECK(M <= INT32_MAX - kPlanHeader, op, ": too many rows (", M, ")");
  const c10::cuda::CUDAGuard guard(c.row_ptr.device());
  const int64_t L = c.row_end.size(0);
  const at::Tensor rp = c.row_ptr.cpu().contiguous(), re = c.row_end.cpu().contiguous();
  const int32_t* ptr = rp.const_data_ptr<int32_t>();
  at::Tensor plan = at::zeros({L, kPlanHeader + M}, rp.options());
  std::vector<int64_t> len(M);
  for (int64_t l = 0; l < L; ++l) {
    const int32_t* end = re.const_data_ptr<int32_t>() + l * M;
    // A slice outside its row costs nothing here: the kernels find and report it per call.
    for (int64_t r = 0; r < M; ++r) len[r] = std::max<int64_t>(int64_t{end[r]} - ptr[r], 0);
    int32_t* row = plan.mutable_data_ptr<int32_t>() + l * (kPlanHeader + M);
    int32_t* order = row + kPlanHeader;
    std::iota(order, order + M, 0);
    std::stable_sort(order, order + M, [&](int32_t a, int32_t b) { return len[a] > len[b]; });
    // Class k holds the rows with row_class(len) == k: consecutive in the order, classes ascending.
    int64_t pos = 0, tasks = 0;
    for (int k = 0; k < kClasses; ++k) {
      row[k] = static_cast<int32_t>(tasks);
      row[kClasses + 1 + k] = static_cast<int32_t>(pos);
      int64_t n = 0;
      while (pos + n < M && row_class(len[order[pos + n]]) == k) ++n;
      const int64_t per_task = int64_t{1} << k;
      tasks += (n + per_task - 1) / per_task;
      pos += n;
    }
    row[kClasses] = static_cast<int32_t>(tasks);
    row[2 * kClasses + 1] = static_cast<int32_t>(M);
  }
  return plan.to(c.row_ptr.device());
}

}  // namespace
}  // namespace nestsparse::cuda

TORCH_LIBRARY_IMPL(nestsparse, CUDA, m) {
  m.impl(nestsparse::NcsrPlan::name(), nestsparse::impl<nestsparse::NcsrPlan, &nestsparse::cuda::ncsr_plan>);
}

TORCH_LIBRARY_FRAGMENT(nestsparse, m) {
  // The columns before the row order in a CUDA plan (the fake kernel of ncsr_plan sizes its output with it).
  m.def("cuda_plan_header() -> int", [] { return int64_t{nestsparse::cuda::kPlanHeader}; });
}
