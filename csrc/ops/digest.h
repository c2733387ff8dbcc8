// What an exported program checks before it serves a result (nestsparse.export puts the check first in the program):
// that its level input is in range, and that its constants (every parameter and buffer: the nested layers' values,
// index arrays, bias and epilogue tensors, and the dense layers' weights) are the bytes nestsparse.export recorded.
//
// The kernels bound every index they read, but an index edited to another in-bounds value (a flipped col_idx, a
// row_end or block count moved at a level the ops do not rescan) runs and silently changes the outputs, as does an
// edited value: of 120 one-element in-bounds edits of a saved program's nested constants (tests/test_deploy.py),
// 67 (NCSR) and 76 (NBCR) did so before this check. A digest of each constant, recorded at export and compared once
// per program, refuses every such edit and names the constant.
//
//   constant_digests(Tensor[] constants) -> str[]
//     each constant's digest (hex): SHA-1 over its dtype, sizes and bytes in C order. nestsparse.export records
//     them in the program, so the digest has one implementation, this one.
//   verified_level(Tensor level, int num_levels, Tensor[] constants, str names, str digests) -> Tensor
//     the level (a new 0-dim int64 tensor on the level's device), once the level is checked to be in
//     [0, num_levels) and the constants to match their digests (`digests`: theirs concatenated, 40 hex digits each;
//     `names`: their names, one a line); raises naming the level and the valid range, or the first
//     constant that differs. Two strings, not two lists: a list of strings is converted element by element on every
//     call (from Python, 17 of the 29 us a call with 100 constants took). The constants are hashed the first time a
//     set of them is seen; later calls with the same tensors compare pointers only (a cache that holds weak
//     references to their storages, so a freed program's memory reused by another cannot pass for the one
//     verified).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace nestsparse {

inline constexpr const char* kConstantDigestsSchema = "constant_digests(Tensor[] constants) -> str[]";
inline constexpr const char* kVerifiedLevelSchema =
    "verified_level(Tensor level, int num_levels, Tensor[] constants, str names, str digests) -> Tensor";

// The digest of each tensor (hex SHA-1 of its dtype, sizes and C-order bytes); the pieces of large tensors are
// hashed in parallel.
std::vector<std::string> constant_digests(at::TensorList constants);

}  // namespace nestsparse
