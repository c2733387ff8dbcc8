// The dense side of the CPU float32 products, shared by every sparse format: packing x into column panels
// (linear) and lowering a convolution onto a wide grid of columns (conv). Each driver cuts the output into
// tiles and hands every (tile, chunk of weight rows) pair to a format's tile kernel through `run`.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <cstdint>

#include "ops/conv2d.h"
#include "ops/cpu/isa/kernel_api.h"

namespace nestsparse::cpu {

// Runs the format's tile kernel on one tile for chunk `chunk` of the weight; returns the kernel's bad count.
using TileRun = c10::function_ref<int64_t(const SpmmTile&, int64_t chunk)>;

// out (N, M) from x (N, K), N > 4 rows. x is packed into K x TN panels (transposed), so a panel stays in
// cache while the weight streams through it. `work` is the level's multiply-adds per output column (sizes
// the thread grain and picks how outputs are stored); `store_direct` makes the tiles store into `out` itself,
// as an epilogue that reads a residual at the output's offsets needs. Returns the summed bad counts.
int64_t panel_product(const float* x, int64_t N, int64_t K, int64_t M, int64_t chunks, int64_t work, bool store_direct,
                      float* out, TileRun run);

// A 1x1 stride-1 unpadded convolution: x itself is the dense operand, no copy.
inline bool is_direct(const ConvShape& s) {
  return s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0;
}
// Columns of one image's (direct) or the whole batch's (phase buffer) grid, and the tile width over them.
int64_t grid_columns(const ConvShape& s);
int64_t conv_tile_width(const ConvShape& s);

// out (Nb, M, OH, OW) for a float32 x. A 1x1 stride-1 unpadded convolution reads x directly; any other
// geometry goes through the stride-phase buffer (see lowering.cpp). Returns the summed bad counts.
int64_t conv_product(const ConvShape& s, const float* x, int64_t chunks, int64_t work, float* out, TileRun run);

}  // namespace nestsparse::cpu
