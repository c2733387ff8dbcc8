// Helpers shared by the CPU ops' torch glue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "ops/cpu/isa/kernel_api.h"

namespace nestsparse::cpu {

constexpr int64_t kNoGroups = std::numeric_limits<int64_t>::max();

inline ValueKind value_kind(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kBFloat16: return ValueKind::BF16;
    case at::kHalf: return ValueKind::F16;
    default: return ValueKind::F32;
  }
}

// Tile width for n dense columns: the narrowest of 16/32/64 that holds them, so small batches waste no lanes.
inline int64_t tile_width(int64_t n) { return n <= 16 ? 16 : (n <= 32 ? 32 : 64); }

// Tile width for a dense operand of `ncols` columns whose rows are `K` long. Every weight row of a tile re-reads
// the K x TN panel, so it must stay in L2 (1 MB a core on the processors measured) next to the streaming weights:
// narrower for long rows. 64 wide up to K = 4096 (a 1 MB panel): ResNet-50's layer4 3x3 convolutions (K = 4608,
// 32 wide) and layer3's (K = 2304, 64 wide) ran 7-25% faster at batch 16 than with half the width.
inline int64_t panel_width(int64_t ncols, int64_t K) {
  return std::min(tile_width(ncols), K <= 4096 ? int64_t{64} : (K <= 8192 ? int64_t{32} : int64_t{16}));
}

// Grain for at::parallel_for over `items` pieces of a product with `work` multiply-adds in all: below about
// 10 us of work, waking the other threads costs more than it saves, so the whole range runs inline.
inline int64_t grain_for(int64_t items, int64_t work) {
  return work < (int64_t{1} << 15) ? std::max<int64_t>(items, 1) : 1;
}

inline int64_t default_chunks() { return 4 * static_cast<int64_t>(at::get_num_threads()); }

// float64 weights compute in float64 (gradient checks); every other value type computes in float32.
inline at::ScalarType compute_type(const at::Tensor& values) {
  return values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A product call's epilogue operands (bias, scale, residual) in the compute type `ct`, undefined where absent.
struct EpilogueTensors {
  at::Tensor bias, scale, residual;
  template <typename T>
  static const T* ptr(const at::Tensor& t) {
    return t.defined() ? t.const_data_ptr<T>() : nullptr;
  }
  // The ISA kernels' epilogue, writing into `out`.
  Epilogue kernel(Act act, const float* out) const {
    return Epilogue{ptr<float>(bias), act, ptr<float>(scale), ptr<float>(residual), out};
  }
};

template <typename Call>
EpilogueTensors epilogue_tensors(const Call& c, at::ScalarType ct) {
  const auto in_ct = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(ct).contiguous() : at::Tensor();
  };
  return {in_ct(c.bias), in_ct(c.scale), in_ct(c.residual)};
}

// The epilogue of the plain-loop (float64) paths, over an output (outer, M, inner) that holds the bare products:
// out = act(scale[r] * out + bias[r] + residual) for channel r.
template <typename T>
void finish_outputs(const EpilogueTensors& e, Act act, T* out, int64_t outer, int64_t M, int64_t inner) {
  const T *scale = EpilogueTensors::ptr<T>(e.scale), *bias = EpilogueTensors::ptr<T>(e.bias);
  const T* res = EpilogueTensors::ptr<T>(e.residual);
  at::parallel_for(0, outer * M, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i % M;
      const T s = scale ? scale[r] : T(1), b = bias ? bias[r] : T(0);
      for (int64_t j = i * inner; j < (i + 1) * inner; ++j) {
        out[j] = activate<ExactMath>(act, s * out[j] + b + (res ? res[j] : T(0)));
      }
    }
  });
}

}  // namespace nestsparse::cpu
