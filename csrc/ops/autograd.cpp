// Autograd of the four products (ncsr/nbcr x linear/conv2d), registered at the Autograd key for every device.
//
// Registered in C++ rather than with torch.library.register_autograd: a Python autograd kernel runs on
// every call, gradients wanted or not, and cost about 10 us per op here (a 16x16 product took 15 us
// instead of 5), which would swamp small layers at batch 1 -- the latency case this library is for.
//
// z = x @ W_level^T (+ bias), y = act(z). grad_z = grad_y * act'(z): relu and relu6 read the saved output,
// gelu recomputes z. Then grad_x and grad_values come from the op's *_backward op (values outside the level
// get zero) and grad_bias sums grad_z over everything but the channel.
//
// One Function serves every op: it takes (x, values, bias, the op's other arguments bundled, plan), so the
// edges that can need a gradient are x = 0, values = 1 and bias = 2; backward() returns one entry per
// argument. Each op contributes a small traits struct (run the forward, run the backward).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <numeric>

namespace nestsparse {
namespace {

constexpr size_t kEdgeX = 0, kEdgeValues = 1, kEdgeBias = 2;

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using OptTensor = std::optional<at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor>;

// Everything of a product call but x, values, bias and plan: the format's index tensors, the level and the
// integer arguments (shape, block shape, conv geometry) in schema order. Passed as one opaque argument so
// autograd does not count its tensors as inputs.
struct ProductArgs {
  std::vector<at::Tensor> idx;
  int64_t level;
  std::vector<int64_t> ints;
};

template <typename Fn>
auto op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

using T = const at::Tensor&;
using IA = at::IntArrayRef;

struct NcsrLinear {
  static at::Tensor run(T x, T v, const ProductArgs& a, const OptTensor& bias, c10::string_view act, const OptTensor& plan) {
    static auto op = op_handle<at::Tensor(T, T, T, T, T, int64_t, const OptTensor&, c10::string_view, const OptTensor&)>(
        "nestsparse::ncsr_linear");
    return op.call(x, v, a.idx[0], a.idx[1], a.idx[2], a.level, bias, act, plan);
  }
  static Grads grads(T gz, T x, T v, const ProductArgs& a) {
    static auto op = op_handle<Grads(T, T, T, T, T, T, int64_t)>("nestsparse::ncsr_linear_backward");
    return op.call(gz, x, v, a.idx[0], a.idx[1], a.idx[2], a.level);
  }
};

// ints: kernel_size, stride, padding, dilation (2 each), groups.
struct NcsrConv {
  static at::Tensor run(T x, T v, const ProductArgs& a, const OptTensor& bias, c10::string_view act, const OptTensor& plan) {
    static auto op = op_handle<at::Tensor(T, T, T, T, T, int64_t, IA, const OptTensor&, IA, IA, IA, int64_t,
                                          c10::string_view, const OptTensor&)>("nestsparse::ncsr_conv2d");
    const int64_t* g = a.ints.data();
    return op.call(x, v, a.idx[0], a.idx[1], a.idx[2], a.level, IA(g, 2), bias, IA(g + 2, 2), IA(g + 4, 2),
                   IA(g + 6, 2), g[8], act, plan);
  }
  static Grads grads(T gz, T x, T v, const ProductArgs& a) {
    static auto op = op_handle<Grads(T, T, T, T, T, T, int64_t, IA, IA, IA, IA, int64_t)>(
        "nestsparse::ncsr_conv2d_backward");
    const int64_t* g = a.ints.data();
    return op.call(gz, x, v, a.idx[0], a.idx[1], a.idx[2], a.level, IA(g, 2), IA(g + 2, 2), IA(g + 4, 2), IA(g + 6, 2),
                   g[8]);
  }
};

// ints: rows, block_shape (2).
struct NbcrLinear {
  static at::Tensor run(T x, T v, const ProductArgs& a, const OptTensor& bias, c10::string_view act, const OptTensor& plan) {
    static auto op = op_handle<at::Tensor(T, T, T, T, T, T, int64_t, int64_t, IA, const OptTensor&, c10::string_view,
                                          const OptTensor&)>("nestsparse::nbcr_linear");
    const int64_t* g = a.ints.data();
    return op.call(x, v, a.idx[0], a.idx[1], a.idx[2], a.idx[3], a.level, g[0], IA(g + 1, 2), bias, act, plan);
  }
  static Grads grads(T gz, T x, T v, const ProductArgs& a) {
    static auto op = op_handle<Grads(T, T, T, T, T, T, T, int64_t, int64_t, IA)>("nestsparse::nbcr_linear_backward");
    const int64_t* g = a.ints.data();
    return op.call(gz, x, v, a.idx[0], a.idx[1], a.idx[2], a.idx[3], a.level, g[0], IA(g + 1, 2));
  }
};

// ints: rows, block_shape (2), kernel_size, stride, padding, dilation (2 each), groups.
struct NbcrConv {
  static at::Tensor run(T x, T v, const ProductArgs& a, const OptTensor& bias, c10::string_view act, const OptTensor& plan) {
    static auto op = op_handle<at::Tensor(T, T, T, T, T, T, int64_t, int64_t, IA, IA, const OptTensor&, IA, IA, IA,
                                          int64_t, c10::string_view, const OptTensor&)>("nestsparse::nbcr_conv2d");
    const int64_t* g = a.ints.data();
    return op.call(x, v, a.idx[0], a.idx[1], a.idx[2], a.idx[3], a.level, g[0], IA(g + 1, 2), IA(g + 3, 2), bias,
                   IA(g + 5, 2), IA(g + 7, 2), IA(g + 9, 2), g[11], act, plan);
  }
  static Grads grads(T gz, T x, T v, const ProductArgs& a) {
    static auto op = op_handle<Grads(T, T, T, T, T, T, T, int64_t, int64_t, IA, IA, IA, IA, IA, int64_t)>(
        "nestsparse::nbcr_conv2d_backward");
    const int64_t* g = a.ints.data();
    return op.call(gz, x, v, a.idx[0], a.idx[1], a.idx[2], a.idx[3], a.level, g[0], IA(g + 1, 2), IA(g + 3, 2),
                   IA(g + 5, 2), IA(g + 7, 2), IA(g + 9, 2), g[11]);
  }
};

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

// The bias gradient: grad_z summed over every dimension but the channel (last for linear, 1 for conv). A 1-D
// (unbatched) linear input has nothing to sum.
at::Tensor bias_grad(const at::Tensor& gz, bool conv) {
  if (conv) return gz.sum({0, 2, 3});
  std::vector<int64_t> dims(gz.dim() - 1);
  std::iota(dims.begin(), dims.end(), 0);
  return dims.empty() ? gz : gz.sum(dims);
}

template <typename Op, bool Conv>
class ProductFunction : public torch::autograd::Function<ProductFunction<Op, Conv>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                            const ProductArgs& args, c10::string_view activation, const OptTensor& plan) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = Op::run(x, values, args, bias, activation, plan);
    std::vector<at::Tensor> saved{x, values, bias.has_value() ? *bias : at::Tensor(), out};
    saved.insert(saved.end(), args.idx.begin(), args.idx.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["level"] = args.level;
    ctx->saved_data["ints"] = args.ints;
    ctx->saved_data["activation"] = std::string(activation);
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &values = s[1], &bias = s[2], &out = s[3];
    const ProductArgs args{std::vector<at::Tensor>(s.begin() + 4, s.end()), ctx->saved_data["level"].toInt(),
                           ctx->saved_data["ints"].toIntVector()};
    const OptTensor bias_opt = bias.defined() ? OptTensor(bias) : std::nullopt;
    const at::Tensor gz = grad_through_activation(ctx->saved_data["activation"].toStringRef(), grads[0], out, [&] {
                            return Op::run(x, values, args, bias_opt, "none", std::nullopt);
                          }).contiguous();
    at::Tensor gx, gv, gb;
    if (ctx->needs_input_grad(kEdgeX) || ctx->needs_input_grad(kEdgeValues)) {
      std::tie(gx, gv) = Op::grads(gz, x, values, args);
    }
    if (bias.defined() && ctx->needs_input_grad(kEdgeBias)) gb = bias_grad(gz, Conv);
    const at::Tensor none;
    return {ctx->needs_input_grad(kEdgeX) ? gx : none, ctx->needs_input_grad(kEdgeValues) ? gv : none, gb, none, none,
            none};
  }
};

