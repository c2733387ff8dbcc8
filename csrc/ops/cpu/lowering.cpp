// The dense side of the CPU float32 products (see lowering.h).
#include "ops/cpu/lowering.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

#include "ops/cpu/common.h"
#include "ops/output_pool.h"

namespace nestsparse::cpu {

int64_t panel_product(const float* x, int64_t N, int64_t K, int64_t M, int64_t P, int64_t work, bool store_direct,
                      float* out, TileRun run) {
  const int64_t TN = panel_width(N, K);
  const int64_t T = (N + TN - 1) / TN;
  at::Tensor xp = at::from_blob(const_cast<float*>(x), {N, K}, at::kFloat);
  if (T * TN != N) xp = at::constant_pad_nd(xp, {0, 0, 0, T * TN - N});
  const at::Tensor panels = xp.reshape({T, TN, K}).transpose(1, 2).contiguous();  // (T, K, TN)
  const float* pan = panels.const_data_ptr<float>();
  // Output y[n, r] is transposed to the tiles' rows. Long rows store it directly (TN scalar stores per row, each
  // to another cache line, little next to their multiply-adds); shorter rows store each tile row contiguously
  // into (T, M, TN) and the whole is transposed once at the end. The line is 128 non-zeros a row on average:
  // at 32, a 4096 x 64 weight with 51 a row took 0.80 ms at batch 64 stored directly, 0.49 ms transposed.
  const bool direct = store_direct || work >= 128 * M;
  at::Tensor tiles = direct ? at::Tensor() : at::empty({T, M, TN}, at::kFloat);
  float* tp = direct ? nullptr : tiles.data_ptr<float>();
  const Segment whole{0, static_cast<int32_t>(TN), 0};
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, T * P, grain_for(T * P, work * N), [&](int64_t i0, int64_t i1) {
    int64_t b = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / P, c = i % P, tn = std::min(TN, N - t * TN);
      const SpmmTile tile =
          direct ? SpmmTile{pan + t * K * TN, nullptr, TN, kNoGroups, 0, tn, out + t * TN * M, 1, M, nullptr, 0}
                 : SpmmTile{pan + t * K * TN, nullptr, TN, kNoGroups, 0, tn, tp + t * M * TN, TN, 1, &whole, 1};
      b += run(tile, c);
    }
    bad += b;
  });
  if (!direct) {
    const at::Tensor y = at::from_blob(out, {N, M}, at::kFloat);
    const int64_t full = N / TN, rem = N - full * TN;  // whole tiles, then the last one's valid columns
    if (full > 0) y.narrow(0, 0, full * TN).view({full, TN, M}).copy_(tiles.narrow(0, 0, full).permute({0, 2, 1}));
    if (rem > 0) y.narrow(0, full * TN, rem).copy_(tiles[full].narrow(1, 0, rem).t());
  }
  return bad.load();
}

int64_t grid_columns(const ConvShape& s) {
  if (is_direct(s)) return s.H * s.W;
  const int64_t Hq = (s.H + 2 * s.ph + s.sh - 1) / s.sh, Wq = (s.W + 2 * s.pw + s.sw - 1) / s.sw;
  return (s.Nb - 1) * Hq * Wq + s.OH * Wq;  // the last image's rows past OH are not needed
}

int64_t conv_tile_width(const ConvShape& s) { return panel_width(grid_columns(s), s.K); }

namespace {

// 1x1, stride 1, no padding: the weight multiplies x[n] viewed as (Cin, H*W) directly, with no copy.
int64_t conv_direct(const ConvShape& s, const float* xf, int64_t P, int64_t work, float* out, TileRun run) {
  const int64_t HW = s.H * s.W, TN = conv_tile_width(s), T = (HW + TN - 1) / TN;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, s.Nb * T * P, grain_for(s.Nb * T * P, work * s.Nb * HW), [&](int64_t i0, int64_t i1) {
    int64_t nbad = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / (T * P), t = (i / P) % T, c = i % P, tn = std::min(TN, HW - t * TN);
      const SpmmTile tile{xf + n * s.Cin * HW + t * TN, nullptr, HW, s.M / s.groups, s.Cg * HW, tn,
                          out + n * s.M * HW + t * TN,  HW,      1,  nullptr,        0};
      nbad += run(tile, c);
    }
    bad += nbad;
  });
  return bad.load();
}

