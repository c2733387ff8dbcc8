// CUDA ncsr_conv2d and its backward (ops/conv2d.h): NCHW convolution with the weight in nested CSR, by implicit
// im2col: spmm_kernel's ConvOperand (ncsr_kernels.cuh) computes, for each staged weight entry (cin, a, b) and each
// output pixel, where in x the entry meets that pixel, or that it meets the padding. No column matrix is built, so
// the memory a call needs is the output's; a 1x1 convolution reads x exactly as a linear layer reads x^T.
//
// Backward: grad_x is the same schedule scattering v * grad_z into a float32 copy of x's shape (the col2im of the
// implicit im2col), grad_values the SDDMM kernel over the output pixels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "ops/conv2d.h"
#include "ops/cuda/launch.cuh"

namespace nestsparse::cuda {
namespace {

ConvOperand conv_operand(const ConvShape& s) {
  const int64_t OHW = s.OH * s.OW, HW = s.H * s.W;
  return {s.Nb * OHW,  s.M,  OHW,  s.OW, s.Cin * HW, s.Cg * HW, s.H,  s.W, s.M / s.groups,
          s.kh * s.kw, s.kw, s.dh, s.dw, s.sh,       s.sw,      s.ph, s.pw};
}

at::Tensor conv2d(const Conv2d<Ncsr>::Call& c) {
  const char* op = Conv2d<Ncsr>::name();
  TORCH_CHECK(c.x.is_cuda(), op, ": x must be a CUDA tensor, got ", c.x.device());
  const c10::cuda::CUDAGuard guard(c.x.device());
  check_dense_input(op, "x", c.x, c.w.values);
  const NcsrLevel w = Ncsr::check(op, c.w, c.x.device());
  const ConvShape s = conv_shape(op, c.x, w.rows, c.geometry);
  check_bias(op, c.bias, c.w.values, w.rows);
  check_epilogue(op, c.scale, c.residual, c.w.values, w.rows, {s.Nb, s.M, s.OH, s.OW});
  const int32_t* plan = plan_row(op, c.plan, w, c.x.device());
  at::Tensor y = new_output({s.Nb, s.M, s.OH, s.OW}, c.x.options());
  if (y.numel() == 0) return y;

  const CallFlags flags = call_flags(c.x);
  const ConvOperand operand = conv_operand(s);
  dispatch_types(w, [&]<typename scalar_t, typename index_t>() {
    launch_spmm(device_rows<scalar_t, index_t>(w, s.K, plan), operand, operand.P, c.x.const_data_ptr<scalar_t>(),
                epilogue<scalar_t>(c.bias, c.scale, c.residual, c.activation, y), flags.ptr, stream_of(c.x));
  });
  raise_if_bad(op, flags, w, s.K);
  return y;
}

std::tuple<at::Tensor, at::Tensor> conv2d_backward(const Conv2dBackward<Ncsr>::Call& c) {
  const char* op = Conv2dBackward<Ncsr>::name();
  TORCH_CHECK(c.x.is_cuda(), op, ": x must be a CUDA tensor, got ", c.x.device());
  const c10::cuda::CUDAGuard guard(c.x.device());
  check_dense_input(op, "x", c.x, c.w.values);
  const NcsrLevel w = Ncsr::check(op, c.w, c.x.device());
  const ConvShape s = conv_shape(op, c.x, w.rows, c.geometry);
  check_grad_z(op, c.grad_z, {s.Nb, s.M, s.OH, s.OW});
  TORCH_CHECK(c.grad_z.device() == c.x.device(), op, ": grad_z is on ", c.grad_z.device(), " but x is on ",
              c.x.device());
  at::Tensor gv = at::zeros_like(w.values);
  if (c.grad_z.numel() == 0 || c.x.numel() == 0) return {at::zeros_like(c.x), gv};

  const at::ScalarType acc = w.values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gz = c.grad_z.to(c.x.scalar_type()).contiguous();
  at::Tensor gx = at::zeros(c.x.sizes(), c.x.options().dtype(acc));
  at::globalContext().alertNotDeterministic("ncsr_conv2d_backward on CUDA (float atomics)");
  const CallFlags flags = call_flags(c.x);
  const cudaStream_t stream = stream_of(c.x);
  const ConvOperand operand = conv_operand(s);
  dispatch_types(w, [&]<typename scalar_t, typename index_t>() {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto rows = device_rows<scalar_t, index_t>(w, s.K, nullptr);
    launch_scatter(rows, operand, operand.P, gz.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<acc_t>(), flags.ptr,
                   stream);
    launch_sddmm(rows, operand, gz.const_data_ptr<scalar_t>(), c.x.const_data_ptr<scalar_t>(),
                 gv.mutable_data_ptr<scalar_t>(), flags.ptr, stream);
  });
  raise_if_bad(op, flags, w, s.K);
  return {gx.to(c.x.scalar_type()), gv};
}

}  // namespace
}  // namespace nestsparse::cuda

TORCH_LIBRARY_IMPL(nestsparse, CUDA, m) {
  using nestsparse::Conv2d;
  using nestsparse::Conv2dBackward;
  using nestsparse::Ncsr;
  m.impl(Conv2d<Ncsr>::name(), nestsparse::impl<Conv2d<Ncsr>, &nestsparse::cuda::conv2d>);
  m.impl(Conv2dBackward<Ncsr>::name(), nestsparse::impl<Conv2dBackward<Ncsr>, &nestsparse::cuda::conv2d_backward>);
}
