"""The CUDA nested CSR ops: every op against a float64 reference on odd shapes (outputs poisoned), every dtype and
index dtype, both kernels (batch <= 32 and larger), with and without the plan, unaligned buffers, the epilogue,
gradients (gradcheck in float64), opcheck and torch.compile, the plan cache, bad indices (immediate and deferred
checks) and CUDA graph capture. Skipped without a GPU; the CPU ops have the same tests in test_linear.py,
test_conv2d.py and test_op_conventions.py."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import nestsparse
from nestsparse import NestedCSR, NestedSparseConv2d, NestedSparseLinear
from nestsparse.activations import ACTIVATIONS

from conftest import (
    activation_reference,
    assert_close_to_reference,
    has_kernel,
    linear_reference,
    random_tags,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not has_kernel("ncsr_conv2d", "cuda"),
    reason="needs a GPU and a CUDA build of nestsparse",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def weight(M, K, levels=3, density=0.4, seed=0, dtype=torch.float32, index_dtype=None, empty_level=None):
    g = torch.Generator().manual_seed(seed)
    shape = (M, K) if isinstance(K, int) else (M, *K)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    tags = random_tags(shape, levels, density, empty_rows=min(2, M - 1), empty_level=empty_level, generator=g)
    nw = NestedCSR.from_dense(w, tags, num_levels=levels)
    if index_dtype is not None:
        nw.col_idx = nw.col_idx.to(index_dtype)
    return nw.validate()


# (batch, M, K): batch <= 32 runs the sub-warp kernel (NB = 1, 2, 4, 8, 16, 32), larger the staged one. Rows of
# every length class (K from 1 to 5000 at density 0.4 and below), K not a multiple of any vector width.
LINEAR_CASES = [
    (1, 33, 53),
    (1, 1000, 1000),
    (2, 17, 129),
    (3, 1, 1),
    (5, 77, 17),
    (16, 3, 77),
    (17, 53, 1000),
    (32, 129, 777),
    (33, 17, 53),
    (100, 77, 1000),
    (129, 40, 5000),
    (300, 9, 3),
]


@pytest.mark.parametrize("n,M,K", LINEAR_CASES, ids=[f"n{n}-{M}x{K}" for n, M, K in LINEAR_CASES])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_linear_every_level_matches_float64(n, M, K, activation):
    w = weight(M, K, seed=n + M + K)
    wc = w.to("cuda")
    plan = wc.plan()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, K, generator=g)
    bias = torch.randn(M, generator=g)
    for level in range(3):
        for i, b in enumerate((bias, None)):
            p = plan if (i + level) % 2 == 0 else None
            out = wc.linear(x.cuda(), level, None if b is None else b.cuda(), activation, p)
            assert out.is_cuda and out.shape == (n, M)
            assert_close_to_reference(out.cpu(), linear_reference(x, w, level, b, activation), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("n", [1, 7, 32, 40])
def test_linear_dtypes_and_index_dtypes(dtype, index_dtype, n):
    M, K = 150, 515
    w = weight(M, K, dtype=dtype, index_dtype=index_dtype, seed=n).to("cuda")
    x = torch.randn(n, K, dtype=torch.float64).to(dtype)
    bias = torch.randn(M, dtype=torch.float64).to(dtype)
    plan = w.plan()
    for level in range(3):
        out = w.linear(x.cuda(), level, bias.cuda(), "gelu", plan)
        assert out.dtype == dtype
        assert_close_to_reference(out.cpu(), linear_reference(x, w, level, bias, "gelu"), dtype)


@pytest.mark.parametrize("n", [1, 5, 64])
def test_linear_unaligned_buffers_take_the_scalar_path(n):
    # values and col_idx sliced one entry in: contiguous, but not 16-byte aligned.
    w = weight(60, 300, dtype=torch.float16)
    pad_v = torch.cat([torch.zeros(1, dtype=w.values.dtype), w.values]).cuda()[1:]
    pad_c = torch.cat([torch.zeros(1, dtype=w.col_idx.dtype), w.col_idx]).cuda()[1:]
    assert pad_v.data_ptr() % 16 != 0
    x = torch.randn(n, 300).half()
    for level in range(3):
        out = torch.ops.nestsparse.ncsr_linear(
            x.cuda(), pad_v, pad_c, w.row_ptr.cuda(), w.row_end.cuda(), level, None, "none", None, None, None
        )
        assert_close_to_reference(out.cpu(), linear_reference(x, w, level), torch.float16)


@pytest.mark.parametrize("n", [1, 3, 50])
def test_linear_epilogue_scale_and_residual(n):
    M, K = 70, 91
    w = weight(M, K)
    g = torch.Generator().manual_seed(2)
    x, bias, scale = torch.randn(n, K, generator=g), torch.randn(M, generator=g), torch.randn(M, generator=g)
    residual = torch.randn(n, M, generator=g)
    out = nestsparse.ops.ncsr_linear(
        x.cuda(),
        *(t.cuda() for t in (w.values, w.col_idx, w.row_ptr, w.row_end)),
        1,
        bias.cuda(),
        "relu",
        None,
        scale.cuda(),
        residual.cuda(),
    )
    ref = linear_reference(x, w, 1, bias, "relu", scale, residual)
    assert_close_to_reference(out.cpu(), ref, torch.float32)


@pytest.mark.parametrize("n", [1, 4, 40])
def test_empty_level_all_pruned_and_empty_batch(n):
    M, K = 19, 37
    w = weight(M, K, empty_level=1).to("cuda")
    bias = torch.randn(M).cuda()
    x = torch.randn(n, K).cuda()
    out = w.linear(x, 2, bias, "relu")
    torch.testing.assert_close(out, torch.relu(bias).expand(n, M))
    none = weight(M, K, density=0.0).to("cuda")
    torch.testing.assert_close(none.linear(x, 0, bias), bias.expand(n, M))
    assert w.linear(torch.randn(0, K).cuda(), 0).shape == (0, M)
    assert w.linear(torch.randn(2, 0, K).cuda(), 1).shape == (2, 0, M)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# (batch, Cin, Cout, H, W, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 3, 5, 9, 11, 3, 1, 1, 1, 1),
    (3, 4, 6, 10, 7, 3, 2, 1, 1, 2),
    (2, 6, 6, 13, 9, 3, 2, 2, 2, 3),
    (1, 8, 16, 17, 17, 1, 1, 0, 1, 1),
    (2, 8, 12, 15, 15, 1, 2, 0, 1, 1),
    (1, 5, 7, 20, 1, (3, 1), (2, 1), (1, 0), 1, 1),
    (1, 6, 6, 8, 8, 3, 1, 1, 1, 6),
    (2, 3, 4, 31, 33, 5, 3, 2, (2, 1), 1),
    (1, 3, 4, 1, 1, 1, 1, 0, 1, 1),
    (1, 2, 3, 7, 7, 3, 1, 3, 3, 1),
    (1, 64, 33, 14, 14, 3, 1, 1, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"case{i}" for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_every_level_matches_float64(case, dtype):
    n, cin, cout, h, w_, k, s, p, d, g = case
    k, s, p, d = pair(k), pair(s), pair(p), pair(d)
    w = weight(cout, (cin // g, *k), dtype=dtype, seed=cin + cout)
    wc = w.to("cuda")
    plan = wc.plan()
    x = torch.randn(n, cin, h, w_, dtype=torch.float64).to(dtype)
    bias = torch.randn(cout, dtype=torch.float64).to(dtype)
    for level in range(3):
        z = F.conv2d(x.double(), w.to_dense(level).double(), None, s, p, d, g)
        for i, act in enumerate(ACTIVATIONS):
            b = bias if (i + level) % 2 == 0 else None
            ref = activation_reference(act)(z if b is None else z + b.double().view(1, -1, 1, 1))
            bc = None if b is None else b.cuda()
            out = wc.conv2d(x.cuda(), level, k, bc, s, p, d, g, act, plan if i % 2 else None)
            assert out.shape == ref.shape and out.dtype == dtype
            assert_close_to_reference(out.cpu(), ref, dtype)


def test_gradcheck_linear_and_conv_float64():
    w = weight(7, 9, dtype=torch.float64).to("cuda")
    x = torch.randn(3, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(7, dtype=torch.float64, device="cuda", requires_grad=True)
    for level in range(3):
        torch.autograd.gradcheck(
            lambda x, v, b, level=level: nestsparse.ops.ncsr_linear(
                x, v, w.col_idx, w.row_ptr, w.row_end, level, b, "gelu"
            ),
            (x, values, bias),
        )
    wc = weight(4, (3, 3, 2), dtype=torch.float64).to("cuda")
    xc = torch.randn(2, 3, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    vc = wc.values.clone().requires_grad_()
    torch.autograd.gradcheck(
        lambda x, v: nestsparse.ops.ncsr_conv2d(
            x, v, wc.col_idx, wc.row_ptr, wc.row_end, 1, (3, 2), None, (2, 1), (1, 1), (1, 2), 1, "relu"
        ),
        (xc, vc),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 33])
def test_gradients_match_dense_autograd(dtype, n):
    M, K = 45, 130
    w = weight(M, K, dtype=dtype)
    level = 1
    dense = w.to_dense(level).double().requires_grad_()
    x = torch.randn(n, K, dtype=torch.float64)
    gy = torch.randn(n, M, dtype=torch.float64)
    xd = x.clone().requires_grad_()
    (xd @ dense.T).backward(gy)
    wc = w.to("cuda")
    xc = x.to(dtype).cuda().requires_grad_()
    vc = wc.values.clone().requires_grad_()
    out = nestsparse.ops.ncsr_linear(xc, vc, wc.col_idx, wc.row_ptr, wc.row_end, level)
    out.backward(gy.to(dtype).cuda())
    assert_close_to_reference(xc.grad.cpu(), xd.grad, dtype)
    # grad_values: the dense gradient at each stored position of the level, zero elsewhere.
    mask = torch.zeros_like(w.values, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(M), w.row_ptr.diff().long())
    for r in range(M):
        mask[w.row_ptr[r] : w.row_end[level, r]] = True
    expected = torch.where(mask, dense.grad[rows, w.col_idx.long()], torch.zeros((), dtype=torch.float64))
    assert_close_to_reference(vc.grad.cpu(), expected, dtype)


def test_conv_gradients_match_dense_autograd():
    w = weight(6, (4, 3, 3), seed=5)
    level = 0
    dense = w.to_dense(level).double().requires_grad_()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    xd = x.clone().requires_grad_()
    gy = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    F.conv2d(xd, dense, None, 2, 1).backward(gy)
    wc = w.to("cuda")
    xc = x.float().cuda().requires_grad_()
    vc = wc.values.clone().requires_grad_()
    out = nestsparse.ops.ncsr_conv2d(xc, vc, wc.col_idx, wc.row_ptr, wc.row_end, level, (3, 3), None, 2, 1)
    out.backward(gy.float().cuda())
    assert_close_to_reference(xc.grad.cpu(), xd.grad, torch.float32)
    rows = torch.repeat_interleave(torch.arange(6), w.row_ptr.diff().long())
    expected = dense.grad.reshape(6, -1)[rows, w.col_idx.long()]
    assert_close_to_reference(vc.grad.cpu(), expected, torch.float32)


def test_opcheck_cuda_ops():
    w = weight(9, 11).to("cuda")
    args = (w.values, w.col_idx, w.row_ptr, w.row_end)
    for n in (1, 40):
        x = torch.randn(n, 11, device="cuda", requires_grad=True)
        bias = torch.randn(9, device="cuda", requires_grad=True)
        opcheck(torch.ops.nestsparse.ncsr_linear, (x, *args, 1, bias, "relu", w.plan(), None, None))
        opcheck(torch.ops.nestsparse.ncsr_linear_backward, (torch.randn(n, 9, device="cuda"), x.detach(), *args, 0))
    opcheck(torch.ops.nestsparse.ncsr_plan, (w.row_ptr, w.row_end, 4))
    wc = weight(6, (4, 3, 3)).to("cuda")
    xc = torch.randn(2, 4, 7, 7, device="cuda", requires_grad=True)
    cargs = (wc.values, wc.col_idx, wc.row_ptr, wc.row_end)
    opcheck(torch.ops.nestsparse.ncsr_conv2d, (xc, *cargs, 2, [3, 3], None, [1, 1], [1, 1], [1, 1], 1, "none"))
    opcheck(
        torch.ops.nestsparse.ncsr_conv2d_backward,
        (torch.randn(2, 6, 7, 7, device="cuda"), xc.detach(), *cargs, 2, [3, 3], [1, 1], [1, 1], [1, 1], 1),
    )


def test_torch_compile_module_on_cuda():
    lin = NestedSparseLinear.from_dense(torch.nn.Linear(40, 30), random_tags((30, 40), 2), num_levels=2).cuda()
    conv = NestedSparseConv2d.from_dense(
        torch.nn.Conv2d(4, 8, 3, padding=1), random_tags((8, 4, 3, 3), 2), num_levels=2
    ).cuda()
    x, xc = torch.randn(5, 40, device="cuda"), torch.randn(2, 4, 6, 6, device="cuda")
    for level in (0, 1):
        nestsparse.set_level(lin, level)
        nestsparse.set_level(conv, level)
        torch.testing.assert_close(torch.compile(lin, fullgraph=True)(x), lin(x))
        torch.testing.assert_close(torch.compile(conv, fullgraph=True)(xc), conv(xc))


def test_plan_orders_rows_by_length_and_is_cached_and_moved():
    w = weight(300, 200, density=0.3)
    wc = w.to("cuda")
    plan = wc.plan()
    header = torch.ops.nestsparse.cuda_plan_header()
    assert plan.is_cuda and plan.dtype == torch.int32 and plan.shape == (3, header + 300)
    for level in range(3):
        order = plan[level, header:].cpu().long()
        assert torch.equal(order.sort().values, torch.arange(300))
        lengths = (w.row_end[level] - w.row_ptr[:-1]).long()[order]
        assert (lengths[:-1] >= lengths[1:]).all()
    m = NestedSparseLinear.from_dense(torch.nn.Linear(200, 300), random_tags((300, 200), 3), num_levels=3).cuda()
    p1 = m.plan()
    assert p1 is not None and p1.is_cuda and m.plan() is p1  # cached
    m.cpu()
    assert m.plan().device.type == "cpu"  # a CPU partition, rebuilt
    m.cuda()
    p2 = m.plan()
    assert p2.is_cuda and torch.equal(p2, p1)
    if torch.cuda.device_count() > 1:
        m.to("cuda:1")
        assert m._plan is not None and m._plan.device == torch.device("cuda:1")  # moved, not rebuilt
        assert m.plan() is m._plan


def corrupted(kind):
    """A (40, 60) weight with one bad index that levels 0 and 1 both read."""
    w = weight(40, 60)
    rows = [r for r in range(40) if w.row_end[1, r] > w.row_ptr[r]]
    if kind == "col_idx":
        w.col_idx[w.row_ptr[rows[0]]] = 60  # a row's first entry belongs to every level the row has entries at
    elif kind == "negative_col":
        w.col_idx[w.row_ptr[rows[1]]] = -3
    elif kind == "row_end":
        w.row_end[:, rows[2]] = w.values.numel() + 10
    return w


@pytest.mark.parametrize(
    "kind,message", [("col_idx", r"col_idx\[\d+\] = 60"), ("negative_col", r"= -3"), ("row_end", "outside")]
)
@pytest.mark.parametrize("n", [1, 40])
def test_bad_indices_raise_naming_them(kind, message, n):
    w = corrupted(kind)
    args = [t.cuda() for t in (w.values, w.col_idx, w.row_ptr, w.row_end)]
    x = torch.randn(n, 60, device="cuda")
    for level in (0, 1):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.nestsparse.ncsr_linear(x, *args, level, None, "none", None, None, None)
            torch.cuda.synchronize()
    xc = torch.randn(1, 60, 3, 3, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.nestsparse.ncsr_conv2d(xc, *args, 1, [1, 1], None, [1, 1], [0, 0], [1, 1], 1, "none", None)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.nestsparse.ncsr_linear_backward(torch.randn(n, 40, device="cuda"), x, *args, 1)


def test_bad_plan_raises():
    w = weight(40, 60).to("cuda")
    plan = w.plan().clone()
    plan[0, torch.ops.nestsparse.cuda_plan_header() + 3] = 1000
    with pytest.raises(RuntimeError, match="plan"):
        w.linear(torch.randn(1, 60, device="cuda"), 0, None, "none", plan)
    with pytest.raises(RuntimeError, match="plan must be"):
        w.linear(torch.randn(1, 60, device="cuda"), 0, None, "none", w.to("cpu").plan())


def test_deferred_checks_never_sync_and_raise_on_request():
    good = weight(40, 60).to("cuda")
    bad = corrupted("col_idx").to("cuda")
    x = torch.randn(3, 60, device="cuda")
    nestsparse.check_errors()  # clear anything earlier
    before = nestsparse.set_deferred_checks(True)
    try:
        good.linear(x, 0)
        nestsparse.check_errors()  # nothing to report
        out = bad.linear(x, 0)  # no exception at the op
        assert out.shape == (3, 40)
        with pytest.raises(RuntimeError, match=r"1 column index\(es\) outside \[0, K\)"):
            nestsparse.check_errors()
        nestsparse.check_errors()  # cleared by the previous check
    finally:
        nestsparse.set_deferred_checks(before)
    with pytest.raises(RuntimeError, match="column"):
        with nestsparse.deferred_checks():
            bad.linear(x, 1)


def test_cuda_graph_capture_and_replay():
    m = NestedSparseLinear.from_dense(torch.nn.Linear(64, 48), random_tags((48, 64), 2), num_levels=2).cuda()
    conv = NestedSparseConv2d.from_dense(
        torch.nn.Conv2d(8, 16, 3, padding=1), random_tags((16, 8, 3, 3), 2), num_levels=2
    ).cuda()
    x = torch.randn(4, 64, device="cuda")
    xc = torch.randn(1, 8, 10, 10, device="cuda")
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
        x.copy_(torch.randn(4, 64, device="cuda"))
        xc.copy_(torch.randn(1, 8, 10, 10, device="cuda"))
        graph.replay()
        torch.testing.assert_close(y, m(x))
        torch.testing.assert_close(yc, conv(xc))
    nestsparse.check_errors()
