// CUDA ncsr_linear and its backward (ops/linear.h): y = act(scale * x W_level^T + bias + residual), W in nested CSR.
// Batches of 1-32 rows run spmv_kernel (sub-warp per row, vector loads), larger ones spmm_kernel (the row staged in
// shared memory); see ncsr_kernels.cuh. x is read as (K, N): one transposing copy for N > 1, so that the N values
// an entry meets are adjacent (for N > 32, so that a warp's reads are).
//
// Backward: grad_x by the scatter kernel (float32 atomics into (K, N), then transposed and cast), grad_values by the
// SDDMM kernel on x and grad_z both read as (., N) rows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops/cuda/launch.cuh"
#include "ops/linear.h"

namespace nestsparse::cuda {
namespace {

at::Tensor linear(const Linear<Ncsr>::Call& c) {
  const char* op = Linear<Ncsr>::name();
  const at::Tensor& x = c.x;
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_linear_input(op, x, c.w.values);
  const NcsrLevel w = Ncsr::check(op, c.w, x.device());
  check_bias(op, c.bias, c.w.values, w.rows);
  const int64_t K = x.size(-1), N = batch_rows(x), M = w.rows;
  const std::vector<int64_t> out_sizes = linear_output_sizes(x, M);
  check_epilogue(op, c.scale, c.residual, c.w.values, M, out_sizes);
  const int32_t* plan = plan_row(op, c.plan, w, x.device());
  at::Tensor y = new_output(out_sizes, x.options());
  if (N == 0 || M == 0) return y;

  const CallFlags flags = call_flags(x);
  const cudaStream_t stream = stream_of(x);
  const at::Tensor xt = N == 1 ? x : x.reshape({N, K}).t().contiguous();  // (K, N)
  dispatch_types(w, [&]<typename scalar_t, typename index_t>() {
    const auto rows = device_rows<scalar_t, index_t>(w, K, plan);
    const auto ep = epilogue<scalar_t>(c.bias, c.scale, c.residual, c.activation, y);
    if (N <= kMaxSmallBatch) {
      launch_spmv(rows, xt.const_data_ptr<scalar_t>(), N, ep, flags.ptr, stream);
    } else {
      launch_spmm(rows, LinearOperand{N, M, 1}, N, xt.const_data_ptr<scalar_t>(), ep, flags.ptr, stream);
    }
  });
  raise_if_bad(op, flags, w, K);
  return y;
}

std::tuple<at::Tensor, at::Tensor> linear_backward(const LinearBackward<Ncsr>::Call& c) {
  const char* op = LinearBackward<Ncsr>::name();
  const at::Tensor& x = c.x;
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_linear_input(op, x, c.w.values);
  const NcsrLevel w = Ncsr::check(op, c.w, x.device());
  check_grad_z(op, c.grad_z, linear_output_sizes(x, w.rows));
  TORCH_CHECK(c.grad_z.device() == x.device(), op, ": grad_z is on ", c.grad_z.device(), " but x is on ", x.device());
  const int64_t K = x.size(-1), N = batch_rows(x), M = w.rows;
  at::Tensor gv = at::zeros_like(w.values);
  if (N == 0 || M == 0 || K == 0) return {at::zeros_like(x), gv};

  const at::ScalarType acc = w.values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xt = x.reshape({N, K}).t().contiguous();                              // (K, N)
  const at::Tensor gzt = c.grad_z.to(x.scalar_type()).reshape({N, M}).t().contiguous();  // (M, N)
  at::Tensor gxt = at::zeros({K, N}, x.options().dtype(acc));                            // (K, N), accumulated
  at::globalContext().alertNotDeterministic("ncsr_linear_backward on CUDA (float atomics)");
  const CallFlags flags = call_flags(x);
  const cudaStream_t stream = stream_of(x);
  const LinearOperand operand{N, 1, N};  // grad_z (M, N): element (n, r) at r * N + n
  dispatch_types(w, [&]<typename scalar_t, typename index_t>() {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto rows = device_rows<scalar_t, index_t>(w, K, nullptr);
    launch_scatter(rows, operand, N, gzt.const_data_ptr<scalar_t>(), gxt.mutable_data_ptr<acc_t>(), flags.ptr, stream);
    launch_sddmm(rows, operand, gzt.const_data_ptr<scalar_t>(), xt.const_data_ptr<scalar_t>(),
                 gv.mutable_data_ptr<scalar_t>(), flags.ptr, stream);
  });
  raise_if_bad(op, flags, w, K);
  return {gxt.t().reshape(x.sizes()).to(x.scalar_type()).contiguous(), gv};
}

}  // namespace
}  // namespace nestsparse::cuda

TORCH_LIBRARY_IMPL(nestsparse, CUDA, m) {
  using nestsparse::Linear;
  using nestsparse::LinearBackward;
  using nestsparse::Ncsr;
  m.impl(Linear<Ncsr>::name(), nestsparse::impl<Linear<Ncsr>, &nestsparse::cuda::linear>);
  m.impl(LinearBackward<Ncsr>::name(), nestsparse::impl<LinearBackward<Ncsr>, &nestsparse::cuda::linear_backward>);
}
