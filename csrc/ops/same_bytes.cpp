#include "ops/same_bytes.h"

#include <cstring>

namespace nestsparse {
namespace {

// Whether the tensor's storage holds all of its bytes: a storage resized to nothing (how FSDP frees a parameter)
// would otherwise be read out of bounds.
bool backed(const at::Tensor& t) {
  return t.has_storage() && (t.numel() == 0 || t.storage().nbytes() >= (t.storage_offset() + t.numel()) * t.itemsize());
}

bool readable(const at::Tensor& t) { return t.device().is_cpu() && t.is_contiguous() && backed(t); }

void check_readable(const at::Tensor& t, size_t i, const char* which) {
  TORCH_CHECK(readable(t), "nestsparse.same_bytes: ", which, "[", i,
              "] must be a contiguous CPU tensor with all of its bytes in its storage");
}

}  // namespace

bool same_bytes(const c10::List<std::optional<at::Tensor>>& now, const c10::List<std::optional<at::Tensor>>& snapshot) {
  if (now.size() != snapshot.size()) return false;
  for (size_t i = 0; i < now.size(); ++i) {
    const std::optional<at::Tensor> a = now.get(i), b = snapshot.get(i);
    const bool has_a = a.has_value() && a->defined(), has_b = b.has_value() && b->defined();
    if (has_a != has_b) return false;
    if (!has_a) continue;
    check_readable(*b, i, "snapshot");
    // A tensor moved off the CPU, replaced by a strided one or freed is not its snapshot any more.
    if (!readable(*a)) return false;
    if (a->scalar_type() != b->scalar_type() || a->sizes() != b->sizes()) return false;
    const void* pa = a->const_data_ptr();
    const void* pb = b->const_data_ptr();
    if (pa != pb && a->nbytes() != 0 && std::memcmp(pa, pb, a->nbytes()) != 0) return false;
  }
  return true;
}

}  // namespace nestsparse
