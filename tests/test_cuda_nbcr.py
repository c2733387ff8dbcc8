"""The CUDA nested BCR ops: every op against a float64 reference on odd shapes (outputs poisoned) and block shapes
(1x1 to 256x256, partial edge blocks, blocks taller than a tile), every dtype (tensor cores for float16 / bfloat16),
with and without the plan, the epilogue, gradients (gradcheck in float64, and against the CPU ops), opcheck and
torch.compile, the plan cache, bad indices (immediate and deferred checks), determinism and CUDA graph capture.
Skipped without a GPU; the CPU ops have the same tests in test_linear.py, test_conv2d.py and test_op_conventions.py."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import nestsparse
from nestsparse import NestedBCR, NestedSparseConv2d, NestedSparseLinear
from nestsparse.activations import ACTIVATIONS

from conftest import (
    activation_reference,
    assert_close_to_reference,
    has_kernel,
    linear_reference,
    random_bcr_tags,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not has_kernel("nbcr_conv2d", "cuda"),
    reason="needs a GPU and a CUDA build of nestsparse",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DEVICE = "cuda"


def weight(M, K, block_shape=(8, 8), levels=3, keep=0.6, seed=0, dtype=torch.float32, **options):
    g = torch.Generator().manual_seed(seed)
    shape = (M, K) if isinstance(K, int) else (M, *K)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    tags = random_bcr_tags(shape, block_shape, levels, keep=keep, generator=g, **options)
    return NestedBCR.from_dense(w, tags, block_shape, num_levels=levels).validate()


def args_of(w):
    return (w.values, w.indices, w.block_ptr, w.blocks, w.counts)


# (batch, M, K, block shape): blocks from 1x1 to 256x256, partial edge blocks, K not a multiple of any width, blocks
# taller / wider than one tile (TM = 32 up to 32 rows, 64 above: 100 rows are two slices), batches below, at and
# above one tile of 128.
LINEAR_CASES = [
    (1, 33, 53, (8, 8)),
    (3, 1, 1, (1, 1)),
    (17, 70, 45, (32, 32)),
    (128, 64, 100, (16, 48)),
    (129, 77, 1000, (32, 32)),
    (5, 300, 77, (100, 7)),
    (300, 130, 257, (64, 64)),
    (40, 260, 300, (256, 256)),
]


@pytest.mark.parametrize("n,M,K,bs", LINEAR_CASES, ids=[f"n{n}-{M}x{K}-b{b[0]}x{b[1]}" for n, M, K, b in LINEAR_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_every_level_matches_float64(n, M, K, bs, dtype):
    w = weight(M, K, bs, dtype=dtype, seed=n + M + K)
    wc = w.to(DEVICE)
    plan = wc.plan()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, K, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(M, generator=g, dtype=torch.float64).to(dtype)
    for level in range(3):
        for i, act in enumerate(ACTIVATIONS):
            b = bias if (i + level) % 2 == 0 else None
            p = plan if (i + level) % 3 == 0 else None
            out = wc.linear(x.to(DEVICE), level, None if b is None else b.to(DEVICE), act, p)
            assert out.device.type == DEVICE and out.shape == (n, M) and out.dtype == dtype
            assert_close_to_reference(out.cpu(), linear_reference(x, w, level, b, act), dtype)


@pytest.mark.parametrize("n", [1, 3, 200])
def test_linear_epilogue_scale_and_residual(n):
    M, K = 70, 91
    w = weight(M, K, (16, 16))
    g = torch.Generator().manual_seed(2)
    x, bias, scale = torch.randn(n, K, generator=g), torch.randn(M, generator=g), torch.randn(M, generator=g)
    residual = torch.randn(n, M, generator=g)
    wc = w.to(DEVICE)
    out = nestsparse.ops.nbcr_linear(
        x.to(DEVICE),
        *args_of(wc),
        1,
        M,
        w.block_shape,
        bias.to(DEVICE),
        "relu",
        None,
        scale.to(DEVICE),
        residual.to(DEVICE),
    )
    assert_close_to_reference(out.cpu(), linear_reference(x, w, 1, bias, "relu", scale, residual), torch.float32)


@pytest.mark.parametrize("n", [1, 40, 130])
def test_empty_level_all_pruned_and_empty_batch(n):
    M, K = 19, 37
    w = weight(M, K, empty_level=1).to(DEVICE)
    bias = torch.randn(M).to(DEVICE)
    x = torch.randn(n, K).to(DEVICE)
    torch.testing.assert_close(w.linear(x, 2, bias, "relu"), torch.relu(bias).expand(n, M))
    none = weight(M, K, all_pruned=True).to(DEVICE)
    assert none.num_blocks == 0
    torch.testing.assert_close(none.linear(x, 0, bias), bias.expand(n, M))
    assert w.linear(torch.randn(0, K).to(DEVICE), 0).shape == (0, M)
    assert w.linear(torch.randn(2, 0, K).to(DEVICE), 1).shape == (2, 0, M)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# (batch, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, block shape): groups narrower than a block
# (depthwise, 6 groups of 1 row in 8-row blocks) and wider; 1x1 convolutions (the ResNet bottleneck shape).
CONV_CASES = [
    (1, 3, 5, 9, 11, 3, 1, 1, 1, 1, (8, 8)),
    (3, 4, 6, 10, 7, 3, 2, 1, 1, 2, (4, 9)),
    (2, 6, 6, 13, 9, 3, 2, 2, 2, 3, (8, 8)),
    (1, 8, 16, 17, 17, 1, 1, 0, 1, 1, (8, 8)),
    (2, 64, 96, 15, 15, 1, 2, 0, 1, 1, (32, 32)),
    (1, 5, 7, 20, 1, (3, 1), (2, 1), (1, 0), 1, 1, (3, 5)),
    (1, 6, 6, 8, 8, 3, 1, 1, 1, 6, (8, 8)),
    (2, 3, 4, 31, 33, 5, 3, 2, (2, 1), 1, (16, 16)),
    (1, 3, 4, 1, 1, 1, 1, 0, 1, 1, (1, 1)),
    (1, 64, 33, 14, 14, 3, 1, 1, 1, 1, (32, 32)),
    (1, 32, 80, 9, 9, 3, 1, 1, 1, 4, (64, 64)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"case{i}" for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_every_level_matches_float64(case, dtype):
    n, cin, cout, h, w_, k, s, p, d, g, bs = case
    k, s, p, d = pair(k), pair(s), pair(p), pair(d)
    w = weight(cout, (cin // g, *k), bs, dtype=dtype, seed=cin + cout)
    wc = w.to(DEVICE)
    plan = wc.plan()
    x = torch.randn(n, cin, h, w_, dtype=torch.float64).to(dtype)
    bias = torch.randn(cout, dtype=torch.float64).to(dtype)
    for level in range(3):
        z = F.conv2d(x.double(), w.to_dense(level).double(), None, s, p, d, g)
        for i, act in enumerate(ACTIVATIONS):
            b = bias if (i + level) % 2 == 0 else None
            ref = activation_reference(act)(z if b is None else z + b.double().view(1, -1, 1, 1))
            bc = None if b is None else b.to(DEVICE)
            out = wc.conv2d(x.to(DEVICE), level, k, bc, s, p, d, g, act, plan if i % 2 else None)
            assert out.shape == ref.shape and out.dtype == dtype
            assert_close_to_reference(out.cpu(), ref, dtype)


def test_gradcheck_linear_and_conv_float64():
    w = weight(13, 9, (4, 4), dtype=torch.float64).to(DEVICE)
    x = torch.randn(3, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(13, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for level in range(3):
        torch.autograd.gradcheck(
            lambda x, v, b, level=level: nestsparse.ops.nbcr_linear(
                x, v, *args_of(w)[1:], level, 13, w.block_shape, b, "gelu"
            ),
            (x, values, bias),
        )
    for shape, groups, bs in (((4, 3, 3, 2), 1, (4, 6)), ((6, 1, 3, 3), 6, (4, 4))):
        wc = weight(shape[0], shape[1:], bs, dtype=torch.float64).to(DEVICE)
        cin = shape[1] * groups
        xc = torch.randn(2, cin, 5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
        vc = wc.values.clone().requires_grad_()
        torch.autograd.gradcheck(
            lambda x, v, wc=wc, shape=shape, groups=groups: nestsparse.ops.nbcr_conv2d(
                x,
                v,
                *args_of(wc)[1:],
                1,
                shape[0],
                wc.block_shape,
                shape[2:],
                None,
                (2, 1),
                (1, 1),
                (1, 2),
                groups,
                "relu",
            ),
            (xc, vc),
            nondet_tol=1e-12,  # kernels larger than 1x1 add overlapping taps with atomics
        )


def cpu_grads(op, grad_z, x, w, *rest):
    """The CPU op's (grad_x, grad_values) in float64: the reference the CPU tests hold to float64 dense autograd."""
    wd = dataclasses.replace(w.to("cpu"), values=w.values.cpu().double())
    return op(grad_z.double().cpu(), x.double().cpu(), *args_of(wd), *rest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n,M,K,bs",
    # The last: block columns wider than a tile (TM-slices over W^T), more kept rows per block column than one piece
    # holds, and a batch that takes 16-byte loads.
    [(1, 90, 130, (8, 8)), (33, 90, 130, (32, 32)), (300, 90, 130, (64, 16)), (256, 600, 300, (32, 128))],
)
def test_linear_gradients_match_the_cpu_op(dtype, n, M, K, bs):
    w = weight(M, K, bs, dtype=dtype)
    level = 1
    g = torch.Generator().manual_seed(n)
    x, gy = torch.randn(n, K, generator=g).to(dtype), torch.randn(n, M, generator=g).to(dtype)
    wc = w.to(DEVICE)
    xc = x.to(DEVICE).requires_grad_()
    vc = wc.values.clone().requires_grad_()
    out = nestsparse.ops.nbcr_linear(xc, vc, *args_of(wc)[1:], level, M, bs)
    out.backward(gy.to(DEVICE))
    gx, gv = cpu_grads(torch.ops.nestsparse.nbcr_linear_backward, gy, x, w, level, M, list(bs))
    assert_close_to_reference(xc.grad.cpu(), gx, dtype)
    assert_close_to_reference(vc.grad.cpu(), gv, dtype)


