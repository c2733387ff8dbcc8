// <format>_linear: y = act(x @ W_level^T + bias) for x (..., K) and W (M, K) in a nested format, and its backward.
// Declared once for every format (see ops/op.h); the kernels are ops/cpu/linear.cpp and ops/cuda/linear.cu,
// autograd is ops/autograd.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

#include "ops/activation.h"
#include "ops/checks.h"
#include "ops/op.h"
#include "ops/weight_args.h"

namespace nestsparse {

// The arguments every product over a weight in format F takes (x, the weight, bias, activation, plan, and the
// inference epilogue: scale, residual); an op adds its own (Conv2d: the geometry).
//
// The epilogue of every product is y = act(scale[c] * z + bias[c] + residual), z the sparse product and c the
// output channel: `scale` (M,) carries a folded BatchNorm (nestsparse.fuse passes the level's row of a per-level
// table, so a level switch copies nothing) and `residual` (the output's shape) a skip connection added before
// the activation, so the output is written once.
template <typename F>
struct ProductCall {
  at::Tensor x;
  typename F::Args w;
  std::optional<at::Tensor> bias;
  Act activation;
  std::optional<at::Tensor> plan;
  std::optional<at::Tensor> scale;
  std::optional<at::Tensor> residual;
  template <typename Fn>
  void for_each_tensor(Fn&& f) {
    f(x), w.for_each_tensor(f);
  }
  // Everything but the tensors (and the plan), by name.
  template <typename Fn>
  void for_each_attribute(Fn&& f) {
    f("activation", activation), w.for_each_attribute(f);
  }
};

// y = act(scale * (x @ W_level^T) + bias + residual): x (..., K) -> y (..., M). `plan` is an optional int32 (L, P+1)
// partition from <format>_plan, cached by the caller so that it is not rebuilt per call.
template <typename F, typename = typename F::Params>
struct Linear;

template <typename F, typename... W>
struct Linear<F, Params<W...>> {
  using Format = F;
  using Result = at::Tensor;
  static constexpr int64_t kChannelDim = -1;  // the output dimension a bias adds along

  using Call = ProductCall<F>;

  static const char* name() { return format_op_name<Linear>(F::name, "_linear"); }
  static std::string schema() {
    return std::string(name()) + "(Tensor x, " + F::schema +
           ", Tensor? bias=None, str activation='none', Tensor? plan=None, Tensor? scale=None, "
           "Tensor? residual=None) -> Tensor";
  }
  static Call unpack(const at::Tensor& x, W... w, const std::optional<at::Tensor>& bias, c10::string_view activation,
                     const std::optional<at::Tensor>& plan, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& residual) {
    return {x, F::unpack(name(), w...), bias, parse_activation(name(), activation), plan, scale, residual};
  }
  static auto pack(const Call& c) {
    return std::tuple_cat(std::forward_as_tuple(c.x), F::pack(c.w),
                          std::make_tuple(std::cref(c.bias), c10::string_view(kActivationNames[int(c.activation)]),
                                          std::cref(c.plan), std::cref(c.scale), std::cref(c.residual)));
  }
};

// Gradients of the pre-activation product z = x @ W_level^T: (grad_x, grad_values), grad_values zero outside
// the level. The bias gradient and the activation's derivative are autograd's (ops/autograd.cpp).
template <typename F, typename = typename F::Params>
struct LinearBackward;

template <typename F, typename... W>
struct LinearBackward<F, Params<W...>> {
  using Result = std::tuple<at::Tensor, at::Tensor>;

  struct Call {
    at::Tensor grad_z, x;
    typename F::Args w;
  };

  static const char* name() { return format_op_name<LinearBackward>(F::name, "_linear_backward"); }
  static std::string schema() {
    return std::string(name()) + "(Tensor grad_z, Tensor x, " + F::schema + ") -> (Tensor, Tensor)";
  }
  static Call unpack(const at::Tensor& grad_z, const at::Tensor& x, W... w) {
    return {grad_z, x, F::unpack(name(), w...)};
  }
  static auto pack(const Call& c) { return std::tuple_cat(std::forward_as_tuple(c.grad_z, c.x), F::pack(c.w)); }
  // The backward call of a forward one.
  static Call of(const ProductCall<F>& c, const at::Tensor& grad_z) { return {grad_z, c.x, c.w}; }
};

}  // namespace nestsparse
