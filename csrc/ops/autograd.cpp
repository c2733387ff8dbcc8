// Autograd of ncsr_linear and ncsr_conv2d, registered at the Autograd key for every device.
//
// Registered in C++ rather than with torch.library.register_autograd: a Python autograd kernel runs on
// every call, gradients wanted or not, and cost about 10 us per op here (a 16x16 product took 15 us
// instead of 5), which would swamp small layers at batch 1 -- the latency case this library is for.
//
// z = x @ W_level^T (+ bias), y = act(z). grad_z = grad_y * act'(z): relu and relu6 read the saved output,
// gelu recomputes z. Then grad_x and grad_values come from the *_backward ops (values outside the level get
// zero) and grad_bias sums grad_z over everything but the channel.
//
// needs_input_grad() counts edges, i.e. tensor arguments only (an optional one only when present):
// x = 0, values = 1, col_idx, row_ptr, row_end = 2..4, bias = 5. backward() returns one entry per argument.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace nestsparse {
namespace {

constexpr size_t kEdgeX = 0, kEdgeValues = 1, kEdgeBias = 5;

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
                     const at::Tensor& row_ptr, const at::Tensor& row_end, int64_t level,
                     const std::optional<at::Tensor>& bias, c10::string_view activation,
                     const std::optional<at::Tensor>& plan) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nestsparse::ncsr_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                                         c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(x, values, col_idx, row_ptr, row_end, level, bias, activation, plan);
}

at::Tensor conv_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx, const at::Tensor& row_ptr,
                   const at::Tensor& row_end, int64_t level, at::IntArrayRef kernel_size,
                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
                   const std::optional<at::Tensor>& plan) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nestsparse::ncsr_conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, at::IntArrayRef, const std::optional<at::Tensor>&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                            const std::optional<at::Tensor>&)>();
  return op.call(x, values, col_idx, row_ptr, row_end, level, kernel_size, bias, stride, padding, dilation, groups,
                 activation, plan);
}

// grad_z from grad_y, given the saved output y = act(z); `pre_activation` recomputes z for gelu.
template <typename F>
at::Tensor grad_through_activation(const std::string& act, const at::Tensor& grad, const at::Tensor& out,
                                   F pre_activation) {
  if (act == "relu") return grad * out.gt(0).to(grad.scalar_type());
  if (act == "relu6") return grad * at::logical_and(out.gt(0), out.lt(6)).to(grad.scalar_type());
  if (act == "gelu") {
    const at::Tensor z = pre_activation();
    const at::Tensor cdf = 0.5 * (1.0 + at::erf(z * M_SQRT1_2));
    const at::Tensor pdf = at::exp(-0.5 * z * z) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
    return grad * (cdf + z * pdf);
  }
  return grad;
}

at::Tensor optional_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
std::optional<at::Tensor> undefined_to_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& col_idx, const at::Tensor& row_ptr, const at::Tensor& row_end,
                            int64_t level, const std::optional<at::Tensor>& bias, c10::string_view activation,
                            const std::optional<at::Tensor>& plan) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = linear_op(x, values, col_idx, row_ptr, row_end, level, bias, activation, plan);
    ctx->save_for_backward({x, values, col_idx, row_ptr, row_end, optional_or_undefined(bias), out});
    ctx->saved_data["level"] = level;
    ctx->saved_data["activation"] = std::string(activation);
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &values = s[1], &col_idx = s[2], &row_ptr = s[3], &row_end = s[4], &bias = s[5];
    const int64_t level = ctx->saved_data["level"].toInt();
    const at::Tensor gz =
        grad_through_activation(ctx->saved_data["activation"].toStringRef(), grads[0], s[6], [&] {
          return linear_op(x, values, col_idx, row_ptr, row_end, level, undefined_to_optional(bias), "none",
                           std::nullopt);
        }).contiguous();
    at::Tensor gx, gv, gb;
    if (ctx->needs_input_grad(kEdgeX) || ctx->needs_input_grad(kEdgeValues)) {
      static auto bw = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("nestsparse::ncsr_linear_backward", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&, int64_t)>();
      std::tie(gx, gv) = bw.call(gz, x, values, col_idx, row_ptr, row_end, level);
    }
    if (bias.defined() && ctx->needs_input_grad(kEdgeBias)) {
      // sum over no dimension would reduce everything, so a 1-D (unbatched) x passes grad_z through.
      std::vector<int64_t> dims(gz.dim() - 1);
      std::iota(dims.begin(), dims.end(), 0);
      gb = dims.empty() ? gz : gz.sum(dims);
    }
    return {ctx->needs_input_grad(kEdgeX) ? gx : at::Tensor(), ctx->needs_input_grad(kEdgeValues) ? gv : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), gb, at::Tensor(), at::Tensor()};
  }
};

