// CPU ncsr_conv2d and its backward.
//
// The forward never builds an im2col matrix. The batch is copied once into a zero-padded buffer split by
// stride phase (conv_f32_phases), where the input pixel that weight tap (c, a, b) meets at output
// (n, oh, ow) sits at a fixed offset koff[c, a, b] from column n*Hq*Wq + oh*Wq + ow, for every stride and
// dilation. So the convolution is the broadcast SpMM kernel over a "wide" grid whose padding columns are
// computed and dropped. A 1x1 stride-1 unpadded convolution skips the copy and reads x itself
// (conv_f32_direct). float64 and the backward use im2col/col2im (gradient checks and training only).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

#include "cpu_isa.h"
#include "ops/cpu/common.h"
#include "ops/cpu/lowering.h"
#include "ops/debug.h"

namespace nestsparse::cpu {
namespace {

constexpr const char* kOp = "ncsr_conv2d";

void conv_f64(const NcsrLevel& w, const ConvShape& s, const at::Tensor& x, const double* bias, Act act, double* out,
              const std::vector<int32_t>& chunks) {
  const at::Tensor cols = at::im2col(x, {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw}).contiguous();
  const int64_t L = s.OH * s.OW, Ktot = s.Cin * s.kh * s.kw, P = static_cast<int64_t>(chunks.size()) - 1;
  const RowsView rv = rows_view(w, s.K, s.M / s.groups);
  const double* v = w.values.const_data_ptr<double>();
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, s.Nb * P, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / P, c = i % P;
      bad += spmm_strided<double>(rv, v, cols.const_data_ptr<double>() + n * Ktot * L, L, 1, L, bias, act,
                                  out + n * s.M * L, L, 1, chunks[c], chunks[c + 1]);
    }
  });
  if (bad.load() != 0) fail_column_out_of_range(kOp, w, s.K);
}

at::Tensor ncsr_conv2d_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
                           const at::Tensor& row_ptr, const at::Tensor& row_end, int64_t level,
                           at::IntArrayRef kernel_size, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           c10::string_view activation, const std::optional<at::Tensor>& plan) {
  check_dense_input(kOp, "x", x, values);
  const NcsrLevel w = check_ncsr(kOp, values, col_idx, row_ptr, row_end, level, x.device());
  const ConvShape s = check_conv(kOp, x, w.rows, kernel_size, stride, padding, dilation, groups);
  check_bias(kOp, bias, values, w.rows);
  const Act act = parse_activation(kOp, std::string(activation));
  const at::ScalarType ct = compute_type(values);
  at::Tensor out = maybe_poison(at::empty({s.Nb, s.M, s.OH, s.OW}, x.options().dtype(ct)));
  if (out.numel() == 0) return out.to(x.scalar_type());
  const std::vector<int32_t> chunks = row_chunks(kOp, w, plan, default_chunks());
  const at::Tensor xc = x.to(ct).contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
  if (ct == at::kDouble) {
    conv_f64(w, s, xc, bc.defined() ? bc.const_data_ptr<double>() : nullptr, act, out.data_ptr<double>(), chunks);
  } else {
    const Epilogue ep{bc.defined() ? bc.const_data_ptr<float>() : nullptr, act};
    const SparseRows rows = sparse_rows(w, s.K);
    const SpmmTileFn fn = spmm_for_width(active_kernels(), s.tile_width());
    const int64_t bad = conv_product(s, xc.const_data_ptr<float>(), static_cast<int64_t>(chunks.size()) - 1, w.nnz,
                                     out.data_ptr<float>(), [&](const SpmmTile& tile, int64_t c) {
                                       return fn(rows, ep, tile, chunks[c], chunks[c + 1]);
                                     });
    if (bad != 0) fail_column_out_of_range(kOp, w, s.K);
  }
  return out.to(x.scalar_type());
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> conv_backward_typed(const NcsrLevel& w, const ConvShape& s, const at::Tensor& gz,
                                                       const at::Tensor& x) {
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t L = s.OH * s.OW, Ktot = s.Cin * s.kh * s.kw;
  const at::Tensor g = gz.to(ct).contiguous();  // (Nb, M, L)
  const at::Tensor cols = at::im2col(x.to(ct), {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw}).contiguous();
  const at::Tensor v = w.values.to(ct).contiguous();
  const RowsView rv = rows_view(w, s.K, s.M / s.groups);
  at::Tensor gcols = at::zeros({s.Nb, Ktot, L}, g.options());
  at::Tensor gv = at::zeros({w.values.numel()}, g.options());
  std::atomic<int64_t> bad{0};
  constexpr int64_t kCols = 256;
  const int64_t nblk = (L + kCols - 1) / kCols;
  at::parallel_for(0, s.Nb * nblk, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / nblk, j0 = (i % nblk) * kCols;
      bad += spmm_transposed<T>(rv, s.M, v.const_data_ptr<T>(), g.const_data_ptr<T>() + n * s.M * L, L,
                                gcols.data_ptr<T>() + n * Ktot * L, L, j0, std::min(L, j0 + kCols));
    }
  });
  at::parallel_for(0, s.M, 4, [&](int64_t r0, int64_t r1) {
    bad += sddmm<T>(rv, g.const_data_ptr<T>(), L, s.M * L, cols.const_data_ptr<T>(), L, Ktot * L, L, s.Nb,
                    gv.data_ptr<T>(), r0, r1);
  });
  if (bad.load() != 0) fail_column_out_of_range("ncsr_conv2d_backward", w, s.K);
  const at::Tensor gx = at::col2im(gcols, {s.H, s.W}, {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw});
  return {gx.to(x.scalar_type()), gv.to(w.values.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> ncsr_conv2d_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
    const at::Tensor& row_ptr, const at::Tensor& row_end, int64_t level, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "ncsr_conv2d_backward";
  check_dense_input(op, "x", x, values);
  const NcsrLevel w = check_ncsr(op, values, col_idx, row_ptr, row_end, level, x.device());
  const ConvShape s = check_conv(op, x, w.rows, kernel_size, stride, padding, dilation, groups);
  TORCH_CHECK(grad_z.sizes() == at::IntArrayRef({s.Nb, s.M, s.OH, s.OW}), op, ": grad_z must have shape (", s.Nb,
              ", ", s.M, ", ", s.OH, ", ", s.OW, "), got ", grad_z.sizes());
  return values.scalar_type() == at::kDouble ? conv_backward_typed<double>(w, s, grad_z, x)
                                             : conv_backward_typed<float>(w, s, grad_z, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(nestsparse, CPU, m) {
  m.impl("ncsr_conv2d", &ncsr_conv2d_cpu);
  m.impl("ncsr_conv2d_backward", &ncsr_conv2d_backward_cpu);
}

}  // namespace nestsparse::cpu
