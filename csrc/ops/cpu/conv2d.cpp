// CPU <format>_conv2d and its backward, written once for every format (format_traits.h says what differs).
//
// The forward never builds an im2col matrix. The batch is copied once into a zero-padded buffer split by
// stride phase (conv_product in lowering.h), where the input pixel that weight tap (c, a, b) meets at output
// (n, oh, ow) sits at a fixed offset koff[c, a, b] from column n*Hq*Wq + oh*Wq + ow, for every stride and
// dilation. So the convolution is the format's tile kernel over a "wide" grid whose padding columns are
// computed and dropped. A 1x1 stride-1 unpadded convolution skips the copy and reads x itself. float64 and the
// backward use im2col/col2im and the format's plain loops (gradient checks and training only).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "ops/conv2d.h"
#include "ops/cpu/format_traits.h"
#include "ops/cpu/lowering.h"

namespace nestsparse::cpu {
namespace {

// A stride past the padded input gives one output row (column), which reads from the first rows only: the same
// as a stride of the padded size, and the phase buffer is sized by the stride (a 1-pixel input at stride 16384
// asked for 1.3 GB). So the work stays bounded by the input, whatever the stride.
ConvShape bounded_stride(ConvShape s) {
  s.sh = std::min(s.sh, s.H + 2 * s.ph);
  s.sw = std::min(s.sw, s.W + 2 * s.pw);
  return s;
}

template <typename F>
int64_t conv_f32(const typename F::Level& w, const ConvShape& geometry, const float* x, const EpilogueTensors& e,
                 Act act, float* out, const std::vector<int32_t>& chunks) {
  using C = CpuFormat<F>;
  const ConvShape s = bounded_stride(geometry);
  const Epilogue ep = e.kernel(act, out);
  const auto view = C::kernel_view(w, s.K);
  const auto fn = C::tile_kernel(active_kernels(), conv_tile_width(s));
  return conv_product(s, x, static_cast<int64_t>(chunks.size()) - 1, C::work(w), out,
                      [&](const SpmmTile& tile, int64_t c) { return fn(view, ep, tile, chunks[c], chunks[c + 1]); });
}

template <typename F>
int64_t conv_f64(const typename F::Level& w, const ConvShape& s, const at::Tensor& x, const EpilogueTensors& e, Act act,
                 double* out, const std::vector<int32_t>& chunks) {
  const at::Tensor cols = at::im2col(x, {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw}).contiguous();
  const int64_t L = s.OH * s.OW, Ktot = s.Cin * s.kh * s.kw, P = static_cast<int64_t>(chunks.size()) - 1;
  const auto view = loop_view(w, s.K, s.M / s.groups);
  const double* v = w.values.template const_data_ptr<double>();
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, s.Nb * P, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / P, c = i % P;
      bad += spmm_strided<double>(view, v, cols.const_data_ptr<double>() + n * Ktot * L, L, 1, L, nullptr, Act::None,
                                  out + n * s.M * L, L, 1, chunks[c], chunks[c + 1]);
    }
  });
  finish_outputs<double>(e, act, out, s.Nb, s.M, L);
  return bad.load();
}

template <typename F>
at::Tensor conv2d(const typename Conv2d<F>::Call& c) {
  const char* op = Conv2d<F>::name();
  check_dense_input(op, "x", c.x, c.w.values);
  const typename F::Level w = F::check(op, c.w, c.x.device());
  const ConvShape s = conv_shape(op, c.x, w.rows, c.geometry);
  check_bias(op, c.bias, c.w.values, w.rows);
  check_epilogue(op, c.scale, c.residual, c.w.values, w.rows, {s.Nb, s.M, s.OH, s.OW});
  const at::ScalarType ct = compute_type(w.values);
  at::Tensor out = new_output({s.Nb, s.M, s.OH, s.OW}, c.x.options().dtype(ct));
  if (out.numel() == 0) return out.to(c.x.scalar_type());
  const std::vector<int32_t> chunks = CpuFormat<F>::chunks(op, w, c.plan);
  const at::Tensor xc = c.x.to(ct).contiguous();
  const EpilogueTensors e = epilogue_tensors(c, ct);
  const int64_t bad =
      ct == at::kDouble ? conv_f64<F>(w, s, xc, e, c.activation, out.data_ptr<double>(), chunks)
                        : conv_f32<F>(w, s, xc.const_data_ptr<float>(), e, c.activation, out.data_ptr<float>(), chunks);
  if (bad != 0) CpuFormat<F>::fail(op, w, s.K);
  return out.to(c.x.scalar_type());
}

