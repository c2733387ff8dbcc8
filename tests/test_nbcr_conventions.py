"""PyTorch custom-op conventions for the nested BCR ops: opcheck, gradcheck in float64, gradients against dense
autograd, and torch.compile(fullgraph=True)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from conftest import bcr_args, nested_bcr, random_bcr_tags
from nestsparse import ops

OPS = torch.ops.nestsparse
ACTS = {"none": lambda z: z, "relu": F.relu, "relu6": F.relu6, "gelu": F.gelu}


def linear_weight(M=7, K=11, L=2, bs=(3, 5), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nested_bcr(torch.randn(M, K, generator=g).to(dtype), random_bcr_tags((M, K), bs, L, keep=0.8, generator=g),
                      bs, L)


def conv_weight(cout=6, cin=4, k=3, groups=2, bs=(4, 4), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin // groups, k, k, generator=g).to(dtype)
    return nested_bcr(weight, random_bcr_tags(weight.shape, bs, 2, keep=0.8, generator=g), bs, 2)


def value_positions(w, level):
    """For every entry of w's level: (index into values, row, column) of the matrix."""
    pos = replace(w, values=torch.arange(1, w.values.numel() + 1, dtype=torch.float64)).to_dense(level)
    pos = pos.reshape(w.shape).long()
    rows, cols = pos.nonzero(as_tuple=True)
    return pos[rows, cols] - 1, rows, cols


