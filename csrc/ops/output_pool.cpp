#include "ops/output_pool.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace nestsparse {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

class Pool {
 public:
  // A buffer of `bytes` (a multiple of kHugePage) from the free list of its size, else from the system.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= static_cast<int64_t>(bytes);
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = std::aligned_alloc(kHugePage, bytes);
    TORCH_CHECK(p != nullptr, "nestsparse: out of memory allocating an output of ", bytes, " bytes");
#ifdef __linux__
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: refused (no THP) it changes nothing
#endif
    return p;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + static_cast<int64_t>(bytes) <= limit_) {
        free_[bytes].push_back(p);
        cached_ += static_cast<int64_t>(bytes);
        return;
      }
    }
    std::free(p);
  }

  int64_t set_limit(int64_t bytes) {
    std::vector<std::pair<void*, size_t>> release;
    int64_t before;
    {
      std::lock_guard<std::mutex> lock(mu_);
      before = limit_;
      limit_ = bytes;
      for (auto& [size, list] : free_) {
        while (!list.empty() && cached_ > limit_) {
          release.emplace_back(list.back(), size);
          list.pop_back();
          cached_ -= static_cast<int64_t>(size);
        }
      }
    }
    for (auto& [p, size] : release) std::free(p);
    return before;
  }

  OutputPoolStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, hits_, misses_};
  }

 private:
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  int64_t cached_ = 0, hits_ = 0, misses_ = 0;
  int64_t limit_ = int64_t{1} << 30;
};

// Never destroyed: outputs may be freed after static destructors ran.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

namespace {

// What a pooled buffer's DataPtr carries to its deleter.
struct Block {
  void* data;
  size_t bytes;
};

void release(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  pool().give_back(b->data, b->bytes);
  delete b;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (nbytes < kMinPooledBytes || options.device().type() != at::kCPU) return at::empty(sizes, options);
  const size_t bytes = (static_cast<size_t>(nbytes) + kHugePage - 1) / kHugePage * kHugePage;
  void* p = pool().take(bytes);
  // A resizable storage with the CPU allocator, as at::empty's: resize_ or an out= op that grows the tensor
  // moves it to fresh memory and gives this buffer back to the pool.
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes,
                       c10::DataPtr(p, new Block{p, bytes}, &release, at::Device(at::kCPU)), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  std::vector<int64_t> strides(sizes.size(), 1);
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) strides[d] = strides[d + 1] * sizes[d + 1];
  return at::empty({0}, options).set_(storage, 0, sizes, strides);
}

int64_t set_output_pool_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_output_pool_limit: the limit must be >= 0 bytes, got ", bytes);
  return pool().set_limit(bytes);
}

OutputPoolStats output_pool_stats() { return pool().stats(); }

}  // namespace nestsparse
