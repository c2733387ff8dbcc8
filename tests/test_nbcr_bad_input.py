"""Bad input to the nested BCR ops raises a Python exception naming the problem; it never crashes or reads out of
bounds."""

import pytest
import torch

from conftest import bcr_args, nested_bcr, random_bcr_tags
from nestsparse import ops

OPS = torch.ops.nestsparse
M, K, BS, L = 21, 27, (8, 8), 3  # 3 block rows (the last 5 rows high), 4 block columns (the last 3 wide)


@pytest.fixture(scope="module")
def w():
    g = torch.Generator().manual_seed(0)
    tags = random_bcr_tags((M, K), BS, L, keep=0.9, empty_blocks=0, level0_only_blocks=0, generator=g)
    w = nested_bcr(torch.randn(M, K, generator=g), tags, BS, L)
    b = w.num_blocks - 1
    # The last block is the partial corner block and keeps something at every level.
    assert w.grid == (3, 4) and int(w.block_ptr[2]) <= b and int(w.blocks[b, 0]) == 3
    assert (w.counts[:, b] > 0).all()
    return w


def args(w, **kw):
    a = dict(values=w.values, indices=w.indices, block_ptr=w.block_ptr, blocks=w.blocks, counts=w.counts)
    a.update({k: v for k, v in kw.items() if k in a})
    return a["values"], a["indices"], a["block_ptr"], a["blocks"], a["counts"]


def call(w, x, level=0, rows=M, block_shape=BS, **kw):
    return ops.nbcr_linear(x, *args(w, **kw), level, rows, block_shape, kw.get("bias"), kw.get("activation", "none"),
                           kw.get("plan"))


