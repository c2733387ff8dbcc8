"""Nested BCR (NBCR), block-based column-row sparsity (GRIM), for structured sparsity; the contract is at the top of
csrc/formats/nbcr.h."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .. import ops
from . import base
from . import blocks as block_grid
from .base import (
    VALUE_DTYPES,
    FormatError,
    NestedFormat,
    check_dense_args,
    check_integer,
    check_weight_dtype,
    first_index,
    level_count,
    row_slabs,
)
from .blocks import DEFAULT_BLOCK_SHAPE, MAX_BLOCK_DIM, check_block_shape, matrix_shape

__all__ = ["NestedBCR"]

INT32_MAX = 2**31 - 1


@dataclass
class NestedBCR(NestedFormat):
    """Nested BCR (block-based column-row, GRIM): an (M, K) matrix (a Linear weight, or a Conv2d weight viewed
    as (Cout, Cin/g*kh*kw)) tiled into (bm, bk) blocks. Inside a block whole rows and columns are kept, so a
    block's level l is a dense r_l x c_l sub-block: the top-left corner of its level-0 r_0 x c_0 sub-block.
    The tensors follow csrc/formats/nbcr.h to the letter."""

    name: ClassVar[str] = "nbcr"
    index_names: ClassVar[tuple[str, ...]] = ("indices", "block_ptr", "blocks", "counts")
    level_table: ClassVar[str] = "counts"
    option_lengths: ClassVar[dict[str, int]] = {"block_shape": 2}

    values: Tensor
    indices: Tensor
    block_ptr: Tensor
    blocks: Tensor
    counts: Tensor
    weight_shape: tuple[int, ...]
    block_shape: tuple[int, int]
    densities: tuple[float, ...] = field(default=())

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def structured_tags(tags: Tensor, block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE) -> tuple[Tensor, Tensor]:
        """The row tags (MB, KB, bm) and column tags (MB, KB, bk), int8, of weight-shaped element tags: a row's
        tag is the largest tag in its block row, a column's the largest in its block column (-1 outside the
        matrix). Raises FormatError naming the first element whose tag is not min(row tag, column tag)."""
        where = "NestedBCR.structured_tags"
        bm, bk = check_block_shape(where, block_shape)
        check_integer(where, "tags", tags)
        M, K = matrix_shape(tuple(tags.shape))
        t = tags.detach().reshape(M, K)
        if t.numel() and (int(t.min()) < -1 or int(t.max()) > 127):
            raise ValueError(f"{where}: tags must lie in [-1, 127], got [{int(t.min())}, {int(t.max())}]")
        MB, KB = block_grid.grid(M, K, (bm, bk))
        row_tags = torch.empty(MB, KB, bm, dtype=torch.int8, device=t.device)
        col_tags = torch.empty(MB, KB, bk, dtype=torch.int8, device=t.device)
        # A slab of block rows at a time: the padded copy and the check's temporaries are a slab's, not the matrix's.
        for a, b in row_slabs(MB, KB * bm * bk):
            blocked = block_grid.blocked(t[a * bm : b * bm].to(torch.int8), (bm, bk), -1)  # (b - a, KB, bm, bk)
            row_tags[a:b], col_tags[a:b] = blocked.amax(3), blocked.amax(2)
            implied = torch.minimum(row_tags[a:b].unsqueeze(3), col_tags[a:b].unsqueeze(2))
            bad = (implied != blocked).permute(0, 2, 1, 3).reshape((b - a) * bm, KB * bk)  # in matrix order
            if bad.any():
                r, c = divmod(first_index(bad), bad.shape[1])
                r += a * bm
                i, p, j, q = r // bm, r % bm, c // bk, c % bk
                raise FormatError(
                    f"{where}: tags are not block row/column structured (block shape ({bm}, {bk})): element ({r}, "
                    f"{c}) in block ({i}, {j}) has tag {int(t[r, c])}, but its row and column are kept up to levels "
                    f"{int(row_tags[i, j, p])} and {int(col_tags[i, j, q])}, so it would have tag "
                    f"{int(implied[i - a, j, p, q])}"
                )
        return row_tags, col_tags

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        tags: Tensor,
        block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
        num_levels: int | None = None,
        densities: tuple[float, ...] = (),
    ) -> NestedBCR:
        """Packs ``weight`` by its element tags (weight-shaped, int8), which must be block row/column structured
        (see structured_tags)."""
        where = "NestedBCR.from_dense"
        check_block_shape(where, block_shape)
        L = check_dense_args(where, weight, tags, num_levels, densities)[3]
        return cls.from_tags(weight, *cls.structured_tags(tags, block_shape), block_shape, L, densities)

    @classmethod
    def from_tags(
        cls,
        weight: Tensor,
        row_tags: Tensor,
        col_tags: Tensor,
        block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
        num_levels: int | None = None,
        densities: tuple[float, ...] = (),
    ) -> NestedBCR:
        """Packs ``weight`` by the tags of every local row (MB, KB, bm) and column (MB, KB, bk) of every block
        (-1: pruned at every level; always so outside the matrix). Element tag = min(row tag, column tag).
        A row or column tag above the sparsest level at which its block keeps both rows and columns is
        lowered to it first (canonical form; the element tags do not change)."""
        where = "NestedBCR.from_tags"
        check_weight_dtype(where, weight)
        bm, bk = check_block_shape(where, block_shape)
        M, K = matrix_shape(tuple(weight.shape))
        MB, KB = block_grid.grid(M, K, (bm, bk))
        dev = weight.device
        for name, t, n in (("row_tags", row_tags, bm), ("col_tags", col_tags, bk)):
            check_integer(where, name, t)
            if tuple(t.shape) != (MB, KB, n):
                raise ValueError(
                    f"{where}: {name} must have shape {(MB, KB, n)} for a ({M}, {K}) matrix in "
                    f"({bm}, {bk}) blocks, got {tuple(t.shape)}"
                )
        rt, ct = row_tags.detach().to(dev, torch.int64), col_tags.detach().to(dev, torch.int64)
        L = level_count(where, "row_tags and col_tags", (rt, ct), num_levels, densities)
        for name, t, inside, what, n in zip(
            ("row_tags", "col_tags"), (rt, ct), block_grid.inside(M, K, (bm, bk), dev), ("row", "column"), (M, K)
        ):
            outside = (t >= 0) & ~inside
            if outside.any():
                i, j, p = (int(x) for x in outside.nonzero()[0])
                raise ValueError(
                    f"{where}: {name}[{i}, {j}, {p}] = {int(t[i, j, p])}, but local {what} {p} of "
                    f"block ({i}, {j}) lies outside the matrix ({n} {what}s); it must be -1"
                )
        top = torch.minimum(rt.amax(2, keepdim=True), ct.amax(2, keepdim=True))  # canonical form
        rt, ct = torch.minimum(rt, top), torch.minimum(ct, top)
        # Per block: rows (and columns) sparsest level first, then by number.
        r_order = torch.argsort((L - rt) * bm + torch.arange(bm, device=dev), dim=2)
        c_order = torch.argsort((L - ct) * bk + torch.arange(bk, device=dev), dim=2)
        r = torch.stack([(rt >= lvl).sum(2) for lvl in range(L)])  # (L, MB, KB)
        c = torch.stack([(ct >= lvl).sum(2) for lvl in range(L)])
        bi, bj = (r[0] > 0).nonzero(as_tuple=True)  # the stored blocks, row-major (r_0 > 0 <=> c_0 > 0 now)
        r, c, r_order, c_order = r[:, bi, bj], c[:, bi, bj], r_order[bi, bj], c_order[bi, bj]
        vsize, isize = r[0] * c[0], r[0] + c[0]
        if int(vsize.sum()) > INT32_MAX or int(isize.sum()) > INT32_MAX:
            raise ValueError(
                f"{where}: {int(vsize.sum())} values and {int(isize.sum())} indices; int32 offsets "
                f"allow at most {INT32_MAX} of each"
            )
        keep_r = torch.arange(bm, device=dev) < r[0, :, None]  # (B, bm)
        keep_c = torch.arange(bk, device=dev) < c[0, :, None]  # (B, bk)
        block_ptr = torch.zeros(MB + 1, dtype=torch.int64, device=dev)
        block_ptr[1:] = torch.bincount(bi, minlength=MB).cumsum(0)
        return cls(
            values=cls._kept_values(weight.detach().reshape(M, K), bi, bj, r_order, c_order, keep_r, keep_c, vsize),
            indices=torch.cat([r_order, c_order], 1)[torch.cat([keep_r, keep_c], 1)].to(torch.int16),
            block_ptr=block_ptr.to(torch.int32),
            blocks=torch.stack([bj, vsize.cumsum(0) - vsize, isize.cumsum(0) - isize], 1).to(torch.int32),
            counts=torch.stack([r, c], 2).to(torch.int32),
            weight_shape=tuple(weight.shape),
            block_shape=(bm, bk),
            densities=tuple(float(d) for d in densities),
        )

    @staticmethod
    def _kept_values(w, bi, bj, r_order, c_order, keep_r, keep_c, vsize) -> Tensor:
        """Every stored block's kept rows x kept columns of ``w`` (M, K), block after block, each row-major in its
        rows' and columns' stored order. Gathered a slab of blocks at a time into one array sized first: the whole
        padded matrix gathered and reordered at once peaked at 5.4x the weight's bytes."""
        (M, K), bm, bk = w.shape, r_order.shape[1], c_order.shape[1]
        values = torch.empty(int(vsize.sum()), dtype=w.dtype, device=w.device)
        ends = vsize.cumsum(0).tolist()
        step = max(1, base.SLAB_ELEMENTS // (bm * bk))
        for s in range(0, bi.numel(), step):
            e = min(s + step, bi.numel())
            rows = (bi[s:e, None] * bm + r_order[s:e]).clamp_(max=M - 1)  # outside the matrix: never kept
            cols = (bj[s:e, None] * bk + c_order[s:e]).clamp_(max=K - 1)
            sub = w[rows[:, :, None], cols[:, None, :]]  # (blocks, bm, bk)
            values[(ends[s - 1] if s else 0) : ends[e - 1]] = sub[keep_r[s:e, :, None] & keep_c[s:e, None, :]]
        return values

    # ---- shape and size -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """B, the stored blocks."""
        return int(self.blocks.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        """(MB, KB): block rows and block columns, the last ones maybe partial."""
        return block_grid.grid(*self.shape, self.block_shape)

    def op_args(self) -> tuple:
        return (self.shape[0], self.block_shape)

    def plan(self, num_chunks: int | None = None) -> Tensor:
        return ops.nbcr_plan(self.block_ptr, self.counts, self.block_shape[0], num_chunks)

    def nnz(self, level: int = 0) -> int:
        rc = self.counts[self._check_level(level)].to(torch.int64)
        return int((rc[:, 0] * rc[:, 1]).sum())

    def nbytes(self, level: int | None = None) -> int:
        """Bytes stored (``level=None``), or bytes a product at ``level`` reads: its r_l x c_l values and
        r_l + c_l indices per block, block_ptr, blocks and its own level of counts."""
        tables = (self.block_ptr, self.blocks)
        if level is None:
            return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.counts) + tables)
        rc = self.counts[self._check_level(level)].to(torch.int64)
        return (
            self.nnz(level) * self.values.element_size()
            + int(rc.sum()) * self.indices.element_size()
            + sum(t.numel() * t.element_size() for t in tables)
            + rc.numel() * self.counts.element_size()
        )

    # ---- views back to dense ---------------------------------------------------------------------
    def _block_rows(self) -> Tensor:
        """The block row of every stored block."""
        per_row = (self.block_ptr[1:] - self.block_ptr[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(per_row.numel(), device=self.device), per_row)

    def _index_entries(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For every entry of ``indices``: its block, whether it is a row (else a column), its position in its
        block's row (or column) list, and its tag."""
        cnt = self.counts.to(torch.int64)  # (L, B, 2)
        r0, n = cnt[0, :, 0], cnt[0].sum(1)
        blk = torch.repeat_interleave(torch.arange(n.numel(), device=self.device), n)
        k = torch.arange(blk.numel(), device=self.device) - (n.cumsum(0) - n)[blk]
        is_row = k < r0[blk]
        pos = torch.where(is_row, k, k - r0[blk])
        kept = torch.where(is_row, cnt[:, blk, 0], cnt[:, blk, 1])  # (L, entries): r_l or c_l of its block
        return blk, is_row, pos, (pos < kept).sum(0) - 1

    def row_col_tags(self) -> tuple[Tensor, Tensor]:
        """The int8 row tags (MB, KB, bm) and column tags (MB, KB, bk), canonical (as structured_tags gives)."""
        (MB, KB), (bm, bk) = self.grid, self.block_shape
        blk, is_row, _, tag = self._index_entries()
        where = (self._block_rows() * KB + self.blocks[:, 0].to(torch.int64))[blk]
        idx, tag = self.indices[: blk.numel()].to(torch.int64), tag.to(torch.int8)
        row_tags = torch.full((MB * KB, bm), -1, dtype=torch.int8, device=self.device)
        col_tags = torch.full((MB * KB, bk), -1, dtype=torch.int8, device=self.device)
        row_tags[where[is_row], idx[is_row]] = tag[is_row]
        col_tags[where[~is_row], idx[~is_row]] = tag[~is_row]
        return row_tags.reshape(MB, KB, bm), col_tags.reshape(MB, KB, bk)

    def tags(self) -> Tensor:
        """The int8 element tags, weight-shaped (the inverse of from_dense)."""
        return block_grid.element_tags(*self.row_col_tags(), *self.shape).reshape(self.weight_shape)

    def to_dense(self, level: int = 0) -> Tensor:
        """The level-``level`` weight as a dense tensor of the original weight shape."""
        self._check_level(level)
        (M, K), (bm, bk) = self.shape, self.block_shape
        cnt = self.counts.to(torch.int64)
        r0, c0 = cnt[0, :, 0], cnt[0, :, 1]
        size, n_idx = r0 * c0, r0 + c0
        blk = torch.repeat_interleave(torch.arange(size.numel(), device=self.device), size)
        local = torch.arange(blk.numel(), device=self.device) - (size.cumsum(0) - size)[blk]
        p, q = local // c0[blk], local % c0[blk]  # row and column in the block's r0 x c0 sub-block
        keep = (p < cnt[level, blk, 0]) & (q < cnt[level, blk, 1])
        blk, p, q = blk[keep], p[keep], q[keep]
        idx, start = self.indices.to(torch.int64), (n_idx.cumsum(0) - n_idx)[blk]
        rows = self._block_rows()[blk] * bm + idx[start + p]
        cols = self.blocks[:, 0].to(torch.int64)[blk] * bk + idx[start + r0[blk] + q]
        out = torch.zeros(M, K, dtype=self.values.dtype, device=self.device)
        out[rows, cols] = self.values[: keep.numel()][keep]
        return out.reshape(self.weight_shape)

    # ---- checks ----------------------------------------------------------------------------------
    def validate(self) -> NestedBCR:
        """Checks every invariant of csrc/formats/nbcr.h; raises FormatError naming the first one broken."""
        v, ix, bp, bl, cn = self.values, self.indices, self.block_ptr, self.blocks, self.counts
        named = (("values", v), ("indices", ix), ("block_ptr", bp), ("blocks", bl), ("counts", cn))

        def fail(msg: str):
            raise FormatError(f"NestedBCR: {msg}")

        if v.dtype not in VALUE_DTYPES:
            fail(f"values dtype {v.dtype} is not one of float32, float16, bfloat16, float64")
        if ix.dtype != torch.int16:
            fail(f"indices dtype {ix.dtype} must be int16")
        for name, t in named[2:]:
            if t.dtype != torch.int32:
                fail(f"{name} dtype {t.dtype} must be int32")
        for name, t in named:
            if t.device != v.device:
                fail(f"{name} is on {t.device} but values are on {v.device}")
        try:
            bm, bk = check_block_shape("NestedBCR", self.block_shape)
        except ValueError as e:
            raise FormatError(str(e)) from None
        M, K = self.shape
        MB, KB = block_grid.grid(M, K, (bm, bk))
        if v.dim() != 1 or ix.dim() != 1:
            fail(f"values and indices must be 1-D, got shapes {tuple(v.shape)} and {tuple(ix.shape)}")
        if bp.shape != (MB + 1,):
            fail(
                f"block_ptr must have shape (MB + 1,) = ({MB + 1},) for a ({M}, {K}) matrix in ({bm}, {bk}) "
                f"blocks, got {tuple(bp.shape)}"
            )
        if bl.dim() != 2 or bl.shape[1] != 3:
            fail(f"blocks must have shape (B, 3), got {tuple(bl.shape)}")
        B = bl.shape[0]
        if cn.dim() != 3 or cn.shape[0] < 1 or cn.shape[1:] != (B, 2):
            fail(f"counts must have shape (L, B, 2) = (L, {B}, 2) with L >= 1, got {tuple(cn.shape)}")
        if self.densities and len(self.densities) != cn.shape[0]:
            fail(f"{len(self.densities)} densities for {cn.shape[0]} levels")
        for name, t in named:
            if not t.is_contiguous():
                fail(f"{name} is not contiguous")
        bp64 = bp.to(torch.int64)
        if int(bp64[0]) != 0:
            fail(f"block_ptr[0] = {int(bp64[0])}, must be 0")
        d = bp64[1:] - bp64[:-1]
        if (d < 0).any():
            i = first_index(d < 0)
            fail(
                f"block_ptr is not non-decreasing: block_ptr[{i}] = {int(bp64[i])} > block_ptr[{i + 1}] = "
                f"{int(bp64[i + 1])}"
            )
        if int(bp64[-1]) != B:
            fail(f"block_ptr[MB] = block_ptr[{MB}] = {int(bp64[-1])} but {B} blocks are stored")
        brow, j = self._block_rows(), bl[:, 0].to(torch.int64)

        def at(b: int) -> str:
            return f"block {b} (block row {int(brow[b])}, block column {int(j[b])})"

        if ((j < 0) | (j >= KB)).any():
            b = first_index((j < 0) | (j >= KB))
            fail(f"block {b} (block row {int(brow[b])}) has block column {int(j[b])}, outside [0, KB={KB})")
        unsorted = (brow[1:] == brow[:-1]) & (j[1:] <= j[:-1])
        if unsorted.any():
            b = first_index(unsorted) + 1
            fail(
                f"block row {int(brow[b])} is not sorted by block column without repeats: block {b - 1} has "
                f"column {int(j[b - 1])}, block {b} has column {int(j[b])}"
            )
        cnt = cn.to(torch.int64)
        r, c = cnt[..., 0], cnt[..., 1]  # (L, B)
        for name, x, lim in (("r", r, f"bm={bm}"), ("c", c, f"bk={bk}")):
            bad = (x < 0) | (x > (bm if name == "r" else bk))
            if bad.any():
                lvl, b = divmod(first_index(bad), B)
                fail(
                    f"counts[{lvl}, {b}] = ({int(r[lvl, b])}, {int(c[lvl, b])}) of {at(b)}: {name}_{lvl} is "
                    f"outside [0, {lim}]"
                )
        if (r[0] < 1).any():
            b = first_index(r[0] < 1)
            fail(
                f"{at(b)} keeps no row at level 0 (counts[0, {b}] = ({int(r[0, b])}, {int(c[0, b])})): r_0 must "
                f"be >= 1, a block with nothing kept is not stored"
            )
        grows = (r[1:] > r[:-1]) | (c[1:] > c[:-1])
        if grows.any():
            lvl, b = divmod(first_index(grows), B)
            fail(
                f"counts of {at(b)} are not nested: level {lvl + 1} keeps (r, c) = ({int(r[lvl + 1, b])}, "
                f"{int(c[lvl + 1, b])}) but level {lvl} only ({int(r[lvl, b])}, {int(c[lvl, b])})"
            )
        odd = (r == 0) != (c == 0)
        if odd.any():
            lvl, b = divmod(first_index(odd), B)
            fail(
                f"counts[{lvl}, {b}] = ({int(r[lvl, b])}, {int(c[lvl, b])}) of {at(b)}: r_l == 0 must hold "
                f"exactly when c_l == 0"
            )
        for col, name, size, rule in ((1, "value", r[0] * c[0], "r0*c0"), (2, "index", r[0] + c[0], "r0+c0")):
            expect = size.cumsum(0) - size
            bad = bl[:, col].to(torch.int64) != expect
            if bad.any():
                b = first_index(bad)
                fail(
                    f"blocks[{b}, {col}] = {int(bl[b, col])}, the {name} offset of {at(b)}, should be "
                    f"{int(expect[b])}: offsets are packed, the running sum of {rule}"
                )
            total, stored = int(size.sum()), (v if col == 1 else ix).numel()
            if stored != total:
                fail(
                    f"{stored} {'values' if col == 1 else 'indices'} are stored but the blocks hold {total} "
                    f"(last {name} offset + {rule})"
                )
        if not ix.numel():
            return self
        blk, is_row, pos, tag = self._index_entries()
        idx = ix.to(torch.int64)

        def entry(p: int) -> str:
            what = "row" if is_row[p] else "column"
            return f"indices[{p}] = {int(idx[p])}, {what} {int(pos[p])} of {at(int(blk[p]))},"

        lim = torch.where(is_row, bm, bk)
        if ((idx < 0) | (idx >= lim)).any():
            p = first_index((idx < 0) | (idx >= lim))
            fail(f"{entry(p)} is outside the block: [0, {int(lim[p])})")
        glob = torch.where(is_row, brow[blk] * bm, j[blk] * bk) + idx
        if (glob >= torch.where(is_row, M, K)).any():
            p = first_index(glob >= torch.where(is_row, M, K))
            what, n = ("row", M) if is_row[p] else ("column", K)
            fail(f"{entry(p)} is global {what} {int(glob[p])}, outside the matrix ({n} {what}s; a partial edge block)")
        same = (blk[1:] == blk[:-1]) & (is_row[1:] == is_row[:-1]) & (tag[1:] == tag[:-1])
        if (same & (idx[1:] <= idx[:-1])).any():
            p = first_index(same & (idx[1:] <= idx[:-1])) + 1
            fail(
                f"{entry(p)} is not ordered by descending tag, then number: it follows {int(idx[p - 1])}, both of "
                f"tag {int(tag[p])} (or a repeat)"
            )
        key = torch.sort((blk * 2 + is_row) * MAX_BLOCK_DIM + idx).values
        if (key[1:] == key[:-1]).any():
            k = int(key[1:][key[1:] == key[:-1]][0])
            b, is_row_k, n = k // (2 * MAX_BLOCK_DIM), (k // MAX_BLOCK_DIM) % 2, k % MAX_BLOCK_DIM
            fail(f"{at(b)} holds {'row' if is_row_k else 'column'} {n} twice")
        return self
