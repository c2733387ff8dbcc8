"""Storage formats for nested sparse weights (see csrc/formats/ncsr.h and csrc/formats/nbcr.h for the full
contracts).

A nested weight holds every sparsity level in one buffer. Levels are numbered 0 (densest) .. L-1
(sparsest); an element's *tag* is the highest level at which it is present, -1 if pruned everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["NestedCSR", "NestedBCR", "FormatError", "DEFAULT_BLOCK_SHAPE"]

_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT16_MAX_COLS = 32767
_INT32_MAX = 2**31 - 1
_MAX_BLOCK_DIM = 256  # kMaxBlockDim in csrc/formats/nbcr.h

DEFAULT_BLOCK_SHAPE = (32, 32)  # (bm, bk) of NestedBCR when none is given


class FormatError(ValueError):
    """A nested sparse object breaks one of its format's invariants; the message names it."""


def _first(mask: Tensor) -> int:
    return int(mask.nonzero()[0, 0]) if mask.dim() == 1 else int(mask.flatten().nonzero()[0, 0])


def _matrix_shape(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(weight_shape) < 1:
        raise ValueError("a weight must have at least one dimension")
    rows = weight_shape[0]
    return rows, math.prod(weight_shape[1:]) if len(weight_shape) > 1 else 1


def _check_integer(where: str, name: str, t: Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{where}: {name} must be an integer tensor, got {t.dtype}")


def _check_weight_dtype(where: str, weight: Tensor) -> None:
    if weight.dtype not in _VALUE_DTYPES:
        raise ValueError(f"{where}: weight dtype {weight.dtype} is not a supported value dtype")


def _num_levels(where: str, name: str, tags: tuple[Tensor, ...], num_levels: int | None,
                densities: tuple[float, ...]) -> int:
    """The number of levels (given, or one more than the largest tag), once every tag lies in [-1, L-1]."""
    seen = [(int(t.min()), int(t.max())) for t in tags if t.numel()]
    lo, hi = (min(s[0] for s in seen), max(s[1] for s in seen)) if seen else (-1, -1)
    L = num_levels if num_levels is not None else max(hi + 1, len(densities), 1)
    if L < 1:
        raise ValueError(f"{where}: num_levels must be >= 1, got {L}")
    if lo < -1 or hi >= L:
        raise ValueError(f"{where}: {name} must lie in [-1, {L - 1}], got [{lo}, {hi}]")
    if densities and len(densities) != L:
        raise ValueError(f"{where}: {len(densities)} densities for {L} levels")
    return L


def _check_dense_args(where: str, weight: Tensor, tags: Tensor, num_levels: int | None,
                      densities: tuple[float, ...]) -> tuple[int, int, Tensor, int]:
    """The checks of every ``from_dense``; returns M, K, the tags as an int64 (M, K) matrix, and L."""
    if tags.shape != weight.shape:
        raise ValueError(f"{where}: tags shape {tuple(tags.shape)} != weight shape {tuple(weight.shape)}")
    _check_weight_dtype(where, weight)
    _check_integer(where, "tags", tags)
    M, K = _matrix_shape(tuple(weight.shape))
    t = tags.detach().reshape(M, K).to(torch.int64)
    return M, K, t, _num_levels(where, "tags", (t,), num_levels, densities)


def _check_block_shape(where: str, block_shape) -> tuple[int, int]:
    bs = tuple(block_shape) if isinstance(block_shape, (tuple, list)) else None
    if bs is None or len(bs) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bs) \
            or not all(1 <= b <= _MAX_BLOCK_DIM for b in bs):
        raise ValueError(f"{where}: block_shape must be two ints (bm, bk) in [1, {_MAX_BLOCK_DIM}], "
                         f"got {block_shape!r}")
    return bs


def _grid(M: int, K: int, block_shape: tuple[int, int]) -> tuple[int, int]:
    """(MB, KB): the block rows and block columns of an (M, K) matrix, the last ones maybe partial."""
    return -(-M // block_shape[0]), -(-K // block_shape[1])


def _inside(M: int, K: int, block_shape: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    """Which local rows (MB, 1, bm) and columns (1, KB, bk) of the block grid lie inside the matrix."""
    (bm, bk), (MB, KB) = block_shape, _grid(M, K, block_shape)
    rows = torch.arange(MB * bm, device=device).reshape(MB, 1, bm) < M
    cols = torch.arange(KB * bk, device=device).reshape(1, KB, bk) < K
    return rows, cols


def _blocked(matrix: Tensor, block_shape: tuple[int, int], fill) -> Tensor:
    """An (M, K) matrix padded with ``fill`` to the block grid and viewed as (MB, KB, bm, bk) (a copy)."""
    (M, K), (bm, bk) = matrix.shape, block_shape
    MB, KB = _grid(M, K, block_shape)
    padded = matrix.new_full((MB * bm, KB * bk), fill)
    padded[:M, :K] = matrix
    return padded.reshape(MB, bm, KB, bk).permute(0, 2, 1, 3)


def _element_tags(row_tags: Tensor, col_tags: Tensor, M: int, K: int) -> Tensor:
    """Element tags (M, K) = min(row tag, column tag), from row tags (MB, KB, bm) and column tags (MB, KB, bk)."""
    MB, KB, bm = row_tags.shape
    t = torch.minimum(row_tags.unsqueeze(3), col_tags.unsqueeze(2))  # (MB, KB, bm, bk)
    return t.permute(0, 2, 1, 3).reshape(MB * bm, KB * col_tags.shape[2])[:M, :K]


class _Nested:
    """What the formats share: a weight of ``weight_shape``, seen as an (M, K) matrix, with ``num_levels``
    levels in one ``values`` buffer."""

    @property
    def shape(self) -> tuple[int, int]:
        """The matrix shape (M, K)."""
        return _matrix_shape(self.weight_shape)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def _check_level(self, level: int) -> int:
        if not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"level {level!r} is out of range for {self.num_levels} levels (0 = densest)")
        return level

    def density(self, level: int = 0) -> float:
        M, K = self.shape
        return self.nnz(level) / max(M * K, 1)

    def flops(self, level: int, n: int) -> int:
        """Multiply-adds x 2 of a product with ``n`` dense columns (batch rows, or output pixels for a conv)."""
        return 2 * self.nnz(level) * int(n)

    def mask(self, level: int = 0) -> Tensor:
        return self.tags() >= self._check_level(level)


@dataclass
class NestedCSR(_Nested):
    """Nested CSR: a (M, K) matrix (a Linear weight, or a Conv2d weight viewed as (Cout, Cin/g*kh*kw))
    with L levels in one values buffer. Row r of level l is ``[row_ptr[r], row_end[l, r])``."""

    values: Tensor
    col_idx: Tensor
    row_ptr: Tensor
    row_end: Tensor
    weight_shape: tuple[int, ...]
    densities: tuple[float, ...] = field(default=())

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: Tensor, tags: Tensor, num_levels: int | None = None,
                   densities: tuple[float, ...] = ()) -> "NestedCSR":
        """Packs the entries of ``weight`` whose tag is >= 0; ``tags`` has the weight's shape (int8)."""
        M, K, t, L = _check_dense_args("NestedCSR.from_dense", weight, tags, num_levels, densities)
        w = weight.detach().reshape(M, K)
        rows, cols = (t >= 0).nonzero(as_tuple=True)
        tg = t[rows, cols]
        # Row-major, sparsest level first inside a row, then by column: every level is a row prefix.
        order = torch.argsort((rows * L + (L - 1 - tg)) * max(K, 1) + cols)
        rows, cols, tg = rows[order], cols[order], tg[order]
        device = weight.device
        row_ptr = torch.zeros(M + 1, dtype=torch.int64, device=device)
        row_ptr[1:] = torch.bincount(rows, minlength=M).cumsum(0)
        row_end = torch.stack([row_ptr[:-1] + torch.bincount(rows[tg >= lvl], minlength=M) for lvl in range(L)]) \
            if M else torch.zeros(L, 0, dtype=torch.int64, device=device)
        if rows.numel() >= 2**31:
            raise ValueError("NestedCSR.from_dense: more than 2^31 non-zeros are not supported")
        return cls(
            values=w[rows, cols].contiguous(),
            col_idx=cols.to(torch.int16 if K <= _INT16_MAX_COLS else torch.int32).contiguous(),
            row_ptr=row_ptr.to(torch.int32),
            row_end=row_end.to(torch.int32).contiguous(),
            weight_shape=tuple(weight.shape),
            densities=tuple(float(d) for d in densities),
        )

    # ---- shape and size -------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return int(self.row_end.shape[0])

    def row_nnz(self, level: int = 0) -> Tensor:
        """Non-zeros of every row at ``level``."""
        return (self.row_end[self._check_level(level)] - self.row_ptr[:-1]).to(torch.int64)

    def nnz(self, level: int = 0) -> int:
        return int(self.row_nnz(level).sum())

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
    def validate(self) -> "NestedCSR":
        """Checks every invariant of the format; raises FormatError naming the first one broken."""
        v, c, rp, re = self.values, self.col_idx, self.row_ptr, self.row_end
        M, K = self.shape

        def fail(msg: str):
            raise FormatError(f"NestedCSR: {msg}")

        if v.dtype not in _VALUE_DTYPES:
            fail(f"values dtype {v.dtype} is not one of float32, float16, bfloat16, float64")
        if c.dtype not in (torch.int16, torch.int32):
            fail(f"col_idx dtype {c.dtype} must be int16 or int32")
        if c.dtype == torch.int16 and K > _INT16_MAX_COLS:
            fail(f"col_idx is int16 but K = {K} > {_INT16_MAX_COLS}")
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
        rp64, re64, c64 = rp.to(torch.int64), re.to(torch.int64), c.to(torch.int64)
        if int(rp64[0]) != 0:
            fail(f"row_ptr[0] = {int(rp64[0])}, must be 0")
        d = rp64[1:] - rp64[:-1]
        if (d < 0).any():
            r = _first(d < 0)
            fail(f"row_ptr is not non-decreasing: row_ptr[{r}] = {int(rp64[r])} > row_ptr[{r + 1}] = {int(rp64[r + 1])}")
        if int(rp64[-1]) != v.numel():
            fail(f"row_ptr[M] = {int(rp64[-1])} but {v.numel()} values are stored")
        if not torch.equal(re64[0], rp64[1:]):
            r = _first(re64[0] != rp64[1:])
            fail(f"row_end[0, {r}] = {int(re64[0, r])} != row_ptr[{r + 1}] = {int(rp64[r + 1])} (level 0 is the whole row)")
        bounds = torch.cat([rp64[:-1].unsqueeze(0), re64.flip(0)])  # row_ptr, row_end[L-1], ..., row_end[0]
        bad = bounds[1:] < bounds[:-1]
        if bad.any():
            i = bad.flatten().nonzero()[0, 0]
            step, r = divmod(int(i), max(M, 1))
            lvl = self.num_levels - 1 - step
            lower = "row_ptr" if step == 0 else f"row_end[{lvl + 1}, {r}]"
            fail(f"levels are not nested in row {r}: row_end[{lvl}, {r}] = {int(re64[lvl, r])} < {lower} = "
                 f"{int(bounds[step, r])}")
        if c64.numel():
            out = (c64 < 0) | (c64 >= K)
            if out.any():
                p = _first(out)
                fail(f"col_idx[{p}] = {int(c64[p])} is outside [0, K={K})")
            rows = torch.repeat_interleave(torch.arange(M, device=v.device), d)
            tag = torch.full_like(c64, -1)
            pos = torch.arange(c64.numel(), device=v.device)
            for lvl in range(self.num_levels):
                tag += pos < re64[lvl][rows]
            same_group = (rows[1:] == rows[:-1]) & (tag[1:] == tag[:-1])
            unsorted = same_group & (c64[1:] <= c64[:-1])
            if unsorted.any():
                p = _first(unsorted) + 1
                fail(f"row {int(rows[p])} is not sorted by column within level {int(tag[p])} at col_idx[{p}] = "
                     f"{int(c64[p])} (or holds that column twice)")
            key = rows * max(K, 1) + c64
            sk = torch.sort(key).values
            dup = sk[1:] == sk[:-1]
            if dup.any():
                k = int(sk[1:][dup][0])
                fail(f"row {k // max(K, 1)} holds column {k % max(K, 1)} twice")
        return self

    # ---- movement and serialisation ---------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NestedCSR":
        """A copy on ``device`` and/or with values cast to ``dtype`` (indices are kept as they are)."""
        return replace(self, values=self.values.to(device=device, dtype=dtype), col_idx=self.col_idx.to(device),
                       row_ptr=self.row_ptr.to(device), row_end=self.row_end.to(device))

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only, so safetensors can store it."""
        return {
            "values": self.values, "col_idx": self.col_idx, "row_ptr": self.row_ptr, "row_end": self.row_end,
            "weight_shape": torch.tensor(self.weight_shape, dtype=torch.int64),
            "densities": torch.tensor(self.densities, dtype=torch.float64),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> "NestedCSR":
        """Rebuilds and validates; a missing key or a broken invariant raises FormatError."""
        missing = {"values", "col_idx", "row_ptr", "row_end", "weight_shape", "densities"} - set(sd)
        if missing:
            raise FormatError(f"NestedCSR: state dict lacks {sorted(missing)}")
        ws = sd["weight_shape"]
        if ws.dtype != torch.int64 or ws.dim() != 1 or (ws < 0).any():
            raise FormatError(f"NestedCSR: weight_shape must be a 1-D non-negative int64 tensor, got {ws}")
        obj = cls(values=sd["values"], col_idx=sd["col_idx"], row_ptr=sd["row_ptr"], row_end=sd["row_end"],
                  weight_shape=tuple(int(s) for s in ws.tolist()),
                  densities=tuple(float(d) for d in sd["densities"].tolist()))
        return obj.validate()


@dataclass
class NestedBCR(_Nested):
    """Nested BCR (block-based column-row, GRIM): an (M, K) matrix (a Linear weight, or a Conv2d weight viewed
    as (Cout, Cin/g*kh*kw)) tiled into (bm, bk) blocks. Inside a block whole rows and columns are kept, so a
    block's level l is a dense r_l x c_l sub-block: the top-left corner of its level-0 r_0 x c_0 sub-block.
    The tensors follow csrc/formats/nbcr.h to the letter."""

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
        bm, bk = _check_block_shape(where, block_shape)
        _check_integer(where, "tags", tags)
        M, K = _matrix_shape(tuple(tags.shape))
        t = tags.detach().reshape(M, K)
        if t.numel() and (int(t.min()) < -1 or int(t.max()) > 127):
            raise ValueError(f"{where}: tags must lie in [-1, 127], got [{int(t.min())}, {int(t.max())}]")
        blocked = _blocked(t.to(torch.int8), (bm, bk), -1)  # (MB, KB, bm, bk)
        row_tags, col_tags = blocked.amax(3), blocked.amax(2)
        implied = torch.minimum(row_tags.unsqueeze(3), col_tags.unsqueeze(2))
        MB, KB = blocked.shape[:2]
        bad = (implied != blocked).permute(0, 2, 1, 3).reshape(MB * bm, KB * bk)  # in matrix order
        if bad.any():
            r, c = divmod(_first(bad), bad.shape[1])
            i, p, j, q = r // bm, r % bm, c // bk, c % bk
            raise FormatError(
                f"{where}: tags are not block row/column structured (block shape ({bm}, {bk})): element ({r}, {c}) "
                f"in block ({i}, {j}) has tag {int(t[r, c])}, but its row and column are kept up to levels "
                f"{int(row_tags[i, j, p])} and {int(col_tags[i, j, q])}, so it would have tag "
                f"{int(implied[i, j, p, q])}")
        return row_tags.contiguous(), col_tags.contiguous()

    @classmethod
    def from_dense(cls, weight: Tensor, tags: Tensor, block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
                   num_levels: int | None = None, densities: tuple[float, ...] = ()) -> "NestedBCR":
        """Packs ``weight`` by its element tags (weight-shaped, int8), which must be block row/column structured
        (see structured_tags)."""
        where = "NestedBCR.from_dense"
        _check_block_shape(where, block_shape)
        L = _check_dense_args(where, weight, tags, num_levels, densities)[3]
        return cls.from_tags(weight, *cls.structured_tags(tags, block_shape), block_shape, L, densities)

    @classmethod
    def from_tags(cls, weight: Tensor, row_tags: Tensor, col_tags: Tensor,
                  block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE, num_levels: int | None = None,
                  densities: tuple[float, ...] = ()) -> "NestedBCR":
        """Packs ``weight`` by the tags of every local row (MB, KB, bm) and column (MB, KB, bk) of every block
        (-1: pruned at every level; always so outside the matrix). Element tag = min(row tag, column tag).
        A row or column tag above the sparsest level at which its block keeps both rows and columns is
        lowered to it first (canonical form; the element tags do not change)."""
        where = "NestedBCR.from_tags"
        _check_weight_dtype(where, weight)
        bm, bk = _check_block_shape(where, block_shape)
        M, K = _matrix_shape(tuple(weight.shape))
        MB, KB = _grid(M, K, (bm, bk))
        dev = weight.device
        for name, t, n in (("row_tags", row_tags, bm), ("col_tags", col_tags, bk)):
            _check_integer(where, name, t)
            if tuple(t.shape) != (MB, KB, n):
                raise ValueError(f"{where}: {name} must have shape {(MB, KB, n)} for a ({M}, {K}) matrix in "
                                 f"({bm}, {bk}) blocks, got {tuple(t.shape)}")
        rt, ct = row_tags.detach().to(dev, torch.int64), col_tags.detach().to(dev, torch.int64)
        L = _num_levels(where, "row_tags and col_tags", (rt, ct), num_levels, densities)
        for name, t, inside, what, n in zip(("row_tags", "col_tags"), (rt, ct), _inside(M, K, (bm, bk), dev),
                                            ("row", "column"), (M, K)):
            outside = (t >= 0) & ~inside
            if outside.any():
                i, j, p = (int(x) for x in outside.nonzero()[0])
                raise ValueError(f"{where}: {name}[{i}, {j}, {p}] = {int(t[i, j, p])}, but local {what} {p} of "
                                 f"block ({i}, {j}) lies outside the matrix ({n} {what}s); it must be -1")
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
        if int(vsize.sum()) > _INT32_MAX or int(isize.sum()) > _INT32_MAX:
            raise ValueError(f"{where}: {int(vsize.sum())} values and {int(isize.sum())} indices; int32 offsets "
                             f"allow at most {_INT32_MAX} of each")
        keep_r = torch.arange(bm, device=dev) < r[0, :, None]  # (B, bm)
        keep_c = torch.arange(bk, device=dev) < c[0, :, None]  # (B, bk)
        sub = _blocked(weight.detach().reshape(M, K), (bm, bk), 0)[bi, bj]  # (B, bm, bk)
        sub = sub.gather(1, r_order[:, :, None].expand(-1, -1, bk)).gather(2, c_order[:, None, :].expand(-1, bm, -1))
        block_ptr = torch.zeros(MB + 1, dtype=torch.int64, device=dev)
        block_ptr[1:] = torch.bincount(bi, minlength=MB).cumsum(0)
        return cls(
            values=sub[keep_r[:, :, None] & keep_c[:, None, :]].contiguous(),
            indices=torch.cat([r_order, c_order], 1)[torch.cat([keep_r, keep_c], 1)].to(torch.int16),
            block_ptr=block_ptr.to(torch.int32),
            blocks=torch.stack([bj, vsize.cumsum(0) - vsize, isize.cumsum(0) - isize], 1).to(torch.int32),
            counts=torch.stack([r, c], 2).to(torch.int32),
            weight_shape=tuple(weight.shape),
            block_shape=(bm, bk),
            densities=tuple(float(d) for d in densities),
        )

    # ---- shape and size -------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_blocks(self) -> int:
        """B, the stored blocks."""
        return int(self.blocks.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        """(MB, KB): block rows and block columns, the last ones maybe partial."""
        return _grid(*self.shape, self.block_shape)

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
        return (self.nnz(level) * self.values.element_size() + int(rc.sum()) * self.indices.element_size()
                + sum(t.numel() * t.element_size() for t in tables) + rc.numel() * self.counts.element_size())

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
        return _element_tags(*self.row_col_tags(), *self.shape).reshape(self.weight_shape)

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
    def validate(self) -> "NestedBCR":
        """Checks every invariant of csrc/formats/nbcr.h; raises FormatError naming the first one broken."""
        v, ix, bp, bl, cn = self.values, self.indices, self.block_ptr, self.blocks, self.counts
        named = (("values", v), ("indices", ix), ("block_ptr", bp), ("blocks", bl), ("counts", cn))

        def fail(msg: str):
            raise FormatError(f"NestedBCR: {msg}")

        if v.dtype not in _VALUE_DTYPES:
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
            bm, bk = _check_block_shape("NestedBCR", self.block_shape)
        except ValueError as e:
            raise FormatError(str(e)) from None
        M, K = self.shape
        MB, KB = _grid(M, K, (bm, bk))
        if v.dim() != 1 or ix.dim() != 1:
            fail(f"values and indices must be 1-D, got shapes {tuple(v.shape)} and {tuple(ix.shape)}")
        if bp.shape != (MB + 1,):
            fail(f"block_ptr must have shape (MB + 1,) = ({MB + 1},) for a ({M}, {K}) matrix in ({bm}, {bk}) "
                 f"blocks, got {tuple(bp.shape)}")
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
            i = _first(d < 0)
            fail(f"block_ptr is not non-decreasing: block_ptr[{i}] = {int(bp64[i])} > block_ptr[{i + 1}] = "
                 f"{int(bp64[i + 1])}")
        if int(bp64[-1]) != B:
            fail(f"block_ptr[MB] = block_ptr[{MB}] = {int(bp64[-1])} but {B} blocks are stored")
        brow, j = self._block_rows(), bl[:, 0].to(torch.int64)

        def at(b: int) -> str:
            return f"block {b} (block row {int(brow[b])}, block column {int(j[b])})"

        if ((j < 0) | (j >= KB)).any():
            b = _first((j < 0) | (j >= KB))
            fail(f"block {b} (block row {int(brow[b])}) has block column {int(j[b])}, outside [0, KB={KB})")
        unsorted = (brow[1:] == brow[:-1]) & (j[1:] <= j[:-1])
        if unsorted.any():
            b = _first(unsorted) + 1
            fail(f"block row {int(brow[b])} is not sorted by block column without repeats: block {b - 1} has "
                 f"column {int(j[b - 1])}, block {b} has column {int(j[b])}")
        cnt = cn.to(torch.int64)
        r, c = cnt[..., 0], cnt[..., 1]  # (L, B)
        for name, x, lim in (("r", r, f"bm={bm}"), ("c", c, f"bk={bk}")):
            bad = (x < 0) | (x > (bm if name == "r" else bk))
            if bad.any():
                lvl, b = divmod(_first(bad), B)
                fail(f"counts[{lvl}, {b}] = ({int(r[lvl, b])}, {int(c[lvl, b])}) of {at(b)}: {name}_{lvl} is "
                     f"outside [0, {lim}]")
        if (r[0] < 1).any():
            b = _first(r[0] < 1)
            fail(f"{at(b)} keeps no row at level 0 (counts[0, {b}] = ({int(r[0, b])}, {int(c[0, b])})): r_0 must "
                 f"be >= 1, a block with nothing kept is not stored")
        grows = (r[1:] > r[:-1]) | (c[1:] > c[:-1])
        if grows.any():
            lvl, b = divmod(_first(grows), B)
            fail(f"counts of {at(b)} are not nested: level {lvl + 1} keeps (r, c) = ({int(r[lvl + 1, b])}, "
                 f"{int(c[lvl + 1, b])}) but level {lvl} only ({int(r[lvl, b])}, {int(c[lvl, b])})")
        odd = (r == 0) != (c == 0)
        if odd.any():
            lvl, b = divmod(_first(odd), B)
            fail(f"counts[{lvl}, {b}] = ({int(r[lvl, b])}, {int(c[lvl, b])}) of {at(b)}: r_l == 0 must hold "
                 f"exactly when c_l == 0")
        for col, name, size, rule in ((1, "value", r[0] * c[0], "r0*c0"), (2, "index", r[0] + c[0], "r0+c0")):
            expect = size.cumsum(0) - size
            bad = bl[:, col].to(torch.int64) != expect
            if bad.any():
                b = _first(bad)
                fail(f"blocks[{b}, {col}] = {int(bl[b, col])}, the {name} offset of {at(b)}, should be "
                     f"{int(expect[b])}: offsets are packed, the running sum of {rule}")
            total, stored = int(size.sum()), (v if col == 1 else ix).numel()
            if stored != total:
                fail(f"{stored} {'values' if col == 1 else 'indices'} are stored but the blocks hold {total} "
                     f"(last {name} offset + {rule})")
        if not ix.numel():
            return self
        blk, is_row, pos, tag = self._index_entries()
        idx = ix.to(torch.int64)

        def entry(p: int) -> str:
            what = "row" if is_row[p] else "column"
            return f"indices[{p}] = {int(idx[p])}, {what} {int(pos[p])} of {at(int(blk[p]))},"

        lim = torch.where(is_row, bm, bk)
        if ((idx < 0) | (idx >= lim)).any():
            p = _first((idx < 0) | (idx >= lim))
            fail(f"{entry(p)} is outside the block: [0, {int(lim[p])})")
        glob = torch.where(is_row, brow[blk] * bm, j[blk] * bk) + idx
        if (glob >= torch.where(is_row, M, K)).any():
            p = _first(glob >= torch.where(is_row, M, K))
            what, n = ("row", M) if is_row[p] else ("column", K)
            fail(f"{entry(p)} is global {what} {int(glob[p])}, outside the matrix ({n} {what}s; a partial edge block)")
        same = (blk[1:] == blk[:-1]) & (is_row[1:] == is_row[:-1]) & (tag[1:] == tag[:-1])
        if (same & (idx[1:] <= idx[:-1])).any():
            p = _first(same & (idx[1:] <= idx[:-1])) + 1
            fail(f"{entry(p)} is not ordered by descending tag, then number: it follows {int(idx[p - 1])}, both of "
                 f"tag {int(tag[p])} (or a repeat)")
        key = torch.sort((blk * 2 + is_row) * _MAX_BLOCK_DIM + idx).values
        if (key[1:] == key[:-1]).any():
            k = int(key[1:][key[1:] == key[:-1]][0])
            b, is_row_k, n = k // (2 * _MAX_BLOCK_DIM), (k // _MAX_BLOCK_DIM) % 2, k % _MAX_BLOCK_DIM
            fail(f"{at(b)} holds {'row' if is_row_k else 'column'} {n} twice")
        return self

    # ---- movement and serialisation ---------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NestedBCR":
        """A copy on ``device`` and/or with values cast to ``dtype`` (indices and tables are kept as they are)."""
        return replace(self, values=self.values.to(device=device, dtype=dtype), indices=self.indices.to(device),
                       block_ptr=self.block_ptr.to(device), blocks=self.blocks.to(device),
                       counts=self.counts.to(device))

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only, so safetensors can store it."""
        return {
            "values": self.values, "indices": self.indices, "block_ptr": self.block_ptr, "blocks": self.blocks,
            "counts": self.counts,
            "weight_shape": torch.tensor(self.weight_shape, dtype=torch.int64),
            "block_shape": torch.tensor(self.block_shape, dtype=torch.int64),
            "densities": torch.tensor(self.densities, dtype=torch.float64),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> "NestedBCR":
        """Rebuilds and validates; a missing key or a broken invariant raises FormatError."""
        missing = {"values", "indices", "block_ptr", "blocks", "counts", "weight_shape", "block_shape",
                   "densities"} - set(sd)
        if missing:
            raise FormatError(f"NestedBCR: state dict lacks {sorted(missing)}")
        ws, bs = sd["weight_shape"], sd["block_shape"]
        if ws.dtype != torch.int64 or ws.dim() != 1 or ws.numel() < 1 or (ws < 0).any():
            raise FormatError(f"NestedBCR: weight_shape must be a 1-D non-empty non-negative int64 tensor, got {ws}")
        if bs.dtype != torch.int64 or bs.shape != (2,):
            raise FormatError(f"NestedBCR: block_shape must be an int64 tensor of shape (2,), got {bs}")
        obj = cls(values=sd["values"], indices=sd["indices"], block_ptr=sd["block_ptr"], blocks=sd["blocks"],
                  counts=sd["counts"], weight_shape=tuple(int(s) for s in ws.tolist()),
                  block_shape=tuple(int(b) for b in bs.tolist()),
                  densities=tuple(float(d) for d in sd["densities"].tolist()))
        return obj.validate()
