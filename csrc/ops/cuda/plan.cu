// ncsr_plan and nbcr_plan on CUDA tensors (ops/plan.h).
//
// ncsr_plan: the schedule of the CUDA kernels, built once per weight on the host (one
// copy of row_ptr and row_end there and of the plan back) and cached by the caller. Per level: the rows ordered by
// their length at that level, longest first, split into the classes of ncsr_kernels.cuh (32, 16, 8 or 4 lanes per
// row) with each class's first position and first task (the layout is at kPlanHeader there). `num_chunks` is the
// CPU partition's and is ignored: the kernels' warps stride over the tasks.
//
// Rows ordered by length keep the warps of a block on rows of about equal work (real pruned layers vary by 10x per
// row), and the spmm kernels start the longest rows first, so the last wave is short rows.
//
// nbcr_plan: per level, the block rows ordered by their work at that level (the sum of r_l x c_l over their blocks),
// most first, int32 (L, MB): tile_kernel starts the heaviest block rows first. `rows_per_block` and `num_chunks` are
// the CPU partition's and are ignored.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "formats/nbcr.h"
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

at::Tensor nbcr_plan(const NbcrPlan::Call& c) {
  const char* op = NbcrPlan::name();
  TORCH_CHECK(c.block_ptr.scalar_type() == at::kInt && c.counts.scalar_type() == at::kInt, op,
              ": block_ptr and counts must be int32, got ", c.block_ptr.scalar_type(), " and ", c.counts.scalar_type());
  TORCH_CHECK(c.block_ptr.dim() == 1 && c.block_ptr.numel() >= 1, op,
              ": block_ptr must be 1-D of length MB+1, got shape ", c.block_ptr.sizes());
  TORCH_CHECK(c.counts.dim() == 3 && c.counts.size(0) >= 1 && c.counts.size(2) == 2, op,
              ": counts must have shape (L, B, 2), got ", c.counts.sizes());
  TORCH_CHECK(c.counts.device() == c.block_ptr.device(), op, ": counts is on ", c.counts.device(),
              " but block_ptr is on ", c.block_ptr.device());
  const int64_t MB = c.block_ptr.numel() - 1, L = c.counts.size(0), B = c.counts.size(1);
  TORCH_CHECK(MB <= INT32_MAX, op, ": too many block rows (", MB, ")");
  const c10::cuda::CUDAGuard guard(c.block_ptr.device());
  const at::Tensor bp = c.block_ptr.cpu().contiguous(), cn = c.counts.cpu().contiguous();
  const int32_t* ptr = bp.const_data_ptr<int32_t>();
  at::Tensor plan = at::empty({L, MB}, bp.options());
  std::vector<int64_t> work(MB);
  for (int64_t l = 0; l < L; ++l) {
    const int32_t* cl = cn.const_data_ptr<int32_t>() + l * B * 2;
    // A range or count outside the weight costs nothing here: the kernels find and report it per call.
    for (int64_t i = 0; i < MB; ++i) {
      const int64_t lo = std::clamp<int64_t>(ptr[i], 0, B), hi = std::clamp<int64_t>(ptr[i + 1], lo, B);
      work[i] = 0;
      for (int64_t b = lo; b < hi; ++b) {
        work[i] +=
            std::clamp<int64_t>(cl[2 * b], 0, kMaxBlockDim) * std::clamp<int64_t>(cl[2 * b + 1], 0, kMaxBlockDim);
      }
    }
    int32_t* order = plan.mutable_data_ptr<int32_t>() + l * MB;
    std::iota(order, order + MB, 0);
    std::stable_sort(order, order + MB, [&](int32_t a, int32_t b) { return work[a] > work[b]; });
  }
  return plan.to(c.block_ptr.device());
}

}  // namespace
}  // namespace nestsparse::cuda

TORCH_LIBRARY_IMPL(nestsparse, CUDA, m) {
  m.impl(nestsparse::NcsrPlan::name(), nestsparse::impl<nestsparse::NcsrPlan, &nestsparse::cuda::ncsr_plan>);
  m.impl(nestsparse::NbcrPlan::name(), nestsparse::impl<nestsparse::NbcrPlan, &nestsparse::cuda::nbcr_plan>);
}

TORCH_LIBRARY_FRAGMENT(nestsparse, m) {
  // The columns before the row order in a CUDA plan (the fake kernel of ncsr_plan sizes its output with it).
  m.def("cuda_plan_header() -> int", [] { return int64_t{nestsparse::cuda::kPlanHeader}; });
}
