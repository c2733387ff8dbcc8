// How each format's weight appears among an op's arguments: the schema text, the C++ parameters (spliced into
// every product's signature, see ops/op.h), the arguments by name (its tensors and its other attributes, which
// autograd saves by name), and the check that turns them into a level the kernels read (formats/<format>.h). A third
// format adds one struct here; every product op then has it (after its entry in for_each_format).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "formats/nbcr.h"
#include "formats/ncsr.h"
#include "ops/checks.h"
#include "ops/op.h"

namespace nestsparse {

struct Ncsr {
  static constexpr const char* name = "ncsr";
  static constexpr const char* schema = "Tensor values, Tensor col_idx, Tensor row_ptr, Tensor row_end, SymInt level";
  using Params =
      nestsparse::Params<const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt>;
  using Level = NcsrLevel;

  struct Args {
    at::Tensor values, col_idx, row_ptr, row_end;
    c10::SymInt level;
    template <typename F>
    void for_each_tensor(F&& f) {
      f(values), f(col_idx), f(row_ptr), f(row_end);
    }
    template <typename F>
    void for_each_attribute(F&& f) {
      f("level", level);
    }
  };

  static Args unpack(const char*, const at::Tensor& values, const at::Tensor& col_idx, const at::Tensor& row_ptr,
                     const at::Tensor& row_end, c10::SymInt level) {
    return {values, col_idx, row_ptr, row_end, std::move(level)};
  }
  static auto pack(const Args& a) { return std::forward_as_tuple(a.values, a.col_idx, a.row_ptr, a.row_end, a.level); }
  static Level check(const char* op, const Args& a, c10::Device device) {
    return check_ncsr(op, a.values, a.col_idx, a.row_ptr, a.row_end, a.level.expect_int(), device);
  }
};

struct Nbcr {
  static constexpr const char* name = "nbcr";
  static constexpr const char* schema =
      "Tensor values, Tensor indices, Tensor block_ptr, Tensor blocks, Tensor counts, SymInt level, int rows, "
      "int[2] block_shape";
  using Params = nestsparse::Params<const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, c10::SymInt, int64_t, at::IntArrayRef>;
  using Level = NbcrLevel;

  struct Args {
    at::Tensor values, indices, block_ptr, blocks, counts;
    c10::SymInt level;
    int64_t rows;
    std::array<int64_t, 2> block_shape;
    template <typename F>
    void for_each_tensor(F&& f) {
      f(values), f(indices), f(block_ptr), f(blocks), f(counts);
    }
    template <typename F>
    void for_each_attribute(F&& f) {
      f("level", level), f("rows", rows), f("block_shape", block_shape);
    }
  };

  static Args unpack(const char* op, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& block_ptr,
                     const at::Tensor& blocks, const at::Tensor& counts, c10::SymInt level, int64_t rows,
                     at::IntArrayRef block_shape) {
    return {values, indices,          block_ptr, blocks,
            counts, std::move(level), rows,      int_pair(op, "block_shape", block_shape)};
  }
  static auto pack(const Args& a) {
    return std::make_tuple(std::cref(a.values), std::cref(a.indices), std::cref(a.block_ptr), std::cref(a.blocks),
                           std::cref(a.counts), a.level, a.rows, at::IntArrayRef(a.block_shape));
  }
  static Level check(const char* op, const Args& a, c10::Device device) {
    return check_nbcr(op, a.values, a.indices, a.block_ptr, a.blocks, a.counts, a.level.expect_int(), a.rows,
                      a.block_shape, device);
  }
};

// Calls fn(Format{}) for every format: the ops of each are declared, registered and tested alike.
template <typename Fn>
void for_each_format(Fn&& fn) {
  fn(Ncsr{});
  fn(Nbcr{});
}

}  // namespace nestsparse
