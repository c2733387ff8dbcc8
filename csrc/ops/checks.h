// The argument checks every device shares (the format checks are in formats/*.h), and the output poison switch.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "ops/activation.h"

namespace nestsparse {

// The activation named `name`; raises naming the op and the known activations otherwise.
Act parse_activation(const char* op, std::string_view name);

// An int[2] argument as a pair; raises "<op>: <what> must have 2 entries, got ..." otherwise (a caller going
// through torch.ops directly can pass any length).
std::array<int64_t, 2> int_pair(const char* op, const char* what, at::IntArrayRef v);

// The dense operand `name` must be on the weight's device, of the values' dtype, and contiguous.
void check_dense_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& values);

// The input of a linear product: a dense operand of shape (..., K), at least 1-D.
void check_linear_input(const char* op, const at::Tensor& x, const at::Tensor& values);

// The output of a linear product of x (..., K) by a weight of M rows: (..., M).
std::vector<int64_t> linear_output_sizes(const at::Tensor& x, int64_t M);

// A backward op's grad_z must have the shape of the forward's output.
void check_grad_z(const char* op, const at::Tensor& grad_z, at::IntArrayRef expected);

// An optional bias must be a dense operand of shape (M,).
void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& values, int64_t M);

// The inference epilogue's operands: an optional scale of shape (M,) and an optional residual of the output's
// shape, both dense operands like x.
void check_epilogue(const char* op, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual,
                    const at::Tensor& values, int64_t M, at::IntArrayRef out_sizes);

// The rows of x (..., K) seen as a matrix: the product of its leading dimensions.
int64_t batch_rows(const at::Tensor& x);

// Test aid: when on, ops fill their outputs with NaN before the kernels run, so an output element a kernel never
// writes shows up as NaN instead of passing by luck with whatever the allocator left there.
void set_poison_outputs(bool on);
bool poison_outputs();
// An uninitialised output, NaN-filled when poisoning is on.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace nestsparse