// Every other geometry. The batch is copied once into a zero-padded buffer laid out [c][phase][n][Hq][Wq]:
// phase (ph, pw) of image n holds xpad[n, c, i*sh + ph, j*sw + pw]. Then the input pixel that weight tap
// (c, a, b) meets at output (n, oh, ow) is column J = n*Hq*Wq + oh*Wq + ow of a row starting at koff[c, a, b],
// for any stride and dilation, and the whole batch is one SpMM over J. Columns with oh >= OH or ow >= OW are
// computed and dropped (the store keeps only the runs of valid outputs).
int64_t conv_phases(const ConvShape& s, const float* xf, int64_t P, int64_t work, float* out, TileRun run) {
  const int64_t Hp = s.H + 2 * s.ph, Wp = s.W + 2 * s.pw;
  const int64_t Hq = (Hp + s.sh - 1) / s.sh, Wq = (Wp + s.sw - 1) / s.sw, plane = Hq * Wq;
  // Floats per input channel: its planes, padded to an odd number of cache lines. Consecutive channels an exact
  // power of two apart (16 KiB for ResNet-50's layer4.0.conv2 at batch 16) map every non-zero's input row of a
  // tile to the same cache sets: that layer ran 4.7x slower per image at batch 16 than at 15 or 17.
  const int64_t phases = s.sh * s.sw, used = phases * s.Nb * plane;
  const int64_t lines = (used + 15) / 16, chan = 16 * (lines % 2 == 0 ? lines + 1 : lines);
  std::vector<int64_t> koff(std::max<int64_t>(s.K, 1));
  int64_t max_koff = 0;
  for (int64_t c = 0; c < s.Cg; ++c) {
    for (int64_t a = 0; a < s.kh; ++a) {
      for (int64_t b = 0; b < s.kw; ++b) {
        const int64_t ya = a * s.dh, xb = b * s.dw;
        const int64_t off = c * chan + ((ya % s.sh) * s.sw + xb % s.sw) * s.Nb * plane + (ya / s.sh) * Wq + xb / s.sw;
        koff[(c * s.kh + a) * s.kw + b] = off;
        max_koff = std::max(max_koff, off);
      }
    }
  }
  const int64_t N = grid_columns(s), TN = conv_tile_width(s), T = (N + TN - 1) / TN;
  // Dropped columns read past their plane: size the buffer so every read of every tile stays inside. The
  // buffer comes from the output pool (ops/output_pool.h: recycled, so no page faults per call, and 2 MB huge
  // pages where the system grants them: a tile's input rows span one page per channel, and with 4 KB pages
  // they missed the TLB). No full memset: the fill below rewrites every input pixel, and only the padding,
  // which valid outputs do read, is zeroed each call; the slack past the planes is zeroed too. Whatever else
  // it holds (between channels, in phases no tap reads) only reaches dropped outputs.
  const int64_t size = std::max(s.Cin * chan, (s.groups - 1) * s.Cg * chan + max_koff + T * TN);
  const at::Tensor workspace = pooled_empty({size}, at::kFloat);
  float* bp = workspace.data_ptr<float>();
  std::fill(bp + s.Cin * chan, bp + size, 0.f);
  // Rows [r_lo, r_hi) of phase row qr and columns [c_lo, c_hi) of phase column qc hold input pixels.
  std::vector<int64_t> r_lo(s.sh), r_hi(s.sh), c_lo(s.sw), c_hi(s.sw);
  const auto interior = [](int64_t q, int64_t stride, int64_t pad, int64_t size_in, int64_t n, int64_t& lo,
                           int64_t& hi) {
    lo = n, hi = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t y = i * stride + q - pad;
      if (y >= 0 && y < size_in) lo = std::min(lo, i), hi = i + 1;
    }
    if (lo > hi) lo = hi = 0;
  };
  for (int64_t q = 0; q < s.sh; ++q) interior(q, s.sh, s.ph, s.H, Hq, r_lo[q], r_hi[q]);
  for (int64_t q = 0; q < s.sw; ++q) interior(q, s.sw, s.pw, s.W, Wq, c_lo[q], c_hi[q]);
  // The phase rows and columns some weight tap reads: a 1x1 convolution of stride 2 reads one phase of four,
  // and the others are neither filled nor copied (the strided read costs a quarter of the copy).
  std::vector<char> row_used(s.sh, 0), col_used(s.sw, 0);
  for (int64_t a = 0; a < s.kh; ++a) row_used[(a * s.dh) % s.sh] = 1;
  for (int64_t b = 0; b < s.kw; ++b) col_used[(b * s.dw) % s.sw] = 1;
  at::parallel_for(0, s.Cin * phases * s.Nb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t cq = i / s.Nb, qr = (cq % phases) / s.sw, qc = cq % s.sw;
      if (!row_used[qr] || !col_used[qc]) continue;
      const int64_t c = i / (phases * s.Nb);
      float* pl = bp + c * chan + (i - c * phases * s.Nb) * plane;  // planes are ordered [c][phase][n]
      for (int64_t r = 0; r < Hq; ++r) {
        float* row = pl + r * Wq;
        if (r < r_lo[qr] || r >= r_hi[qr]) {
          std::fill(row, row + Wq, 0.f);
        } else {
          std::fill(row, row + c_lo[qc], 0.f);
          std::fill(row + c_hi[qc], row + Wq, 0.f);
        }
      }
    }
  });
  // Where each input row lands (phase row and row inside the phase), and for each phase column q its first
  // input column and destination: computed once, since images can be as small as a few pixels a row.
  std::vector<int64_t> row_dst(s.H), col_first(s.sw), col_dst(s.sw);
  for (int64_t y = 0; y < s.H; ++y) {
    const int64_t yp = y + s.ph;
    row_dst[y] = (yp % s.sh) * s.sw * s.Nb * plane + (yp / s.sh) * Wq;
  }
  for (int64_t q = 0; q < s.sw; ++q) {  // phase column q holds padded columns q, q + sw, ...
    col_first[q] = ((q - s.pw) % s.sw + s.sw) % s.sw;
    col_dst[q] = q * s.Nb * plane + (col_first[q] + s.pw) / s.sw;
  }
  at::parallel_for(0, s.Nb * s.Cin, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.Cin, c = i % s.Cin;
      const float* src = xf + (n * s.Cin + c) * s.H * s.W;
      float* dimg = bp + c * chan + n * plane;
      for (int64_t y = 0; y < s.H; ++y) {
        if (!row_used[(y + s.ph) % s.sh]) continue;
        const float* sr = src + y * s.W;
        float* drow = dimg + row_dst[y];
        if (s.sw == 1) {
          std::memcpy(drow + s.pw, sr, sizeof(float) * s.W);
          continue;
        }
        for (int64_t q = 0; q < s.sw; ++q) {
          if (!col_used[q]) continue;
          float* dq = drow + col_dst[q];
          for (int64_t xx = col_first[q]; xx < s.W; xx += s.sw) *dq++ = sr[xx];
        }
      }
    }
  });
  const int64_t L = s.OH * s.OW;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, T * P, grain_for(T * P, work * N), [&](int64_t i0, int64_t i1) {
    Segment segs[kMaxTile];
    int64_t nbad = 0, seg_tile = -1, nsegs = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / P, c = i % P, tn = std::min(TN, N - t * TN);
      if (t != seg_tile) {  // the runs of valid outputs in this tile, shared by all its rows
        nsegs = 0;
        for (int64_t j = 0; j < tn;) {
          const int64_t J = t * TN + j, n = J / plane, within = J - n * plane, oh = within / Wq, ow = within - oh * Wq;
          if (oh >= s.OH || ow >= s.OW) {
            ++j;
            continue;
          }
          const int64_t len = std::min(s.OW - ow, tn - j);
          segs[nsegs++] = Segment{static_cast<int32_t>(j), static_cast<int32_t>(len), n * s.M * L + oh * s.OW + ow};
          j += len;
        }
        seg_tile = t;
      }
      const SpmmTile tile{bp + t * TN, koff.data(), 0, s.M / s.groups, s.Cg * chan, tn, out, L, 1, segs, nsegs};
      nbad += run(tile, c);
    }
    bad += nbad;
  });
  return bad.load();
}

}  // namespace

int64_t conv_product(const ConvShape& s, const float* x, int64_t chunks, int64_t work, float* out, TileRun run) {
  return (is_direct(s) ? conv_direct : conv_phases)(s, x, chunks, work, out, run);
}

}  // namespace nestsparse::cpu
