// Every op schema of nestsparse, registered in one place from the op declarations (ops/linear.h, ops/conv2d.h,
// ops/plan.h), plus the small Python module that reports how the library was built. Kernels register per device in
// ops/<device>/*, autograd in ops/autograd.cpp.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops/activation.h"
#include "ops/checks.h"
#include "ops/conv2d.h"
#include "ops/cpu/isa/dispatch.h"
#include "ops/linear.h"
#include "ops/output_pool.h"
#include "ops/plan.h"

TORCH_LIBRARY(nestsparse, m) {
  using namespace nestsparse;
  for_each_format([&](auto format) {
    using F = decltype(format);
    m.def(Linear<F>::schema().c_str());
    m.def(LinearBackward<F>::schema().c_str());
    m.def(Conv2d<F>::schema().c_str());
    m.def(Conv2dBackward<F>::schema().c_str());
  });
  m.def(NcsrPlan::schema());
  m.def(NbcrPlan::schema());
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "nestsparse compiled kernels; the ops register under torch.ops.nestsparse on import";
  mod.def(
      "torch_version", [] { return std::string(NESTSPARSE_TORCH_VERSION); },
      "torch version this library was compiled against");
  mod.def("with_cuda", [] {
#ifdef NESTSPARSE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  mod.def(
      "activations",
      [] {
        return std::vector<std::string>(nestsparse::kActivationNames,
                                        nestsparse::kActivationNames + nestsparse::kNumActivations);
      },
      "the activations the ops fuse, in enum order");
  mod.def(
      "cpu_isa", [] { return std::string(nestsparse::cpu::active_isa_name()); },
      "instruction set the CPU kernels use now");
  mod.def(
      "cpu_isas", [] { return nestsparse::cpu::supported_isa_names(); },
      "instruction sets this processor can run, best last");
  mod.def(
      "set_cpu_isa", [](const std::string& name) { nestsparse::cpu::set_isa(name); },
      "use the kernels of one instruction set ('generic', 'avx2', 'avx512'); for tests and benchmarks");
  mod.def(
      "set_poison_outputs", [](bool on) { nestsparse::set_poison_outputs(on); },
      "fill op outputs with NaN before the kernels run, so an element a kernel forgets shows up");
  mod.def("set_output_pool_limit", &nestsparse::set_output_pool_limit,
          "the most bytes of freed large CPU outputs kept for reuse; returns the previous limit");
  mod.def(
      "output_pool_stats",
      [] {
        const auto s = nestsparse::output_pool_stats();
        return std::make_tuple(s.cached_bytes, s.hits, s.misses);
      },
      "(bytes cached, hits, misses) of the CPU output pool");
}