def test_wrong_dtypes(w):
    x = torch.randn(2, K)
    with pytest.raises(RuntimeError, match="nbcr_linear: x is Double but values are Float"):
        call(w, x.double())
    with pytest.raises(RuntimeError, match="values must be float32, float16, bfloat16 or float64, got Int"):
        call(w, x.int(), values=w.values.int())
    with pytest.raises(RuntimeError, match="indices must be int16, got Int"):
        call(w, x, indices=w.indices.int())
    for name in ("block_ptr", "blocks", "counts"):
        with pytest.raises(RuntimeError, match=f"nbcr_linear: {name} must be int32, got Long"):
            call(w, x, **{name: getattr(w, name).long()})
    with pytest.raises(RuntimeError, match="bias is Double but values are Float"):
        call(w, x, bias=torch.randn(M, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="nbcr_linear_backward: x is Half but values are Float"):
        OPS.nbcr_linear_backward(torch.randn(2, M), x.half(), *bcr_args(w), 0, M, list(BS))
    with pytest.raises(RuntimeError, match="nbcr_conv2d: indices must be int16, got Long"):
        ops.nbcr_conv2d(torch.randn(1, K, 3, 3), *args(w, indices=w.indices.long()), 0, M, BS, 1)


def test_wrong_shapes_and_levels(w):
    x = torch.randn(2, K)
    with pytest.raises(RuntimeError, match=r"level 3 is out of range for a model with 3 levels"):
        call(w, x, level=3)
    with pytest.raises(RuntimeError, match="level -1 is out of range"):
        call(w, x, level=-1)
    for bs in ((0, 8), (257, 8), (8, 0), (8, 257)):
        with pytest.raises(RuntimeError, match=r"block_shape \[\d+, \d+\] must lie in \[1, 256\]"):
            call(w, x, block_shape=bs)
    # 29 rows make 4 block rows in blocks of 8, but block_ptr holds 3.
    with pytest.raises(RuntimeError, match=r"block_ptr must have shape \(5,\) for 29 rows in blocks of 8, got \[4\]"):
        call(w, x, rows=29)
    with pytest.raises(RuntimeError, match=r"block_ptr must have shape \(3,\) for 16 rows"):
        call(w, x, rows=16)
    with pytest.raises(RuntimeError, match="rows must lie in"):
        call(w, x, rows=-1)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(21,\), got \[22\]"):
        call(w, x, bias=torch.randn(22))
    with pytest.raises(RuntimeError, match=r"bias must have shape \(21,\)"):
        call(w, x, bias=torch.randn(1, 21))
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        call(w, x, activation="tanh")
    B = w.num_blocks
    counts = torch.zeros(L, B + 1, 2, dtype=torch.int32)
    counts[:, :B] = w.counts
    with pytest.raises(RuntimeError,
                       match=rf"counts must have shape \(L, B={B}, 2\) with L >= 1, got \[3, {B + 1}, 2\]"):
        call(w, x, counts=counts)
    with pytest.raises(RuntimeError, match=r"counts must have shape \(L, B="):
        call(w, x, counts=w.counts[:, :, 0].contiguous())
    with pytest.raises(RuntimeError, match=r"counts must have shape \(L, B="):
        call(w, x, counts=w.counts[:0].contiguous())
    with pytest.raises(RuntimeError, match=r"blocks must have shape \(B, 3\)"):
        call(w, x, blocks=w.blocks[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="values must be 1-D"):
        call(w, x, values=w.values.reshape(1, -1))
    with pytest.raises(RuntimeError, match="indices must be 1-D"):
        call(w, x, indices=w.indices.reshape(1, -1))
    with pytest.raises(RuntimeError, match=r"x must have shape \(\.\.\., K\)"):
        call(w, torch.tensor(1.0))
    # x narrower than the weight: its last block column lies outside, its third one partly.
    with pytest.raises(RuntimeError, match=r"keeps local column \d+ at indices\[\d+\], outside \[0, 4\) for K=20"):
        call(w, torch.randn(2, 20))


def test_non_contiguous(w):
    x = torch.randn(2, K)
    with pytest.raises(RuntimeError, match="nbcr_linear: x must be contiguous"):
        call(w, torch.randn(K, 2).T)
    with pytest.raises(RuntimeError, match="values must be contiguous"):
        call(w, x, values=torch.randn(2 * w.values.numel())[::2])
    with pytest.raises(RuntimeError, match="indices must be contiguous"):
        call(w, x, indices=w.indices.repeat_interleave(2)[::2])
    with pytest.raises(RuntimeError, match="block_ptr must be contiguous"):
        call(w, x, block_ptr=w.block_ptr.repeat_interleave(2)[::2])
    with pytest.raises(RuntimeError, match="blocks must be contiguous"):
        call(w, x, blocks=torch.cat([w.blocks, w.blocks[:, :1]], 1)[:, :3])
    with pytest.raises(RuntimeError, match="counts must be contiguous"):
        call(w, x, counts=w.counts.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(RuntimeError, match="nbcr_conv2d: x must be contiguous"):
        ops.nbcr_conv2d(torch.randn(1, 3, 3, K).permute(0, 3, 1, 2), *bcr_args(w), 0, M, BS, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch(w):
    with pytest.raises(RuntimeError, match="is on cuda"):
        call(w, torch.randn(2, K), values=w.values.cuda())


def test_block_ptr_errors(w):
    x = torch.randn(3, K)
    bp = w.block_ptr.clone()
    bp[1] = int(w.block_ptr[2]) + 1
    with pytest.raises(RuntimeError, match=r"block_ptr is not non-decreasing: block_ptr\[1\] = \d+ > block_ptr\[2\]"):
        call(w, x, block_ptr=bp)
    bp = w.block_ptr.clone()
    bp[0] = 1
    with pytest.raises(RuntimeError, match=r"block_ptr\[0\] = 1 but must be 0"):
        call(w, x, block_ptr=bp)
    for end in (w.num_blocks - 1, w.num_blocks + 1, 10**6):
        bp = w.block_ptr.clone()
        bp[-1] = end
        with pytest.raises(RuntimeError, match=rf"block_ptr\[3\] = {end} but {w.num_blocks} blocks are stored"):
            call(w, x, block_ptr=bp)
    bp = w.block_ptr.clone()
    bp[1] = -5
    with pytest.raises(RuntimeError, match="block_ptr is not non-decreasing"):
        OPS.nbcr_linear_backward(torch.randn(3, M), x, *args(w, block_ptr=bp), 0, M, list(BS))
    with pytest.raises(RuntimeError, match="nbcr_conv2d: block_ptr is not non-decreasing"):
        ops.nbcr_conv2d(torch.randn(1, 3, 5, 5), *args(w, block_ptr=bp), 0, M, BS, 3)


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
    "local row past the matrix": (*_index("row", 5), 1,
                                  _ROW + r"keeps local row 5 at indices\[\d+\], outside \[0, 5\)"),
    "local row < 0": (*_index("row", -1), 2, _ROW + r"keeps local row -1 at indices\[\d+\], outside \[0, 5\)"),
    "local column = bk": (*_index("col", 8), 0,
                          _COL + r"keeps local column 8 at indices\[\d+\], outside \[0, 3\) for K=27"),
    "local column past the matrix": (*_index("col", 3), 1,
                                     _COL + r"keeps local column 3 at indices\[\d+\], outside \[0, 3\)"),
    "local column far out": (*_index("col", 30000), 0,
                             _COL + r"keeps local column 30000 at indices\[\d+\], outside \[0, 3\)"),
    "local column < 0": (*_index("col", -32768), 2,
                         _COL + r"keeps local column -32768 at indices\[\d+\], outside \[0, 3\)"),
    "r_1 > r_0": (*_counts(1, 0, lambda t, b: int(t[0, b, 0]) + 1), 1,
                  _KEEPS + r"\(\d+, \d+\) rows and columns at level 1, not nested in level 0's"),
    "c_2 > c_0": (*_counts(2, 1, lambda t, b: int(t[0, b, 1]) + 1), 2,
                  _KEEPS + r"\(\d+, \d+\) rows and columns at level 2, not nested in level 0's"),
    "r_0 > bm": (*_counts(0, 0, 9), 0, _KEEPS + r"\(9, \d+\) rows and columns at level 0, outside the 8x8 block"),
    "c_0 > bk": (*_counts(0, 1, 300), 1, _KEEPS + r"\(\d+, 300\) rows and columns at level 0, outside the 8x8 block"),
    "r_1 < 0": (*_counts(1, 0, -1), 1, _KEEPS + r"\(-1, \d+\) rows and columns at level 1"),
    "c_0 < 0": (*_counts(0, 1, -1), 0, _KEEPS + r"\(\d+, -1\) rows and columns at level 0, outside the 8x8 block"),
    "value offset past the end": (*_blocks(1, lambda t, b: int(t[b, 1]) + 1), 0,
                                  r"block {b} has value offset \d+ for a \dx\d sub-block, outside the \d+ stored "
                                  r"values"),
    "value offset far out": (*_blocks(1, 2**31 - 1), 2, r"block {b} has value offset 2147483647"),
    "value offset < 0": (*_blocks(1, -1), 0, r"block {b} has value offset -1"),
    "index offset past the end": (*_blocks(2, lambda t, b: int(t[b, 2]) + 1), 1,
                                  r"block {b} has index offset \d+ for \d+ indices, outside the \d+ stored indices"),
    "index offset < 0": (*_blocks(2, -7), 0, r"block {b} has index offset -7"),
}

# Each path runs a different loop: the float32 block dot-product kernel (batch <= 4), the panel micro-kernel, the
# float64 loops, the backward (transposed product and SDDMM), the direct 1x1 conv, the stride-phase conv, a grouped
# conv whose block rows straddle two groups (7 rows per group, bm = 8) and their float64 and backward versions.
PATHS = {
    "linear-n1": lambda a, lvl, dt: ops.nbcr_linear(torch.randn(K, dtype=dt), *a, lvl, M, BS),
    "linear-n3": lambda a, lvl, dt: ops.nbcr_linear(torch.randn(3, K, dtype=dt), *a, lvl, M, BS,
                                                    torch.randn(M, dtype=dt)),
    "linear-n40": lambda a, lvl, dt: ops.nbcr_linear(torch.randn(40, K, dtype=dt), *a, lvl, M, BS, None, "relu"),
    "linear-backward": lambda a, lvl, dt: OPS.nbcr_linear_backward(
        torch.randn(5, M, dtype=dt), torch.randn(5, K, dtype=dt), *a, lvl, M, list(BS)),
    "conv-direct": lambda a, lvl, dt: ops.nbcr_conv2d(torch.randn(2, K, 4, 5, dtype=dt), *a, lvl, M, BS, 1),
    "conv-phases": lambda a, lvl, dt: ops.nbcr_conv2d(torch.randn(2, 3, 7, 6, dtype=dt), *a, lvl, M, BS, 3, None, 2,
                                                      1),
    "conv-groups": lambda a, lvl, dt: ops.nbcr_conv2d(torch.randn(1, 9, 5, 5, dtype=dt), *a, lvl, M, BS, 3, None, 1,
                                                      1, 1, 3),
    "conv-backward": lambda a, lvl, dt: OPS.nbcr_conv2d_backward(
        torch.randn(2, M, 4, 3, dtype=dt), torch.randn(2, 3, 7, 6, dtype=dt), *a, lvl, M, list(BS), [3, 3], [2, 2],
        [1, 1], [1, 1], 1),
}
OP_NAME = {"linear-backward": "nbcr_linear_backward", "conv-backward": "nbcr_conv2d_backward"}


def check_corruptions(w, path, dtype):
    b = w.num_blocks - 1
    row, col = int(w.blocks[b, 2]), int(w.blocks[b, 2]) + int(w.counts[0, b, 0])
    op = OP_NAME.get(path, "nbcr_linear" if path.startswith("linear") else "nbcr_conv2d")
    values = w.values.to(dtype)
    arrays = {"indices": w.indices, "block_ptr": w.block_ptr, "blocks": w.blocks, "counts": w.counts}
    for level in range(L):  # the intact weight runs at every level
        PATHS[path](args(w, values=values), level, dtype)
    for name, (field, change, level, message) in CORRUPTIONS.items():
        t = arrays[field].clone()
        change(t, b, row, col)
        with pytest.raises(RuntimeError, match=rf"{op}: " + message.format(b=b)):
            PATHS[path](args(w, values=values, **{field: t}), level, dtype)


@pytest.mark.parametrize("path", [p for p in PATHS if "backward" not in p])
def test_corrupted_blocks_are_named(isa, w, path):
    check_corruptions(w, path, torch.float32)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_corrupted_blocks_are_named_in_other_dtypes_and_backward(w, path, dtype):
    if "backward" in path and dtype == torch.bfloat16:
        dtype = torch.float32
    check_corruptions(w, path, dtype)


def test_bad_plan_is_refused(w):
    x = torch.randn(2, K)
    good = ops.nbcr_plan(w.block_ptr, w.counts, BS[0], 2)
    call(w, x, plan=good)
    with pytest.raises(RuntimeError, match=r"plan must be a contiguous int32 CPU tensor of shape \(L=3, chunks\+1\)"):
        call(w, x, plan=good[:2].contiguous())  # one level short
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        call(w, x, plan=good.float())
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        call(w, x, plan=good[:, :1].contiguous())  # no chunk
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        call(w, x, plan=good.T.contiguous().T)
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        call(w, x, plan=good[0])
    other = torch.tensor([[0, 2, 5]] * 3, dtype=torch.int32)  # built for a weight of 5 block rows
    with pytest.raises(RuntimeError, match=r"plan row 1 must run from 0 to MB=3, got 0 \.\. 5"):
        call(w, x, level=1, plan=other)
    with pytest.raises(RuntimeError, match=r"plan row 0 must run from 0 to MB=3, got 1 \.\. 3"):
        call(w, x, plan=torch.tensor([[1, 3]] * 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"plan row 2 is not non-decreasing at 2"):
        call(w, torch.randn(40, K), level=2, plan=torch.tensor([[0, 2, 1, 3]] * 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"plan row 0 is not non-decreasing"):
        call(w, x, plan=torch.tensor([[0, -1, 3]] * 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"nbcr_conv2d: plan row 0 must run from 0 to MB=3"):
        ops.nbcr_conv2d(torch.randn(1, 3, 5, 5), *bcr_args(w), 0, M, BS, 3, plan=other)


def test_plan_arguments_are_checked(w):
    with pytest.raises(RuntimeError, match="nbcr_plan: num_chunks must be >= 1, got 0"):
        ops.nbcr_plan(w.block_ptr, w.counts, BS[0], 0)
    with pytest.raises(RuntimeError, match=r"at most MB \+ 1024"):
        ops.nbcr_plan(w.block_ptr, w.counts, BS[0], 10**7)
    for bm in (0, 257):
        with pytest.raises(RuntimeError, match=rf"nbcr_plan: block rows must lie in \[1, 256\], got {bm}"):
            ops.nbcr_plan(w.block_ptr, w.counts, bm, 2)
    with pytest.raises(RuntimeError, match="block_ptr and counts must be contiguous int32 CPU tensors, got Long"):
        ops.nbcr_plan(w.block_ptr.long(), w.counts, BS[0], 2)
    with pytest.raises(RuntimeError, match="block_ptr and counts must be contiguous int32"):
        ops.nbcr_plan(w.block_ptr, w.counts.transpose(0, 1).contiguous().transpose(0, 1), BS[0], 2)
    with pytest.raises(RuntimeError, match=r"counts must have shape \(L, B, 2\)"):
        ops.nbcr_plan(w.block_ptr, w.counts[..., 0].contiguous(), BS[0], 2)
    with pytest.raises(RuntimeError, match="block_ptr must be 1-D"):
        ops.nbcr_plan(w.block_ptr[:0], w.counts, BS[0], 2)
    B = w.num_blocks
    with pytest.raises(RuntimeError, match=rf"block_ptr must run from 0 to B={B - 1}, got 0 \.\. {B}"):
        ops.nbcr_plan(w.block_ptr, w.counts[:, :-1].contiguous(), BS[0], 2)
    bp = w.block_ptr.clone()
    bp[1] = B + 3
    with pytest.raises(RuntimeError, match="nbcr_plan: block_ptr is not non-decreasing at 1"):
        ops.nbcr_plan(bp, w.counts, BS[0], 2)


def test_backward_ops_check_their_arguments(w):
    x = torch.randn(3, K)
    with pytest.raises(RuntimeError, match=r"nbcr_linear_backward: grad_z must have shape \[3, 21\], got \[3, 20\]"):
        OPS.nbcr_linear_backward(torch.randn(3, 20), x, *bcr_args(w), 0, M, list(BS))
    with pytest.raises(RuntimeError, match="nbcr_linear_backward: level 3 is out of range"):
        OPS.nbcr_linear_backward(torch.randn(3, M), x, *bcr_args(w), 3, M, list(BS))
    with pytest.raises(RuntimeError, match=r"nbcr_linear_backward: block_shape \[8, 257\] must lie in"):
        OPS.nbcr_linear_backward(torch.randn(3, M), x, *bcr_args(w), 0, M, [8, 257])
    with pytest.raises(RuntimeError, match=r"nbcr_linear_backward: counts must have shape"):
        OPS.nbcr_linear_backward(torch.randn(3, M), x, *args(w, counts=w.counts[:, 1:].contiguous()), 0, M, list(BS))
    xc = torch.randn(2, 3, 7, 6)
    geometry = ([3, 3], [2, 2], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError,
                       match=r"nbcr_conv2d_backward: grad_z must have shape \(2, 21, 4, 3\), got \[2, 21, 3, 3\]"):
        OPS.nbcr_conv2d_backward(torch.randn(2, M, 3, 3), xc, *bcr_args(w), 0, M, list(BS), *geometry)
    with pytest.raises(RuntimeError, match="nbcr_conv2d_backward: level -1 is out of range"):
        OPS.nbcr_conv2d_backward(torch.randn(2, M, 4, 3), xc, *bcr_args(w), -1, M, list(BS), *geometry)
    with pytest.raises(RuntimeError, match=r"nbcr_conv2d_backward: block_ptr must have shape \(5,\) for 25 rows"):
        OPS.nbcr_conv2d_backward(torch.randn(2, 25, 4, 3), xc, *bcr_args(w), 0, 25, list(BS), *geometry)
    with pytest.raises(RuntimeError, match="nbcr_conv2d_backward: x is Double but values are Float"):
        OPS.nbcr_conv2d_backward(torch.randn(2, M, 4, 3), xc.double(), *bcr_args(w), 0, M, list(BS), *geometry)


def test_conv_argument_errors(w):
    def conv(x, level=0, rows=M, block_shape=BS, k=3, bias=None, s=1, p=0, d=1, groups=1, activation="none", **kw):
        return ops.nbcr_conv2d(x, *args(w, **kw), level, rows, block_shape, k, bias, s, p, d, groups, activation)

    x = torch.randn(1, 3, 5, 5)
    conv(x)
    with pytest.raises(RuntimeError, match="nbcr_conv2d: x must be NCHW"):
        conv(torch.randn(3, 5, 5))
    with pytest.raises(RuntimeError, match=r"input channels \(3\) are not divisible by groups \(2\)"):
        conv(x, groups=2)
    with pytest.raises(RuntimeError, match=r"output channels \(21 weight rows\) are not divisible by groups \(2\)"):
        conv(torch.randn(1, 4, 5, 5), groups=2)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        conv(torch.randn(1, 3, 2, 2))
    with pytest.raises(RuntimeError, match="stride must be positive"):
        conv(x, s=0)
    with pytest.raises(RuntimeError, match="padding must be non-negative"):
        conv(x, p=-1)
    with pytest.raises(RuntimeError, match="dilation must be positive"):
        conv(x, d=0)
    with pytest.raises(RuntimeError, match="nbcr_conv2d: level 3 is out of range"):
        conv(x, level=3)
    with pytest.raises(RuntimeError, match=r"nbcr_conv2d: block_shape \[0, 8\] must lie in \[1, 256\]"):
        conv(x, block_shape=(0, 8))
    with pytest.raises(RuntimeError, match=r"nbcr_conv2d: bias must have shape \(21,\)"):
        conv(x, bias=torch.randn(3))
    with pytest.raises(RuntimeError, match="nbcr_conv2d: unknown activation 'swish'"):
        conv(x, activation="swish")
    with pytest.raises(RuntimeError, match=r"nbcr_conv2d: block_ptr must have shape \(5,\) for 32 rows"):
        conv(x, rows=32)
    with pytest.raises(RuntimeError, match="nbcr_conv2d: counts must have shape"):
        conv(x, counts=w.counts[:, :-1].contiguous())
    # The weight has 27 columns (3 channels x 3x3); read as a 2-channel 3x3 conv, K is 18.
    with pytest.raises(RuntimeError, match=r"nbcr_conv2d: block \d+ \(block column 2\) keeps local column \d at "
                                           r"indices\[\d+\], outside \[0, 2\) for K=18"):
        conv(torch.randn(1, 2, 5, 5))


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=(5, 1), dilation=(2**62, 1)),                  # dh * (kh - 1) would wrap around
    dict(kernel_size=(2**32, 2**32), padding=(2**31, 2**31)),       # K = Cin * kh * kw would wrap around
    dict(kernel_size=(1, 1), padding=(2**40, 0)),
])
def test_conv_geometry_that_would_overflow_is_refused(geometry):
    weight = torch.randn(2, 1, 1, 2)
    w = nested_bcr(weight, torch.zeros(2, 1, 1, 2, dtype=torch.int8), (2, 2), 1)
    a = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1))
    a.update(geometry)
    with pytest.raises(RuntimeError, match="nbcr_conv2d: "):
        ops.nbcr_conv2d(torch.randn(1, 1, 1, 2), *bcr_args(w), 0, 2, (2, 2), a["kernel_size"], None, a["stride"],
                        a["padding"], a["dilation"])


# Int lists of the wrong length, straight through torch.ops (past the Python wrappers' pair conversion).
def _linear_raw(w, block_shape):
    return OPS.nbcr_linear(torch.randn(2, K), *bcr_args(w), 0, M, block_shape, None, "none", None)


def _conv_raw(w, which, length):
    a = dict(block_shape=[8, 8], kernel_size=[3, 3], stride=[1, 1])
    a[which] = [a[which][0]] * length
    return OPS.nbcr_conv2d(torch.randn(1, 3, 6, 6), *bcr_args(w), 0, M, a["block_shape"], a["kernel_size"], None,
                           a["stride"], [1, 1], [1, 1], 1, "none", None)


CONV_LISTS = [(which, length) for which in ("block_shape", "kernel_size", "stride") for length in (1, 3)]


def _conv_message(which):
    # Named alone (the Autograd kernel's check) or with its siblings (the CPU kernel's).
    return rf"nbcr_conv2d: ({which} must have 2 entries|kernel_size, stride, padding and dilation must have 2 entries)"


def test_int_lists_of_wrong_length_are_refused_below_autograd(w):
    with torch.inference_mode():  # skips the Autograd kernel: the CPU kernels' own checks name the problem
        for block_shape in ([8], [8, 8, 8]):
            with pytest.raises(RuntimeError, match="nbcr_linear: block_shape must have 2 entries"):
                _linear_raw(w, block_shape)
        for which, length in CONV_LISTS:
            with pytest.raises(RuntimeError, match=_conv_message(which)):
                _conv_raw(w, which, length)


def test_block_shape_of_wrong_length_is_refused(w):
    # The Autograd kernel (csrc/ops/autograd.cpp) packs rows and the int lists into one vector and reads them back
    # at fixed offsets: unchecked, [8] read past the vector's end (a garbage block dimension in the message) and
    # [8, 8, 8] was silently cut to [8, 8].
    for block_shape in ([8], [8, 8, 8]):
        with pytest.raises(RuntimeError, match="nbcr_linear: block_shape must have 2 entries"):
            _linear_raw(w, block_shape)


def test_conv_int_lists_of_wrong_length_are_refused(w):
    # As above: unchecked, every int argument after the bad list was shifted (a missing entry made the last ones
    # read past the vector), so the message named another argument ("groups must be positive, got 0", "input
    # channels (3) are not divisible by groups (<garbage>)") or the call ran with shifted geometry.
    for which, length in CONV_LISTS:
        with pytest.raises(RuntimeError, match=_conv_message(which)):
            _conv_raw(w, which, length)