// The integer arguments in schema order. The list arguments are int[2] in the schemas, but a caller can pass
// another length; it is refused here, before the traits index the bundle by fixed offsets.
std::vector<int64_t> concat(const char* op, std::initializer_list<std::pair<const char*, IA>> parts) {
  std::vector<int64_t> out;
  for (const auto& [name, p] : parts) {
    TORCH_CHECK(name == nullptr || p.size() == 2, op, ": ", name, " must have 2 entries, got ", p);
    out.insert(out.end(), p.begin(), p.end());
  }
  return out;
}

at::Tensor ncsr_linear_autograd(T x, T values, T col_idx, T row_ptr, T row_end, int64_t level, const OptTensor& bias,
                                c10::string_view activation, const OptTensor& plan) {
  return ProductFunction<NcsrLinear, false>::apply(x, values, bias, ProductArgs{{col_idx, row_ptr, row_end}, level, {}},
                                                   activation, plan);
}

at::Tensor ncsr_conv2d_autograd(T x, T values, T col_idx, T row_ptr, T row_end, int64_t level, IA kernel_size,
                                const OptTensor& bias, IA stride, IA padding, IA dilation, int64_t groups,
                                c10::string_view activation, const OptTensor& plan) {
  ProductArgs a{{col_idx, row_ptr, row_end}, level, concat("ncsr_conv2d", {{"kernel_size", kernel_size}, {"stride", stride}, {"padding", padding}, {"dilation", dilation}})};
  a.ints.push_back(groups);
  return ProductFunction<NcsrConv, true>::apply(x, values, bias, a, activation, plan);
}

