// CPU <format>_linear and its backward, written once for every format (format_traits.h says what differs).
// Batches of 1-4 rows use the format's small-batch kernel (the weight is read once, x sits in L1); larger batches
// go through panel_product (lowering.h) and the format's tile kernel. float64 and the backward use the format's
// plain loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "ops/cpu/format_traits.h"
#include "ops/cpu/lowering.h"
#include "ops/linear.h"

namespace nestsparse::cpu {
namespace {

template <typename F>
int64_t linear_f32(const typename F::Level& w, const float* x, int64_t N, int64_t K, const EpilogueTensors& e, Act act,
                   float* out, const std::vector<int32_t>& chunks) {
  using C = CpuFormat<F>;
  const KernelTable& kt = active_kernels();
  const auto view = C::kernel_view(w, K);
  const Epilogue ep = e.kernel(act, out);
  const int64_t M = w.rows, P = static_cast<int64_t>(chunks.size()) - 1, work = C::work(w);
  if (N > kMaxSpmvBatch) {
    const auto fn = C::tile_kernel(kt, panel_width(N, K));
    return panel_product(x, N, K, M, P, work, ep.residual != nullptr, out,
                         [&](const SpmmTile& tile, int64_t c) { return fn(view, ep, tile, chunks[c], chunks[c + 1]); });
  }
  const auto fn = C::small_batch_kernel(kt);
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, P, grain_for(P, work * N), [&](int64_t c0, int64_t c1) {
    int64_t b = 0;
    for (int64_t c = c0; c < c1; ++c) b += fn(view, ep, SpmvBatch{x, K, N, out, M}, chunks[c], chunks[c + 1]);
    bad += b;
  });
  return bad.load();
}

template <typename F>
int64_t linear_f64(const typename F::Level& w, const double* x, int64_t N, int64_t K, const EpilogueTensors& e, Act act,
                   double* out, const std::vector<int32_t>& chunks) {
  const auto view = loop_view(w, K, kNoGroups);
  const double* v = w.values.template const_data_ptr<double>();
  const int64_t P = static_cast<int64_t>(chunks.size()) - 1;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, P, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      bad += spmm_strided<double>(view, v, x, 1, K, N, nullptr, Act::None, out, 1, w.rows, chunks[c], chunks[c + 1]);
    }
  });
  finish_outputs<double>(e, act, out, N, w.rows, 1);
  return bad.load();
}

template <typename F>
at::Tensor linear(const typename Linear<F>::Call& c) {
  const char* op = Linear<F>::name();
  const at::Tensor& x = c.x;
  check_linear_input(op, x, c.w.values);
  const typename F::Level w = F::check(op, c.w, x.device());
  check_bias(op, c.bias, c.w.values, w.rows);
  const int64_t K = x.size(-1), N = batch_rows(x), M = w.rows;
  const std::vector<int64_t> out_sizes = linear_output_sizes(x, M);
  check_epilogue(op, c.scale, c.residual, c.w.values, M, out_sizes);
  const at::ScalarType ct = compute_type(w.values);
  at::Tensor out = new_output(out_sizes, x.options().dtype(ct));
  if (N == 0 || M == 0) return out.to(x.scalar_type());
  const std::vector<int32_t> chunks = CpuFormat<F>::chunks(op, w, c.plan);
  const at::Tensor xc = x.to(ct).contiguous();
  const EpilogueTensors e = epilogue_tensors(c, ct);
  const int64_t bad =
      ct == at::kDouble
          ? linear_f64<F>(w, xc.const_data_ptr<double>(), N, K, e, c.activation, out.data_ptr<double>(), chunks)
          : linear_f32<F>(w, xc.const_data_ptr<float>(), N, K, e, c.activation, out.data_ptr<float>(), chunks);
  if (bad != 0) CpuFormat<F>::fail(op, w, K);
  return out.to(x.scalar_type());
}

template <typename F, typename T>
std::tuple<at::Tensor, at::Tensor> linear_backward_typed(const char* op, const typename F::Level& w,
                                                         const at::Tensor& gz, const at::Tensor& x, int64_t N,
                                                         int64_t K) {
  using C = CpuFormat<F>;
  const int64_t M = w.rows;
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const at::Tensor A = gz.to(ct).reshape({N, M}).t().contiguous();  // (M, N)
  const at::Tensor Bt = x.to(ct).reshape({N, K}).t().contiguous();  // (K, N)
  const at::Tensor v = w.values.to(ct).contiguous();
  const auto view = loop_view(w, K, kNoGroups);
  at::Tensor gxt = at::zeros({K, N}, A.options());
  at::Tensor gv = at::zeros({w.values.numel()}, A.options());
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, N, 64, [&](int64_t j0, int64_t j1) {
    bad += spmm_transposed<T>(view, v.const_data_ptr<T>(), A.const_data_ptr<T>(), N, gxt.data_ptr<T>(), N, j0, j1);
  });
  // Before the value gradients: a block out of bounds is named first, then blocks that would share slots.
  if (bad.load() != 0) C::fail(op, w, K);
  C::check_value_slots(op, w);
  at::parallel_for(0, C::sddmm_units(w), C::sddmm_grain(false), [&](int64_t u0, int64_t u1) {
    bad += sddmm<T>(view, A.const_data_ptr<T>(), N, 0, Bt.const_data_ptr<T>(), N, 0, N, 1, gv.data_ptr<T>(), u0, u1);
  });
  if (bad.load() != 0) C::fail(op, w, K);
  return {gxt.t().contiguous().reshape(x.sizes()).to(x.scalar_type()), gv.to(w.values.scalar_type())};
}

template <typename F>
std::tuple<at::Tensor, at::Tensor> linear_backward(const typename LinearBackward<F>::Call& c) {
  const char* op = LinearBackward<F>::name();
  const at::Tensor& x = c.x;
  check_linear_input(op, x, c.w.values);
  const typename F::Level w = F::check(op, c.w, x.device());
  check_grad_z(op, c.grad_z, linear_output_sizes(x, w.rows));
  const int64_t K = x.size(-1), N = batch_rows(x);
  return w.values.scalar_type() == at::kDouble ? linear_backward_typed<F, double>(op, w, c.grad_z, x, N, K)
                                               : linear_backward_typed<F, float>(op, w, c.grad_z, x, N, K);
}

}  // namespace

TORCH_LIBRARY_IMPL(nestsparse, CPU, m) {
  for_each_format([&](auto format) {
    using F = decltype(format);
    m.impl(Linear<F>::name(), impl<Linear<F>, &linear<F>>);
    m.impl(LinearBackward<F>::name(), impl<LinearBackward<F>, &linear_backward<F>>);
  });
}

}  // namespace nestsparse::cpu
