// The device-independent geometry check of the conv2d ops.
#include "ops/conv2d.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace nestsparse {

ConvShape conv_shape(const char* op, const at::Tensor& x, int64_t M, const ConvGeometry& g) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be NCHW (4-D), got shape ", x.sizes());
  const at::IntArrayRef kernel_size(g.kernel_size), stride(g.stride), padding(g.padding), dilation(g.dilation);
  ConvShape s{};
  s.Nb = x.size(0), s.Cin = x.size(1), s.H = x.size(2), s.W = x.size(3), s.M = M;
  s.kh = g.kernel_size[0], s.kw = g.kernel_size[1], s.sh = g.stride[0], s.sw = g.stride[1];
  s.ph = g.padding[0], s.pw = g.padding[1], s.dh = g.dilation[0], s.dw = g.dilation[1], s.groups = g.groups;
  TORCH_CHECK(s.kh > 0 && s.kw > 0, op, ": kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK(s.sh > 0 && s.sw > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(s.ph >= 0 && s.pw >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(s.dh > 0 && s.dw > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(s.groups > 0, op, ": groups must be positive, got ", s.groups);
  // Bounds that keep every offset computed below far from int64 overflow (and K within int32 indices).
  constexpr int64_t kMaxTap = 1 << 16, kMaxPad = 1 << 24;
  TORCH_CHECK(
      s.kh <= kMaxTap && s.kw <= kMaxTap && s.sh <= kMaxTap && s.sw <= kMaxTap && s.dh <= kMaxTap && s.dw <= kMaxTap,
      op, ": kernel_size, stride and dilation must be at most ", kMaxTap, ", got ", kernel_size, ", ", stride, ", ",
      dilation);
  TORCH_CHECK(s.ph <= kMaxPad && s.pw <= kMaxPad, op, ": padding must be at most ", kMaxPad, ", got ", padding);
  int64_t padded = 0, total = 0;
  const bool overflow =
      __builtin_mul_overflow(s.H + 2 * s.ph, s.W + 2 * s.pw, &padded) ||
      __builtin_mul_overflow(padded, std::max<int64_t>(s.Cin, 1) * std::max<int64_t>(s.Nb, 1), &total) ||
      total > (int64_t{1} << 40);
  TORCH_CHECK(!overflow, op, ": the padded input (", s.Nb, " x ", s.Cin, " x ", s.H + 2 * s.ph, " x ", s.W + 2 * s.pw,
              ") is too large");
  TORCH_CHECK(s.Cin % s.groups == 0, op, ": input channels (", s.Cin, ") are not divisible by groups (", s.groups, ")");
  TORCH_CHECK(s.M % s.groups == 0, op, ": output channels (", s.M, " weight rows) are not divisible by groups (",
              s.groups, ")");
  s.Cg = s.Cin / s.groups;
  s.K = s.Cg * s.kh * s.kw;
  TORCH_CHECK(s.K <= std::numeric_limits<int32_t>::max(), op, ": a filter has ", s.K,
              " weights (Cin/groups x kh x kw), more than int32 column indices can address");
  s.OH = (s.H + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  s.OW = (s.W + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  TORCH_CHECK(s.H + 2 * s.ph >= s.dh * (s.kh - 1) + 1 && s.W + 2 * s.pw >= s.dw * (s.kw - 1) + 1, op, ": input ", s.H,
              "x", s.W, " with padding ", padding, " is smaller than the dilated kernel ", kernel_size, " (dilation ",
              dilation, ")");
  return s;
}

}  // namespace nestsparse
