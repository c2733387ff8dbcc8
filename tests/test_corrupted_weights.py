"""Corrupted index arrays are named, never read out of bounds: the checks of each format's own arrays, which differ
by nature, so they stay per format.

- nested CSR: a column index outside [0, K) (every batch path, ISA, convolution path and the backward), corrupted
  row_ptr / row_end, and the index dtypes (col_idx int16 or int32, row_ptr int32);
- nested BCR: every corruption of blocks, counts and indices (CORRUPTIONS) along every kernel path (PATHS), the
  block_ptr errors, and the index dtypes (indices int16; block_ptr, blocks and counts int32).

The checks every format shares (shapes, levels, contiguity, devices, plans, geometry...) are in test_bad_input.py."""

import pytest
import torch

from nestsparse import ops

from conftest import nested, nested_bcr, random_bcr_tags, random_tags

OPS = torch.ops.nestsparse


# ---- nested CSR: col_idx, row_ptr, row_end ---------------------------------------------------------------------


@pytest.fixture
def csr():
    return nested(torch.randn(10, 20), random_tags((10, 20), 2, 0.5), 2)


def ncsr_call(w, x, level=0, **kw):
    a = dict(values=w.values, col_idx=w.col_idx, row_ptr=w.row_ptr, row_end=w.row_end)
    a.update({k: v for k, v in kw.items() if k in a})
    return ops.ncsr_linear(
        x,
        a["values"],
        a["col_idx"],
        a["row_ptr"],
        a["row_end"],
        level,
        kw.get("bias"),
        kw.get("activation", "none"),
        kw.get("plan"),
    )


def test_ncsr_index_dtypes(csr):
    w = csr
    x = torch.randn(2, 20)
    with pytest.raises(RuntimeError, match="col_idx must be int16 or int32"):
        ncsr_call(w, x, col_idx=w.col_idx.long())
    with pytest.raises(RuntimeError, match="row_ptr must be int32"):
        ncsr_call(w, x, row_ptr=w.row_ptr.long())
    # Both column index dtypes run, alike.
    assert w.col_idx.dtype == torch.int16
    torch.testing.assert_close(ncsr_call(w, x, col_idx=w.col_idx.int()), ncsr_call(w, x), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 3, 40])
def test_corrupted_column_index_is_named(isa, csr, n):
    w = csr
    cols = w.col_idx.clone()
    cols[5] = 20  # == K: one past the end
    with pytest.raises(RuntimeError, match=r"col_idx\[5\] = 20 .* outside \[0, K=20\)"):
        ncsr_call(w, torch.randn(n, 20), col_idx=cols)
    cols[5] = -3
    with pytest.raises(RuntimeError, match=r"col_idx\[5\] = -3"):
        ncsr_call(w, torch.randn(n, 20), col_idx=cols)
    cols[5] = 30000  # far outside: would fault if read
    with pytest.raises(RuntimeError, match="outside"):
        ncsr_call(w, torch.randn(n, 20), col_idx=cols)


def test_corrupted_row_arrays_are_named(csr):
    w = csr
    rp = w.row_ptr.clone()
    rp[3] = rp[2] - 1
    with pytest.raises(RuntimeError, match="row_ptr is not non-decreasing|outside its row"):
        ncsr_call(w, torch.randn(2, 20), row_ptr=rp)
    rp = w.row_ptr.clone()
    rp[-1] = 10**6
    with pytest.raises(RuntimeError, match="exceeds the .* stored values|outside its row"):
        ncsr_call(w, torch.randn(2, 20), row_ptr=rp)
    rp = w.row_ptr.clone()
    rp[0] = 1
    with pytest.raises(RuntimeError, match=r"ncsr_linear: row_ptr\[0\] = 1 but must be 0"):
        ncsr_call(w, torch.randn(2, 20), row_ptr=rp)
    re = w.row_end.clone()
    re[1, 4] = 10**6
    with pytest.raises(RuntimeError, match=r"row_end\[1, 4\] = 1000000 is outside its row"):
        ncsr_call(w, torch.randn(2, 20), level=1, row_end=re)


