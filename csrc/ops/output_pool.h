// Large CPU outputs from a pool of recycled buffers (new_output, ops/checks.h, takes them from here).
//
// A model run at batch 16 allocates and frees the same large activations on every forward. glibc serves every
// block above 32 MB (and many above 128 KB) with a fresh mmap, so each output is first touched page by page by
// the kernel that writes it, and unmapped when it is freed: ResNet-50 at batch 16 took 217k page faults and
// 360 ms of system time per forward, and a 1x1 convolution writing 51 MB ran 5.5x slower per image than the
// same work with a 26 MB output. The pool keeps freed output buffers (up to a cap) and hands them out again;
// new ones are 2 MB aligned and asked to be backed by huge pages, so even a first touch faults 512x less.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace nestsparse {

// An uninitialised contiguous CPU tensor; from the pool when it is at least kMinPooledBytes.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

constexpr int64_t kMinPooledBytes = int64_t{1} << 20;

// The most bytes the pool keeps while they are unused (0: keep nothing, every buffer goes back to the system).
// Returns the previous cap. The default is 1 GiB.
int64_t set_output_pool_limit(int64_t bytes);

struct OutputPoolStats {
  int64_t cached_bytes, hits, misses;
};
OutputPoolStats output_pool_stats();

}  // namespace nestsparse
