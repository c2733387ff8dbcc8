"""Bad input raises a Python exception naming the problem, in every format; it never crashes or reads out of bounds.

One test per concern, run once per format (the ``fmt`` fixture): wrong dtypes, shapes, levels, devices and
contiguity, bad plans, convolution geometry, the backward ops, int lists of the wrong length and the modules' own
checks. Where only a format's array names differ, the expected message is written per format. Corrupted index
arrays, which each format has its own way of getting wrong, are in test_corrupted_weights.py."""

import dataclasses

import pytest
import torch
from torch import nn

import nestsparse

from conftest import FormatCase, has_kernel

OPS = torch.ops.nestsparse
M, K, L, BS = 21, 27, 3, (8, 8)  # NBCR: 3 block rows (the last 5 rows high), 4 block columns (the last 3 wide)
UNIT = {"ncsr": "M", "nbcr": "MB"}  # what a plan partitions (rows or block rows), as the messages name it
INDEX_DTYPE = {"col_idx": "int16 or int32", "indices": "int16"}  # the others are int32


@pytest.fixture
def w(fmt):
    """An (M, K) weight with L levels, keeping something at every level (NBCR: every block stored)."""
    w = fmt.random((M, K), L, torch.Generator().manual_seed(0), density=0.81, block_shape=BS, odd=False)
    assert w.shape == (M, K) and w.num_levels == L and all(w.nnz(level) > 0 for level in range(L))
    assert fmt.name != "nbcr" or (w.grid == (3, 4) and w.num_blocks == 12)
    return w


def arrays(w, **changes):
    """values and the index tensors of ``w`` in the order the ops take them, those named in ``changes`` replaced."""
    tensors = dict(values=w.values, **dict(zip(w.index_names, w.index_tensors())))
    assert set(changes) <= set(tensors), f"{type(w).__name__} has no array {set(changes) - set(tensors)}"
    tensors.update(changes)
    return tuple(tensors.values())


def linear(w, x, level=0, bias=None, activation="none", plan=None, **changes):
    """<format>_linear through its Python wrapper, with arrays of ``w`` replaced by name."""
    return w.linear_op(x, *arrays(w, **changes), level, *w.op_args(), bias, activation, plan)


def conv2d(
    w,
    x,
    level=0,
    kernel_size=3,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    activation="none",
    plan=None,
    **changes,
):
    """<format>_conv2d through its Python wrapper, with arrays of ``w`` replaced by name."""
    return w.conv2d_op(
        x,
        *arrays(w, **changes),
        level,
        *w.op_args(),
        kernel_size,
        bias,
        stride,
        padding,
        dilation,
        groups,
        activation,
        plan,
    )


KINDS = ["linear", "conv2d", "linear_backward", "conv2d_backward"]


def valid_call(kind):
    """A valid call of <format>_<kind> on the (M, K) weight (read as a 3-channel 3x3 convolution for conv2d), less
    the weight's arguments, by schema name."""
    x, xc = torch.randn(2, K), torch.randn(1, 3, 5, 5)
    geometry = dict(kernel_size=[3, 3], stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1)
    return {
        "linear": dict(x=x),
        "conv2d": dict(x=xc, **geometry),
        "linear_backward": dict(grad_z=torch.randn(2, M), x=x),
        "conv2d_backward": dict(grad_z=torch.randn(1, M, 3, 3), x=xc, **geometry),
    }[kind]


def schema_names(op):
    return [a.name for a in op.default._schema.arguments]


def raw(fmt, w, kind, level=0, **changes):
    """torch.ops.nestsparse.<format>_<kind> straight (past the Python wrappers) on ``w``: a valid call with any
    argument replaced by its schema name (an array, the level, an op argument of the format or of the op)."""
    op = getattr(OPS, f"{fmt.name}_{kind}")
    names = schema_names(op)
    kw = valid_call(kind)
    kw.update(zip(["values", *w.index_names], arrays(w)))
    kw["level"] = level
    kw.update(zip(names[names.index("level") + 1 :], w.op_args()))  # NBCR: rows, block_shape
    assert set(changes) <= set(names), f"{op} has no argument {set(changes) - set(names)}"
    kw.update(changes)
    return op(**kw)


