"""PyTorch custom-op conventions for every format: opcheck, gradcheck in float64, gradients against dense autograd
(float32 and half precision), gradients only where required, and torch.compile(fullgraph=True)."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import nestsparse
from nestsparse.activations import ACTIVATIONS

from conftest import value_mask, value_positions

OPS = torch.ops.nestsparse


def op(w, kind):
    return getattr(OPS, f"{w.name}_{kind}")


def weight_args(w, values=None):
    """The op arguments of ``w`` after x: values and the index tensors (the level and op_args come after)."""
    return (w.values if values is None else values, *w.index_tensors())


def op_args(w):
    return tuple(list(a) if isinstance(a, tuple) else a for a in w.op_args())


def linear_weight(fmt, M=7, K=11, L=2, dtype=torch.float32, seed=0, block_shape=(3, 5)):
    return fmt.random((M, K), L, torch.Generator().manual_seed(seed), dtype, block_shape=block_shape, density=0.64)


def conv_weight(fmt, cout=6, cin=4, k=3, groups=2, dtype=torch.float32, seed=0, block_shape=(4, 4)):
    return fmt.random(
        (cout, cin // groups, k, k),
        2,
        torch.Generator().manual_seed(seed),
        dtype,
        block_shape=block_shape,
        density=0.64,
    )


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("n", [1, 9])
def test_opcheck_linear(fmt, activation, n):
    w = linear_weight(fmt)
    x = torch.randn(n, 11, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(7, requires_grad=True)
    opcheck(op(w, "linear"), (x, *weight_args(w, values), 1, *op_args(w), bias, activation, None))
    gz = torch.randn(n, 7)
    opcheck(op(w, "linear_backward"), (gz, x.detach(), *weight_args(w), 0, *op_args(w)))


def test_opcheck_linear_with_plan_and_3d_input(fmt):
    w = linear_weight(fmt)
    plan = w.plan(3)
    opcheck(op(w, "linear"), (torch.randn(2, 3, 11), *weight_args(w), 0, *op_args(w), None, "relu6", plan))
    opcheck(op(w, "linear"), (torch.randn(3, 11), *weight_args(w), 0, *op_args(w), None, "relu6", plan))
    opcheck(op(w, "linear"), (torch.randn(11, requires_grad=True), *weight_args(w), 1, *op_args(w), None, "none", None))
    plan_args = (w.row_ptr, w.row_end, 3) if fmt.name == "ncsr" else (w.block_ptr, w.counts, 3, 3)
    opcheck(op(w, "plan"), plan_args)


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_opcheck_conv(fmt, activation):
    w = conv_weight(fmt)
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(6, requires_grad=True)
    for p in (None, w.plan(2)):
        args = (x, *weight_args(w, values), 0, *op_args(w), [3, 3], bias, [2, 1], [1, 1], [1, 2], 2, activation, p)
        opcheck(op(w, "conv2d"), args)
    gz = torch.randn(2, 6, 4, 4)
    opcheck(
        op(w, "conv2d_backward"), (gz, x.detach(), *weight_args(w), 1, *op_args(w), [3, 3], [2, 1], [1, 1], [1, 2], 2)
    )


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("level", [0, 1])
def test_gradcheck_linear(fmt, activation, level):
    w = linear_weight(fmt, dtype=torch.float64, seed=level)
    x = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return op(w, "linear")(x, *weight_args(w, values), level, *op_args(w), bias, activation)

    assert torch.autograd.gradcheck(f, (x, values, bias))


@pytest.mark.parametrize("activation", ["none", "relu6", "gelu"])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(s=(2, 1), p=1, d=(1, 2), g=2, bs=(4, 4)),
        dict(s=1, p=0, d=1, g=1, bs=(4, 4), k=1),
        dict(s=2, p=(0, 1), d=1, g=6, bs=(4, 3)),
    ],
    ids=["strided-grouped", "direct", "depthwise"],
)
def test_gradcheck_conv(fmt, activation, geometry):
    k, groups = geometry.get("k", 3), geometry["g"]
    cin = 6 if groups == 6 else 4
    w = conv_weight(fmt, cin=cin, k=k, groups=groups, block_shape=geometry["bs"], dtype=torch.float64)
    x = torch.randn(2, cin, 6, 5, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        s, p, d = (list(nestsparse.ops.pair(geometry[key])) for key in ("s", "p", "d"))
        return op(w, "conv2d")(x, *weight_args(w, values), 1, *op_args(w), [k, k], bias, s, p, d, groups, activation)

    assert torch.autograd.gradcheck(f, (x, values, bias))


@pytest.mark.parametrize("level", [1, 2])
def test_values_outside_the_level_get_zero_gradient(fmt, level):
    w = linear_weight(fmt, M=20, K=30, L=3, block_shape=(4, 8), dtype=torch.float64)
    inside = value_mask(w, level)
    assert inside.any() and not inside.all()
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(5, 30, dtype=torch.float64)
    op(w, "linear")(x, *weight_args(w, values), level, *op_args(w)).sum().backward()
    assert (values.grad[~inside] == 0).all() and (values.grad[inside] != 0).all()
    gx, gv = op(w, "linear_backward")(torch.randn(5, 20, dtype=torch.float64), x, *weight_args(w), level, *op_args(w))
    assert (gv[~inside] == 0).all() and not torch.isnan(gv).any() and not torch.isnan(gx).any()


def test_conv_values_outside_the_level_get_zero_gradient(fmt):
    w = conv_weight(fmt, cout=10, cin=4, groups=2, block_shape=(3, 5), dtype=torch.float64, seed=3)
    inside = value_mask(w, 1)
    assert inside.any() and not inside.all()
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    op(w, "conv2d")(
        x, *weight_args(w, values), 1, *op_args(w), [3, 3], None, [1, 1], [1, 1], [1, 1], 2
    ).sum().backward()
    assert (values.grad[~inside] == 0).all() and (values.grad[inside] != 0).any()


def expected_value_grad(w, level, dense_grad):
    """dense_grad (the matrix's gradient) read at the stored positions of ``level``; zero elsewhere."""
    idx, rows, cols = value_positions(w, level)
    expected = torch.zeros(w.values.numel(), dtype=torch.float64)
    expected[idx] = dense_grad.reshape(w.shape)[rows, cols]
    return expected


@pytest.mark.parametrize("n", [3, 33, 150])  # > 64 rows: the backward splits its columns across threads
def test_float32_gradients_match_dense_autograd(fmt, n):
    g = torch.Generator().manual_seed(2)
    M, K = 40, 70
    w = linear_weight(fmt, M=M, K=K, L=2, block_shape=(8, 16), seed=2)
    x = torch.randn(n, K, generator=g, requires_grad=True)
    bias = torch.randn(M, generator=g, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    op(w, "linear")(x, *weight_args(w, values), 1, *op_args(w), bias, "relu").square().sum().backward()
    xd = x.detach().double().requires_grad_(True)
    bd = bias.detach().double().requires_grad_(True)
    dense = w.to_dense(1).double().requires_grad_(True)
    torch.relu(xd @ dense.T + bd).square().sum().backward()
    scale = 1 + xd.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(bias.grad.double(), bd.grad, rtol=1e-4, atol=1e-4 * (1 + bd.grad.abs().max().item()))
    expected = expected_value_grad(w, 1, dense.grad)
    torch.testing.assert_close(values.grad.double(), expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_match_dense_autograd(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    M, K = 20, 30
    w = linear_weight(fmt, M=M, K=K, L=2, block_shape=(4, 8), dtype=dtype, seed=6)
    x = torch.randn(7, K, generator=g).to(dtype).requires_grad_(True)
    values = w.values.clone().requires_grad_(True)
    op(w, "linear")(x, *weight_args(w, values), 1, *op_args(w), None, "gelu").sum().backward()
    assert x.grad.dtype == dtype and values.grad.dtype == dtype
    xd = x.detach().double().requires_grad_(True)
    dense = w.to_dense(1).double().requires_grad_(True)
    F.gelu(xd @ dense.T).sum().backward()
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=tol * (1 + xd.grad.abs().max().item()))
    expected = expected_value_grad(w, 1, dense.grad)
    torch.testing.assert_close(values.grad.double(), expected, rtol=0, atol=tol * (1 + expected.abs().max().item()))


@pytest.mark.parametrize(
    "geometry",
    [dict(k=3, s=2, p=1, g=2), dict(k=1, s=1, p=0, g=1), dict(k=3, s=1, p=1, g=6)],
    ids=["strided-grouped", "direct", "depthwise"],
)
def test_float32_conv_gradients_match_dense_autograd(fmt, geometry):
    gen = torch.Generator().manual_seed(7)
    k, s, p, groups = geometry["k"], geometry["s"], geometry["p"], geometry["g"]
    cin, cout = 6, 6
    w = conv_weight(fmt, cout=cout, cin=cin, k=k, groups=groups, block_shape=(4, 3), seed=7)
    x = torch.randn(2, cin, 9, 8, generator=gen, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    out = op(w, "conv2d")(
        x, *weight_args(w, values), 0, *op_args(w), [k, k], None, [s, s], [p, p], [1, 1], groups, "gelu"
    )
    out.square().sum().backward()
    xd = x.detach().double().requires_grad_(True)
    dense = w.to_dense(0).double().requires_grad_(True)
    F.gelu(F.conv2d(xd, dense, None, s, p, 1, groups)).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4 * (1 + xd.grad.abs().max().item()))
    expected = expected_value_grad(w, 0, dense.grad)
    torch.testing.assert_close(values.grad.double(), expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item()))


def test_unbatched_3d_and_wide_batch_gradients(fmt):
    w = linear_weight(fmt, M=9, K=13, block_shape=(4, 4), dtype=torch.float64, seed=4)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(13, dtype=torch.float64, requires_grad=True)  # 1-D: no batch dimension
    assert torch.autograd.gradcheck(
        lambda x, b: op(w, "linear")(x, *weight_args(w), 0, *op_args(w), b, "relu"), (x1, bias)
    )
    x3 = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, v: op(w, "linear")(x, *weight_args(w, v), 1, *op_args(w), None, "gelu"), (x3, values)
    )
    # More than 64 batch rows: the backward splits its columns across threads.
    x = torch.randn(150, 13, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    op(w, "linear")(x, *weight_args(w, values), 1, *op_args(w), bias).pow(2).sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    dense = w.to_dense(1).clone().requires_grad_(True)
    (xd @ dense.T + bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)
    torch.testing.assert_close(values.grad, expected_value_grad(w, 1, dense.grad))


def test_gradients_flow_only_where_required(fmt):
    w = linear_weight(fmt)
    x = torch.randn(4, 11, requires_grad=True)
    out = op(w, "linear")(x, *weight_args(w), 0, *op_args(w))
    out.sum().backward()
    assert x.grad is not None and w.values.grad is None
    with torch.no_grad():
        assert not op(w, "linear")(x, *weight_args(w), 0, *op_args(w)).requires_grad


def test_torch_compile_fullgraph_ops(fmt):
    torch._dynamo.reset()
    wl = linear_weight(fmt, M=20, K=30, L=3, block_shape=(8, 8), seed=5)
    wc = conv_weight(fmt, cout=8, cin=4, groups=2, block_shape=(3, 5), seed=5)
    bias = torch.randn(20)
    plan = wl.plan(2)

    def f(x, img, level: int):
        y = op(wl, "linear")(x, *weight_args(wl), level, *op_args(wl), bias, "gelu", plan)
        z = op(wc, "conv2d")(
            img, *weight_args(wc), min(level, 1), *op_args(wc), [3, 3], None, [2, 2], [1, 1], [1, 1], 2, "relu", None
        )
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
        return op(wl, "linear")(x, *weight_args(wl, values), 1, *op_args(wl), None, "relu").square().sum()

    torch.compile(h, fullgraph=True, backend="aot_eager")(xg, values).backward()
    gx, gv = xg.grad.clone(), values.grad.clone()
    xg.grad = values.grad = None
    h(xg, values).backward()
    torch.testing.assert_close(gx, xg.grad)
    torch.testing.assert_close(gv, values.grad)


def test_torch_compile_fullgraph_module(fmt):
    from torch import nn

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    tags = nestsparse.model_tags(model, (0.5, 0.2), structure=fmt.structure, block_shape=(4, 4))
    sparse = nestsparse.convert(model, tags, format=fmt.name, block_shape=(4, 4))
    assert all(m.format == fmt.name for m in sparse if isinstance(m, nestsparse.NestedSparseModule))
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(sparse, fullgraph=True, backend="aot_eager")
    for level in (0, 1):
        nestsparse.set_level(sparse, level)
        torch.testing.assert_close(compiled(x), sparse(x))


def test_float32_gradients_of_the_module_match_dense_autograd(fmt):
    """The original NCSR check, through the module: x and the level's values get the dense gradients."""
    g = torch.Generator().manual_seed(2)
    w = linear_weight(fmt, M=40, K=70, L=2, block_shape=(8, 8), seed=2)
    layer = nestsparse.NestedSparseLinear(w, None, "relu")
    x = torch.randn(33, 70, generator=g, requires_grad=True)
    layer(x, level=1).square().sum().backward()
    xd = x.detach().double().requires_grad_(True)
    dense = w.to_dense(1).double().requires_grad_(True)
    torch.relu(xd @ dense.T).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.values.grad.double(), expected_value_grad(w, 1, dense.grad), rtol=1e-4, atol=1e-3)


def test_compiled_autograd(fmt):
    """The backward through compiled autograd (which traces the saved state) gives the eager gradients."""
    from torch._dynamo import compiled_autograd

    wl = linear_weight(fmt, M=20, K=30, L=2, block_shape=(8, 8), seed=5)
    wc = conv_weight(fmt, cout=8, cin=4, groups=2, block_shape=(3, 5), seed=5)
    values = wl.values.clone().requires_grad_(True)
    x = torch.randn(3, 30, requires_grad=True)
    img = torch.randn(2, 4, 9, 9, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)

    def loss():
        y = op(wl, "linear")(x, *weight_args(wl, values), 1, *op_args(wl), None, "gelu")
        z = op(wc, "conv2d")(img, *weight_args(wc), 1, *op_args(wc), [3, 3], bias, [2, 2], [1, 1], [1, 1], 2, "relu")
        return y.square().sum() + z.square().sum()

    loss().backward()
    eager = [t.grad.clone() for t in (x, values, img, bias)]
    for t in (x, values, img, bias):
        t.grad = None
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss().backward()
    for t, g in zip((x, values, img, bias), eager):
        torch.testing.assert_close(t.grad, g)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_double_backward_is_refused_not_silently_zero(fmt, kind):
    # create_graph=True works for first-order gradients; a second backward through the products raises.
    if kind == "linear":
        w = linear_weight(fmt, dtype=torch.float64)
        x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
        values = w.values.clone().requires_grad_(True)
        bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
        y = op(w, "linear")(x, *weight_args(w, values), 0, *op_args(w), bias, "gelu")
    else:
        w = conv_weight(fmt, dtype=torch.float64)
        x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
        values = w.values.clone().requires_grad_(True)
        bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
        y = op(w, "conv2d")(x, *weight_args(w, values), 0, *op_args(w), [3, 3], bias, [1, 1], [1, 1], [1, 1], 2, "relu")
    gx, gv = torch.autograd.grad((y**2).sum(), (x, values), create_graph=True)
    first = torch.autograd.grad((y**2).sum(), (x, values), retain_graph=True)
    assert torch.equal(gx, first[0]) and torch.equal(gv, first[1])
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((gx**2).sum() + gv.sum(), values)
    gx, gv = torch.autograd.grad((y**2).sum(), (x, values), create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):  # through the activation's derivative too
        torch.autograd.grad((gx**2).sum(), bias)
