#include "ops/digest.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/stack.h>
#include <c10/util/hash.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <sstream>
#include <utility>

namespace nestsparse {
namespace {

// c10::sha1 takes one std::string and runs at about 160 MB/s on one core, so a constant is hashed in pieces of
// 1 MiB (each piece's digest in parallel, then one digest of the header and the pieces' digests): a 400 MB model
// costs about 2.5 s on one core and a fraction of that on many, once per program.
constexpr int64_t kPieceBytes = int64_t{1} << 20;

// The bytes a digest covers: the tensor on the CPU, in C order, conjugate and negative bits resolved. A tensor
// whose storage does not hold every element it addresses (a storage resized to nothing, as FSDP frees a parameter)
// is refused before anything reads it.
at::Tensor canonical(const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided, "constant_digests: a constant must be a strided (dense) tensor, got ",
              t.layout());
  if (t.numel() > 0) {
    int64_t last = t.storage_offset();
    bool forward = true;  // no negative stride (torch makes none; a hand-made one is refused, not followed)
    for (int64_t d = 0; d < t.dim(); ++d) {
      last += (t.size(d) - 1) * t.stride(d);
      forward = forward && t.stride(d) >= 0;
    }
    TORCH_CHECK(t.has_storage() && forward &&
                    static_cast<int64_t>(t.storage().nbytes()) >= (last + 1) * static_cast<int64_t>(t.itemsize()),
                "constant_digests: a constant of shape ", t.sizes(), " addresses more bytes than its storage holds");
  }
  return t.resolve_conj().resolve_neg().to(at::kCPU).contiguous();
}

std::string header(const at::Tensor& t) {
  std::ostringstream out;
  out << c10::toString(t.scalar_type()) << t.sizes() << ':';
  return out.str();
}

}  // namespace

std::vector<std::string> constant_digests(at::TensorList constants) {
  std::vector<std::string> out;
  out.reserve(constants.size());
  for (const auto& constant : constants) {  // one at a time: a GPU program's constants are copied to the host singly
    const at::Tensor bytes = canonical(constant);
    const int64_t n = static_cast<int64_t>(bytes.nbytes());
    const char* data = static_cast<const char*>(bytes.const_data_ptr());
    std::vector<std::string> pieces(static_cast<size_t>((n + kPieceBytes - 1) / kPieceBytes));
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t start = p * kPieceBytes, size = std::min(kPieceBytes, n - start);
        pieces[p] = c10::sha1(std::string(data + start, static_cast<size_t>(size))).str();
      }
    });
    std::string text = header(bytes);  // never empty: c10::sha1("") is unset
    for (const auto& piece : pieces) text += piece;
    out.push_back(c10::sha1(text).str());
  }
  return out;
}

namespace {

constexpr size_t kDigestChars = 40;  // a SHA-1 in hex

// One constant as last verified: its storage (held weakly, so that address cannot belong to another storage while
// the entry exists), where its data starts and its shape. Compared through the TensorImpl, without copying a
// Storage handle (an atomic increment each).
struct Seen {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const c10::StorageImpl* impl;
  const void* data;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  c10::ScalarType dtype;

  bool is(const at::Tensor& t) const {
    const auto* s = t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();  // null without storage
    return s == impl && s->data() == data && t.storage_offset() == offset && t.scalar_type() == dtype &&
           t.sizes() == at::IntArrayRef(sizes) && t.strides() == at::IntArrayRef(strides);
  }
};

// A program's constants as verified against its digests.
struct Verified {
  std::string digests;
  std::vector<Seen> constants;