template <typename F, typename T>
std::tuple<at::Tensor, at::Tensor> conv_backward_typed(const char* op, const typename F::Level& w, const ConvShape& s,
                                                       const at::Tensor& gz, const at::Tensor& x) {
  using C = CpuFormat<F>;
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t L = s.OH * s.OW, Ktot = s.Cin * s.kh * s.kw;
  const at::Tensor g = gz.to(ct).contiguous();  // (Nb, M, L)
  const at::Tensor cols = at::im2col(x.to(ct), {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw}).contiguous();
  const at::Tensor v = w.values.to(ct).contiguous();
  const auto view = loop_view(w, s.K, s.M / s.groups);
  at::Tensor gcols = at::zeros({s.Nb, Ktot, L}, g.options());
  at::Tensor gv = at::zeros({w.values.numel()}, g.options());
  std::atomic<int64_t> bad{0};
  constexpr int64_t kCols = 256;
  const int64_t nblk = (L + kCols - 1) / kCols;
  at::parallel_for(0, s.Nb * nblk, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / nblk, j0 = (i % nblk) * kCols;
      bad += spmm_transposed<T>(view, v.const_data_ptr<T>(), g.const_data_ptr<T>() + n * s.M * L, L,
                                gcols.data_ptr<T>() + n * Ktot * L, L, j0, std::min(L, j0 + kCols));
    }
  });
  // Before the value gradients: a block out of bounds is named first, then blocks that would share slots.
  if (bad.load() != 0) C::fail(op, w, s.K);
  C::check_value_slots(op, w);
  at::parallel_for(0, C::sddmm_units(w), C::sddmm_grain(true), [&](int64_t u0, int64_t u1) {
    bad += sddmm<T>(view, g.const_data_ptr<T>(), L, s.M * L, cols.const_data_ptr<T>(), L, Ktot * L, L, s.Nb,
                    gv.data_ptr<T>(), u0, u1);
  });
  if (bad.load() != 0) C::fail(op, w, s.K);
  const at::Tensor gx = at::col2im(gcols, {s.H, s.W}, {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw});
  return {gx.to(x.scalar_type()), gv.to(w.values.scalar_type())};
}

template <typename F>
std::tuple<at::Tensor, at::Tensor> conv2d_backward(const typename Conv2dBackward<F>::Call& c) {
  const char* op = Conv2dBackward<F>::name();
  check_dense_input(op, "x", c.x, c.w.values);
  const typename F::Level w = F::check(op, c.w, c.x.device());
  const ConvShape s = conv_shape(op, c.x, w.rows, c.geometry);
  check_grad_z(op, c.grad_z, {s.Nb, s.M, s.OH, s.OW});
  return w.values.scalar_type() == at::kDouble ? conv_backward_typed<F, double>(op, w, s, c.grad_z, c.x)
                                               : conv_backward_typed<F, float>(op, w, s, c.grad_z, c.x);
}

}  // namespace

TORCH_LIBRARY_IMPL(nestsparse, CPU, m) {
  for_each_format([&](auto format) {
    using F = decltype(format);
    m.impl(Conv2d<F>::name(), impl<Conv2d<F>, &conv2d<F>>);
    m.impl(Conv2dBackward<F>::name(), impl<Conv2dBackward<F>, &conv2d_backward<F>>);
  });
}

}  // namespace nestsparse::cpu
