"""The products' inference epilogue, y = act(scale * z + bias + residual), for every format, op, batch path,
activation and ISA against a float64 reference; its autograd (residual and bias get gradients, scale is refused);
opcheck; bad epilogue operands."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from nestsparse.activations import ACTIVATIONS

from conftest import activation_reference, assert_close_to_reference

OPS = torch.ops.nestsparse


def finish(z, scale, bias, residual, activation):
    """The float64 reference epilogue over z (channel dim 1 for conv, -1 for linear: scale/bias already shaped)."""
    z = z * scale.double() + bias.double()
    if residual is not None:
        z = z + residual.double()
    return activation_reference(activation)(z)


# (batch, M, K): batch <= 4 takes the small-batch kernel; larger ones the panel kernel, whose short rows
# (M=40, K=9 at 10-40% density) store through a transposed buffer unless a residual asks for direct stores.
LINEAR_CASES = [(1, 17, 53), (3, 33, 100), (17, 40, 9), (70, 53, 129), (5, 1, 1)]


@pytest.mark.parametrize("n,M,K", LINEAR_CASES, ids=[f"n{n}-{M}x{K}" for n, M, K in LINEAR_CASES])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_linear_epilogue_matches_float64_reference(isa, fmt, n, M, K, activation):
    g = torch.Generator().manual_seed(n + M + K)
    w = fmt.random((M, K), 2, g, density=0.3, block_shape=(8, 8))
    x = torch.randn(n, K, generator=g)
    scale, bias, residual = torch.randn(M, generator=g), torch.randn(M, generator=g), torch.randn(n, M, generator=g)
    for level in range(2):
        for res in (residual, None):
            out = w.linear(x, level, bias, activation, None, scale, res)
            z = x.double() @ w.to_dense(level).double().T
            assert_close_to_reference(out, finish(z, scale, bias, res, activation), torch.float32)
        # float64 weights take the plain loops, with the same epilogue.
        w64 = type(w).from_parts(
            w.values.double(), dict(zip(w.index_names, w.index_tensors())), w.shape, w.densities, **w.options()
        )
        out = w64.linear(x.double(), level, bias.double(), activation, None, scale.double(), residual.double())
        assert_close_to_reference(out, finish(z, scale, bias, residual, activation), torch.float64)


CONV_CASES = [
    dict(n=1, cin=5, cout=7, hw=(6, 5), k=1, s=1, p=0),  # 1x1 stride 1: reads x directly
    dict(n=3, cin=4, cout=9, hw=(7, 7), k=3, s=1, p=1),
    dict(n=2, cin=6, cout=5, hw=(9, 8), k=3, s=2, p=1),  # stride 2: the phase buffer, dropped columns
    dict(n=2, cin=8, cout=17, hw=(5, 5), k=1, s=2, p=0),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=["1x1", "3x3", "3x3s2", "1x1s2"])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "gelu"])
def test_conv_epilogue_matches_float64_reference(isa, fmt, case, activation):
    g = torch.Generator().manual_seed(case["cin"] * case["cout"])
    k, s, p = case["k"], case["s"], case["p"]
    w = fmt.random((case["cout"], case["cin"], k, k), 2, g, density=0.4, block_shape=(4, 4))
    x = torch.randn(case["n"], case["cin"], *case["hw"], generator=g)
    scale, bias = torch.randn(case["cout"], generator=g), torch.randn(case["cout"], generator=g)
    for level in range(2):
        z = F.conv2d(x.double(), w.to_dense(level).double(), stride=s, padding=p)
        residual = torch.randn(z.shape, generator=g)
        for res in (residual, None):
            out = w.conv2d(x, level, (k, k), bias, s, p, 1, 1, activation, None, scale, res)
            ref = finish(z, scale.view(-1, 1, 1), bias.view(-1, 1, 1), res, activation)
            assert_close_to_reference(out, ref, torch.float32)


def test_scale_one_and_no_residual_are_bit_identical_to_the_plain_product(isa, fmt):
    g = torch.Generator().manual_seed(3)
    w = fmt.random((33, 70), 2, g, density=0.3, block_shape=(8, 8))
    for n in (1, 3, 40):
        x, bias = torch.randn(n, 70, generator=g), torch.randn(33, generator=g)
        assert torch.equal(w.linear(x, 1, bias, "relu"), w.linear(x, 1, bias, "relu", None, torch.ones(33)))


def float64_case(fmt, kind, g):
    """A float64 weight with 6 output channels, an input that requires grad, and the output's shape: a 6x7 linear
    on a batch of 4, or a 3x3 conv of 3 channels on 2 images of 5x5."""
    if kind == "linear":
        w = fmt.random((6, 7), 2, g, torch.float64, block_shape=(3, 5), density=0.6)
        return w, torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True), (4, 6)
    w = fmt.random((6, 3, 3, 3), 2, g, torch.float64, block_shape=(4, 4), density=0.6)
    return w, torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g, requires_grad=True), (2, 6, 3, 3)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradients_of_bias_and_residual_and_scaled_inputs(fmt, kind):
    g = torch.Generator().manual_seed(5)
    w, x, out_shape = float64_case(fmt, kind, g)
    values = w.values.clone().requires_grad_(True)
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    residual = torch.randn(out_shape, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.rand(6, dtype=torch.float64, generator=g) + 0.5
    op = getattr(OPS, f"{fmt.name}_{kind}")
    opts = [list(a) if isinstance(a, tuple) else a for a in w.op_args()]

    def f(x, values, bias, residual):
        head = (x, values, *w.index_tensors(), 1, *opts)
        if kind == "linear":
            return op(*head, bias, "gelu", None, scale, residual)
        return op(*head, [3, 3], bias, [1, 1], [0, 0], [1, 1], 1, "gelu", None, scale, residual)

    assert torch.autograd.gradcheck(f, (x, values, bias, residual))
    # The scale of a folded BatchNorm is an inference constant: asking for its gradient is an error.
    with pytest.raises(RuntimeError, match="scale takes no gradient"):
        scale.requires_grad_(True)
        f(x, values, bias, residual)


def test_opcheck_with_scale_and_residual(fmt):
    g = torch.Generator().manual_seed(1)
    w = fmt.random((7, 11), 2, g, block_shape=(3, 5), density=0.6)
    opts = [list(a) if isinstance(a, tuple) else a for a in w.op_args()]
    for n in (2, 9):
        x, res = torch.randn(n, 11, generator=g), torch.randn(n, 7, generator=g, requires_grad=True)
        args = (x, w.values, *w.index_tensors(), 1, *opts, torch.randn(7), "relu", None, torch.rand(7), res)
        opcheck(getattr(OPS, f"{fmt.name}_linear"), args)
    wc = fmt.random((6, 4, 3, 3), 2, g, block_shape=(4, 4), density=0.6)
    optc = [list(a) if isinstance(a, tuple) else a for a in wc.op_args()]
    x, res = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 6, 3, 2, generator=g)
    args = (x, wc.values, *wc.index_tensors(), 0, *optc, [3, 3], None, [2, 2], [1, 0], [1, 1], 1, "relu")
    opcheck(getattr(OPS, f"{fmt.name}_conv2d"), (*args, None, torch.rand(6), res))


def test_bad_epilogue_operands_are_refused_with_their_name(fmt):
    w = fmt.random((7, 11), 2, torch.Generator().manual_seed(2), block_shape=(3, 5), density=0.6)
    x = torch.randn(3, 11)
    with pytest.raises(RuntimeError, match=r"scale must have shape \(7,\)"):
        w.linear(x, 0, None, "none", None, torch.ones(6))
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        w.linear(x, 0, None, "none", None, None, torch.ones(3, 6))
    with pytest.raises(RuntimeError, match="residual is Double but values are Float"):
        w.linear(x, 0, None, "none", None, None, torch.ones(3, 7, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="scale must be contiguous"):
        w.linear(x, 0, None, "none", None, torch.ones(14)[::2])


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_residual_gradient_without_bias(fmt, kind):
    # An absent bias has no autograd edge: the residual's edge index moves down by one.
    g = torch.Generator().manual_seed(6)
    w, x, out_shape = float64_case(fmt, kind, g)
    residual = torch.randn(out_shape, dtype=torch.float64, generator=g, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    op = getattr(OPS, f"{fmt.name}_{kind}")
    opts = [list(a) if isinstance(a, tuple) else a for a in w.op_args()]

    def f(x, values, residual):
        head = (x, values, *w.index_tensors(), 0, *opts)
        if kind == "linear":
            return op(*head, None, "relu", None, None, residual)
        return op(*head, [3, 3], None, [1, 1], [0, 0], [1, 1], 1, "relu", None, None, residual)

    assert torch.autograd.gradcheck(f, (x, values, residual))
    residual.requires_grad_(False)  # only x and values want gradients
    f(x, values, residual).sum().backward()
    assert x.grad is not None and values.grad is not None
