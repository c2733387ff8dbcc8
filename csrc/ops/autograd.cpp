// Autograd of every product (<format>_linear, <format>_conv2d), registered at the Autograd key for every device.
//
// Registered in C++ rather than with torch.library.register_autograd: a Python autograd kernel runs on every
// call, gradients wanted or not, and cost about 10 us per op here (a 16x16 product took 15 us instead of 5),
// which would swamp small layers at batch 1 -- the latency case this library is for. For the same reason a call
// that needs no gradient goes straight to the device kernel.
//
// z = scale * (x @ W_level^T) + bias + residual, y = act(z). grad_z = grad_y * act'(z) (ops/activation.h: relu
// and relu6 read the saved output, gelu recomputes z). Then grad_x and grad_values come from the op's backward op
// on scale * grad_z (values outside the level get zero), grad_bias sums grad_z over every dimension but the
// channel and grad_residual is grad_z. The scale (a folded BatchNorm of an inference model) takes no gradient:
// asking for one is an error.
//
// One Function serves every product: it takes (x, values, bias, residual, the whole call), so the edges that can
// need a gradient are x = 0, values = 1, then bias = 2 and residual when present: an absent optional tensor has no
// edge, so the residual's is 2 without a bias, 3 with one.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "ops/conv2d.h"
#include "ops/linear.h"

namespace nestsparse {
namespace {

constexpr size_t kEdgeX = 0, kEdgeValues = 1, kEdgeBias = 2;

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using OptTensor = std::optional<at::Tensor>;

// The backward op of a product.
template <typename Op>
struct BackwardOf;
template <typename F>
struct BackwardOf<Linear<F>> {
  using type = LinearBackward<F>;
};
template <typename F>
struct BackwardOf<Conv2d<F>> {
  using type = Conv2dBackward<F>;
};

// A call's attributes (level, activation, geometry...) into the context's saved data by name, and back: plain
// ints and int lists, as every autograd feature (compiled autograd included) can read them.
struct SaveAttribute {
  AutogradContext* ctx;
  void operator()(const char* name, int64_t v) const { ctx->saved_data[name] = v; }
  void operator()(const char* name, const c10::SymInt& v) const { ctx->saved_data[name] = v; }
  void operator()(const char* name, Act v) const { ctx->saved_data[name] = static_cast<int64_t>(v); }
  void operator()(const char* name, const std::array<int64_t, 2>& v) const {
    ctx->saved_data[name] = std::vector<int64_t>(v.begin(), v.end());
  }
};

struct LoadAttribute {
  AutogradContext* ctx;
  void operator()(const char* name, int64_t& v) const { v = ctx->saved_data[name].toInt(); }
  void operator()(const char* name, c10::SymInt& v) const { v = ctx->saved_data[name].toSymInt(); }
  void operator()(const char* name, Act& v) const { v = static_cast<Act>(ctx->saved_data[name].toInt()); }
  void operator()(const char* name, std::array<int64_t, 2>& v) const {
    const std::vector<int64_t> list = ctx->saved_data[name].toIntVector();
    v = {list.at(0), list.at(1)};
  }
};

// grad_z summed over every dimension but the channel (`dim`). A 1-D (unbatched) linear input has nothing to sum.
at::Tensor bias_grad(const at::Tensor& gz, int64_t dim) {
  const int64_t channel = dim < 0 ? dim + gz.dim() : dim;
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < gz.dim(); ++d) {
    if (d != channel) dims.push_back(d);
  }
  return dims.empty() ? gz : gz.sum(dims);
}

// A per-channel (M,) tensor shaped to broadcast along dimension `dim` of a tensor of `ndim` dimensions.
at::Tensor along_channel(const at::Tensor& t, int64_t ndim, int64_t dim) {
  const int64_t channel = dim < 0 ? dim + ndim : dim;
  std::vector<int64_t> shape(static_cast<size_t>(ndim - channel), 1);
  shape[0] = t.size(0);
  return t.view(shape);
}

template <typename Op>
class ProductFunction : public torch::autograd::Function<ProductFunction<Op>> {
 public:
  using Call = typename Op::Call;
  using Backward = typename BackwardOf<Op>::type;

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                            const OptTensor& residual, Call call) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = dispatch<Op>(call);
    }
    // Tensors are saved through save_for_backward (version checks, no reference cycle through the output), the
    // rest of the call by name.
    std::vector<at::Tensor> saved{out, bias.value_or(at::Tensor()), call.scale.value_or(at::Tensor()),
                                  residual.value_or(at::Tensor())};
    call.for_each_tensor([&](at::Tensor& t) { saved.push_back(t); });
    ctx->save_for_backward(saved);
    call.for_each_attribute(SaveAttribute{ctx});
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &out = s[0], &bias = s[1], &scale = s[2], &residual = s[3];
    Call call{};
    size_t i = 4;
    call.for_each_tensor([&](at::Tensor& t) { t = s[i++]; });
    call.for_each_attribute(LoadAttribute{ctx});
    if (bias.defined()) call.bias = bias;
    if (scale.defined()) call.scale = scale;
    if (residual.defined()) call.residual = residual;
    const at::Tensor gz = grad_through_activation(call.activation, grads[0], out, [&] {
                            Call z = call;
                            z.activation = Act::None;
                            return dispatch<Op>(z);
                          }).contiguous();
    at::Tensor gx, gv, gb;
    if (ctx->needs_input_grad(kEdgeX) || ctx->needs_input_grad(kEdgeValues)) {
      const at::Tensor gzs = scale.defined() ? (gz * along_channel(scale, gz.dim(), Op::kChannelDim)).contiguous() : gz;
      std::tie(gx, gv) = dispatch<Backward>(Backward::of(call, gzs));
    }
    if (bias.defined() && ctx->needs_input_grad(kEdgeBias)) gb = bias_grad(gz, Op::kChannelDim);
    const at::Tensor none;
    const size_t residual_edge = bias.defined() ? kEdgeBias + 1 : kEdgeBias;
    const at::Tensor gr = residual.defined() && ctx->needs_input_grad(residual_edge) ? gz : none;
    tensor_list result{ctx->needs_input_grad(kEdgeX) ? gx : none, ctx->needs_input_grad(kEdgeValues) ? gv : none, gb,
                       gr, none};
    const auto wants = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
    const bool create_graph =
        at::GradMode::is_enabled() && (grads[0].requires_grad() || call.x.requires_grad() ||
                                       call.w.values.requires_grad() || wants(call.bias) || wants(call.residual));
    return create_graph ? refuse_double_backward(result, call, grads[0]) : result;
  }

 private:
  // The backward ops have no derivative of their own: under create_graph the gradients get a grad_fn that raises
  // when a second backward reaches it, wired to every input of this product and the incoming gradient, so that a
  // second gradient with respect to any of them meets it, instead of second-order gradients that would silently
  // be zero.
  static tensor_list refuse_double_backward(const tensor_list& grads, const Call& call, const at::Tensor& grad_out) {
    auto error = c10::make_intrusive<torch::autograd::Error>(
        std::string(Op::name()) +
            ": no second derivative (double backward through a nested sparse product is not implemented); take "
            "second-order gradients on a dense copy (nestsparse.to_dense)",
        torch::autograd::collect_next_edges(call.x, call.w.values, grad_out, call.bias.value_or(at::Tensor()),
                                            call.scale.value_or(at::Tensor()), call.residual.value_or(at::Tensor())));
    tensor_list out;
    out.reserve(grads.size());
    for (const at::Tensor& g : grads) {
      at::Tensor o = g.defined() ? g.detach() : at::Tensor();
      torch::autograd::set_history(o, error);
      out.push_back(std::move(o));
    }
    return out;
  }
};

bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
bool has_forward_grad(const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }

template <typename Op, typename Pred>
bool any_input(const typename Op::Call& call, Pred pred) {
  const auto opt = [&](const OptTensor& t) { return t.has_value() && pred(*t); };
  return pred(call.x) || pred(call.w.values) || opt(call.bias) || opt(call.residual);
}

template <typename Op>
at::Tensor product(const typename Op::Call& call) {
  // A forward gradient goes through the Function too, which refuses it (no jvp) instead of dropping it.
  const bool record =
      (at::GradMode::is_enabled() && any_input<Op>(call, requires_grad)) || any_input<Op>(call, has_forward_grad);
  const bool scale_grad = call.scale.has_value() && ((at::GradMode::is_enabled() && call.scale->requires_grad()) ||
                                                     has_forward_grad(*call.scale));
  TORCH_CHECK(!scale_grad, Op::name(),
              ": scale takes no gradient (it carries a folded BatchNorm for inference); pass scale.detach(), or "
              "train the model before nestsparse.fuse");
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return dispatch<Op>(call);
  }
  return ProductFunction<Op>::apply(call.x, call.w.values, call.bias, call.residual, call);
}

}  // namespace

TORCH_LIBRARY_IMPL(nestsparse, Autograd, m) {
  for_each_format([&](auto format) {
    using F = decltype(format);
    m.impl(Linear<F>::name(), impl<Linear<F>, &product<Linear<F>>>);
    m.impl(Conv2d<F>::name(), impl<Conv2d<F>, &product<Conv2d<F>>>);
  });
}

}  // namespace nestsparse
