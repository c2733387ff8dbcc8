"""PyTorch custom-op conventions: opcheck, gradcheck in float64, and torch.compile(fullgraph=True)."""

import pytest
import torch
from torch.library import opcheck

from conftest import nested, random_tags
from nestsparse import ops

OPS = torch.ops.nestsparse


def linear_weight(M=7, K=11, L=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nested(torch.randn(M, K, generator=g).to(dtype), random_tags((M, K), L, 0.6, generator=g), L)


def conv_weight(cout=6, cin=4, k=3, groups=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin // groups, k, k, generator=g).to(dtype)
    return nested(weight, random_tags(weight.shape, 2, 0.6, generator=g), 2)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("n", [1, 9])
def test_opcheck_linear(activation, n):
    w = linear_weight()
    x = torch.randn(n, 11, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(7, requires_grad=True)
    opcheck(OPS.ncsr_linear, (x, values, w.col_idx, w.row_ptr, w.row_end, 1, bias, activation, None))
    gz = torch.randn(n, 7)
    opcheck(OPS.ncsr_linear_backward, (gz, x.detach(), w.values, w.col_idx, w.row_ptr, w.row_end, 0))


def test_opcheck_linear_with_plan():
    w = linear_weight()
    plan = ops.ncsr_plan(w.row_ptr, w.row_end, 3)
    opcheck(OPS.ncsr_linear, (torch.randn(3, 11), w.values, w.col_idx, w.row_ptr, w.row_end, 0, None, "relu6", plan))
    opcheck(OPS.ncsr_plan, (w.row_ptr, w.row_end, 3))


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_opcheck_conv(activation):
    w = conv_weight()
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(6, requires_grad=True)
    args = (x, values, w.col_idx, w.row_ptr, w.row_end, 0, [3, 3], bias, [2, 1], [1, 1], [1, 2], 2, activation, None)
    opcheck(OPS.ncsr_conv2d, args)
    gz = torch.randn(2, 6, 4, 4)
    opcheck(OPS.ncsr_conv2d_backward, (gz, x.detach(), w.values, w.col_idx, w.row_ptr, w.row_end, 1, [3, 3], [2, 1],
                                       [1, 1], [1, 2], 2))


@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "gelu"])
@pytest.mark.parametrize("level", [0, 1])
def test_gradcheck_linear(activation, level):
    w = linear_weight(dtype=torch.float64, seed=level)
    x = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return ops.ncsr_linear(x, values, w.col_idx, w.row_ptr, w.row_end, level, bias, activation)

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_values_outside_the_level_get_zero_gradient():
    w = linear_weight(M=20, K=30, L=3, dtype=torch.float64)
    values = w.values.clone().requires_grad_(True)
    ops.ncsr_linear(torch.randn(5, 30, dtype=torch.float64), values, w.col_idx, w.row_ptr, w.row_end, 2).sum().backward()
    rows = torch.repeat_interleave(torch.arange(20), w.row_nnz(0))
    in_level = torch.arange(values.numel()) < w.row_end[2].long()[rows]
    assert (values.grad[~in_level] == 0).all() and (values.grad[in_level] != 0).any()


@pytest.mark.parametrize("activation", ["none", "relu6", "gelu"])
def test_gradcheck_conv(activation):
    w = conv_weight(dtype=torch.float64)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return ops.ncsr_conv2d(x, values, w.col_idx, w.row_ptr, w.row_end, 0, 3, bias, (2, 1), 1, (1, 2), 2, activation)

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_float32_gradients_match_dense_autograd():
    g = torch.Generator().manual_seed(2)
    w = linear_weight(M=40, K=70, L=2, seed=2)
    x = torch.randn(33, 70, generator=g, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    ops.ncsr_linear(x, values, w.col_idx, w.row_ptr, w.row_end, 1, None, "relu").square().sum().backward()
    xd = x.detach().double().requires_grad_(True)
    dense = w.to_dense(1).double().requires_grad_(True)
    torch.relu(xd @ dense.T).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)
    rows = torch.repeat_interleave(torch.arange(40), w.row_nnz(0))
    torch.testing.assert_close(values.grad.double()[w.mask(1).flatten()[rows * 70 + w.col_idx.long()]],
                               dense.grad[w.mask(1)], rtol=1e-4, atol=1e-3)


def test_torch_compile_fullgraph():
    import nestsparse
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    sparse = nestsparse.convert(model, nestsparse.model_tags(model, (0.5, 0.2)))
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(sparse, fullgraph=True, backend="aot_eager")
    for level in (0, 1):
        nestsparse.set_level(sparse, level)
        torch.testing.assert_close(compiled(x), sparse(x))


def test_unbatched_input_and_wide_batch_gradients():
    w = linear_weight(M=9, K=13, dtype=torch.float64, seed=4)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(13, dtype=torch.float64, requires_grad=True)  # 1-D: no batch dimension
    assert torch.autograd.gradcheck(
        lambda x, b: ops.ncsr_linear(x, w.values, w.col_idx, w.row_ptr, w.row_end, 0, b, "relu"), (x1, bias))
    # More than 64 batch rows: the backward splits its columns across threads.
    x = torch.randn(150, 13, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    ops.ncsr_linear(x, values, w.col_idx, w.row_ptr, w.row_end, 1, bias).pow(2).sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    dense = w.to_dense(1).clone().requires_grad_(True)
    (xd @ dense.T + bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)
    assert torch.allclose(values.grad[values.grad != 0].sort().values, dense.grad[w.mask(1)].sort().values)
