"""Nested CSR (NCSR), for unstructured sparsity; the contract is at the top of csrc/formats/ncsr.h."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .. import ops
from .base import VALUE_DTYPES, FormatError, NestedFormat, check_dense_args, first_index, row_slabs

__all__ = ["NestedCSR"]

INT16_MAX_COLS = 32767  # col_idx is int16 up to this many columns
INT32_MAX = 2**31 - 1  # row_ptr is int32: at most this many non-zeros


def _count_kept(tags: Tensor) -> int:
    """Entries tagged >= 0, counted a slab of rows at a time: a tag tensor too large for int32 row pointers is
    refused before the int64 copy and the index lists of every kept entry are made (tens of GB there)."""
    rows = tags.detach().reshape(tags.shape[0], -1) if tags.dim() > 1 else tags.detach().reshape(1, -1)
    step = max(1, (1 << 24) // max(rows.shape[1], 1))
    return sum(int((rows[i : i + step] >= 0).sum()) for i in range(0, rows.shape[0], step))


@dataclass
class NestedCSR(NestedFormat):
    """Nested CSR: a (M, K) matrix (a Linear weight, or a Conv2d weight viewed as (Cout, Cin/g*kh*kw))
    with L levels in one values buffer. Row r of level l is ``[row_ptr[r], row_end[l, r])``."""

    name: ClassVar[str] = "ncsr"
    index_names: ClassVar[tuple[str, ...]] = ("col_idx", "row_ptr", "row_end")
    level_table: ClassVar[str] = "row_end"

    values: Tensor
    col_idx: Tensor
    row_ptr: Tensor
    row_end: Tensor
    weight_shape: tuple[int, ...]
    densities: tuple[float, ...] = field(default=())

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, weight: Tensor, tags: Tensor, num_levels: int | None = None, densities: tuple[float, ...] = ()
    ) -> NestedCSR:
        """Packs the entries of ``weight`` whose tag is >= 0; ``tags`` has the weight's shape (int8)."""
        if isinstance(tags, Tensor) and tags.numel() > INT32_MAX and _count_kept(tags) > INT32_MAX:
            raise ValueError(
                f"NestedCSR.from_dense: more than {INT32_MAX} non-zeros (int32 row pointers) are not supported"
            )
        M, K, t, L = check_dense_args("NestedCSR.from_dense", weight, tags, num_levels, densities)
        w = weight.detach().reshape(M, K)
        device = weight.device
        # Packed a slab of rows at a time into arrays sized first, so the temporaries (index lists, sort keys) are a
        # slab's, not the matrix's: a 16384 x 16384 Linear peaked at 12.6x its weight's bytes packed at once.
        slabs = row_slabs(M, K)
        kept = torch.cat([(t[a:b] >= 0).sum(1) for a, b in slabs]) if M else torch.zeros(0, dtype=torch.int64)
        row_ptr = torch.zeros(M + 1, dtype=torch.int64, device=device)
        row_ptr[1:] = kept.to(device).cumsum(0)
        nnz = int(row_ptr[-1])
        values = torch.empty(nnz, dtype=w.dtype, device=device)
        col_idx = torch.empty(nnz, dtype=torch.int16 if K <= INT16_MAX_COLS else torch.int32, device=device)
        row_end = torch.empty(L, M, dtype=torch.int64, device=device)
        for a, b in slabs:
            # Sparsest level first inside a row, then by column: every level is a row prefix. No sort: a level's
            # entries come out of nonzero() row-major, so each one's place is its row's start, the entries of the
            # row's sparser levels, and its rank among its row's entries of its own level.
            ts, start = t[a:b], row_ptr[a:b]
            sparser = torch.zeros(b - a, dtype=torch.int64, device=device)
            for lvl in range(L - 1, -1, -1):
                rows, cols = (ts == lvl).nonzero(as_tuple=True)
                count = torch.bincount(rows, minlength=b - a)
                rank = torch.arange(rows.numel(), device=device) - (count.cumsum(0) - count)[rows]
                place = start[rows] + sparser[rows] + rank
                values[place] = w[a:b][rows, cols]
                col_idx[place] = cols.to(col_idx.dtype)
                sparser += count
                row_end[lvl, a:b] = start + sparser
        return cls(
            values=values,
            col_idx=col_idx,
            row_ptr=row_ptr.to(torch.int32),
            row_end=row_end.to(torch.int32),
            weight_shape=tuple(weight.shape),
            densities=tuple(float(d) for d in densities),
        )

    # ---- shape and size -------------------------------------------------------------------------
    def row_nnz(self, level: int = 0) -> Tensor:
        """Non-zeros of every row at ``level``."""
        return (self.row_end[self._check_level(level)] - self.row_ptr[:-1]).to(torch.int64)

    def nnz(self, level: int = 0) -> int:
        return int(self.row_nnz(level).sum())

    def plan(self, num_chunks: int | None = None) -> Tensor:
        return ops.ncsr_plan(self.row_ptr, self.row_end, num_chunks)

    def nbytes(self, level: int | None = None) -> int:
        """Bytes stored (``level=None``), or bytes a product at ``level`` reads: its values and column
        indices, row_ptr and its own row of row_end."""
        if level is None:
            return sum(t.numel() * t.element_size() for t in (self.values, self.col_idx, self.row_ptr, self.row_end))
        per_entry = self.values.element_size() + self.col_idx.element_size()
        return self.nnz(level) * per_entry + self.row_ptr.numel() * 4 + self.shape[0] * 4

    # ---- views back to dense ---------------------------------------------------------------------
    def tags(self) -> Tensor:
        """The int8 tags, weight-shaped (the inverse of from_dense)."""
        M, K = self.shape
        out = torch.full((M, K), -1, dtype=torch.int8, device=self.device)
        rows = torch.repeat_interleave(torch.arange(M, device=self.device), self.row_nnz(0))
        pos = torch.arange(self.values.numel(), device=self.device)[: rows.numel()]
        tag = torch.full_like(pos, -1)
        for lvl in range(self.num_levels):
            tag += pos < self.row_end[lvl].to(torch.int64)[rows]
        out[rows, self.col_idx[: rows.numel()].to(torch.int64)] = tag.to(torch.int8)
        return out.reshape(self.weight_shape)

    def to_dense(self, level: int = 0) -> Tensor:
        """The level-``level`` weight as a dense tensor of the original weight shape."""
        self._check_level(level)
        M, K = self.shape
        rows = torch.repeat_interleave(torch.arange(M, device=self.device), self.row_nnz(0))
        keep = torch.arange(rows.numel(), device=self.device) < self.row_end[level].to(torch.int64)[rows]
        out = torch.zeros(M, K, dtype=self.values.dtype, device=self.device)
        n = rows.numel()
        out[rows[keep], self.col_idx[:n][keep].to(torch.int64)] = self.values[:n][keep]
        return out.reshape(self.weight_shape)

    # ---- checks ----------------------------------------------------------------------------------
    def validate(self) -> NestedCSR:
        """Checks every invariant of the format; raises FormatError naming the first one broken."""
        v, c, rp, re = self.values, self.col_idx, self.row_ptr, self.row_end
        M, K = self.shape

        def fail(msg: str):
            raise FormatError(f"NestedCSR: {msg}")

        if v.dtype not in VALUE_DTYPES:
            fail(f"values dtype {v.dtype} is not one of float32, float16, bfloat16, float64")
        if c.dtype not in (torch.int16, torch.int32):
            fail(f"col_idx dtype {c.dtype} must be int16 or int32")
        if c.dtype == torch.int16 and K > INT16_MAX_COLS:
            fail(f"col_idx is int16 but K = {K} > {INT16_MAX_COLS}")
        if rp.dtype != torch.int32 or re.dtype != torch.int32:
            fail(f"row_ptr and row_end must be int32, got {rp.dtype} and {re.dtype}")
        for name, t in (("values", v), ("col_idx", c), ("row_ptr", rp), ("row_end", re)):
            if t.device != v.device:
                fail(f"{name} is on {t.device} but values are on {v.device}")
        if v.dim() != 1 or c.shape != v.shape:
            fail(f"values and col_idx must be 1-D of equal length, got {tuple(v.shape)} and {tuple(c.shape)}")
        if rp.shape != (M + 1,):
            fail(f"row_ptr must have shape ({M + 1},), got {tuple(rp.shape)}")
        if re.dim() != 2 or re.shape[1] != M or re.shape[0] < 1:
            fail(f"row_end must have shape (L, {M}) with L >= 1, got {tuple(re.shape)}")
        if self.densities and len(self.densities) != re.shape[0]:
            fail(f"{len(self.densities)} densities for {re.shape[0]} levels")
        for name, t in (("values", v), ("col_idx", c), ("row_ptr", rp), ("row_end", re)):
            if not t.is_contiguous():
                fail(f"{name} is not contiguous")
        rp64, re64 = rp.to(torch.int64), re.to(torch.int64)
        if int(rp64[0]) != 0:
            fail(f"row_ptr[0] = {int(rp64[0])}, must be 0")
        d = rp64[1:] - rp64[:-1]
        if (d < 0).any():
            r = first_index(d < 0)
            fail(
                f"row_ptr is not non-decreasing: row_ptr[{r}] = {int(rp64[r])} > row_ptr[{r + 1}] = {int(rp64[r + 1])}"
            )
        if int(rp64[-1]) != v.numel():
            fail(f"row_ptr[M] = {int(rp64[-1])} but {v.numel()} values are stored")
        if not torch.equal(re64[0], rp64[1:]):
            r = first_index(re64[0] != rp64[1:])
            fail(
                f"row_end[0, {r}] = {int(re64[0, r])} != row_ptr[{r + 1}] = {int(rp64[r + 1])} "
                "(level 0 is the whole row)"
            )
        bounds = torch.cat([rp64[:-1].unsqueeze(0), re64.flip(0)])  # row_ptr, row_end[L-1], ..., row_end[0]
        bad = bounds[1:] < bounds[:-1]
        if bad.any():
            i = bad.flatten().nonzero()[0, 0]
            step, r = divmod(int(i), max(M, 1))
            lvl = self.num_levels - 1 - step
            lower = f"row_ptr[{r}]" if step == 0 else f"row_end[{lvl + 1}, {r}]"
            fail(
                f"levels are not nested in row {r}: row_end[{lvl}, {r}] = {int(re64[lvl, r])} < {lower} = "
                f"{int(bounds[step, r])}"
            )
        if c.numel():
            out = (c < 0) | (c >= K)
            if out.any():
                p = first_index(out)
                fail(f"col_idx[{p}] = {int(c[p])} is outside [0, K={K})")
            # Per entry: sorted by column within each level of a row, no column twice in a row. A slab of rows at a
            # time, so the int64 temporaries are a slab's (all at once they were 5.8x a 8192 x 8192 weight's bytes).
            for a, b in row_slabs(M, 0, rp64):
                self._check_rows(a, b, rp64, re64, c, K, fail)
        return self

    def _check_rows(self, a: int, b: int, rp64: Tensor, re64: Tensor, c: Tensor, K: int, fail) -> None:
        """The per-entry invariants of rows [a, b): within a level of a row the columns increase, and no row holds
        a column twice."""
        lo, hi = int(rp64[a]), int(rp64[b])
        c64 = c[lo:hi].to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(a, b, device=c.device), rp64[a + 1 : b + 1] - rp64[a:b])
        pos = torch.arange(lo, hi, device=c.device)
        tag = torch.full_like(c64, -1)
        for lvl in range(self.num_levels):
            tag += pos < re64[lvl][rows]
        same_group = (rows[1:] == rows[:-1]) & (tag[1:] == tag[:-1])
        unsorted = same_group & (c64[1:] <= c64[:-1])
        if unsorted.any():
            p = first_index(unsorted) + 1
            fail(
                f"row {int(rows[p])} is not sorted by column within level {int(tag[p])} at col_idx[{lo + p}] = "
                f"{int(c64[p])} (or holds that column twice)"
            )
        if self.num_levels > 1:  # with one level the strict order above already rules out a repeat
            key = (rows - a) * max(K, 1) + c64
            sk = torch.sort(key).values
            dup = sk[1:] == sk[:-1]
            if dup.any():
                k = int(sk[1:][dup][0])
                fail(f"row {a + k // max(K, 1)} holds column {k % max(K, 1)} twice")
        return self
