// Run-time choice of the CPU kernels' instruction set: the best the processor (and OS) supports, unless
// NESTSPARSE_CPU_ISA or set_isa() asks for a lower one (tests use this to cover every path).
#pragma once

#include <string>
#include <vector>

#include "ops/cpu/isa/kernel_api.h"

namespace nestsparse::cpu {
const KernelTable& active_kernels();
const char* active_isa_name();
std::vector<std::string> supported_isa_names();
void set_isa(const std::string& name);
}  // namespace nestsparse::cpu
