// The activations an op fuses into its epilogue: the one C++ definition, used by the CPU kernels of every
// instruction set, the CUDA kernels, the argument parser and autograd. Adding an activation on the C++ side
// touches this file only:
//   1. a row of NESTSPARSE_ACTIVATIONS (enum name, name in the op schemas);
//   2. its formula in activate(), with the functions of a Math (erf, exp, tanh);
//   3. its derivative in grad_through_activation().
// A missing formula or derivative does not build (-Werror=switch). The Python side names the torch module it
// stands for in python/nestsparse/activations.py.
//
// No function here has external linkage and nothing here needs a header beyond <cmath>: the ISA kernel files
// include it, and an inline function with external linkage compiled there for AVX-512 could be the copy the linker
// keeps for every caller (see ops/cpu/isa/kernel_api.h).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NESTSPARSE_HOST_DEVICE __host__ __device__
#else
#define NESTSPARSE_HOST_DEVICE
#endif

namespace nestsparse {

// X(enum name, schema name)
#define NESTSPARSE_ACTIVATIONS(X) \
  X(None, "none")                 \
  X(Relu, "relu")                 \
  X(Relu6, "relu6")               \
  X(Gelu, "gelu")

enum class Act : int32_t {
#define NESTSPARSE_ACT_ENUM(e, name) e,
  NESTSPARSE_ACTIVATIONS(NESTSPARSE_ACT_ENUM)
#undef NESTSPARSE_ACT_ENUM
};

// The schema names, indexed by Act.
inline constexpr const char* kActivationNames[] = {
#define NESTSPARSE_ACT_NAME(e, name) name,
    NESTSPARSE_ACTIVATIONS(NESTSPARSE_ACT_NAME)
#undef NESTSPARSE_ACT_NAME
};
inline constexpr int kNumActivations = sizeof(kActivationNames) / sizeof(kActivationNames[0]);

namespace {

// The functions an activation's formula may use (Math::erf, Math::exp, Math::tanh), in three flavours:
// ExactMath for the float64 paths (and the float32 loops outside the ISA kernels), FastMath for the ISA kernels'
// float32 epilogues, DeviceMath for CUDA. A formula written with them runs everywhere.
struct ExactMath {
  // The compiler's builtins rather than std::'s inline overloads: nothing with external linkage, even if an ISA
  // file used it.
  static float erf(float x) { return __builtin_erff(x); }
  static double erf(double x) { return __builtin_erf(x); }
  static float exp(float x) { return __builtin_expf(x); }
  static double exp(double x) { return __builtin_exp(x); }
  static float tanh(float x) { return __builtin_tanhf(x); }
  static double tanh(double x) { return __builtin_tanh(x); }
};

// erf by Abramowitz & Stegun 7.1.28 (|error| < 3e-7): only arithmetic, so an epilogue loop over it vectorises.
inline float erf_approx(float x) {
  const float ax = x < 0.f ? -x : x;
  float t = 1.f + ax * (0.0705230784f +
                        ax * (0.0422820123f +
                              ax * (0.0092705272f + ax * (0.0001520143f + ax * (0.0002765672f + ax * 0.0000430638f)))));
  t = t * t;
  t = t * t;
  t = t * t;
  t = t * t;
  const float e = 1.f - 1.f / t;
  return x < 0.f ? -e : e;
}

// The ISA kernels' float32 math: no std:: inline function (an ISA file must not compile one, see kernel_api.h);
// exp and tanh are the C library's.
struct FastMath {
  static float erf(float x) { return erf_approx(x); }
  static float exp(float x) { return __builtin_expf(x); }
  static float tanh(float x) { return __builtin_tanhf(x); }
};

#if defined(__CUDACC__)
struct DeviceMath {
  __device__ static float erf(float x) { return ::erff(x); }
  __device__ static double erf(double x) { return ::erf(x); }
  __device__ static float exp(float x) { return ::expf(x); }
  __device__ static double exp(double x) { return ::exp(x); }
  __device__ static float tanh(float x) { return ::tanhf(x); }
  __device__ static double tanh(double x) { return ::tanh(x); }
};
#endif

// act(z). Comparisons are written so that NaN passes through, as torch.relu, relu6 and gelu do.
template <typename Math, typename T>
NESTSPARSE_HOST_DEVICE inline T activate(Act act, T z) {
  switch (act) {
    case Act::Relu: return z < T(0) ? T(0) : z;
    case Act::Relu6: return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
    case Act::Gelu:  // exact: z/2 (1 + erf(z / sqrt 2)), as torch's approximate='none'
      return T(0.5) * z * (T(1) + Math::erf(z * T(0.70710678118654752440)));
    case Act::None: break;
  }
  return z;
}

// y[i] = act(y[i]) for i < n, the switch taken once outside the loop so that the loop vectorises.
template <typename Math, typename T>
NESTSPARSE_HOST_DEVICE inline void activate_all(Act act, T* y, int64_t n) {
  switch (act) {
#define NESTSPARSE_ACT_LOOP(e, name)                                     \
  case Act::e:                                                           \
    for (int64_t i = 0; i < n; ++i) y[i] = activate<Math>(Act::e, y[i]); \
    break;
    NESTSPARSE_ACTIVATIONS(NESTSPARSE_ACT_LOOP)
#undef NESTSPARSE_ACT_LOOP
  }
}

// grad_z = grad_y * act'(z) on tensors (autograd), given the op's output y = act(z). `pre_activation()` returns z
// (a second product, so only what needs it calls it). A template over the tensor type so that this header needs
// no ATen include; it is only instantiated with at::Tensor.
template <typename Tensor, typename PreActivation>
Tensor grad_through_activation(Act act, const Tensor& grad, const Tensor& out, PreActivation pre_activation) {
  switch (act) {
    case Act::Relu: return grad * out.gt(0).to(grad.scalar_type());
    case Act::Relu6: return grad * out.gt(0).logical_and(out.lt(6)).to(grad.scalar_type());
    case Act::Gelu: {
      const Tensor z = pre_activation();
      const Tensor cdf = 0.5 * (1.0 + (z * M_SQRT1_2).erf());
      const Tensor pdf = (-0.5 * z * z).exp() * (0.5 * M_2_SQRTPI * M_SQRT1_2);
      return grad * (cdf + z * pdf);
    }
    case Act::None: break;
  }
  return grad;
}

}  // namespace
}  // namespace nestsparse
