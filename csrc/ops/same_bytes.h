// Whether tensors hold the same bytes as their snapshots: what a derived copy (a dense level, nn/sparse.py) checks
// before it is served, so that a write no version counter sees (a fused optimizer step, a .data or numpy write, an
// inference tensor written in inference mode) never leaves the copy stale.
//
// memcmp, not a hash: exact, and glibc's runs at 37-50 GB/s on one core of the AVX2 development machine (a 4 MB
// weight in 108 us, about one dense matrix-vector product of the same weight); torch.equal took 2.8 ms for it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace nestsparse {

// True when every tensor of `now` has the dtype, shape and bytes of the tensor at the same place in `snapshot`
// (absent in both counts as the same). The snapshots must be contiguous CPU tensors; a tensor of `now` that is not
// (moved to a GPU, replaced by a strided one) differs from its snapshot.
bool same_bytes(const c10::List<std::optional<at::Tensor>>& now, const c10::List<std::optional<at::Tensor>>& snapshot);

}  // namespace nestsparse