at::Tensor nbcr_linear_autograd(T x, T values, T indices, T block_ptr, T blocks, T counts, int64_t level, int64_t rows,
                                IA block_shape, const OptTensor& bias, c10::string_view activation,
                                const OptTensor& plan) {
  ProductArgs a{{indices, block_ptr, blocks, counts}, level, concat("nbcr_linear", {{nullptr, IA(rows)}, {"block_shape", block_shape}})};
  return ProductFunction<NbcrLinear, false>::apply(x, values, bias, a, activation, plan);
}

at::Tensor nbcr_conv2d_autograd(T x, T values, T indices, T block_ptr, T blocks, T counts, int64_t level, int64_t rows,
                                IA block_shape, IA kernel_size, const OptTensor& bias, IA stride, IA padding,
                                IA dilation, int64_t groups, c10::string_view activation, const OptTensor& plan) {
  ProductArgs a{{indices, block_ptr, blocks, counts}, level,
                concat("nbcr_conv2d", {{nullptr, IA(rows)}, {"block_shape", block_shape}, {"kernel_size", kernel_size},
                                       {"stride", stride}, {"padding", padding}, {"dilation", dilation}})};
  a.ints.push_back(groups);
  return ProductFunction<NbcrConv, true>::apply(x, values, bias, a, activation, plan);
}

}  // namespace

TORCH_LIBRARY_IMPL(nestsparse, Autograd, m) {
  m.impl("ncsr_linear", &ncsr_linear_autograd);
  m.impl("ncsr_conv2d", &ncsr_conv2d_autograd);
  m.impl("nbcr_linear", &nbcr_linear_autograd);
  m.impl("nbcr_conv2d", &nbcr_conv2d_autograd);
}

}  // namespace nestsparse