@pytest.mark.parametrize("geometry", [dict(k=1, s=1, p=0), dict(k=3, s=2, p=1)], ids=["direct", "phases"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_corrupted_column_index_is_named(geometry, dtype):
    k = geometry["k"]
    w = nested(torch.randn(4, 3, k, k, dtype=dtype), random_tags((4, 3, k, k), 1, 0.9), 1)
    cols = w.col_idx.clone()
    cols[2] = 3 * k * k
    with pytest.raises(RuntimeError, match=rf"col_idx\[2\] = {3 * k * k} .*outside \[0, K={3 * k * k}\)"):
        ops.ncsr_conv2d(
            torch.randn(2, 3, 6, 6, dtype=dtype),
            w.values,
            cols,
            w.row_ptr,
            w.row_end,
            0,
            k,
            None,
            geometry["s"],
            geometry["p"],
        )


def test_backward_ops_check_columns(csr):
    w = csr
    cols = w.col_idx.clone()
    cols[0] = 99
    with pytest.raises(RuntimeError, match=r"ncsr_linear_backward: col_idx\[0\] = 99"):
        OPS.ncsr_linear_backward(torch.randn(3, 10), torch.randn(3, 20), w.values, cols, w.row_ptr, w.row_end, 0)


# ---- nested BCR: indices, block_ptr, blocks, counts -------------------------------------------------------------

M, K, BS, L = 21, 27, (8, 8), 3  # 3 block rows (the last 5 rows high), 4 block columns (the last 3 wide)


@pytest.fixture(scope="module")
def bcr():
    g = torch.Generator().manual_seed(0)
    tags = random_bcr_tags((M, K), BS, L, keep=0.9, empty_blocks=0, level0_only_blocks=0, generator=g)
    w = nested_bcr(torch.randn(M, K, generator=g), tags, BS, L)
    b = w.num_blocks - 1
    # The last block is the partial corner block and keeps something at every level.
    assert w.grid == (3, 4) and int(w.block_ptr[2]) <= b and int(w.blocks[b, 0]) == 3
    assert (w.counts[:, b] > 0).all()
    return w


def nbcr_args(w, **kw):
    a = dict(values=w.values, indices=w.indices, block_ptr=w.block_ptr, blocks=w.blocks, counts=w.counts)
    a.update({k: v for k, v in kw.items() if k in a})
    return a["values"], a["indices"], a["block_ptr"], a["blocks"], a["counts"]


def nbcr_call(w, x, level=0, rows=M, block_shape=BS, **kw):
    return ops.nbcr_linear(
        x, *nbcr_args(w, **kw), level, rows, block_shape, kw.get("bias"), kw.get("activation", "none"), kw.get("plan")
    )


def test_nbcr_index_dtypes(bcr):
    w = bcr
    x = torch.randn(2, K)
    with pytest.raises(RuntimeError, match="indices must be int16, got Int"):
        nbcr_call(w, x, indices=w.indices.int())
    for name in ("block_ptr", "blocks", "counts"):
        with pytest.raises(RuntimeError, match=f"nbcr_linear: {name} must be int32, got Long"):
            nbcr_call(w, x, **{name: getattr(w, name).long()})
    with pytest.raises(RuntimeError, match="nbcr_conv2d: indices must be int16, got Long"):
        ops.nbcr_conv2d(torch.randn(1, K, 3, 3), *nbcr_args(w, indices=w.indices.long()), 0, M, BS, 1)


def test_block_ptr_errors(bcr):
    w = bcr
    x = torch.randn(3, K)
    bp = w.block_ptr.clone()
    bp[1] = int(w.block_ptr[2]) + 1
    with pytest.raises(RuntimeError, match=r"block_ptr is not non-decreasing: block_ptr\[1\] = \d+ > block_ptr\[2\]"):
        nbcr_call(w, x, block_ptr=bp)
    bp = w.block_ptr.clone()
    bp[0] = 1
    with pytest.raises(RuntimeError, match=r"block_ptr\[0\] = 1 but must be 0"):
        nbcr_call(w, x, block_ptr=bp)
    for end in (w.num_blocks - 1, w.num_blocks + 1, 10**6):
        bp = w.block_ptr.clone()
        bp[-1] = end
        with pytest.raises(RuntimeError, match=rf"block_ptr\[3\] = {end} but {w.num_blocks} blocks are stored"):
            nbcr_call(w, x, block_ptr=bp)
    bp = w.block_ptr.clone()
    bp[1] = -5
    with pytest.raises(RuntimeError, match="block_ptr is not non-decreasing"):
        OPS.nbcr_linear_backward(torch.randn(3, M), x, *nbcr_args(w, block_ptr=bp), 0, M, list(BS))
    with pytest.raises(RuntimeError, match="nbcr_conv2d: block_ptr is not non-decreasing"):
        ops.nbcr_conv2d(torch.randn(1, 3, 5, 5), *nbcr_args(w, block_ptr=bp), 0, M, BS, 3)


# Corruptions of the last stored block b (the partial corner block: only its local rows [0, 5) and columns [0, 3)
# lie inside the matrix): name -> (array, change(t, b, row, col), level of the call, message after "<op>: "), where
# row and col are the positions in `indices` of b's first kept row and column.
def _counts(level, which, value):
    def change(t, b, row, col):
        t[level, b, which] = value(t, b) if callable(value) else value

    return "counts", change


def _blocks(which, value):
    def change(t, b, row, col):
        t[b, which] = value(t, b) if callable(value) else value

    return "blocks", change


def _index(kind, value):
    def change(t, b, row, col):
        t[row if kind == "row" else col] = value

    return "indices", change


_ROW, _COL, _KEEPS = r"block {b} \(block row 2\) ", r"block {b} \(block column 3\) ", r"block {b} keeps "
CORRUPTIONS = {
    "block column = KB": (*_blocks(0, 4), 0, _ROW + r"has block column 4, outside \[0, 4\) for K=27"),
    "block column < 0": (*_blocks(0, -1), 0, _ROW + r"has block column -1, outside \[0, 4\)"),
    "local row = bm": (*_index("row", 8), 0, _ROW + r"keeps local row 8 at indices\[\d+\], outside \[0, 5\)"),
    "local row past the matrix": (
        *_index("row", 5),
        1,
        _ROW + r"keeps local row 5 at indices\[\d+\], outside \[0, 5\)",
    ),
    "local row < 0": (*_index("row", -1), 2, _ROW + r"keeps local row -1 at indices\[\d+\], outside \[0, 5\)"),
    "local column = bk": (
        *_index("col", 8),
        0,
        _COL + r"keeps local column 8 at indices\[\d+\], outside \[0, 3\) for K=27",
    ),
    "local column past the matrix": (
        *_index("col", 3),
        1,
        _COL + r"keeps local column 3 at indices\[\d+\], outside \[0, 3\)",
    ),
    "local column far out": (
        *_index("col", 30000),
        0,
        _COL + r"keeps local column 30000 at indices\[\d+\], outside \[0, 3\)",
    ),
    "local column < 0": (
        *_index("col", -32768),
        2,
        _COL + r"keeps local column -32768 at indices\[\d+\], outside \[0, 3\)",
    ),
    "r_1 > r_0": (
        *_counts(1, 0, lambda t, b: int(t[0, b, 0]) + 1),
        1,
        _KEEPS + r"\(\d+, \d+\) rows and columns at level 1, not nested in level 0's",
    ),
    "c_2 > c_0": (
        *_counts(2, 1, lambda t, b: int(t[0, b, 1]) + 1),
        2,
        _KEEPS + r"\(\d+, \d+\) rows and columns at level 2, not nested in level 0's",
    ),
    "r_0 > bm": (*_counts(0, 0, 9), 0, _KEEPS + r"\(9, \d+\) rows and columns at level 0, outside the 8x8 block"),
    "c_0 > bk": (*_counts(0, 1, 300), 1, _KEEPS + r"\(\d+, 300\) rows and columns at level 0, outside the 8x8 block"),
    "r_1 < 0": (*_counts(1, 0, -1), 1, _KEEPS + r"\(-1, \d+\) rows and columns at level 1"),
    "c_0 < 0": (*_counts(0, 1, -1), 0, _KEEPS + r"\(\d+, -1\) rows and columns at level 0, outside the 8x8 block"),
    "value offset past the end": (
        *_blocks(1, lambda t, b: int(t[b, 1]) + 1),
        0,
        r"block {b} has value offset \d+ for a \dx\d sub-block, outside the \d+ stored "
        r"values",
    ),
    "value offset far out": (*_blocks(1, 2**31 - 1), 2, r"block {b} has value offset 2147483647"),
    "value offset < 0": (*_blocks(1, -1), 0, r"block {b} has value offset -1"),
    "index offset past the end": (
        *_blocks(2, lambda t, b: int(t[b, 2]) + 1),
        1,
        r"block {b} has index offset \d+ for \d+ indices, outside the \d+ stored indices",
    ),
    "index offset < 0": (*_blocks(2, -7), 0, r"block {b} has index offset -7"),
}

# Each path runs a different loop: the float32 block dot-product kernel (batch <= 4), the panel micro-kernel, the
# float64 loops, the backward (transposed product and SDDMM), the direct 1x1 conv, the stride-phase conv, a grouped
# conv whose block rows straddle two groups (7 rows per group, bm = 8) and their float64 and backward versions.
PATHS = {
    "linear-n1": lambda a, lvl, dt: ops.nbcr_linear(torch.randn(K, dtype=dt), *a, lvl, M, BS),
    "linear-n3": lambda a, lvl, dt: ops.nbcr_linear(
        torch.randn(3, K, dtype=dt), *a, lvl, M, BS, torch.randn(M, dtype=dt)
    ),
    "linear-n40": lambda a, lvl, dt: ops.nbcr_linear(torch.randn(40, K, dtype=dt), *a, lvl, M, BS, None, "relu"),
    "linear-backward": lambda a, lvl, dt: OPS.nbcr_linear_backward(
        torch.randn(5, M, dtype=dt), torch.randn(5, K, dtype=dt), *a, lvl, M, list(BS)
    ),
    "conv-direct": lambda a, lvl, dt: ops.nbcr_conv2d(torch.randn(2, K, 4, 5, dtype=dt), *a, lvl, M, BS, 1),
    "conv-phases": lambda a, lvl, dt: ops.nbcr_conv2d(torch.randn(2, 3, 7, 6, dtype=dt), *a, lvl, M, BS, 3, None, 2, 1),
    "conv-groups": lambda a, lvl, dt: ops.nbcr_conv2d(
        torch.randn(1, 9, 5, 5, dtype=dt), *a, lvl, M, BS, 3, None, 1, 1, 1, 3
    ),
    "conv-backward": lambda a, lvl, dt: OPS.nbcr_conv2d_backward(
        torch.randn(2, M, 4, 3, dtype=dt),
        torch.randn(2, 3, 7, 6, dtype=dt),
        *a,
        lvl,
        M,
        list(BS),
        [3, 3],
        [2, 2],
        [1, 1],
        [1, 1],
        1,
    ),
}
OP_NAME = {"linear-backward": "nbcr_linear_backward", "conv-backward": "nbcr_conv2d_backward"}


def check_corruptions(w, path, dtype):
    b = w.num_blocks - 1
    row, col = int(w.blocks[b, 2]), int(w.blocks[b, 2]) + int(w.counts[0, b, 0])
    op = OP_NAME.get(path, "nbcr_linear" if path.startswith("linear") else "nbcr_conv2d")
    values = w.values.to(dtype)
    arrays = {"indices": w.indices, "block_ptr": w.block_ptr, "blocks": w.blocks, "counts": w.counts}
    for level in range(L):  # the intact weight runs at every level
        PATHS[path](nbcr_args(w, values=values), level, dtype)
    for field, change, level, message in CORRUPTIONS.values():
        t = arrays[field].clone()
        change(t, b, row, col)
        with pytest.raises(RuntimeError, match=rf"{op}: " + message.format(b=b)):
            PATHS[path](nbcr_args(w, values=values, **{field: t}), level, dtype)


@pytest.mark.parametrize("path", [p for p in PATHS if "backward" not in p])
def test_corrupted_blocks_are_named(isa, bcr, path):
    check_corruptions(bcr, path, torch.float32)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_corrupted_blocks_are_named_in_other_dtypes_and_backward(bcr, path, dtype):
    if "backward" in path and dtype == torch.bfloat16:
        dtype = torch.float32
    check_corruptions(bcr, path, dtype)
