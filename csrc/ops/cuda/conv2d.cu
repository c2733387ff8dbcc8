// CUDA ncsr_conv2d, nbcr_conv2d and their backward ops (ops/conv2d.h): NCHW convolution by implicit im2col: the
// ConvOperand (dense_operand.cuh) computes, for each staged weight entry (cin, a, b) and each output pixel, where in
// x the entry meets that pixel, or that it meets the padding. No column matrix is built, so the memory a call needs
// is the output's; a 1x1 convolution reads x exactly as a linear layer reads x^T.
//
// Nested CSR: spmm_kernel; backward, the same schedule scattering v * grad_z into a float32 copy of x's shape (the
// col2im of the implicit im2col), grad_values the SDDMM kernel over the output pixels.
// Nested BCR: tile_kernel (tensor cores for float16 / bfloat16); backward, tile_kernel over W^T into a float32 copy
// of x's shape (atomics where taps overlap, i.e. kernels larger than 1x1), grad_values block_sddmm_kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "ops/conv2d.h"
#include "ops/cuda/nbcr_launch.cuh"
#include "ops/cuda/ncsr_launch.cuh"

namespace nestsparse::cuda {
namespace {

ConvOperand conv_operand(const ConvShape& s) {
  const int64_t OHW = s.OH * s.OW, HW = s.H * s.W;
  return {s.Nb * OHW,  s.M,  OHW,  s.OW, s.Cin * HW, s.Cg * HW, s.H,  s.W, s.M / s.groups,
          s.kh * s.kw, s.kw, s.dh, s.dw, s.sh,       s.sw,      s.ph, s.pw};
}

// ---- the launches of each format ----------------------------------------------------------------------------------

void launch_conv2d(const ProductCall<Ncsr>& c, const NcsrLevel& w, const int32_t* plan, const ConvShape& s,
                   at::Tensor& y, const CallFlags& flags) {
  const ConvOperand operand = conv_operand(s);
  dispatch_types(w, [&]<typename scalar_t, typename index_t>() {
    launch_spmm(device_rows<scalar_t, index_t>(w, s.K, plan), operand, operand.P, c.x.const_data_ptr<scalar_t>(),
                epilogue<scalar_t>(c.bias, c.scale, c.residual, c.activation, y), flags.ptr, stream_of(c.x));
  });
}

void launch_conv2d(const ProductCall<Nbcr>& c, const NbcrLevel& w, const int32_t* plan, const ConvShape& s,
                   at::Tensor& y, const CallFlags& flags) {
  const ConvOperand operand = conv_operand(s);
  dispatch_values(w, [&]<typename scalar_t>() {
    const EpilogueSink<scalar_t> sink{epilogue<scalar_t>(c.bias, c.scale, c.residual, c.activation, y)};
    const TileGrid grid{operand.P, 0, s.M / s.groups, s.groups, 1, true, false};
    launch_tiles<false>(device_blocks<scalar_t>(w, s.K, plan), ColumnLists{}, operand, c.x.const_data_ptr<scalar_t>(),
                        sink, grid, flags.ptr, stream_of(c.x));
  });
}

// grad_x into gx (x's shape, float32 / float64), grad_values into gv.
void launch_conv2d_backward(const NcsrLevel& w, const ConvShape& s, const at::Tensor& x, const at::Tensor& gz,
                            at::Tensor& gx, at::Tensor& gv, const CallFlags& flags) {
  at::globalContext().alertNotDeterministic("ncsr_conv2d_backward on CUDA (float atomics)");
  const ConvOperand operand = conv_operand(s);
  dispatch_types(w, [&]<typename scalar_t, typename index_t>() {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto rows = device_rows<scalar_t, index_t>(w, s.K, nullptr);
    launch_scatter(rows, operand, operand.P, gz.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<acc_t>(), flags.ptr,
                   stream_of(x));
    launch_sddmm(rows, operand, gz.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                 gv.mutable_data_ptr<scalar_t>(), flags.ptr, stream_of(x));
  });
}

void launch_conv2d_backward(const NbcrLevel& w, const ConvShape& s, const at::Tensor& x, const at::Tensor& gz,
                            at::Tensor& gx, at::Tensor& gv, const CallFlags& flags) {
  // A 1x1 kernel meets each input element from one (column, pixel) only: plain stores. Larger kernels overlap.
  const bool overlap = s.kh * s.kw > 1;
  if (overlap) at::globalContext().alertNotDeterministic("nbcr_conv2d_backward on CUDA (float atomics)");
  const ConvOperand operand = conv_operand(s);
  launch_nbcr_backward(w, s.K, operand, TileGrid{operand.P, 0, s.M / s.groups, s.groups, 1, false, false}, gz, x, gx,
                       gv, overlap, flags);
}

// ---- the ops, once over the formats ----------------------------------------------------------------------------

template <typename F>
at::Tensor conv2d(const typename Conv2d<F>::Call& c) {
  const char* op = Conv2d<F>::name();
  TORCH_CHECK(c.x.is_cuda(), op, ": x must be a CUDA tensor, got ", c.x.device());
  const c10::cuda::CUDAGuard guard(c.x.device());
  check_dense_input(op, "x", c.x, c.w.values);
  const auto w = F::check(op, c.w, c.x.device());
  const ConvShape s = conv_shape(op, c.x, w.rows, c.geometry);
  check_bias(op, c.bias, c.w.values, w.rows);
  check_epilogue(op, c.scale, c.residual, c.w.values, w.rows, {s.Nb, s.M, s.OH, s.OW});
  const int32_t* plan = plan_row(op, c.plan, w, c.x.device());
  at::Tensor y = new_output({s.Nb, s.M, s.OH, s.OW}, c.x.options());
  if (y.numel() == 0) return y;

  const CallFlags flags = call_flags(c.x);
  launch_conv2d(c, w, plan, s, y, flags);
  raise_if_bad(op, flags, w, s.K);
  return y;
}

template <typename F>
std::tuple<at::Tensor, at::Tensor> conv2d_backward(const typename Conv2dBackward<F>::Call& c) {
  const char* op = Conv2dBackward<F>::name();
  TORCH_CHECK(c.x.is_cuda(), op, ": x must be a CUDA tensor, got ", c.x.device());
  const c10::cuda::CUDAGuard guard(c.x.device());
  check_dense_input(op, "x", c.x, c.w.values);
  const auto w = F::check(op, c.w, c.x.device());
  const ConvShape s = conv_shape(op, c.x, w.rows, c.geometry);
  check_grad_z(op, c.grad_z, {s.Nb, s.M, s.OH, s.OW});
  TORCH_CHECK(c.grad_z.device() == c.x.device(), op, ": grad_z is on ", c.grad_z.device(), " but x is on ",
              c.x.device());
  at::Tensor gv = at::zeros_like(w.values);
  if (c.grad_z.numel() == 0 || c.x.numel() == 0) return {at::zeros_like(c.x), gv};

  const at::ScalarType acc = w.values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gz = c.grad_z.to(c.x.scalar_type()).contiguous();
  at::Tensor gx = at::zeros(c.x.sizes(), c.x.options().dtype(acc));
  const CallFlags flags = call_flags(c.x);
  launch_conv2d_backward(w, s, c.x, gz, gx, gv, flags);
  raise_if_bad(op, flags, w, s.K);
  return {gx.to(c.x.scalar_type()), gv};
}

}  // namespace
}  // namespace nestsparse::cuda

TORCH_LIBRARY_IMPL(nestsparse, CUDA, m) {
  using namespace nestsparse;
  for_each_format([&](auto format) {
    using F = decltype(format);
    m.impl(Conv2d<F>::name(), impl<Conv2d<F>, &nestsparse::cuda::conv2d<F>>);
    m.impl(Conv2dBackward<F>::name(), impl<Conv2dBackward<F>, &nestsparse::cuda::conv2d_backward<F>>);
  });
}
