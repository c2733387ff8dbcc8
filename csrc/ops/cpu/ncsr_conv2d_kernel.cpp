// CPU ncsr_conv2d and its backward.
//
// The forward never builds an im2col matrix. The input is copied once, zero-padded and split into its
// stride phases: plane (ph, pw) of channel c holds xpad[c, i*sh + ph, j*sw + pw]. In that layout the input
// pixel that weight tap (c, a, b) meets at output (oh, ow) sits at a fixed offset koff[c, a, b] from
// oh*Wq + ow, for every stride and dilation, so the convolution is the broadcast SpMM kernel over a "wide"
// output grid of OH x Wq columns whose last Wq - OW columns are computed and dropped. A 1x1 stride-1
// unpadded convolution skips the copy and reads x itself. The backward uses im2col/col2im (training only).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

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
  TORCH_CHECK(s.Cin % groups == 0, op, ": input channels (", s.Cin, ") are not divisible by groups (", groups, ")");
  TORCH_CHECK(s.M % groups == 0, op, ": output channels (", s.M, " weight rows) are not divisible by groups (", groups, ")");
  s.Cg = s.Cin / groups;
  s.K = s.Cg * s.kh * s.kw;
  s.OH = (s.H + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  s.OW = (s.W + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  TORCH_CHECK(s.H + 2 * s.ph >= s.dh * (s.kh - 1) + 1 && s.W + 2 * s.pw >= s.dw * (s.kw - 1) + 1, op,
              ": input ", s.H, "x", s.W, " with padding ", padding, " is smaller than the dilated kernel ",
              kernel_size, " (dilation ", dilation, ")");
  return s;
}

void conv_f32(const NcsrLevel& w, const ConvShape& s, const at::Tensor& x, const float* bias, Act act, float* out,
              const std::vector<int32_t>& chunks) {
  const bool direct = s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0;
  const int64_t Hp = s.H + 2 * s.ph, Wp = s.W + 2 * s.pw;
  const int64_t Hq = direct ? s.H : (Hp + s.sh - 1) / s.sh, Wq = direct ? s.W : (Wp + s.sw - 1) / s.sw;
  const int64_t plane = Hq * Wq;
  const int64_t chan = direct ? plane : s.sh * s.sw * plane;  // floats per input channel in the buffer
  std::vector<int64_t> koff(std::max<int64_t>(s.K, 1));
  int64_t max_koff = 0;
  for (int64_t c = 0; c < s.Cg; ++c) {
    for (int64_t a = 0; a < s.kh; ++a) {
      for (int64_t b = 0; b < s.kw; ++b) {
        const int64_t ya = a * s.dh, xb = b * s.dw;
        const int64_t off = c * chan + ((ya % s.sh) * s.sw + xb % s.sw) * plane + (ya / s.sh) * Wq + xb / s.sw;
        koff[(c * s.kh + a) * s.kw + b] = off;
        max_koff = std::max(max_koff, off);
      }
    }
  }
  const int64_t Nw = s.OH * Wq;  // wide output columns per image
  const float* xf = x.const_data_ptr<float>();
  at::Tensor buf;
  const float* B = xf;
  int64_t img = s.Cin * s.H * s.W;
  if (!direct) {
    // Sized so the wide grid's dropped columns also read inside the buffer.
    img = std::max(s.Cin * chan, (s.groups - 1) * s.Cg * chan + max_koff + Nw);
    buf = at::zeros({s.Nb, img}, at::kFloat);
    float* bp = buf.data_ptr<float>();
    at::parallel_for(0, s.Nb * s.Cin, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / s.Cin, c = i % s.Cin;
        const float* src = xf + (n * s.Cin + c) * s.H * s.W;
        float* dst = bp + n * img + c * chan;
        for (int64_t y = 0; y < s.H; ++y) {
          const int64_t yp = y + s.ph;
          float* drow = dst + (yp % s.sh) * s.sw * plane + (yp / s.sh) * Wq;
          if (s.sw == 1) {
            std::memcpy(drow + s.pw, src + y * s.W, sizeof(float) * s.W);
          } else {
            for (int64_t xx = 0; xx < s.W; ++xx) {
              const int64_t xp = xx + s.pw;
              drow[(xp % s.sw) * plane + xp / s.sw] = src[y * s.W + xx];
            }
          }
        }
      }
    });
    B = buf.const_data_ptr<float>();
  }
  const KernelTable& kt = active_kernels();
  const SparseRows rows = sparse_rows(w, s.K);
  const Epilogue ep{bias, act};
  const int64_t TN = tile_width(Nw), T = (Nw + TN - 1) / TN, P = static_cast<int64_t>(chunks.size()) - 1;
  const SpmmTileFn fn = spmm_for_width(kt, TN);
  const int64_t out_img = s.M * s.OH * s.OW;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, s.Nb * T * P, 1, [&](int64_t i0, int64_t i1) {
    int32_t dst[kMaxTile];
    int64_t nbad = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / (T * P), t = (i / P) % T, c = i % P;
      const int64_t tn = std::min(TN, Nw - t * TN);
      SpmmTile tile{B + n * img + t * TN, koff.data(), s.M / s.groups, s.Cg * chan, tn,
                    out + n * out_img, s.OH * s.OW, 1, nullptr};
      if (direct) {
        tile.out += t * TN;
      } else {
        for (int64_t j = 0; j < tn; ++j) {
          const int64_t jj = t * TN + j, oh = jj / Wq, ow = jj - oh * Wq;
          dst[j] = ow < s.OW ? static_cast<int32_t>(oh * s.OW + ow) : -1;
        }
        tile.dst = dst;
      }
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
    conv_f32(w, s, xc, bc.defined() ? bc.const_data_ptr<float>() : nullptr, act, out.data_ptr<float>(), chunks);
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