class ConvFunction : public torch::autograd::Function<ConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& col_idx, const at::Tensor& row_ptr, const at::Tensor& row_end,
                            int64_t level, at::IntArrayRef kernel_size, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            c10::string_view activation, const std::optional<at::Tensor>& plan) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = conv_op(x, values, col_idx, row_ptr, row_end, level, kernel_size, bias, stride, padding,
                             dilation, groups, activation, plan);
    ctx->save_for_backward({x, values, col_idx, row_ptr, row_end, optional_or_undefined(bias), out});
    ctx->saved_data["level"] = level;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &values = s[1], &col_idx = s[2], &row_ptr = s[3], &row_end = s[4], &bias = s[5];
    const int64_t level = ctx->saved_data["level"].toInt(), groups = ctx->saved_data["groups"].toInt();
    const auto ks = ctx->saved_data["kernel_size"].toIntVector(), st = ctx->saved_data["stride"].toIntVector();
    const auto pd = ctx->saved_data["padding"].toIntVector(), dl = ctx->saved_data["dilation"].toIntVector();
    const at::Tensor gz =
        grad_through_activation(ctx->saved_data["activation"].toStringRef(), grads[0], s[6], [&] {
          return conv_op(x, values, col_idx, row_ptr, row_end, level, ks, undefined_to_optional(bias), st, pd, dl,
                         groups, "none", std::nullopt);
        }).contiguous();
    at::Tensor gx, gv, gb;
    if (ctx->needs_input_grad(kEdgeX) || ctx->needs_input_grad(kEdgeValues)) {
      static auto bw =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("nestsparse::ncsr_conv2d_backward", "")
              .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        int64_t, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                                        at::IntArrayRef, int64_t)>();
      std::tie(gx, gv) = bw.call(gz, x, values, col_idx, row_ptr, row_end, level, ks, st, pd, dl, groups);
    }
    if (bias.defined() && ctx->needs_input_grad(kEdgeBias)) gb = gz.sum({0, 2, 3});
    at::Tensor none;
    return {ctx->needs_input_grad(kEdgeX) ? gx : none, ctx->needs_input_grad(kEdgeValues) ? gv : none, none, none, none, none,
            none, gb, none, none, none, none, none, none};
  }
};

at::Tensor ncsr_linear_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
                                const at::Tensor& row_ptr, const at::Tensor& row_end, int64_t level,
                                const std::optional<at::Tensor>& bias, c10::string_view activation,
                                const std::optional<at::Tensor>& plan) {
  return LinearFunction::apply(x, values, col_idx, row_ptr, row_end, level, bias, activation, plan);
}

at::Tensor ncsr_conv2d_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
                                const at::Tensor& row_ptr, const at::Tensor& row_end, int64_t level,
                                at::IntArrayRef kernel_size, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, c10::string_view activation, const std::optional<at::Tensor>& plan) {
  return ConvFunction::apply(x, values, col_idx, row_ptr, row_end, level, kernel_size, bias, stride, padding,
                             dilation, groups, activation, plan);
}

}  // namespace

TORCH_LIBRARY_IMPL(nestsparse, Autograd, m) {
  m.impl("ncsr_linear", &ncsr_linear_autograd);
  m.impl("ncsr_conv2d", &ncsr_conv2d_autograd);
}

}  // namespace nestsparse