def noncontiguous(t):
    """``t``'s values, not contiguous: every other element of a buffer twice as long."""
    out = torch.stack([t, t], -1).flatten(-2)[..., ::2]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def weight_errors(fmt, w):
    """Bad weight arguments (arrays, level, the format's op arguments) as (changes by schema name, the message after
    "<op>: "): every op checks them alike."""
    errors = [
        (dict(level=L), rf"level {L} is out of range for a model with {L} levels"),
        (dict(level=-1), "level -1 is out of range"),
        (dict(values=w.values.reshape(1, -1)), "values must be 1-D"),
    ]
    for name, t in zip(["values", *w.index_names], arrays(w)):
        errors.append(({name: noncontiguous(t)}, rf"{name} must be contiguous"))
    for name, t in zip(w.index_names, w.index_tensors()):
        errors.append(({name: t.long()}, rf"{name} must be {INDEX_DTYPE.get(name, 'int32')}, got Long"))
    if fmt.name == "ncsr":
        n = w.values.numel()
        errors += [
            (
                dict(row_end=w.row_end[:, :5].contiguous()),
                r"row_end must have shape \(L, M\) = \(L, 21\) with L >= 1, got \[3, 5\]",
            ),
            (dict(row_end=w.row_end[:0].contiguous()), r"row_end must have shape \(L, M\) = \(L, 21\) with L >= 1"),
            (dict(row_end=w.row_end[0].contiguous()), r"row_end must have shape \(L, M\) = \(L, 21\) with L >= 1"),
            (
                dict(row_ptr=w.row_ptr[:-1].contiguous()),
                r"row_end must have shape \(L, M\) = \(L, 20\) with L >= 1, got \[3, 21\]",
            ),
            (dict(row_ptr=w.row_ptr[:0]), r"row_ptr must be 1-D of length M\+1, got shape \[0\]"),
            (dict(row_ptr=w.row_ptr.reshape(1, -1)), r"row_ptr must be 1-D of length M\+1, got shape \[1, 22\]"),
            (
                dict(col_idx=w.col_idx[:-1]),
                rf"col_idx must be 1-D with as many entries as values \({n}\), got shape \[{n - 1}\]",
            ),
            (dict(col_idx=w.col_idx.reshape(1, -1)), "col_idx must be 1-D with as many entries as values"),
        ]
    else:
        B = w.num_blocks
        counts = torch.zeros(L, B + 1, 2, dtype=torch.int32)
        counts[:, :B] = w.counts
        errors += [
            (dict(block_shape=list(bs)), rf"block_shape \[{bs[0]}, {bs[1]}\] must lie in \[1, 256\]")
            for bs in ((0, 8), (257, 8), (8, 0), (8, 257))
        ]
        errors += [
            # 29 rows make 4 block rows in blocks of 8, but block_ptr holds 3.
            (dict(rows=29), r"block_ptr must have shape \(5,\) for 29 rows in blocks of 8, got \[4\]"),
            (dict(rows=16), r"block_ptr must have shape \(3,\) for 16 rows"),
            (dict(rows=25), r"block_ptr must have shape \(5,\) for 25 rows"),
            (dict(rows=32), r"block_ptr must have shape \(5,\) for 32 rows"),
            (dict(rows=-1), "rows must lie in"),
            (
                dict(block_ptr=w.block_ptr[:0]),
                r"block_ptr must have shape \(4,\) for 21 rows in blocks of 8, got \[0\]",
            ),
            (dict(counts=counts), rf"counts must have shape \(L, B={B}, 2\) with L >= 1, got \[3, {B + 1}, 2\]"),
            (dict(counts=w.counts[:, :, 0].contiguous()), r"counts must have shape \(L, B="),
            (dict(counts=w.counts[:0].contiguous()), r"counts must have shape \(L, B="),
            (dict(counts=w.counts[:, :-1].contiguous()), "counts must have shape"),
            (dict(counts=w.counts[:, 1:].contiguous()), "counts must have shape"),
            (dict(blocks=w.blocks[:, :2].contiguous()), r"blocks must have shape \(B, 3\)"),
            (dict(indices=w.indices.reshape(1, -1)), "indices must be 1-D"),
        ]
    return errors