def in_level(w, level):
    """Boolean over values: whether each stored value belongs to level ``level`` (the top-left r_l x c_l corner of
    its block's level-0 sub-block)."""
    cnt = w.counts.long()
    r0, c0 = cnt[0, :, 0], cnt[0, :, 1]
    size = r0 * c0
    blk = torch.repeat_interleave(torch.arange(w.num_blocks), size)
    local = torch.arange(blk.numel()) - (size.cumsum(0) - size)[blk]
    return (local // c0[blk] < cnt[level, blk, 0]) & (local % c0[blk] < cnt[level, blk, 1])


@pytest.mark.parametrize("n,activation", [(1, "relu"), (9, "gelu")])
def test_opcheck_linear(n, activation):
    w = linear_weight()
    x = torch.randn(n, 11, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(7, requires_grad=True)
    opcheck(OPS.nbcr_linear, (x, values, *bcr_args(w)[1:], 1, 7, [3, 5], bias, activation, None))
    gz = torch.randn(n, 7)
    opcheck(OPS.nbcr_linear_backward, (gz, x.detach(), *bcr_args(w), 0, 7, [3, 5]))


def test_opcheck_linear_with_plan_and_3d_input():
    w = linear_weight()
    plan = ops.nbcr_plan(w.block_ptr, w.counts, 3, 3)
    opcheck(OPS.nbcr_linear, (torch.randn(2, 3, 11), *bcr_args(w), 0, 7, [3, 5], None, "relu6", plan))
    opcheck(OPS.nbcr_linear, (torch.randn(11, requires_grad=True), *bcr_args(w), 1, 7, [3, 5], None, "none", None))
    opcheck(OPS.nbcr_plan, (w.block_ptr, w.counts, 3, 3))


def test_opcheck_conv():
    w = conv_weight()
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(6, requires_grad=True)
    plan = ops.nbcr_plan(w.block_ptr, w.counts, 4, 2)
    for activation, p in (("relu", None), ("none", plan)):
        args = (x, values, *bcr_args(w)[1:], 0, 6, [4, 4], [3, 3], bias, [2, 1], [1, 1], [1, 2], 2, activation, p)
        opcheck(OPS.nbcr_conv2d, args)
    gz = torch.randn(2, 6, 4, 4)
    opcheck(OPS.nbcr_conv2d_backward, (gz, x.detach(), *bcr_args(w), 1, 6, [4, 4], [3, 3], [2, 1], [1, 1], [1, 2], 2))


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("level", [0, 1])
def test_gradcheck_linear(activation, level):
    w = linear_weight(dtype=torch.float64, seed=level)
    x = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return ops.nbcr_linear(x, values, *bcr_args(w)[1:], level, 7, (3, 5), bias, activation)

    assert torch.autograd.gradcheck(f, (x, values, bias))


@pytest.mark.parametrize("activation", ["none", "relu6", "gelu"])
@pytest.mark.parametrize("geometry", [dict(s=(2, 1), p=1, d=(1, 2), g=2, bs=(4, 4)),
                                      dict(s=1, p=0, d=1, g=1, bs=(4, 4), k=1),
                                      dict(s=2, p=(0, 1), d=1, g=6, bs=(4, 3))],
                         ids=["strided-grouped", "direct", "depthwise"])
def test_gradcheck_conv(activation, geometry):
    k, groups = geometry.get("k", 3), geometry["g"]
    w = conv_weight(cin=6 if groups == 6 else 4, k=k, groups=groups, bs=geometry["bs"], dtype=torch.float64)
    x = torch.randn(2, 6 if groups == 6 else 4, 6, 5, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return ops.nbcr_conv2d(x, values, *bcr_args(w)[1:], 1, 6, geometry["bs"], k, bias, geometry["s"],
                               geometry["p"], geometry["d"], groups, activation)

    assert torch.autograd.gradcheck(f, (x, values, bias))


@pytest.mark.parametrize("level", [1, 2])
def test_values_outside_the_level_get_zero_gradient(level):
    w = linear_weight(M=20, K=30, L=3, bs=(4, 8), dtype=torch.float64)
    inside = in_level(w, level)
    assert inside.any() and not inside.all()
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(5, 30, dtype=torch.float64)
    ops.nbcr_linear(x, values, *bcr_args(w)[1:], level, 20, (4, 8)).sum().backward()
    assert (values.grad[~inside] == 0).all() and (values.grad[inside] != 0).all()
    gx, gv = OPS.nbcr_linear_backward(torch.randn(5, 20, dtype=torch.float64), x, *bcr_args(w), level, 20, [4, 8])
    assert (gv[~inside] == 0).all() and not torch.isnan(gv).any() and not torch.isnan(gx).any()


def test_conv_values_outside_the_level_get_zero_gradient():
    w = conv_weight(cout=10, cin=4, groups=2, bs=(3, 5), dtype=torch.float64, seed=3)
    inside = in_level(w, 1)
    assert inside.any() and not inside.all()
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    ops.nbcr_conv2d(x, values, *bcr_args(w)[1:], 1, 10, (3, 5), 3, None, 1, 1, 1, 2).sum().backward()
    assert (values.grad[~inside] == 0).all() and (values.grad[inside] != 0).any()


@pytest.mark.parametrize("n", [3, 33, 150])  # > 64 rows: the backward splits its columns across threads
def test_float32_gradients_match_dense_autograd(n):
    g = torch.Generator().manual_seed(2)
    M, K, bs = 40, 70, (8, 16)
    w = linear_weight(M=M, K=K, L=2, bs=bs, seed=2)
    x = torch.randn(n, K, generator=g, requires_grad=True)
    bias = torch.randn(M, generator=g, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    ops.nbcr_linear(x, values, *bcr_args(w)[1:], 1, M, bs, bias, "relu").square().sum().backward()
    xd = x.detach().double().requires_grad_(True)
    bd = bias.detach().double().requires_grad_(True)
    dense = w.to_dense(1).double().requires_grad_(True)
    torch.relu(xd @ dense.T + bd).square().sum().backward()
    scale = 1 + xd.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(bias.grad.double(), bd.grad, rtol=1e-4, atol=1e-4 * (1 + bd.grad.abs().max().item()))
    idx, rows, cols = value_positions(w, 1)
    expected = torch.zeros(values.numel(), dtype=torch.float64)
    expected[idx] = dense.grad[rows, cols]
    torch.testing.assert_close(values.grad.double(), expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_match_dense_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    M, K, bs = 20, 30, (4, 8)
    w = linear_weight(M=M, K=K, L=2, bs=bs, dtype=dtype, seed=6)
    x = torch.randn(7, K, generator=g).to(dtype).requires_grad_(True)
    values = w.values.clone().requires_grad_(True)
    ops.nbcr_linear(x, values, *bcr_args(w)[1:], 1, M, bs, None, "gelu").sum().backward()
    assert x.grad.dtype == dtype and values.grad.dtype == dtype
    xd = x.detach().double().requires_grad_(True)
    dense = w.to_dense(1).double().requires_grad_(True)
    F.gelu(xd @ dense.T).sum().backward()
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=tol * (1 + xd.grad.abs().max().item()))
    idx, rows, cols = value_positions(w, 1)
    expected = torch.zeros(values.numel(), dtype=torch.float64)
    expected[idx] = dense.grad[rows, cols]
    torch.testing.assert_close(values.grad.double(), expected, rtol=0, atol=tol * (1 + expected.abs().max().item()))


@pytest.mark.parametrize("geometry", [dict(k=3, s=2, p=1, g=2), dict(k=1, s=1, p=0, g=1), dict(k=3, s=1, p=1, g=6)],
                         ids=["strided-grouped", "direct", "depthwise"])
def test_float32_conv_gradients_match_dense_autograd(geometry):
    gen = torch.Generator().manual_seed(7)
    k, s, p, groups = geometry["k"], geometry["s"], geometry["p"], geometry["g"]
    cin, cout, bs = 6, 6, (4, 3)
    w = conv_weight(cout=cout, cin=cin, k=k, groups=groups, bs=bs, seed=7)
    x = torch.randn(2, cin, 9, 8, generator=gen, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    out = ops.nbcr_conv2d(x, values, *bcr_args(w)[1:], 0, cout, bs, k, None, s, p, 1, groups, "gelu")
    out.square().sum().backward()
    xd = x.detach().double().requires_grad_(True)
    dense = w.to_dense(0).double().requires_grad_(True)
    F.gelu(F.conv2d(xd, dense, None, s, p, 1, groups)).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4 * (1 + xd.grad.abs().max().item()))
    idx, rows, cols = value_positions(w, 0)
    expected = torch.zeros(values.numel(), dtype=torch.float64)
    expected[idx] = dense.grad.reshape(w.shape)[rows, cols]
    torch.testing.assert_close(values.grad.double(), expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item()))


def test_unbatched_and_3d_input_gradients():
    w = linear_weight(M=9, K=13, bs=(4, 4), dtype=torch.float64, seed=4)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(13, dtype=torch.float64, requires_grad=True)  # 1-D: no batch dimension
    assert torch.autograd.gradcheck(lambda x, b: ops.nbcr_linear(x, *bcr_args(w), 0, 9, (4, 4), b, "relu"), (x1, bias))
    x3 = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, v: ops.nbcr_linear(x, v, *bcr_args(w)[1:], 1, 9, (4, 4), None, "gelu"), (x3, values))


def test_gradients_flow_only_where_required():
    w = linear_weight(dtype=torch.float32)
    x = torch.randn(4, 11, requires_grad=True)
    out = ops.nbcr_linear(x, *bcr_args(w), 0, 7, (3, 5))
    out.sum().backward()
    assert x.grad is not None and w.values.grad is None
    with torch.no_grad():
        assert not ops.nbcr_linear(x, *bcr_args(w), 0, 7, (3, 5)).requires_grad


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    wl = linear_weight(M=20, K=30, L=3, bs=(8, 8), seed=5)
    wc = conv_weight(cout=8, cin=4, groups=2, bs=(3, 5), seed=5)
    bias = torch.randn(20)
    plan = ops.nbcr_plan(wl.block_ptr, wl.counts, 8, 2)

    def f(x, img, level: int):
        y = ops.nbcr_linear(x, *bcr_args(wl), level, 20, (8, 8), bias, "gelu", plan)
        z = ops.nbcr_conv2d(img, *bcr_args(wc), min(level, 1), 8, (3, 5), 3, None, 2, 1, 1, 2, "relu")
        return y.sum(-1), z

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, img = torch.randn(5, 30), torch.randn(2, 4, 9, 9)
    for level in (0, 1, 2):
        for a, b in zip(compiled(x, img, level), f(x, img, level)):
            torch.testing.assert_close(a, b)
    # And with gradients through the compiled graph.
    values = wl.values.clone().requires_grad_(True)
    xg = torch.randn(3, 30, requires_grad=True)

    def h(x, values):
        return ops.nbcr_linear(x, values, *bcr_args(wl)[1:], 1, 20, (8, 8), None, "relu").square().sum()

    torch.compile(h, fullgraph=True, backend="aot_eager")(xg, values).backward()
    gx, gv = xg.grad.clone(), values.grad.clone()
    xg.grad = values.grad = None
    h(xg, values).backward()
    torch.testing.assert_close(gx, xg.grad)
    torch.testing.assert_close(gv, values.grad)
