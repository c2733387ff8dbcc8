// The host side both formats' CUDA launches share (ncsr_launch.cuh, nbcr_launch.cuh).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>
#include <optional>

#include "ops/activation.h"
#include "ops/cuda/dense_operand.cuh"

namespace nestsparse::cuda {

constexpr int64_t kMaxGridY = 65535;

template <typename scalar_t>
Epilogue<scalar_t> epilogue(const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& residual, Act act, at::Tensor& y) {
  const auto ptr = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->const_data_ptr<scalar_t>() : static_cast<const scalar_t*>(nullptr);
  };
  return {ptr(bias), ptr(scale), ptr(residual), y.mutable_data_ptr<scalar_t>(), act};
}

inline cudaStream_t stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()); }

}  // namespace nestsparse::cuda
