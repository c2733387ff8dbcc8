// Test aid: when on, ops fill their outputs with NaN before the kernels run, so an output element a kernel
// never writes shows up as NaN instead of passing by luck with whatever the allocator left there.
#pragma once

#include <ATen/core/Tensor.h>

namespace nestsparse {
void set_poison_outputs(bool on);
bool poison_outputs();
// Returns `t`, NaN-filled if poisoning is on.
at::Tensor maybe_poison(at::Tensor t);
}  // namespace nestsparse