  bool is(c10::ArrayRef<c10::IValue> now, const std::string& now_digests) const {
    if (now.size() != constants.size() || now_digests != digests) return false;
    for (size_t i = 0; i < now.size(); ++i) {
      if (!constants[i].is(now[i].toTensor())) return false;
    }
    return true;
  }
  bool freed() const {
    return std::any_of(constants.begin(), constants.end(), [](const Seen& c) { return c.storage.expired(); });
  }
};

// One entry per program verified in this process (a handful), scanned in order.
std::mutex verified_mutex;
std::vector<Verified> verified;

bool already_verified(c10::ArrayRef<c10::IValue> constants, const std::string& digests) {
  std::lock_guard<std::mutex> lock(verified_mutex);
  return std::any_of(verified.begin(), verified.end(), [&](const Verified& v) { return v.is(constants, digests); });
}

void remember(c10::ArrayRef<c10::IValue> constants, const std::string& digests) {
  Verified entry{digests, {}};
  for (const auto& c : constants) {
    const auto& t = c.toTensor();
    if (!t.has_storage()) return;  // nothing to key it by: verified again on the next call
    const auto& storage = t.unsafeGetTensorImpl()->unsafe_storage();
    entry.constants.push_back(Seen{storage.getWeakStorageImpl(), storage.unsafeGetStorageImpl(), storage.data(),
                                   t.storage_offset(), t.sizes().vec(), t.strides().vec(), t.scalar_type()});
  }
  std::lock_guard<std::mutex> lock(verified_mutex);
  std::erase_if(verified, [](const Verified& v) { return v.freed(); });  // programs freed since
  verified.push_back(std::move(entry));
}

int64_t level_value(const at::Tensor& level, int64_t num_levels) {
  TORCH_CHECK(level.numel() == 1 && at::isIntegralType(level.scalar_type(), /*includeBool=*/false),
              "the level is a one-element integer tensor, e.g. torch.tensor(1), got a ", level.scalar_type(),
              " tensor of shape ", level.sizes());
  int64_t value = 0;
  if (level.is_cpu()) {
    AT_DISPATCH_INTEGRAL_TYPES(level.scalar_type(), "verified_level",
                               [&] { value = static_cast<int64_t>(*level.const_data_ptr<scalar_t>()); });
  } else {
    value = level.item<int64_t>();
  }
  TORCH_CHECK(value >= 0 && value < num_levels, "level ", value, " is out of range for this program (0 = densest .. ",
              num_levels - 1, ")");
  return value;
}

// The constants' names, one a line (for the messages only): where they do not split into one per constant (a name
// with a newline), the constants are named by number.
std::vector<std::string> split_names(const std::string& names, size_t count) {
  std::vector<std::string> out;
  std::stringstream in(names);
  for (std::string name; std::getline(in, name, '\n');) out.push_back(name);
  if (out.size() != count) {
    out.clear();
    for (size_t i = 0; i < count; ++i) out.emplace_back(std::to_string(i)).insert(0, 1, '#');
  }
  return out;
}

void check_digests(c10::ArrayRef<c10::IValue> constants, const std::string& names, const std::string& digests) {
  TORCH_CHECK(digests.size() == kDigestChars * constants.size(), "verified_level: ", constants.size(),
              " constants, but ", digests.size(), " digest characters (", kDigestChars, " each)");
  const auto name = split_names(names, constants.size());
  std::vector<at::Tensor> tensors;
  tensors.reserve(constants.size());
  for (const auto& c : constants) tensors.push_back(c.toTensor());
  const auto actual = constant_digests(tensors);
  size_t differ = 0, first = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    if (digests.compare(i * kDigestChars, kDigestChars, actual[i]) != 0 && differ++ == 0) first = i;
  }
  TORCH_CHECK(
      differ == 0, "this program's constant '", name[first], "' (", tensors[first].scalar_type(), " of shape ",
      tensors[first].sizes(), ") is not what nestsparse.export recorded (", differ, " of ", actual.size(),
      " constants differ): its file was damaged or edited after the export, or the model's weights were changed in "
      "place since; restore the file or export the model again (nestsparse.export)");
}

// Boxed: the arguments are read off the stack as they are, without the per-call copy of the constants' list that
// the typed form makes.
void verified_level_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::last(*stack, 5);
  const auto& level = args[0].toTensor();
  const int64_t value = level_value(level, args[1].toInt());
  const auto constants = args[2].toListRef();
  const auto& digests = args[4].toStringRef();
  if (!already_verified(constants, digests)) {
    check_digests(constants, args[3].toStringRef(), digests);
    remember(constants, digests);
  }
  at::Tensor out;
  if (level.is_cpu()) {
    out = at::empty({}, at::TensorOptions().dtype(at::kLong));
    *out.mutable_data_ptr<int64_t>() = value;
  } else {
    out = at::scalar_tensor(value, level.options().dtype(at::kLong));
  }
  torch::jit::drop(*stack, 5);
  torch::jit::push(*stack, std::move(out));
}

}  // namespace

// CPU and CUDA alike: the digests are taken on the CPU. No Meta kernel: the fake kernel is nestsparse.deploy's.
TORCH_LIBRARY_IMPL(nestsparse, CPU, m) {
  m.impl("constant_digests", TORCH_FN(constant_digests));
  m.impl("verified_level", torch::CppFunction::makeFromBoxedFunction<&verified_level_kernel>());
}

TORCH_LIBRARY_IMPL(nestsparse, CUDA, m) {
  m.impl("constant_digests", TORCH_FN(constant_digests));
  m.impl("verified_level", torch::CppFunction::makeFromBoxedFunction<&verified_level_kernel>());
}

// No gradient flows through either op (an integer level, strings): the Autograd key falls through to the kernels.
// Without this, torch's autograd fallback inspects every constant on each call (1.4 us of the 2.1 us a call of
// verified_level took with 100 constants).
TORCH_LIBRARY_IMPL(nestsparse, Autograd, m) {
  m.impl("constant_digests", torch::CppFunction::makeFallthrough());
  m.impl("verified_level", torch::CppFunction::makeFallthrough());
}

}  // namespace nestsparse
