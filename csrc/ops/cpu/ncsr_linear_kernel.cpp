// CPU ncsr_linear and its backward. Batches of 1-4 rows use the gather kernel (the weight is read once, x
// sits in L1); larger batches go through panel_product (lowering.h) and the broadcast kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "ops/cpu/common.h"
#include "ops/cpu/lowering.h"
#include "ops/debug.h"

namespace nestsparse::cpu {
namespace {

constexpr const char* kOp = "ncsr_linear";

int64_t batch_rows(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  return n;
}

void linear_f32(const NcsrLevel& w, const at::Tensor& x, int64_t N, int64_t K, const float* bias, Act act,
                float* out, const std::vector<int32_t>& chunks) {
  const KernelTable& kt = active_kernels();
  const SparseRows rows = sparse_rows(w, K);
  const Epilogue ep{bias, act};
  const int64_t M = w.rows, P = static_cast<int64_t>(chunks.size()) - 1;
  const float* xf = x.const_data_ptr<float>();
  std::atomic<int64_t> bad{0};
  if (N <= kMaxSpmvBatch) {
    at::parallel_for(0, P, grain_for(P, w.nnz * N), [&](int64_t c0, int64_t c1) {
      int64_t b = 0;
      for (int64_t c = c0; c < c1; ++c) b += kt.spmv(rows, ep, SpmvBatch{xf, K, N, out, M}, chunks[c], chunks[c + 1]);
      bad += b;
    });
  } else {
    const SpmmTileFn fn = spmm_for_width(kt, panel_width(N, K));
    bad += panel_product(xf, N, K, M, P, w.nnz, out, [&](const SpmmTile& tile, int64_t c) {
      return fn(rows, ep, tile, chunks[c], chunks[c + 1]);
    });
  }
  if (bad.load() != 0) fail_column_out_of_range(kOp, w, K);
}

void linear_f64(const NcsrLevel& w, const at::Tensor& x, int64_t N, int64_t K, const double* bias, Act act,
                double* out, const std::vector<int32_t>& chunks) {
  const RowsView rv = rows_view(w, K, kNoGroups);
  const double* v = w.values.const_data_ptr<double>();
  const double* xd = x.const_data_ptr<double>();
  std::atomic<int64_t> bad{0};
  const int64_t P = static_cast<int64_t>(chunks.size()) - 1;
  at::parallel_for(0, P, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      bad += spmm_strided<double>(rv, v, xd, 1, K, N, bias, act, out, 1, w.rows, chunks[c], chunks[c + 1]);
    }
  });
  if (bad.load() != 0) fail_column_out_of_range(kOp, w, K);
}

at::Tensor ncsr_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
                           const at::Tensor& row_ptr, const at::Tensor& row_end, int64_t level,
                           const std::optional<at::Tensor>& bias, c10::string_view activation,
                           const std::optional<at::Tensor>& plan) {
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have shape (..., K), got a 0-d tensor");
  check_dense_input(kOp, "x", x, values);
  const NcsrLevel w = check_ncsr(kOp, values, col_idx, row_ptr, row_end, level, x.device());
  check_bias(kOp, bias, values, w.rows);
  const Act act = parse_activation(kOp, std::string(activation));
  const int64_t K = x.size(-1), N = batch_rows(x), M = w.rows;
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = M;
  const at::ScalarType ct = compute_type(values);
  at::Tensor out = maybe_poison(at::empty(out_sizes, x.options().dtype(ct)));
  if (N == 0 || M == 0) return out.to(x.scalar_type());
  const std::vector<int32_t> chunks = row_chunks(kOp, w, plan, default_chunks());
  const at::Tensor xc = x.to(ct).contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
  if (ct == at::kDouble) {
    linear_f64(w, xc, N, K, bc.defined() ? bc.const_data_ptr<double>() : nullptr, act, out.data_ptr<double>(), chunks);
  } else {
    linear_f32(w, xc, N, K, bc.defined() ? bc.const_data_ptr<float>() : nullptr, act, out.data_ptr<float>(), chunks);
  }
  return out.to(x.scalar_type());
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> linear_backward_typed(const NcsrLevel& w, const at::Tensor& gz,
                                                         const at::Tensor& x, int64_t N, int64_t K) {
  const int64_t M = w.rows;
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const at::Tensor A = gz.to(ct).reshape({N, M}).t().contiguous();  // (M, N)
  const at::Tensor Bt = x.to(ct).reshape({N, K}).t().contiguous();  // (K, N)
  const at::Tensor v = w.values.to(ct).contiguous();
  const RowsView rv = rows_view(w, K, kNoGroups);
  at::Tensor gxt = at::zeros({K, N}, A.options());
  at::Tensor gv = at::zeros({w.values.numel()}, A.options());
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, N, 64, [&](int64_t j0, int64_t j1) {
    bad += spmm_transposed<T>(rv, M, v.const_data_ptr<T>(), A.const_data_ptr<T>(), N, gxt.data_ptr<T>(), N, j0, j1);
  });
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    bad += sddmm<T>(rv, A.const_data_ptr<T>(), N, 0, Bt.const_data_ptr<T>(), N, 0, N, 1, gv.data_ptr<T>(), r0, r1);
  });
  if (bad.load() != 0) fail_column_out_of_range("ncsr_linear_backward", w, K);
  return {gxt.t().contiguous().reshape(x.sizes()).to(x.scalar_type()), gv.to(w.values.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> ncsr_linear_backward_cpu(const at::Tensor& grad_z, const at::Tensor& x,
                                                            const at::Tensor& values, const at::Tensor& col_idx,
                                                            const at::Tensor& row_ptr, const at::Tensor& row_end,
                                                            int64_t level) {
  constexpr const char* op = "ncsr_linear_backward";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (..., K)");
  check_dense_input(op, "x", x, values);
  const NcsrLevel w = check_ncsr(op, values, col_idx, row_ptr, row_end, level, x.device());
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = w.rows;
  TORCH_CHECK(grad_z.sizes() == at::IntArrayRef(out_sizes), op, ": grad_z must have shape ", at::IntArrayRef(out_sizes),
              ", got ", grad_z.sizes());
  const int64_t K = x.size(-1), N = batch_rows(x);
  return values.scalar_type() == at::kDouble ? linear_backward_typed<double>(w, grad_z, x, N, K)
                                             : linear_backward_typed<float>(w, grad_z, x, N, K);
}

}  // namespace

TORCH_LIBRARY_IMPL(nestsparse, CPU, m) {
  m.impl("ncsr_linear", &ncsr_linear_cpu);
  m.impl("ncsr_linear_backward", &ncsr_linear_backward_cpu);
}

}  // namespace nestsparse::cpu