@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (1, 2, 4, 6, 10)], ids=["g2", "g3-dil", "1x1", "dw", "g4"])
def test_conv_gradients_match_the_cpu_op(case):
    n, cin, cout, h, w_, k, s, p, d, groups, bs = case
    k, s, p, d = pair(k), pair(s), pair(p), pair(d)
    w = weight(cout, (cin // groups, *k), bs, seed=5)
    level = 0
    x = torch.randn(n, cin, h, w_)
    y = F.conv2d(x, w.to_dense(level), None, s, p, d, groups)
    gy = torch.randn(y.shape)
    wc = w.to(DEVICE)
    xc = x.to(DEVICE).requires_grad_()
    vc = wc.values.clone().requires_grad_()
    out = nestsparse.ops.nbcr_conv2d(xc, vc, *args_of(wc)[1:], level, cout, bs, k, None, s, p, d, groups)
    out.backward(gy.to(DEVICE))
    geometry = (list(k), list(s), list(p), list(d), groups)
    gx, gv = cpu_grads(torch.ops.nestsparse.nbcr_conv2d_backward, gy, x, w, level, cout, list(bs), *geometry)
    assert_close_to_reference(xc.grad.cpu(), gx, torch.float32)
    assert_close_to_reference(vc.grad.cpu(), gv, torch.float32)


def test_linear_and_1x1_backward_are_deterministic_3x3_alerts():
    # Under torch.use_deterministic_algorithms the linear and 1x1 backward ops run (no alert) and repeat bit for bit;
    # a 3x3 kernel's adds overlapping taps with atomics and raises.
    w = weight(40, 50, (8, 8)).to(DEVICE)
    x = torch.randn(6, 50, device=DEVICE)
    gy = torch.randn(6, 40, device=DEVICE)
    w1 = weight(40, (50, 1, 1), (8, 8)).to(DEVICE)
    x1 = torch.randn(2, 50, 5, 5, device=DEVICE)
    gy1 = torch.randn(2, 40, 4, 4, device=DEVICE)
    wc = weight(8, (4, 3, 3), (8, 8)).to(DEVICE)
    xc = torch.randn(1, 4, 6, 6, device=DEVICE)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = torch.ops.nestsparse.nbcr_linear_backward(gy, x, *args_of(w), 0, 40, [8, 8])
        b = torch.ops.nestsparse.nbcr_linear_backward(gy, x, *args_of(w), 0, 40, [8, 8])
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        geometry = ([1, 1], [2, 2], [1, 1], [1, 1], 1)  # strided and padded: still one tap per input element
        a = torch.ops.nestsparse.nbcr_conv2d_backward(gy1, x1, *args_of(w1), 0, 40, [8, 8], *geometry)
        b = torch.ops.nestsparse.nbcr_conv2d_backward(gy1, x1, *args_of(w1), 0, 40, [8, 8], *geometry)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        with pytest.raises(RuntimeError, match="nbcr_conv2d_backward"):
            torch.ops.nestsparse.nbcr_conv2d_backward(
                torch.randn(1, 8, 6, 6, device=DEVICE),
                xc,
                *args_of(wc),
                0,
                8,
                [8, 8],
                [3, 3],
                [1, 1],
                [1, 1],
                [1, 1],
                1,
            )
    finally:
        torch.use_deterministic_algorithms(before)


def test_opcheck_cuda_ops():
    w = weight(19, 21, (8, 8)).to(DEVICE)
    a = (*args_of(w), 1, 19, [8, 8])
    for n in (1, 140):
        x = torch.randn(n, 21, device=DEVICE, requires_grad=True)
        bias = torch.randn(19, device=DEVICE, requires_grad=True)
        opcheck(torch.ops.nestsparse.nbcr_linear, (x, *a, bias, "relu", w.plan(), None, None))
        opcheck(torch.ops.nestsparse.nbcr_linear_backward, (torch.randn(n, 19, device=DEVICE), x.detach(), *a))
    opcheck(torch.ops.nestsparse.nbcr_plan, (w.block_ptr, w.counts, 8, 4))
    wc = weight(6, (4, 3, 3), (4, 4)).to(DEVICE)
    xc = torch.randn(2, 4, 7, 7, device=DEVICE, requires_grad=True)
    ca = (*args_of(wc), 2, 6, [4, 4])
    opcheck(torch.ops.nestsparse.nbcr_conv2d, (xc, *ca, [3, 3], None, [1, 1], [1, 1], [1, 1], 1, "none"))
    opcheck(
        torch.ops.nestsparse.nbcr_conv2d_backward,
        (torch.randn(2, 6, 7, 7, device=DEVICE), xc.detach(), *ca, [3, 3], [1, 1], [1, 1], [1, 1], 1),
    )


def block_rows_work(w, level):
    rc = w.counts[level].long()
    work = rc[:, 0] * rc[:, 1]
    rows = torch.repeat_interleave(torch.arange(len(w.block_ptr) - 1), w.block_ptr.diff().long())
    return torch.zeros(len(w.block_ptr) - 1, dtype=torch.long).index_add_(0, rows, work)


def test_plan_orders_block_rows_by_work_and_is_cached():
    w = weight(300, 200, (16, 16))
    plan = w.to(DEVICE).plan()
    assert plan.device.type == DEVICE and plan.dtype == torch.int32 and plan.shape == (3, 19)
    for level in range(3):
        order = plan[level].cpu().long()
        assert torch.equal(order.sort().values, torch.arange(19))
        work = block_rows_work(w, level)[order]
        assert (work[:-1] >= work[1:]).all()
    tags = random_bcr_tags((300, 200), (32, 32), 3)
    m = NestedSparseLinear.from_dense(torch.nn.Linear(200, 300), tags, num_levels=3, format="nbcr").to(DEVICE)
    p1 = m.plan()
    assert p1 is not None and p1.device.type == DEVICE and m.plan() is p1  # cached
    m.cpu()
    assert m.plan().device.type == "cpu"  # a CPU partition, rebuilt
    m.to(DEVICE)
    assert torch.equal(m.plan(), p1)


def corrupted(kind):
    """A (40, 60) weight in (8, 8) blocks with one bad entry that levels 0 and 1 both read."""
    w = weight(40, 60, (8, 8), keep=0.9, empty_blocks=0, level0_only_blocks=0)
    b = int((w.counts[1, :, 0] > 0).nonzero()[0])
    io = int(w.blocks[b, 2])
    if kind == "row":
        w.indices[io] = 8  # a local row outside the block
    elif kind == "column":
        w.indices[io + int(w.counts[0, b, 0])] = -1
    elif kind == "block_column":
        w.blocks[b, 0] = 100
    elif kind == "counts":
        w.counts[:, b, 0] = 9  # more rows than the block has
    elif kind == "value_offset":
        w.blocks[b, 1] = w.values.numel()
    return w


@pytest.mark.parametrize("kind", ["row", "column", "block_column", "counts", "value_offset"])
@pytest.mark.parametrize("n", [1, 140])
def test_bad_indices_raise_naming_the_block(kind, n):
    w = corrupted(kind).to(DEVICE)
    a = args_of(w)
    x = torch.randn(n, 60, device=DEVICE)
    for level in (0, 1):
        with pytest.raises(RuntimeError, match=r"block \d+"):
            torch.ops.nestsparse.nbcr_linear(x, *a, level, 40, [8, 8], None, "none", None, None, None)
    xc = torch.randn(1, 60, 3, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"block \d+"):
        torch.ops.nestsparse.nbcr_conv2d(xc, *a, 1, 40, [8, 8], [1, 1], None, [1, 1], [0, 0], [1, 1], 1, "none", None)
    with pytest.raises(RuntimeError, match=r"block \d+"):
        torch.ops.nestsparse.nbcr_linear_backward(torch.randn(n, 40, device=DEVICE), x, *a, 1, 40, [8, 8])
    with pytest.raises(RuntimeError, match=r"block \d+"):
        torch.ops.nestsparse.nbcr_conv2d_backward(
            torch.randn(1, 40, 3, 3, device=DEVICE), xc, *a, 1, 40, [8, 8], [1, 1], [1, 1], [0, 0], [1, 1], 1
        )


def test_bad_block_ptr_and_plan_raise():
    w = weight(40, 60, (8, 8)).to(DEVICE)
    x = torch.randn(3, 60, device=DEVICE)
    bad_ptr = w.block_ptr.clone()
    bad_ptr[2] = w.num_blocks + 5
    short = w.block_ptr.clone()
    short[-1] -= 1  # the last block belongs to no block row
    for ptr in (bad_ptr, short):
        with pytest.raises(RuntimeError, match="block_ptr is not non-decreasing from 0 to B"):
            torch.ops.nestsparse.nbcr_linear(x, w.values, w.indices, ptr, w.blocks, w.counts, 0, 40, [8, 8])
        with pytest.raises(RuntimeError, match="block_ptr is not non-decreasing from 0 to B"):
            torch.ops.nestsparse.nbcr_linear_backward(
                torch.randn(3, 40, device=DEVICE), x, w.values, w.indices, ptr, w.blocks, w.counts, 0, 40, [8, 8]
            )
    plan = w.plan().clone()
    plan[0, 1] = 1000
    with pytest.raises(RuntimeError, match="plan names"):
        w.linear(x, 0, None, "none", plan)
    with pytest.raises(RuntimeError, match="plan must be"):
        w.linear(x, 0, None, "none", w.to("cpu").plan())


def test_deferred_checks_never_sync_and_raise_on_request():
    good = weight(40, 60, (8, 8)).to(DEVICE)
    bad = corrupted("row").to(DEVICE)
    x = torch.randn(3, 60, device=DEVICE)
    nestsparse.check_errors()  # clear anything earlier
    before = nestsparse.set_deferred_checks(True)
    try:
        good.linear(x, 0)
        nestsparse.check_errors()  # nothing to report
        assert bad.linear(x, 0).shape == (3, 40)  # no exception at the op
        with pytest.raises(RuntimeError, match=r"1 block\(s\) outside their bounds"):
            nestsparse.check_errors()
        nestsparse.check_errors()  # cleared by the previous check
    finally:
        nestsparse.set_deferred_checks(before)


def test_torch_compile_and_cuda_graph_of_nbcr_modules():
    tags = random_bcr_tags((48, 64), (16, 16), 2)
    m = NestedSparseLinear.from_dense(
        torch.nn.Linear(64, 48), tags, num_levels=2, format="nbcr", block_shape=(16, 16)
    ).to(DEVICE, torch.float16)
    ctags = random_bcr_tags((16, 8, 3, 3), (8, 8), 2)
    conv = NestedSparseConv2d.from_dense(
        torch.nn.Conv2d(8, 16, 3, padding=1), ctags, num_levels=2, format="nbcr", block_shape=(8, 8)
    ).to(DEVICE)
    x = torch.randn(200, 64, device=DEVICE).half()
    xc = torch.randn(2, 8, 10, 10, device=DEVICE)
    for level in (0, 1):
        nestsparse.set_level(m, level)
        nestsparse.set_level(conv, level)
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))
        torch.testing.assert_close(torch.compile(conv, fullgraph=True)(xc), conv(xc))
    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up (and build the plans) outside the capture
                m(x), conv(xc)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, yc = m(x), conv(xc)
        x.copy_(torch.randn(200, 64, device=DEVICE).half())
        xc.copy_(torch.randn(2, 8, 10, 10, device=DEVICE))
        graph.replay()
        torch.testing.assert_close(y, m(x))
        torch.testing.assert_close(yc, conv(xc))
    nestsparse.check_errors()
