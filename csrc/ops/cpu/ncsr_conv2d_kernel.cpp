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
#include "ops/debug.h"

namespace nestsparse::cpu {
namespace {

constexpr const char* kOp = "ncsr_conv2d";

struct ConvShape {
  int64_t Nb, Cin, H, W, M, kh, kw, sh, sw, ph, pw, dh, dw, groups, Cg, K, OH, OW;
};

ConvShape check_conv(const char* op, const at::Tensor& x, const NcsrLevel& w, at::IntArrayRef kernel_size,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be NCHW (4-D), got shape ", x.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation must have 2 entries each");
  ConvShape s{};
  s.Nb = x.size(0), s.Cin = x.size(1), s.H = x.size(2), s.W = x.size(3), s.M = w.rows;
  s.kh = kernel_size[0], s.kw = kernel_size[1], s.sh = stride[0], s.sw = stride[1];
  s.ph = padding[0], s.pw = padding[1], s.dh = dilation[0], s.dw = dilation[1], s.groups = groups;
  TORCH_CHECK(s.kh > 0 && s.kw > 0, op, ": kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK(s.sh > 0 && s.sw > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(s.ph >= 0 && s.pw >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(s.dh > 0 && s.dw > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  // Bounds that keep every offset computed below far from int64 overflow (and K within int32 indices).
  constexpr int64_t kMaxTap = 1 << 16, kMaxPad = 1 << 24;
  TORCH_CHECK(s.kh <= kMaxTap && s.kw <= kMaxTap && s.sh <= kMaxTap && s.sw <= kMaxTap && s.dh <= kMaxTap &&
                  s.dw <= kMaxTap,
              op, ": kernel_size, stride and dilation must be at most ", kMaxTap, ", got ", kernel_size, ", ", stride,
              ", ", dilation);
  TORCH_CHECK(s.ph <= kMaxPad && s.pw <= kMaxPad, op, ": padding must be at most ", kMaxPad, ", got ", padding);
  int64_t padded = 0, total = 0;
  const bool overflow = __builtin_mul_overflow(s.H + 2 * s.ph, s.W + 2 * s.pw, &padded) ||
                        __builtin_mul_overflow(padded, std::max<int64_t>(s.Cin, 1) * std::max<int64_t>(s.Nb, 1), &total) ||
                        total > (int64_t{1} << 40);
  TORCH_CHECK(!overflow, op, ": the padded input (", s.Nb, " x ", s.Cin, " x ", s.H + 2 * s.ph, " x ", s.W + 2 * s.pw,
              ") is too large");
  TORCH_CHECK(s.Cin % groups == 0, op, ": input channels (", s.Cin, ") are not divisible by groups (", groups, ")");
  TORCH_CHECK(s.M % groups == 0, op, ": output channels (", s.M, " weight rows) are not divisible by groups (", groups, ")");
  s.Cg = s.Cin / groups;
  s.K = s.Cg * s.kh * s.kw;
  TORCH_CHECK(s.K <= std::numeric_limits<int32_t>::max(), op, ": a filter has ", s.K,
              " weights (Cin/groups x kh x kw), more than int32 column indices can address");
  s.OH = (s.H + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  s.OW = (s.W + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  TORCH_CHECK(s.H + 2 * s.ph >= s.dh * (s.kh - 1) + 1 && s.W + 2 * s.pw >= s.dw * (s.kw - 1) + 1, op,
              ": input ", s.H, "x", s.W, " with padding ", padding, " is smaller than the dilated kernel ",
              kernel_size, " (dilation ", dilation, ")");
  return s;
}

// 1x1, stride 1, no padding: the weight multiplies x[n] viewed as (Cin, H*W) directly, with no copy.
void conv_f32_direct(const NcsrLevel& w, const ConvShape& s, const at::Tensor& x, const Epilogue& ep, float* out,
                     const std::vector<int32_t>& chunks) {
  const int64_t HW = s.H * s.W, TN = panel_width(HW, s.K), T = (HW + TN - 1) / TN;
  const int64_t P = static_cast<int64_t>(chunks.size()) - 1;
  const float* xf = x.const_data_ptr<float>();
  const SparseRows rows = sparse_rows(w, s.K);
  const SpmmTileFn fn = spmm_for_width(active_kernels(), TN);
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, s.Nb * T * P, grain_for(s.Nb * T * P, w.nnz * s.Nb * HW), [&](int64_t i0, int64_t i1) {
    int64_t nbad = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / (T * P), t = (i / P) % T, c = i % P, tn = std::min(TN, HW - t * TN);
      const SpmmTile tile{xf + n * s.Cin * HW + t * TN, nullptr, HW, s.M / s.groups, s.Cg * HW, tn,
                          out + n * s.M * HW + t * TN, HW, 1, nullptr, 0};
      nbad += fn(rows, ep, tile, chunks[c], chunks[c + 1]);
    }
    bad += nbad;
  });
  if (bad.load() != 0) fail_column_out_of_range(kOp, w, s.K);
}

// Every other geometry. The batch is copied once into a zero-padded buffer laid out [c][phase][n][Hq][Wq]:
// phase (ph, pw) of image n holds xpad[n, c, i*sh + ph, j*sw + pw]. Then the input pixel that weight tap
// (c, a, b) meets at output (n, oh, ow) is column J = n*Hq*Wq + oh*Wq + ow of a row starting at koff[c, a, b],
// for any stride and dilation, and the whole batch is one SpMM over J. Columns with oh >= OH or ow >= OW are
// computed and dropped (the store keeps only the runs of valid outputs).
void conv_f32_phases(const NcsrLevel& w, const ConvShape& s, const at::Tensor& x, const Epilogue& ep, float* out,
                     const std::vector<int32_t>& chunks) {
  const int64_t Hp = s.H + 2 * s.ph, Wp = s.W + 2 * s.pw;
  const int64_t Hq = (Hp + s.sh - 1) / s.sh, Wq = (Wp + s.sw - 1) / s.sw, plane = Hq * Wq;
  const int64_t phases = s.sh * s.sw, chan = phases * s.Nb * plane;  // floats per input channel
  std::vector<int64_t> koff(std::max<int64_t>(s.K, 1));
  int64_t max_koff = 0;
  for (int64_t c = 0; c < s.Cg; ++c) {
    for (int64_t a = 0; a < s.kh; ++a) {
      for (int64_t b = 0; b < s.kw; ++b) {
        const int64_t ya = a * s.dh, xb = b * s.dw;
        const int64_t off = c * chan + ((ya % s.sh) * s.sw + xb % s.sw) * s.Nb * plane + (ya / s.sh) * Wq + xb / s.sw;
        koff[(c * s.kh + a) * s.kw + b] = off;
        max_koff = std::max(max_koff, off);
      }
    }
  }
  const int64_t N = (s.Nb - 1) * plane + s.OH * Wq;  // the last image's rows past OH are not needed
  const int64_t TN = panel_width(N, s.K), T = (N + TN - 1) / TN;
  // Dropped columns read past their plane: size the buffer so every read of every tile stays inside. The
  // buffer is a per-thread workspace kept between calls (no page faults, no full memset): the fill below
  // rewrites every input pixel, and only the padding, which valid outputs do read, is zeroed each call.
  // Whatever else it holds only reaches dropped outputs.
  const int64_t size = std::max(s.Cin * chan, (s.groups - 1) * s.Cg * chan + max_koff + T * TN);
  // Buffers above 64 MB (large batches) are allocated per call rather than kept alive by the thread.
  constexpr int64_t kMaxCachedFloats = int64_t{16} << 20;
  thread_local std::vector<float> workspace;
  at::Tensor big;
  float* bp;
  if (size > kMaxCachedFloats) {
    big = at::empty({size}, at::kFloat);
    bp = big.data_ptr<float>();
    std::fill(bp + s.Cin * chan, bp + size, 0.f);  // the slack past the planes, read by dropped columns only
  } else {
    if (static_cast<int64_t>(workspace.size()) < size) workspace.assign(size, 0.f);
    bp = workspace.data();
  }
  const float* xf = x.const_data_ptr<float>();
  // Rows [r_lo, r_hi) of phase row qr and columns [c_lo, c_hi) of phase column qc hold input pixels.
  std::vector<int64_t> r_lo(s.sh), r_hi(s.sh), c_lo(s.sw), c_hi(s.sw);
  const auto interior = [](int64_t q, int64_t stride, int64_t pad, int64_t size_in, int64_t n, int64_t& lo, int64_t& hi) {
    lo = n, hi = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t y = i * stride + q - pad;
      if (y >= 0 && y < size_in) lo = std::min(lo, i), hi = i + 1;
    }
    if (lo > hi) lo = hi = 0;
  };
  for (int64_t q = 0; q < s.sh; ++q) interior(q, s.sh, s.ph, s.H, Hq, r_lo[q], r_hi[q]);
  for (int64_t q = 0; q < s.sw; ++q) interior(q, s.sw, s.pw, s.W, Wq, c_lo[q], c_hi[q]);
  at::parallel_for(0, s.Cin * phases * s.Nb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t cq = i / s.Nb, qr = (cq % phases) / s.sw, qc = cq % s.sw;
      float* pl = bp + i * plane;  // planes are ordered [c][phase][n]
      for (int64_t r = 0; r < Hq; ++r) {
        float* row = pl + r * Wq;
        if (r < r_lo[qr] || r >= r_hi[qr]) {
          std::fill(row, row + Wq, 0.f);
        } else {
          std::fill(row, row + c_lo[qc], 0.f);
          std::fill(row + c_hi[qc], row + Wq, 0.f);
        }
      }
    }
  });
  // Where each input row lands (phase row and row inside the phase), and for each phase column q its first
  // input column and destination: computed once, since images can be as small as a few pixels a row.
  std::vector<int64_t> row_dst(s.H), col_first(s.sw), col_dst(s.sw);
  for (int64_t y = 0; y < s.H; ++y) {
    const int64_t yp = y + s.ph;
    row_dst[y] = (yp % s.sh) * s.sw * s.Nb * plane + (yp / s.sh) * Wq;
  }
  for (int64_t q = 0; q < s.sw; ++q) {  // phase column q holds padded columns q, q + sw, ...
    col_first[q] = ((q - s.pw) % s.sw + s.sw) % s.sw;
    col_dst[q] = q * s.Nb * plane + (col_first[q] + s.pw) / s.sw;
  }
  at::parallel_for(0, s.Nb * s.Cin, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.Cin, c = i % s.Cin;
      const float* src = xf + (n * s.Cin + c) * s.H * s.W;
      float* dimg = bp + c * chan + n * plane;
      for (int64_t y = 0; y < s.H; ++y) {
        const float* sr = src + y * s.W;
        float* drow = dimg + row_dst[y];
        if (s.sw == 1) {
          std::memcpy(drow + s.pw, sr, sizeof(float) * s.W);
          continue;
        }
        for (int64_t q = 0; q < s.sw; ++q) {
          float* dq = drow + col_dst[q];
          for (int64_t xx = col_first[q]; xx < s.W; xx += s.sw) *dq++ = sr[xx];
        }
      }
    }
  });
  const SparseRows rows = sparse_rows(w, s.K);
  const SpmmTileFn fn = spmm_for_width(active_kernels(), TN);
  const int64_t P = static_cast<int64_t>(chunks.size()) - 1, L = s.OH * s.OW;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, T * P, grain_for(T * P, w.nnz * N), [&](int64_t i0, int64_t i1) {
    Segment segs[kMaxTile];
    int64_t nbad = 0, seg_tile = -1, nsegs = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / P, c = i % P, tn = std::min(TN, N - t * TN);
      if (t != seg_tile) {  // the runs of valid outputs in this tile, shared by all its rows
        nsegs = 0;
        for (int64_t j = 0; j < tn;) {
          const int64_t J = t * TN + j, n = J / plane, within = J - n * plane, oh = within / Wq, ow = within - oh * Wq;
          if (oh >= s.OH || ow >= s.OW) {
            ++j;
            continue;
          }
          const int64_t len = std::min(s.OW - ow, tn - j);
          segs[nsegs++] = Segment{static_cast<int32_t>(j), static_cast<int32_t>(len), n * s.M * L + oh * s.OW + ow};
          j += len;
        }
        seg_tile = t;
      }
      const SpmmTile tile{bp + t * TN, koff.data(), 0, s.M / s.groups, s.Cg * chan, tn, out, L, 1, segs, nsegs};
      nbad += fn(rows, ep, tile, chunks[c], chunks[c + 1]);
    }
    bad += nbad;
  });
  if (bad.load() != 0) fail_column_out_of_range(kOp, w, s.K);
}

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
  const ConvShape s = check_conv(kOp, x, w, kernel_size, stride, padding, dilation, groups);
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
    const bool direct = s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0;
    (direct ? conv_f32_direct : conv_f32_phases)(w, s, xc, ep, out.data_ptr<float>(), chunks);
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
  const ConvShape s = check_conv(op, x, w, kernel_size, stride, padding, dilation, groups);
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
