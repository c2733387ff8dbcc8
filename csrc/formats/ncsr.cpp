// The checks of nested CSR arguments (see ncsr.h for what is checked where).
#include "formats/ncsr.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace nestsparse {

NcsrLevel check_ncsr(const char* op, const at::Tensor& values, const at::Tensor& col_idx, const at::Tensor& row_ptr,
                     const at::Tensor& row_end, int64_t level, c10::Device device) {
  const auto vd = values.scalar_type();
  TORCH_CHECK(vd == at::kFloat || vd == at::kHalf || vd == at::kBFloat16 || vd == at::kDouble, op,
              ": values must be float32, float16, bfloat16 or float64, got ", vd);
  TORCH_CHECK(col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt, op,
              ": col_idx must be int16 or int32, got ", col_idx.scalar_type());
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt, op, ": row_ptr must be int32, got ", row_ptr.scalar_type(),
              " (int64 row pointers, for more than 2^31 non-zeros, are not supported)");
  TORCH_CHECK(row_end.scalar_type() == at::kInt, op, ": row_end must be int32, got ", row_end.scalar_type());
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"values", &values}, {"col_idx", &col_idx}, {"row_ptr", &row_ptr}, {"row_end", &row_end}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but the input is on ", device);
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D (nnz0,), got shape ", values.sizes());
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.numel() == values.numel(), op, ": col_idx must be 1-D with as many ",
              "entries as values (", values.numel(), "), got shape ", col_idx.sizes());
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, op, ": row_ptr must be 1-D of length M+1, got shape ",
              row_ptr.sizes());
  const int64_t M = row_ptr.numel() - 1;
  TORCH_CHECK(row_end.dim() == 2 && row_end.size(1) == M && row_end.size(0) >= 1, op,
              ": row_end must have shape (L, M) = (L, ", M, ") with L >= 1, got ", row_end.sizes());
  const int64_t L = row_end.size(0);
  TORCH_CHECK(level >= 0 && level < L, op, ": level ", level, " is out of range for a model with ", L,
              " levels (0 = densest .. ", L - 1, " = sparsest)");
  NcsrLevel w{values, col_idx, row_ptr, row_end, level, L, M};
  // What memory safety needs for this level: every row slice lies inside the values buffer, in the snapshot the
  // kernels read.
  if (device.is_cpu()) {
    at::Tensor slices = at::empty({2, M}, row_ptr.options());
    w.nnz = check_row_slices(op, w.row_start(), w.row_stop(), M, level, values.numel(), slices.data_ptr<int32_t>());
    w.slices = std::move(slices);
  }
  return w;
}

int64_t check_row_slices(const char* op, const int32_t* rp, const int32_t* re, int64_t M, int64_t level, int64_t nnz,
                         int32_t* snapshot) {
  int32_t lo = rp[0];
  TORCH_CHECK(lo == 0, op, ": row_ptr[0] = ", lo, " but must be 0");
  int64_t count = 0;
  for (int64_t r = 0; r < M; ++r) {
    const int32_t hi = rp[r + 1], end = re[r];
    TORCH_CHECK(lo <= hi, op, ": row_ptr is not non-decreasing: row_ptr[", r, "] = ", lo, " > row_ptr[", r + 1,
                "] = ", hi);
    TORCH_CHECK(end >= lo && end <= hi, op, ": row_end[", level, ", ", r, "] = ", end, " is outside its row [row_ptr[",
                r, "], row_ptr[", r + 1, "]] = [", lo, ", ", hi, "]");
    if (snapshot != nullptr) snapshot[r] = lo, snapshot[M + r] = end;
    count += end - lo;
    lo = hi;
  }
  TORCH_CHECK(lo <= nnz, op, ": row_ptr[M=", M, "] = ", lo, " exceeds the ", nnz, " stored values");
  return count;
}

void fail_column_out_of_range(const char* op, const NcsrLevel& w, int64_t K) {
  // Copies, and the row slices clamped to them: the arrays may have changed since the kernel read them.
  const at::Tensor cols = w.col_idx.to(at::kLong).cpu();
  const int64_t* c = cols.const_data_ptr<int64_t>();
  const int64_t n = cols.numel();
  const at::Tensor rp = w.slices.defined() ? w.slices[0] : w.row_ptr.cpu().narrow(0, 0, w.rows);
  const at::Tensor re = w.slices.defined() ? w.slices[1] : w.row_end[w.level].cpu();
  const int32_t* start = rp.const_data_ptr<int32_t>();
  const int32_t* stop = re.const_data_ptr<int32_t>();
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t p = std::max<int64_t>(start[r], 0); p < std::min<int64_t>(stop[r], n); ++p) {
      TORCH_CHECK(c[p] >= 0 && c[p] < K, op, ": col_idx[", p, "] = ", c[p], " (row ", r, ") is outside [0, K=", K, ")");
    }
  }
  TORCH_CHECK(false, op, ": a column index outside [0, K=", K, ") was read");
}

}  // namespace nestsparse
