// Every op schema of nestsparse, in one place, plus the small Python module that reports how the library
// was built. Kernels register per device in ops/<device>/*.
#include <torch/library.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_isa.h"
#include "ops/debug.h"

TORCH_LIBRARY(nestsparse, m) {
  // y = act(x @ W_level^T + bias); x (..., K), W in nested CSR (see formats/ncsr.h). `plan` is an optional
  // int32 (L, P+1) row partition from ncsr_plan, cached by the caller so it is not rebuilt per call.
  m.def(
      "ncsr_linear(Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor row_end, int level, "
      "Tensor? bias=None, str activation='none', Tensor? plan=None) -> Tensor");
  // Gradients of the pre-activation product z = x @ W_level^T: (grad_x, grad_values). grad_values is zero
  // outside level `level`. The bias gradient and the activation derivative are taken in Python.
  m.def(
      "ncsr_linear_backward(Tensor grad_z, Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, "
      "Tensor row_end, int level) -> (Tensor, Tensor)");
  // NCHW convolution with the weight (Cout, Cin/groups, kh, kw) stored as a nested CSR matrix
  // (Cout, Cin/groups*kh*kw), columns ordered (cin, kh, kw).
  m.def(
      "ncsr_conv2d(Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor row_end, int level, "
      "int[2] kernel_size, Tensor? bias=None, int[2] stride=1, int[2] padding=0, int[2] dilation=1, "
      "int groups=1, str activation='none', Tensor? plan=None) -> Tensor");
  m.def(
      "ncsr_conv2d_backward(Tensor grad_z, Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, "
      "Tensor row_end, int level, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> (Tensor, Tensor)");
  // Row partition of every level into `num_chunks` pieces of about equal work (non-zeros plus a per-row
  // cost): int32 (L, num_chunks+1). Built once per weight; the ops take it as `plan`.
  m.def("ncsr_plan(Tensor row_ptr, Tensor row_end, int num_chunks) -> Tensor");

  // The same four ops for nested BCR (see formats/nbcr.h): W has `rows` rows tiled into `block_shape` blocks.
  m.def(
      "nbcr_linear(Tensor x, Tensor values, Tensor indices, Tensor block_ptr, Tensor blocks, Tensor counts, "
      "int level, int rows, int[2] block_shape, Tensor? bias=None, str activation='none', Tensor? plan=None) "
      "-> Tensor");
  m.def(
      "nbcr_linear_backward(Tensor grad_z, Tensor x, Tensor values, Tensor indices, Tensor block_ptr, "
      "Tensor blocks, Tensor counts, int level, int rows, int[2] block_shape) -> (Tensor, Tensor)");
  m.def(
      "nbcr_conv2d(Tensor x, Tensor values, Tensor indices, Tensor block_ptr, Tensor blocks, Tensor counts, "
      "int level, int rows, int[2] block_shape, int[2] kernel_size, Tensor? bias=None, int[2] stride=1, "
      "int[2] padding=0, int[2] dilation=1, int groups=1, str activation='none', Tensor? plan=None) -> Tensor");
  m.def(
      "nbcr_conv2d_backward(Tensor grad_z, Tensor x, Tensor values, Tensor indices, Tensor block_ptr, "
      "Tensor blocks, Tensor counts, int level, int rows, int[2] block_shape, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor)");
  // Block-row partition of every level into `num_chunks` pieces of about equal work: int32 (L, num_chunks+1).
  m.def("nbcr_plan(Tensor block_ptr, Tensor counts, int rows_per_block, int num_chunks) -> Tensor");
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "nestsparse compiled kernels; the ops register under torch.ops.nestsparse on import";
  mod.def("torch_version", [] { return std::string(NESTSPARSE_TORCH_VERSION); },
          "torch version this library was compiled against");
  mod.def("with_cuda", [] {
#ifdef NESTSPARSE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  mod.def("cpu_isa", [] { return std::string(nestsparse::cpu::active_isa_name()); },
          "instruction set the CPU kernels use now");
  mod.def("cpu_isas", [] { return nestsparse::cpu::supported_isa_names(); },
          "instruction sets this processor can run, best last");
  mod.def("set_cpu_isa", [](const std::string& name) { nestsparse::cpu::set_isa(name); },
          "use the kernels of one instruction set ('generic', 'avx2', 'avx512'); for tests and benchmarks");
  mod.def("set_poison_outputs", [](bool on) { nestsparse::set_poison_outputs(on); },
          "fill op outputs with NaN before the kernels run, so an element a kernel forgets shows up");
}
