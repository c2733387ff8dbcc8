// CPU nbcr_conv2d and its backward: the same lowering as ncsr_conv2d (conv_product in lowering.h: x read
// directly for 1x1, else the stride-phase buffer), with the block micro-kernel over each tile. float64 and
// the backward use im2col/col2im and nbcr_loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "ops/cpu/common.h"
#include "ops/cpu/lowering.h"
#include "ops/cpu/nbcr_loops.h"
#include "ops/debug.h"

namespace nestsparse::cpu {
namespace {

constexpr const char* kOp = "nbcr_conv2d";

int64_t conv_f64(const NbcrLevel& w, const ConvShape& s, const at::Tensor& x, const double* bias, Act act, double* out,
                 const std::vector<int32_t>& chunks) {
  const at::Tensor cols = at::im2col(x, {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw}).contiguous();
  const int64_t L = s.OH * s.OW, Ktot = s.Cin * s.kh * s.kw, P = static_cast<int64_t>(chunks.size()) - 1;
  const BlocksView bv = blocks_view(w, s.K, s.M / s.groups);
  const double* v = w.values.const_data_ptr<double>();
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, s.Nb * P, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / P, c = i % P;
      bad += nbcr_spmm_strided<double>(bv, v, cols.const_data_ptr<double>() + n * Ktot * L, L, 1, L, bias, act,
                                       out + n * s.M * L, L, 1, chunks[c], chunks[c + 1]);
    }
  });
  return bad.load();
}

at::Tensor nbcr_conv2d_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                           const at::Tensor& block_ptr, const at::Tensor& blocks, const at::Tensor& counts,
                           int64_t level, int64_t rows, at::IntArrayRef block_shape, at::IntArrayRef kernel_size,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
                           const std::optional<at::Tensor>& plan) {
  check_dense_input(kOp, "x", x, values);
  const NbcrLevel w = check_nbcr(kOp, values, indices, block_ptr, blocks, counts, level, rows, block_shape, x.device());
  const ConvShape s = check_conv(kOp, x, w.rows, kernel_size, stride, padding, dilation, groups);
  check_bias(kOp, bias, values, w.rows);
  const Act act = parse_activation(kOp, std::string(activation));
  const at::ScalarType ct = compute_type(values);
  at::Tensor out = maybe_poison(at::empty({s.Nb, s.M, s.OH, s.OW}, x.options().dtype(ct)));
  if (out.numel() == 0) return out.to(x.scalar_type());
  const std::vector<int32_t> chunks = block_row_chunks(kOp, w, plan, default_chunks());
  const at::Tensor xc = x.to(ct).contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
  int64_t bad = 0;
  if (ct == at::kDouble) {
    bad = conv_f64(w, s, xc, bc.defined() ? bc.const_data_ptr<double>() : nullptr, act, out.data_ptr<double>(), chunks);
  } else {
    const Epilogue ep{bc.defined() ? bc.const_data_ptr<float>() : nullptr, act};
    const SparseBlocks sb = sparse_blocks(w, s.K);
    const KernelTable& kt = active_kernels();
    const BlockTileFn fn = block_fn_for_width(kt, s.tile_width());
    bad = conv_product(s, xc.const_data_ptr<float>(), static_cast<int64_t>(chunks.size()) - 1, w.values.numel(),
                       out.data_ptr<float>(),
                       [&](const SpmmTile& tile, int64_t c) { return fn(sb, ep, tile, chunks[c], chunks[c + 1]); });
  }
  if (bad != 0) fail_bad_block(kOp, w, s.K);
  return out.to(x.scalar_type());
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> conv_backward_typed(const NbcrLevel& w, const ConvShape& s, const at::Tensor& gz,
                                                       const at::Tensor& x) {
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t L = s.OH * s.OW, Ktot = s.Cin * s.kh * s.kw;
  const at::Tensor g = gz.to(ct).contiguous();  // (Nb, M, L)
  const at::Tensor cols = at::im2col(x.to(ct), {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw}).contiguous();
  const at::Tensor v = w.values.to(ct).contiguous();
  const BlocksView bv = blocks_view(w, s.K, s.M / s.groups);
  at::Tensor gcols = at::zeros({s.Nb, Ktot, L}, g.options());
  at::Tensor gv = at::zeros({w.values.numel()}, g.options());
  std::atomic<int64_t> bad{0};
  constexpr int64_t kCols = 256;
  const int64_t nblk = (L + kCols - 1) / kCols;
  at::parallel_for(0, s.Nb * nblk, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / nblk, j0 = (i % nblk) * kCols;
      bad += nbcr_spmm_transposed<T>(bv, v.const_data_ptr<T>(), g.const_data_ptr<T>() + n * s.M * L, L,
                                     gcols.data_ptr<T>() + n * Ktot * L, L, j0, std::min(L, j0 + kCols));
    }
  });
  at::parallel_for(0, w.block_rows, 1, [&](int64_t i0, int64_t i1) {
    bad += nbcr_sddmm<T>(bv, g.const_data_ptr<T>(), L, s.M * L, cols.const_data_ptr<T>(), L, Ktot * L, L, s.Nb,
                         gv.data_ptr<T>(), i0, i1);
  });
  if (bad.load() != 0) fail_bad_block("nbcr_conv2d_backward", w, s.K);
  const at::Tensor gx = at::col2im(gcols, {s.H, s.W}, {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw});
  return {gx.to(x.scalar_type()), gv.to(w.values.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> nbcr_conv2d_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& block_ptr, const at::Tensor& blocks, const at::Tensor& counts, int64_t level, int64_t rows,
    at::IntArrayRef block_shape, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "nbcr_conv2d_backward";
  check_dense_input(op, "x", x, values);
  const NbcrLevel w = check_nbcr(op, values, indices, block_ptr, blocks, counts, level, rows, block_shape, x.device());
  const ConvShape s = check_conv(op, x, w.rows, kernel_size, stride, padding, dilation, groups);
  TORCH_CHECK(grad_z.sizes() == at::IntArrayRef({s.Nb, s.M, s.OH, s.OW}), op, ": grad_z must have shape (", s.Nb,
              ", ", s.M, ", ", s.OH, ", ", s.OW, "), got ", grad_z.sizes());
  return values.scalar_type() == at::kDouble ? conv_backward_typed<double>(w, s, grad_z, x)
                                             : conv_backward_typed<float>(w, s, grad_z, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(nestsparse, CPU, m) {
  m.impl("nbcr_conv2d", &nbcr_conv2d_cpu);
  m.impl("nbcr_conv2d_backward", &nbcr_conv2d_backward_cpu);
}

}  // namespace nestsparse::cpu
