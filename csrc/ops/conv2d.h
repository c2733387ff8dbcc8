// <format>_conv2d: NCHW convolution with the weight (Cout, Cin/groups, kh, kw) stored in a nested format as the
// matrix (Cout, Cin/groups*kh*kw), columns ordered (cin, kh, kw); and its backward. Declared once for every
// format (see ops/op.h); the kernels are ops/cpu/conv2d.cpp, autograd is ops/autograd.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "ops/activation.h"
#include "ops/checks.h"
#include "ops/linear.h"
#include "ops/op.h"
#include "ops/weight_args.h"

namespace nestsparse {

// The geometry arguments of a convolution, by name.
struct ConvGeometry {
  std::array<int64_t, 2> kernel_size, stride, padding, dilation;
  int64_t groups;
};

// The geometry arguments of `op`, each int list checked to have 2 entries.
inline ConvGeometry geometry(const char* op, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return {int_pair(op, "kernel_size", kernel_size), int_pair(op, "stride", stride), int_pair(op, "padding", padding),
          int_pair(op, "dilation", dilation), groups};
}

// Every size of one convolution, checked (conv_shape below).
struct ConvShape {
  int64_t Nb, Cin, H, W, M, kh, kw, sh, sw, ph, pw, dh, dw, groups, Cg, K, OH, OW;
};

// Checks the geometry of an NCHW convolution of x by a weight of M rows (raising with `op` in the message) and
// bounds it so that no offset a kernel computes from it can overflow.
ConvShape conv_shape(const char* op, const at::Tensor& x, int64_t M, const ConvGeometry& g);

template <typename F, typename = typename F::Params>
struct Conv2d;

template <typename F, typename... W>
struct Conv2d<F, Params<W...>> {
  using Format = F;
  using Result = at::Tensor;
  static constexpr int64_t kChannelDim = 1;

  struct Call : ProductCall<F> {
    ConvGeometry geometry;
    template <typename Fn>
    void for_each_attribute(Fn&& f) {
      ProductCall<F>::for_each_attribute(f);
      f("kernel_size", geometry.kernel_size), f("stride", geometry.stride), f("padding", geometry.padding);
      f("dilation", geometry.dilation), f("groups", geometry.groups);
    }
  };

  static const char* name() { return format_op_name<Conv2d>(F::name, "_conv2d"); }
  static std::string schema() {
    return std::string(name()) + "(Tensor x, " + F::schema +
           ", int[2] kernel_size, Tensor? bias=None, int[2] stride=1, int[2] padding=0, int[2] dilation=1, "
           "int groups=1, str activation='none', Tensor? plan=None, Tensor? scale=None, Tensor? residual=None) -> "
           "Tensor";
  }
  static Call unpack(const at::Tensor& x, W... w, at::IntArrayRef kernel_size, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     c10::string_view activation, const std::optional<at::Tensor>& plan,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual) {
    const char* op = name();
    return {{x, F::unpack(op, w...), bias, parse_activation(op, activation), plan, scale, residual},
            geometry(op, kernel_size, stride, padding, dilation, groups)};
  }
  static auto pack(const Call& c) {
    const ConvGeometry& g = c.geometry;
    return std::tuple_cat(std::forward_as_tuple(c.x), F::pack(c.w),
                          std::make_tuple(at::IntArrayRef(g.kernel_size), std::cref(c.bias), at::IntArrayRef(g.stride),
                                          at::IntArrayRef(g.padding), at::IntArrayRef(g.dilation), g.groups,
                                          c10::string_view(kActivationNames[int(c.activation)]), std::cref(c.plan),
                                          std::cref(c.scale), std::cref(c.residual)));
  }
};

// Gradients of the pre-activation convolution: (grad_x, grad_values), grad_values zero outside the level.
template <typename F, typename = typename F::Params>
struct Conv2dBackward;

template <typename F, typename... W>
struct Conv2dBackward<F, Params<W...>> {
  using Result = std::tuple<at::Tensor, at::Tensor>;

  struct Call {
    at::Tensor grad_z, x;
    typename F::Args w;
    ConvGeometry geometry;
  };

  static const char* name() { return format_op_name<Conv2dBackward>(F::name, "_conv2d_backward"); }
  static std::string schema() {
    return std::string(name()) + "(Tensor grad_z, Tensor x, " + F::schema +
           ", int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor)";
  }
  static Call unpack(const at::Tensor& grad_z, const at::Tensor& x, W... w, at::IntArrayRef kernel_size,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    const char* op = name();
    return {grad_z, x, F::unpack(op, w...), geometry(op, kernel_size, stride, padding, dilation, groups)};
  }
  static auto pack(const Call& c) {
    const ConvGeometry& g = c.geometry;
    return std::tuple_cat(std::forward_as_tuple(c.grad_z, c.x), F::pack(c.w),
                          std::make_tuple(at::IntArrayRef(g.kernel_size), at::IntArrayRef(g.stride),
                                          at::IntArrayRef(g.padding), at::IntArrayRef(g.dilation), g.groups));
  }
  static Call of(const typename Conv2d<F>::Call& c, const at::Tensor& grad_z) { return {grad_z, c.x, c.w, c.geometry}; }
};

}  // namespace nestsparse
