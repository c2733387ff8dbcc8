// CUDA ncsr_linear, nbcr_linear and their backward ops (ops/linear.h): y = act(scale * x W_level^T + bias + residual).
// x is read as (K, N): one transposing copy for N > 1, so that the N values an entry meets are adjacent (and a warp's
// reads are).
//
// Nested CSR (ncsr_kernels.cuh): batches of 1-32 rows run spmv_kernel (sub-warp per row, vector loads), larger ones
// spmm_kernel (the row staged in shared memory). Backward: grad_x by the scatter kernel (float32 atomics into (K, N),
// then transposed and cast), grad_values by the SDDMM kernel on x and grad_z both read as (., N) rows.
//
// Nested BCR (nbcr_kernels.cuh): tile_kernel at every batch (tensor cores for float16 / bfloat16). Backward: grad_x by
// tile_kernel over W^T (each element written once: deterministic), grad_values by block_sddmm_kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops/cuda/nbcr_launch.cuh"
#include "ops/cuda/ncsr_launch.cuh"
#include "ops/linear.h"

namespace nestsparse::cuda {
namespace {

// ---- the launches of each format ----------------------------------------------------------------------------------

void launch_linear(const ProductCall<Ncsr>& c, const NcsrLevel& w, const int32_t* plan, const at::Tensor& xt, int64_t N,
                   int64_t K, at::Tensor& y, const CallFlags& flags) {
  dispatch_types(w, [&]<typename scalar_t, typename index_t>() {
    const auto rows = device_rows<scalar_t, index_t>(w, K, plan);
    const auto ep = epilogue<scalar_t>(c.bias, c.scale, c.residual, c.activation, y);
    if (N <= kMaxSmallBatch) {
      launch_spmv(rows, xt.const_data_ptr<scalar_t>(), N, ep, flags.ptr, stream_of(xt));
    } else {
      launch_spmm(rows, LinearOperand{N, w.rows, 1}, N, xt.const_data_ptr<scalar_t>(), ep, flags.ptr, stream_of(xt));
    }
  });
}

void launch_linear(const ProductCall<Nbcr>& c, const NbcrLevel& w, const int32_t* plan, const at::Tensor& xt, int64_t N,
                   int64_t K, at::Tensor& y, const CallFlags& flags) {
  dispatch_values(w, [&]<typename scalar_t>() {
    const EpilogueSink<scalar_t> sink{epilogue<scalar_t>(c.bias, c.scale, c.residual, c.activation, y)};
    const scalar_t* xp = xt.const_data_ptr<scalar_t>();
    const TileGrid grid{N, 0, w.rows, 1, 1, true, vector_loads<scalar_t>(xp, N)};
    launch_tiles<false>(device_blocks<scalar_t>(w, K, plan), ColumnLists{}, LinearOperand{N, w.rows, 1}, xp, sink, grid,
                        flags.ptr, stream_of(xt));
  });
}

// grad_x into gxt (K, N), accumulated in float32 (float64); grad_values into gv. x and grad_z are read as (., N).
void launch_linear_backward(const NcsrLevel& w, const at::Tensor& xt, const at::Tensor& gzt, at::Tensor& gxt,
                            at::Tensor& gv, int64_t N, int64_t K, const CallFlags& flags) {
  at::globalContext().alertNotDeterministic("ncsr_linear_backward on CUDA (float atomics)");
  const LinearOperand operand{N, 1, N};  // grad_z (M, N): element (n, r) at r * N + n
  dispatch_types(w, [&]<typename scalar_t, typename index_t>() {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto rows = device_rows<scalar_t, index_t>(w, K, nullptr);
    launch_scatter(rows, operand, N, gzt.const_data_ptr<scalar_t>(), gxt.mutable_data_ptr<acc_t>(), flags.ptr,
                   stream_of(xt));
    launch_sddmm(rows, operand, gzt.const_data_ptr<scalar_t>(), xt.const_data_ptr<scalar_t>(),
                 gv.mutable_data_ptr<scalar_t>(), flags.ptr, stream_of(xt));
  });
}

void launch_linear_backward(const NbcrLevel& w, const at::Tensor& xt, const at::Tensor& gzt, at::Tensor& gxt,
                            at::Tensor& gv, int64_t N, int64_t K, const CallFlags& flags) {
  // grad_z (M, N): element (n, r) at r * N + n; every element of grad_x is written once (no overlap).
  launch_nbcr_backward(w, K, LinearOperand{N, 1, N}, TileGrid{N, 0, w.rows, 1, 1, false, true}, gzt, xt, gxt, gv, false,
                       flags);
}

// ---- the ops, once over the formats ----------------------------------------------------------------------------

template <typename F>
at::Tensor linear(const typename Linear<F>::Call& c) {
  const char* op = Linear<F>::name();
  const at::Tensor& x = c.x;
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_linear_input(op, x, c.w.values);
  const auto w = F::check(op, c.w, x.device());
  check_bias(op, c.bias, c.w.values, w.rows);
  const int64_t K = x.size(-1), N = batch_rows(x), M = w.rows;
  const std::vector<int64_t> out_sizes = linear_output_sizes(x, M);
  check_epilogue(op, c.scale, c.residual, c.w.values, M, out_sizes);
  const int32_t* plan = plan_row(op, c.plan, w, x.device());
  at::Tensor y = new_output(out_sizes, x.options());
  if (N == 0 || M == 0) return y;

  const CallFlags flags = call_flags(x);
  const at::Tensor xt = N == 1 ? x : x.reshape({N, K}).t().contiguous();  // (K, N)
  launch_linear(c, w, plan, xt, N, K, y, flags);
  raise_if_bad(op, flags, w, K);
  return y;
}

template <typename F>
std::tuple<at::Tensor, at::Tensor> linear_backward(const typename LinearBackward<F>::Call& c) {
  const char* op = LinearBackward<F>::name();
  const at::Tensor& x = c.x;
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_linear_input(op, x, c.w.values);
  const auto w = F::check(op, c.w, x.device());
  check_grad_z(op, c.grad_z, linear_output_sizes(x, w.rows));
  TORCH_CHECK(c.grad_z.device() == x.device(), op, ": grad_z is on ", c.grad_z.device(), " but x is on ", x.device());
  const int64_t K = x.size(-1), N = batch_rows(x), M = w.rows;
  at::Tensor gv = at::zeros_like(w.values);
  if (N == 0 || M == 0 || K == 0) return {at::zeros_like(x), gv};

  const at::ScalarType acc = w.values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xt = x.reshape({N, K}).t().contiguous();                              // (K, N)
  const at::Tensor gzt = c.grad_z.to(x.scalar_type()).reshape({N, M}).t().contiguous();  // (M, N)
  at::Tensor gxt = at::zeros({K, N}, x.options().dtype(acc));                            // (K, N), accumulated
  const CallFlags flags = call_flags(x);
  launch_linear_backward(w, xt, gzt, gxt, gv, N, K, flags);
  raise_if_bad(op, flags, w, K);
  return {gxt.t().reshape(x.sizes()).to(x.scalar_type()).contiguous(), gv};
}

}  // namespace
}  // namespace nestsparse::cuda

TORCH_LIBRARY_IMPL(nestsparse, CUDA, m) {
  using namespace nestsparse;
  for_each_format([&](auto format) {
    using F = decltype(format);
    m.impl(Linear<F>::name(), impl<Linear<F>, &nestsparse::cuda::linear<F>>);
    m.impl(LinearBackward<F>::name(), impl<LinearBackward<F>, &nestsparse::cuda::linear_backward<F>>);
  });
}
