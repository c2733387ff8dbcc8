// How the CUDA kernels report a bad index, and when the host learns of it.
//
// A kernel never reads through a bad index. Nested CSR: a row slice outside [0, nnz0] or reversed is computed as an
// empty row, a column outside [0, K) and a plan entry outside [0, M) are skipped. Nested BCR: a block row whose block
// range [block_ptr[i], block_ptr[i+1]) is outside [0, B] or reversed (or, for the first and last, does not start at 0
// or end at B) is computed as empty, a block whose counts,
// offsets, block column or local indices break the contract (formats/nbcr.h) is skipped, and so is a plan entry
// outside [0, MB). Each is counted in int32 flags (Flag) in device memory, and the host turns a non-zero count into
// an exception naming the problem.
//
// Two modes (errors.cu):
//   immediate (the default)  each call zeroes its own flags, runs, and copies them to the host: one small
//                            device-to-host copy per call, which waits for the kernels. An error raises at the op.
//   deferred                 the kernels count into one flag block per device that lives for the whole process
//                            (a __device__ array, so capturing a call into a CUDA graph allocates nothing) and the
//                            op returns without waiting: no host synchronisation on the success path. The caller
//                            asks with nestsparse.check_errors() (torch.ops.nestsparse.cuda_check_errors), which
//                            raises if any call since the last check met a bad index, and clears the flags.
// A call made while its stream is being captured into a CUDA graph is always deferred (a copy to the host is not
// allowed there). The trade-off: in deferred mode a corrupted weight gives wrong outputs until the caller checks,
// and the message names the first bad position only, not the op.
//
// What the per-call checks do not catch (NestedCSR.validate() and NestedBCR.validate() do, once per weight): a plan
// whose order repeats or leaves out rows (one not from ncsr_plan) leaves those outputs unwritten; row slices that
// overlap (row_ptr not non-decreasing) give a value gradient that depends on the order of the writes; in nested BCR,
// block ranges that overlap, repeated local rows or columns and blocks that share value slots give wrong results. None
// reads out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "formats/nbcr.h"
#include "formats/ncsr.h"

namespace nestsparse::cuda {

// kBadRow: a CSR row slice or a BCR block range; kFirstBadEntry: 1 + the first bad col_idx position (CSR).
enum Flag : int { kBadRow = 0, kBadCol = 1, kBadPlan = 2, kFirstBadEntry = 3, kBadBlock = 4, kNumFlags = 5 };

// The flags one call counts into.
struct CallFlags {
  at::Tensor own;  // immediate mode: this call's zeroed flags
  int* ptr = nullptr;
  bool deferred = false;
};

// The flags for a call on `like`'s device and the current stream (deferred when asked for or when capturing).
CallFlags call_flags(const at::Tensor& like);

// Immediate mode: copies the flags to the host and raises naming the first problem (the column is searched on the
// host, from `w`); deferred: returns at once.
void raise_if_bad(const char* op, const CallFlags& flags, const NcsrLevel& w, int64_t K);
void raise_if_bad(const char* op, const CallFlags& flags, const NbcrLevel& w, int64_t K);

}  // namespace nestsparse::cuda
