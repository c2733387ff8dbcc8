#include "ops/cpu/isa/dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace nestsparse::cpu {
namespace {

bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

std::vector<const KernelTable*> supported() {
  std::vector<const KernelTable*> s{generic_kernels()};
  if (has_avx2()) s.push_back(avx2_kernels());
  if (has_avx512()) s.push_back(avx512_kernels());
  return s;
}

const KernelTable* by_name(const std::string& name) {
  for (const KernelTable* t : supported()) {
    if (name == t->name) return t;
  }
  std::string names;
  for (const KernelTable* t : supported()) names += std::string(names.empty() ? "" : ", ") + t->name;
  TORCH_CHECK(false, "nestsparse: CPU instruction set '", name, "' is unknown or not supported by this processor; ",
              "choose one of: ", names);
}

const KernelTable* initial() {
  if (const char* env = std::getenv("NESTSPARSE_CPU_ISA"); env != nullptr && *env != '\0') return by_name(env);
  return supported().back();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{initial()};
  return table;
}

}  // namespace

const KernelTable& active_kernels() { return *current().load(std::memory_order_relaxed); }
const char* active_isa_name() { return active_kernels().name; }

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> names;
  for (const KernelTable* t : supported()) names.emplace_back(t->name);
  return names;
}

void set_isa(const std::string& name) { current().store(by_name(name)); }

}  // namespace nestsparse::cpu
