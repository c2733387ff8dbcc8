// Every op schema of nestsparse, registered in one place from the op declarations (ops/linear.h, ops/conv2d.h,
// ops/plan.h), and the library's few settings and build facts as ops without tensors. Kernels register per device
// in ops/<device>/*, autograd in ops/autograd.cpp.
//
// The library is a plain torch op library (libnestsparse.so, no Python symbols): Python loads it with
// torch.ops.load_library, a C++ program that runs an exported model dlopens it or links it. Nothing here may
// include Python or pybind11 headers; the build facts Python needs before loading live in _build_info.py.
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops/activation.h"
#include "ops/checks.h"
#include "ops/conv2d.h"
#include "ops/cpu/isa/dispatch.h"
#include "ops/digest.h"
#include "ops/linear.h"
#include "ops/output_pool.h"
#include "ops/plan.h"
#include "ops/same_bytes.h"

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
  // An exported program's first step (nestsparse.export): its level and constants checked (ops/digest.h).
  m.def(kConstantDigestsSchema);
  m.def(kVerifiedLevelSchema);
  // Whether CPU tensors still hold their snapshots' bytes (ops/same_bytes.h): a derived copy is still current.
  m.def("same_bytes(Tensor?[] now, Tensor?[] snapshot) -> bool", same_bytes);

  // Settings and build facts: ops without tensor arguments, so they run under any dispatch key.
  m.def("torch_version() -> str", [] { return std::string(NESTSPARSE_TORCH_VERSION); });
  m.def("with_cuda() -> bool", [] {
#ifdef NESTSPARSE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // The activations the ops fuse, in enum order (nestsparse.activations refuses a Python list that differs).
  m.def("activations() -> str[]",
        [] { return std::vector<std::string>(kActivationNames, kActivationNames + kNumActivations); });
  // The instruction set the CPU kernels use now, and those this processor can run (best last).
  m.def("cpu_isa() -> str", [] { return std::string(cpu::active_isa_name()); });
  m.def("cpu_isas() -> str[]", [] { return cpu::supported_isa_names(); });
  // Use the kernels of one instruction set ('generic', 'avx2', 'avx512'): for tests and benchmarks.
  m.def("set_cpu_isa(str name) -> ()", [](const std::string& name) { cpu::set_isa(name); });
  // Fill op outputs with NaN before the kernels run, so an element a kernel forgets shows up (tests).
  m.def("set_poison_outputs(bool on) -> ()", [](bool on) { set_poison_outputs(on); });
  // The most bytes of freed large CPU outputs kept for reuse; returns the previous limit.
  m.def("set_output_pool_limit(int nbytes) -> int", [](int64_t n) { return set_output_pool_limit(n); });
  // (bytes cached, hits, misses) of the CPU output pool.
  m.def("output_pool_stats() -> int[]", [] {
    const auto s = output_pool_stats();
    return std::vector<int64_t>{s.cached_bytes, s.hits, s.misses};
  });
}
