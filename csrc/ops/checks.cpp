#include "ops/checks.h"

#include <ATen/ATen.h>

#include <atomic>
#include <limits>
#include <string>

#include "ops/output_pool.h"

namespace nestsparse {
namespace {
std::atomic<bool> g_poison{false};
}

Act parse_activation(const char* op, std::string_view name) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (name == kActivationNames[i]) return static_cast<Act>(i);
  }
  std::string known;
  for (int i = 0; i < kNumActivations; ++i) known += std::string(i ? ", " : "") + kActivationNames[i];
  TORCH_CHECK(false, op, ": unknown activation '", std::string(name), "'; expected one of ", known);
}

std::array<int64_t, 2> int_pair(const char* op, const char* what, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 2, op, ": ", what, " must have 2 entries, got ", v);
  return {v[0], v[1]};
}

void check_dense_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& values) {
  TORCH_CHECK(t.device() == values.device(), op, ": ", name, " is on ", t.device(), " but values are on ",
              values.device());
  TORCH_CHECK(t.scalar_type() == values.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but values are ",
              values.scalar_type(), "; cast one of them so they match");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first)");
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& values, int64_t M) {
  if (!bias.has_value()) return;
  check_dense_input(op, "bias", *bias, values);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == M, op, ": bias must have shape (", M, ",), got ", bias->sizes());
}

void check_epilogue(const char* op, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual,
                    const at::Tensor& values, int64_t M, at::IntArrayRef out_sizes) {
  if (scale.has_value()) {
    check_dense_input(op, "scale", *scale, values);
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == M, op, ": scale must have shape (", M, ",), got ",
                scale->sizes());
  }
  if (residual.has_value()) {
    check_dense_input(op, "residual", *residual, values);
    TORCH_CHECK(residual->sizes() == out_sizes, op, ": residual must have the output's shape ", out_sizes, ", got ",
                residual->sizes());
  }
}

void check_linear_input(const char* op, const at::Tensor& x, const at::Tensor& values) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (..., K), got a 0-d tensor");
  check_dense_input(op, "x", x, values);
}

std::vector<int64_t> linear_output_sizes(const at::Tensor& x, int64_t M) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = M;
  return sizes;
}

void check_grad_z(const char* op, const at::Tensor& grad_z, at::IntArrayRef expected) {
  TORCH_CHECK(grad_z.sizes() == expected, op, ": grad_z must have shape ", expected, ", got ", grad_z.sizes());
}

int64_t batch_rows(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  return n;
}

void set_poison_outputs(bool on) { g_poison.store(on); }
bool poison_outputs() { return g_poison.load(); }

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = pooled_empty(sizes, options);
  if (poison_outputs() && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace nestsparse