@pytest.mark.parametrize("kind", KINDS)
def test_weight_arguments_are_checked_by_every_op(fmt, w, kind):
    raw(fmt, w, kind)  # the intact call runs
    for changes, message in weight_errors(fmt, w):
        with pytest.raises(RuntimeError, match=rf"{fmt.name}_{kind}: {message}"):
            raw(fmt, w, kind, **changes)


def test_wrong_dtypes(fmt, w):
    x = torch.randn(2, K)
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_linear: x is Double but values are Float"):
        linear(w, x.double())
    with pytest.raises(RuntimeError, match="values must be float32, float16, bfloat16 or float64, got Int"):
        linear(w, x.int(), values=w.values.int())
    with pytest.raises(RuntimeError, match="bias is Double but values are Float"):
        linear(w, x, bias=torch.randn(M, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_linear_backward: x is Half but values are Float"):
        raw(fmt, w, "linear_backward", x=x.half())
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_conv2d: x is Double but values are Float"):
        conv2d(w, torch.randn(1, 3, 5, 5, dtype=torch.float64))


# x narrower than the weight (K=20): the columns past it are named. NBCR: its last block column lies outside, its
# third one partly.
NARROW = {
    "ncsr": r"col_idx\[\d+\] = 2[0-6] \(row \d+\) is outside \[0, K=20\)",
    "nbcr": r"block \d+ \(block column 2\) keeps local column \d+ at indices\[\d+\], outside \[0, 4\) for K=20",
}


def test_wrong_shapes_and_levels(fmt, w):
    x = torch.randn(2, K)
    with pytest.raises(RuntimeError, match=rf"level {L} is out of range for a model with {L} levels"):
        linear(w, x, level=L)
    with pytest.raises(RuntimeError, match="level -1 is out of range"):
        linear(w, x, level=-1)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(21,\), got \[22\]"):
        linear(w, x, bias=torch.randn(22))
    with pytest.raises(RuntimeError, match=r"bias must have shape \(21,\)"):
        linear(w, x, bias=torch.randn(1, 21))
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        linear(w, x, activation="tanh")
    with pytest.raises(RuntimeError, match=r"x must have shape \(\.\.\., K\)"):
        linear(w, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_linear: {NARROW[fmt.name]}"):
        linear(w, torch.randn(2, 20))


def test_non_contiguous(fmt, w):
    x = torch.randn(2, K)
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_linear: x must be contiguous"):
        linear(w, torch.randn(K, 2).T)
    with pytest.raises(RuntimeError, match="values must be contiguous"):
        linear(w, x, values=torch.randn(2 * w.values.numel())[::2])
    for name, t in zip(w.index_names, w.index_tensors()):
        with pytest.raises(RuntimeError, match=rf"{fmt.name}_linear: {name} must be contiguous"):
            linear(w, x, **{name: noncontiguous(t)})
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_linear: bias must be contiguous"):
        linear(w, x, bias=noncontiguous(torch.randn(M)))
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_conv2d: x must be contiguous"):
        conv2d(w, torch.randn(1, 5, 5, 3).permute(0, 3, 1, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_device_mismatch(fmt, w, kind):
    op = f"{fmt.name}_{kind}"
    x = torch.randn(2, K) if kind == "linear" else torch.randn(1, 3, 5, 5)
    call = linear if kind == "linear" else conv2d
    gpu = w.to("cuda")
    gpu_arrays = dict(zip(["values", *w.index_names], arrays(gpu)))
    # Any CUDA tensor sends the call to the op's CUDA kernel: x on the CPU with the weight on the GPU, the reverse,
    # and a weight with one array (or the bias) left on the CPU.
    cases = [
        (x, dict(values=w.values.cuda()), rf"{op}: x must be a CUDA tensor, got cpu"),
        (x.cuda(), {}, rf"{op}: x is on cuda:0 but values are on cpu"),
        (x.cuda(), dict(gpu_arrays, bias=torch.randn(M)), rf"{op}: bias is on cpu but values are on cuda:0"),
    ]
    cases += [
        (x.cuda(), dict(gpu_arrays, **{name: t}), rf"{op}: {name} is on cpu but the input is on cuda:0")
        for name, t in zip(w.index_names, w.index_tensors())
    ]
    for xi, changes, message in cases:
        if has_kernel(op, "cuda"):
            with pytest.raises(RuntimeError, match=message):
                call(w, xi, **changes)
        else:  # no CUDA kernel: the dispatcher refuses the call
            with pytest.raises(
                NotImplementedError, match=rf"Could not run 'nestsparse::{op}' with arguments from the 'CUDA' backend"
            ):
                call(w, xi, **changes)


def test_bad_plan_is_refused(fmt, w):
    x = torch.randn(2, K)
    unit, units = UNIT[fmt.name], fmt.units(w)
    good = w.plan(2)
    linear(w, x, plan=good)
    with pytest.raises(RuntimeError, match=rf"plan row 0 must run from 0 to {unit}={units}, got 0 \.\. 5"):
        linear(w, x, plan=torch.tensor([[0, 5]] + [[0, 99]] * (L - 1), dtype=torch.int32))
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        linear(w, x, plan=torch.zeros(L, 3))
    with pytest.raises(RuntimeError, match=r"plan must be a contiguous int32 CPU tensor of shape \(L=3, chunks\+1\)"):
        linear(w, x, plan=good[:2].contiguous())  # one level short
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        linear(w, x, plan=good.float())
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        linear(w, x, plan=good[:, :1].contiguous())  # no chunk
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        linear(w, x, plan=good.T.contiguous().T)
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        linear(w, x, plan=good[0])
    other = torch.tensor([[0, 2, 5]] * 3, dtype=torch.int32)  # built for a weight of 5 rows or block rows
    with pytest.raises(RuntimeError, match=rf"plan row 1 must run from 0 to {unit}={units}, got 0 \.\. 5"):
        linear(w, x, level=1, plan=other)
    with pytest.raises(RuntimeError, match=rf"plan row 0 must run from 0 to {unit}={units}, got 1 \.\. {units}"):
        linear(w, x, plan=torch.tensor([[1, units]] * 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"plan row 2 is not non-decreasing at 2"):
        linear(w, torch.randn(40, K), level=2, plan=torch.tensor([[0, 2, 1, units]] * 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"plan row 0 is not non-decreasing"):
        linear(w, x, plan=torch.tensor([[0, -1, units]] * 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_conv2d: plan row 0 must run from 0 to {unit}={units}"):
        conv2d(w, torch.randn(1, 3, 5, 5), plan=other)


def plan(fmt, w, num_chunks=2, **changes):
    """<format>_plan of ``w``'s arrays (and NBCR's rows per block), any replaced by its schema name."""
    op = getattr(OPS, f"{fmt.name}_plan")
    names = schema_names(op)
    kw = {n: t for n, t in zip(w.index_names, w.index_tensors()) if n in names}
    if "rows_per_block" in names:
        kw["rows_per_block"] = BS[0]
    assert set(changes) <= set(names), f"{op} has no argument {set(changes) - set(names)}"
    kw.update(changes, num_chunks=num_chunks)
    return op(**kw)


def plan_errors(fmt, w):
    """Bad arguments of <format>_plan as (changes by schema name, the message after "<format>_plan: ")."""
    if fmt.name == "ncsr":
        rp = w.row_ptr.clone()
        rp[4] = -5
        return [
            (dict(row_ptr=w.row_ptr.long()), r"row_ptr must be a 1-D int32 tensor of length M\+1, got Long"),
            (dict(row_ptr=w.row_ptr[:0]), r"row_ptr must be a 1-D int32 tensor of length M\+1, got Int \[0\]"),
            (dict(row_end=w.row_end.long()), "row_end must be int32, got Long"),
            (dict(row_end=noncontiguous(w.row_end)), "row_end must be contiguous"),
            (dict(row_ptr=noncontiguous(w.row_ptr)), "row_ptr must be contiguous"),
            (dict(row_end=w.row_end[0].contiguous()), r"row_end must have shape \(L, M\), got \[21\]"),
            (dict(row_end=w.row_end[:, :-1].contiguous()), r"row_end must have shape \(L, M=21\), got \[3, 20\]"),
            (dict(row_ptr=rp), r"row_ptr is not non-decreasing: row_ptr\[3\] = \d+ > row_ptr\[4\] = -5"),
        ]
    B = w.num_blocks
    bp = w.block_ptr.clone()
    bp[1] = B + 3
    errors = [(dict(rows_per_block=bm), rf"block rows must lie in \[1, 256\], got {bm}") for bm in (0, 257)]
    return errors + [
        (dict(block_ptr=w.block_ptr.long()), "block_ptr and counts must be contiguous int32 CPU tensors, got Long"),
        (
            dict(counts=w.counts.transpose(0, 1).contiguous().transpose(0, 1)),
            "block_ptr and counts must be contiguous int32",
        ),
        (dict(counts=w.counts[..., 0].contiguous()), r"counts must have shape \(L, B, 2\)"),
        (dict(block_ptr=w.block_ptr[:0]), "block_ptr must be 1-D"),
        (dict(counts=w.counts[:, :-1].contiguous()), rf"block_ptr must run from 0 to B={B - 1}, got 0 \.\. {B}"),
        (dict(block_ptr=bp), "block_ptr is not non-decreasing at 1"),
    ]


def test_plan_arguments_are_checked(fmt, w):
    assert plan(fmt, w).shape == (L, 3)
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_plan: num_chunks must be >= 1, got 0"):
        w.plan(0)
    with pytest.raises(RuntimeError, match=rf"at most {UNIT[fmt.name]} \+ 1024"):
        w.plan(10**7)
    for changes, message in plan_errors(fmt, w):
        with pytest.raises(RuntimeError, match=rf"{fmt.name}_plan: {message}"):
            plan(fmt, w, **changes)


def test_conv_argument_errors(fmt, w):
    op = f"{fmt.name}_conv2d"
    x = torch.randn(1, 3, 5, 5)
    conv2d(w, x)
    with pytest.raises(RuntimeError, match=rf"{op}: x must be NCHW"):
        conv2d(w, torch.randn(3, 5, 5))
    with pytest.raises(RuntimeError, match=r"input channels \(3\) are not divisible by groups \(2\)"):
        conv2d(w, x, groups=2)
    with pytest.raises(RuntimeError, match=r"output channels \(21 weight rows\) are not divisible by groups \(2\)"):
        conv2d(w, torch.randn(1, 4, 5, 5), groups=2)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        conv2d(w, torch.randn(1, 3, 2, 2))
    with pytest.raises(RuntimeError, match="kernel_size must be positive"):
        conv2d(w, x, kernel_size=0)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        conv2d(w, x, stride=0)
    with pytest.raises(RuntimeError, match="padding must be non-negative"):
        conv2d(w, x, padding=-1)
    with pytest.raises(RuntimeError, match="dilation must be positive"):
        conv2d(w, x, dilation=0)
    with pytest.raises(RuntimeError, match="groups must be positive, got 0"):
        conv2d(w, x, groups=0)
    with pytest.raises(RuntimeError, match=rf"{op}: level 3 is out of range"):
        conv2d(w, x, level=3)
    with pytest.raises(RuntimeError, match=rf"{op}: bias must have shape \(21,\)"):
        conv2d(w, x, bias=torch.randn(3))
    with pytest.raises(RuntimeError, match=rf"{op}: unknown activation 'swish'"):
        conv2d(w, x, activation="swish")
    # The weight has 27 columns (3 channels x 3x3); read as a 2-channel 3x3 conv, K is 18.
    outside = {
        "ncsr": r"col_idx\[\d+\] = (1[89]|2[0-6]) \(row \d+\) is outside \[0, K=18\)",
        "nbcr": r"block \d+ \(block column 2\) keeps local column \d at indices\[\d+\], outside \[0, 2\) "
        r"for K=18",
    }
    with pytest.raises(RuntimeError, match=rf"{op}: {outside[fmt.name]}"):
        conv2d(w, torch.randn(1, 2, 5, 5))


def test_conv_geometry_errors(fmt):
    wc = fmt.random((6, 2, 3, 3), 1, torch.Generator().manual_seed(1), density=0.5, block_shape=BS, odd=False)

    def conv(x, **kw):
        a = dict(kernel_size=(3, 3), stride=1, padding=0, dilation=1, groups=2)
        a.update(kw)
        return wc.conv2d(x, 0, a["kernel_size"], None, a["stride"], a["padding"], a["dilation"], a["groups"])

    conv(torch.randn(1, 4, 5, 5))
    with pytest.raises(RuntimeError, match="NCHW"):
        conv(torch.randn(4, 5, 5))
    with pytest.raises(RuntimeError, match="not divisible by groups"):
        conv(torch.randn(1, 5, 5, 5))
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        conv(torch.randn(1, 4, 2, 2))
    with pytest.raises(RuntimeError, match="stride must be positive"):
        conv(torch.randn(1, 4, 5, 5), stride=0)
    # The weight has 18 columns (2 channels per group x 3x3); read as a 1-channel 3x3 conv, K is 9.
    outside = {
        "ncsr": r"col_idx\[\d+\] = (9|1[0-7]) \(row \d+\) is outside \[0, K=9\)",
        "nbcr": r"block \d+ \(block column 1\) keeps local column [1-7] at indices\[\d+\], outside \[0, 1\) "
        r"for K=9",
    }
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_conv2d: {outside[fmt.name]}"):
        wc.conv2d(torch.randn(1, 1, 5, 5), 0, (3, 3))


@pytest.mark.parametrize(
    "geometry,message",
    [
        (
            dict(kernel_size=(5, 1), dilation=(2**62, 1)),  # dh * (kh - 1) would wrap around
            "kernel_size, stride and dilation must be at most 65536",
        ),
        (
            dict(kernel_size=(2**32, 2**32), padding=(2**31, 2**31)),  # K = Cin * kh * kw would wrap around
            "kernel_size, stride and dilation must be at most 65536",
        ),
        (dict(kernel_size=(1, 1), padding=(2**40, 0)), "padding must be at most 16777216"),
    ],
    ids=["dilation", "kernel", "padding"],
)
def test_conv_geometry_that_would_overflow_is_refused(fmt, geometry, message):
    wo = fmt.weight(torch.randn(2, 1, 1, 2), torch.zeros(2, 1, 1, 2, dtype=torch.int8), 1, block_shape=(2, 2))
    a = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1))
    a.update(geometry)
    with pytest.raises(RuntimeError, match=rf"{fmt.name}_conv2d: {message}"):
        wo.conv2d(torch.randn(1, 1, 1, 2), 0, a["kernel_size"], None, a["stride"], a["padding"], a["dilation"])


def test_backward_ops_check_their_arguments(fmt, w):
    lin, conv = f"{fmt.name}_linear_backward", f"{fmt.name}_conv2d_backward"
    x = torch.randn(3, K)
    with pytest.raises(RuntimeError, match=rf"{lin}: grad_z must have shape \[3, 21\], got \[3, 20\]"):
        raw(fmt, w, "linear_backward", grad_z=torch.randn(3, 20), x=x)
    with pytest.raises(RuntimeError, match=rf"{lin}: level 3 is out of range"):
        raw(fmt, w, "linear_backward", level=3, grad_z=torch.randn(3, M), x=x)
    xc = torch.randn(2, 3, 7, 6)
    geometry = dict(kernel_size=[3, 3], stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=1)
    with pytest.raises(RuntimeError, match=rf"{conv}: grad_z must have shape \[2, 21, 4, 3\], got \[2, 21, 3, 3\]"):
        raw(fmt, w, "conv2d_backward", grad_z=torch.randn(2, M, 3, 3), x=xc, **geometry)
    with pytest.raises(RuntimeError, match=rf"{conv}: grad_z must have shape \[2, 21, 4, 3\], got \[2, 25, 4, 3\]"):
        raw(fmt, w, "conv2d_backward", grad_z=torch.randn(2, 25, 4, 3), x=xc, **geometry)
    with pytest.raises(RuntimeError, match=rf"{conv}: level -1 is out of range"):
        raw(fmt, w, "conv2d_backward", level=-1, grad_z=torch.randn(2, M, 4, 3), x=xc, **geometry)
    with pytest.raises(RuntimeError, match=rf"{conv}: x is Double but values are Float"):
        raw(fmt, w, "conv2d_backward", grad_z=torch.randn(2, M, 4, 3), x=xc.double(), **geometry)
    with pytest.raises(RuntimeError, match=rf"{conv}: stride must be positive"):
        raw(fmt, w, "conv2d_backward", grad_z=torch.randn(2, M, 4, 3), x=xc, **dict(geometry, stride=[0, 2]))


# Int lists of the wrong length, straight through torch.ops (past the Python wrappers' pair conversion): every
# int[2] argument of every op (the convolution's geometry; NBCR's block_shape).
LIST_ENTRY = {"block_shape": BS[0], "kernel_size": 3, "stride": 1, "padding": 0, "dilation": 1}  # a valid entry
GEOMETRY_LISTS = ("kernel_size", "stride", "padding", "dilation")
OWN_LISTS = {"ncsr": (), "nbcr": ("block_shape",)}


def int_lists(op):
    return [a.name for a in op.default._schema.arguments if str(a.type) == "List[int]"]


def _list_message(op, which):
    # Every kernel (Autograd, CPU) refuses the list by its name when it unpacks the arguments.
    return rf"{op}: {which} must have 2 entries, got \["


def check_int_lists(fmt, w, kinds):
    """Every int list of the ops ``kinds``, one entry short and one too many, is refused by name; returns the
    (kind, list) pairs checked."""
    checked = set()
    for kind in kinds:
        op = f"{fmt.name}_{kind}"
        for which in int_lists(getattr(OPS, op)):
            for length in (1, 3):
                with pytest.raises(RuntimeError, match=_list_message(op, which)):
                    raw(fmt, w, kind, **{which: [LIST_ENTRY[which]] * length})
            checked.add((kind, which))
    return checked


def expected_lists(fmt, kinds):
    return {
        (kind, which)
        for kind in kinds
        for which in OWN_LISTS[fmt.name] + (GEOMETRY_LISTS if kind.startswith("conv2d") else ())
    }


def test_int_lists_of_wrong_length_are_refused(fmt, w):
    # The Autograd kernel (csrc/ops/autograd.cpp) once packed rows and the int lists into one vector and read them
    # back at fixed offsets: unchecked, [8] read past the vector's end (a garbage block dimension in the message),
    # [8, 8, 8] was silently cut to [8, 8], and every int argument after a bad conv list was shifted (the message
    # named another argument, "groups must be positive, got 0", or the call ran with shifted geometry).
    assert check_int_lists(fmt, w, KINDS) == expected_lists(fmt, KINDS)


def test_int_lists_of_wrong_length_are_refused_below_autograd(fmt, w):
    kinds = ["linear", "conv2d"]
    with torch.inference_mode():  # skips the Autograd kernel: the CPU kernels' own checks name the problem
        assert check_int_lists(fmt, w, kinds) == expected_lists(fmt, kinds)


def test_python_level_errors(fmt):
    model = nestsparse.convert(
        nn.Sequential(nn.Linear(4, 3)), {"0": torch.zeros(3, 4, dtype=torch.int8)}, format=fmt.name
    )
    assert model[0].format == fmt.name
    with pytest.raises(ValueError, match="level 5 is out of range"):
        nestsparse.set_level(model, 5)
    with pytest.raises(ValueError, match="level 1 is out of range"):
        model[0](torch.randn(1, 4), level=1)
    with pytest.raises(KeyError, match="no module named 'missing'"):
        nestsparse.convert(nn.Sequential(nn.Linear(4, 3)), {"missing": torch.zeros(3, 4)}, format=fmt.name)


def test_modules_check_input_width(fmt):
    lin = nestsparse.convert(
        nn.Sequential(nn.Linear(20, 10)), {"0": torch.zeros(10, 20, dtype=torch.int8)}, format=fmt.name
    )
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 20\)"):
        lin(torch.randn(3, 21))
    conv = nestsparse.convert(
        nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), {"0": torch.zeros(6, 2, 3, 3, dtype=torch.int8)}, format=fmt.name
    )
    assert lin[0].format == conv[0].format == fmt.name
    with pytest.raises(ValueError, match="expected NCHW input with 4 channels"):
        conv(torch.randn(1, 6, 8, 8))


@pytest.mark.parametrize("stride", [(16384, 16384), (65535, 3), (7, 65535)])
def test_a_huge_stride_costs_what_the_input_costs(fmt, stride):
    # The phase buffer is sized by the stride: a 1-pixel input at stride 65535 asked for 17 GB. Now the work is
    # bounded by the input; the result equals torch's (one output pixel per image here, or a few).
    w = fmt.random((4, 3, 3, 3), 1, torch.Generator().manual_seed(4), density=0.6, block_shape=BS)
    dense = w.to_dense(0)
    for hw in [(1, 1), (5, 9)]:
        x = torch.randn(2, 3, *hw)
        out = w.conv2d(x, 0, (3, 3), None, stride, 1, 1, 1)
        torch.testing.assert_close(out, torch.nn.functional.conv2d(x, dense, None, stride, 1), rtol=1e-5, atol=1e-5)


def test_nbcr_value_gradients_refuse_blocks_that_share_value_slots():
    # Unvalidated blocks may point at the same values: their gradients would overwrite each other. The forward is
    # defined (a shared value is used twice), the value gradient is refused by name.
    w = FormatCase("nbcr").random((8, 8), 1, torch.Generator().manual_seed(5), density=1.0, block_shape=(4, 4))
    blocks = w.blocks.clone()
    assert blocks.shape[0] >= 2
    blocks[1, 1] = blocks[0, 1]  # block 1 reads block 0's values
    x = torch.randn(3, 8)
    values = w.values.clone().requires_grad_(True)
    args = [list(a) if isinstance(a, tuple) else a for a in w.op_args()]
    y = OPS.nbcr_linear(x, values, w.indices, w.block_ptr, blocks, w.counts, 0, *args)
    with pytest.raises(RuntimeError, match=r"block 1 has value offset 0 but the blocks before it fill \d+ values"):
        y.sum().backward()


def test_deferred_checks_leave_the_cpu_ops_raising_at_once(fmt):
    # Deferred checks are the CUDA ops' (no host sync there); a CPU op raises at the call in either mode, and the
    # switch and check work on every build, with or without CUDA.
    w = fmt.random((9, 12), 2, odd=False)
    bad = dataclasses.replace(w, values=w.values.clone())
    if fmt.name == "ncsr":
        bad.col_idx = w.col_idx.clone()
        bad.col_idx[-1] = 12  # read by the kernel, found there
    before = nestsparse.set_deferred_checks(True)
    try:
        with pytest.raises(RuntimeError, match="col_idx" if fmt.name == "ncsr" else "level"):
            bad.linear(torch.randn(3, 12), 0 if fmt.name == "ncsr" else 7)
        nestsparse.check_errors()
    finally:
        nestsparse.set_deferred_checks(before)
    with nestsparse.deferred_checks():
        w.linear(torch.randn(3, 12), 1)
