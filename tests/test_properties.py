"""Property tests (hypothesis) over both formats: every product op and its gradients against a float64 dense
reference on random shapes, densities, level counts, block shapes, dtypes and epilogues; and a corpus of randomly
corrupted index arrays sent straight to the ops, which must return or raise a RuntimeError, never read out of
bounds (`make sanitize` runs this file under ASan + UBSan). Bounded so the suite stays fast: about 20 s."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nestsparse.activations import ACTIVATIONS

from conftest import activation_reference, assert_close_to_reference, value_positions

OPS = torch.ops.nestsparse
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BATCHES = [1, 2, 3, 4, 5, 17, 64, 65]  # 1-4: the small-batch kernels; more: the panel kernels


def weight_draws():
    return dict(
        L=st.integers(1, 3),
        density=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
        block=st.tuples(st.integers(1, 9), st.integers(1, 9)),
        dtype=st.sampled_from(DTYPES),
        activation=st.sampled_from(list(ACTIVATIONS)),
        with_bias=st.booleans(),
        odd=st.booleans(),
        seed=st.integers(0, 2**16),
        data=st.data(),
    )


def test_linear_and_its_gradients_match_float64(fmt):
    @PROPERTY
    @given(M=st.integers(1, 70), K=st.integers(1, 130), n=st.sampled_from(BATCHES), **weight_draws())
    def check(M, K, n, L, density, block, dtype, activation, with_bias, odd, seed, data):
        g = torch.Generator().manual_seed(seed)
        w = fmt.random((M, K), L, g, dtype, block_shape=block, density=density, odd=odd)
        level = data.draw(st.integers(0, L - 1), label="level")
        x = torch.randn(n, K, generator=g).to(dtype)
        bias = torch.randn(M, generator=g).to(dtype) if with_bias else None
        out = w.linear(x, level, bias, activation)
        z = x.double() @ w.to_dense(level).double().T + (0 if bias is None else bias.double())
        ref = activation_reference(activation)(z)
        assert out.shape == (n, M) and out.dtype == dtype
        assert_close_to_reference(out.float() if dtype != torch.float64 else out, ref, dtype)
        if dtype == torch.float64:  # gradients against dense autograd, values outside the level at zero
            xg = x.clone().requires_grad_(True)
            values = w.values.clone().requires_grad_(True)
            y = w.linear_op(xg, values, *w.index_tensors(), level, *w.op_args(), bias, activation)
            gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
            gx, gv = torch.autograd.grad(y, (xg, values), gy)
            dense = w.to_dense(level).double().requires_grad_(True)
            xr = x.clone().requires_grad_(True)
            yr = activation_reference(activation)(F.linear(xr, dense, bias))
            rx, rw = torch.autograd.grad(yr, (xr, dense), gy)
            assert_close_to_reference(gx, rx, dtype)
            idx, rows, cols = value_positions(w, level)
            expected = torch.zeros(w.values.numel(), dtype=torch.float64)
            expected[idx] = rw[rows, cols]
            assert gv.shape == w.values.shape
            if w.values.numel():
                assert_close_to_reference(gv, expected, dtype)

    check()


def test_conv2d_matches_float64(fmt):
    @PROPERTY
    @given(
        cout=st.integers(1, 12),
        cin_g=st.integers(1, 5),
        groups=st.integers(1, 3),
        k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
        hw=st.tuples(st.integers(1, 11), st.integers(1, 11)),
        stride=st.tuples(st.integers(1, 4), st.integers(1, 40)),
        padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
        dilation=st.tuples(st.integers(1, 3), st.integers(1, 2)),
        nb=st.integers(1, 3),
        **weight_draws(),
    )
    def check(cout, cin_g, groups, k, hw, stride, padding, dilation, nb, L, density, block, dtype, activation,
              with_bias, odd, seed, data):  # fmt: skip
        cout = cout * groups
        H, W = hw
        if H + 2 * padding[0] < dilation[0] * (k[0] - 1) + 1 or W + 2 * padding[1] < dilation[1] * (k[1] - 1) + 1:
            return  # smaller than the dilated kernel: refused, tested in test_bad_input
        g = torch.Generator().manual_seed(seed)
        w = fmt.random((cout, cin_g, *k), L, g, dtype, block_shape=block, density=density, odd=odd)
        level = data.draw(st.integers(0, L - 1), label="level")
        x = torch.randn(nb, cin_g * groups, H, W, generator=g).to(dtype)
        bias = torch.randn(cout, generator=g).to(dtype) if with_bias else None
        out = w.conv2d(x, level, list(k), bias, list(stride), list(padding), list(dilation), groups, activation)
        z = F.conv2d(x.double(), w.to_dense(level).double(), None if bias is None else bias.double(), stride,
                     padding, dilation, groups)  # fmt: skip
        ref = activation_reference(activation)(z)
        assert out.shape == ref.shape and out.dtype == dtype
        assert_close_to_reference(out.float() if dtype != torch.float64 else out, ref, dtype)

    check()


# ---- a corpus of corrupted index arrays, straight to the ops ---------------------------------------------------


def corrupt(t, g, count):
    """``t`` with ``count`` random entries replaced by values of every sign and size its dtype holds."""
    t = t.clone()
    if t.numel() == 0:
        return t
    info = torch.iinfo(t.dtype)
    flat = t.view(-1)
    for _ in range(count):
        i = int(torch.randint(0, flat.numel(), (1,), generator=g))
        kind = int(torch.randint(0, 4, (1,), generator=g))
        flat[i] = [info.min, info.max, -1, int(torch.randint(-300, 300, (1,), generator=g))][kind]
    return t


@pytest.mark.parametrize("kind", ["linear", "conv2d", "linear_backward", "conv2d_backward"])
def test_corrupted_index_arrays_give_a_result_or_an_error(fmt, kind):
    calls = {"ok": 0, "refused": 0}

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(seed=st.integers(0, 2**16), which=st.integers(0, 10), count=st.integers(1, 4), n=st.sampled_from([1, 9]))
    def check(seed, which, count, n):
        g = torch.Generator().manual_seed(seed)
        conv = kind.startswith("conv")
        shape = (6, 2, 3, 3) if conv else (13, 21)
        w = fmt.random(shape, 2, g, block_shape=(4, 4), density=0.5)
        arrays = list(w.index_tensors())
        arrays[which % len(arrays)] = corrupt(arrays[which % len(arrays)], g, count)
        op = getattr(OPS, f"{fmt.name}_{kind}")
        args = [list(a) if isinstance(a, tuple) else a for a in w.op_args()]
        level = int(torch.randint(0, 2, (1,), generator=g))
        x = torch.randn(n, 4, 5, 5, generator=g) if conv else torch.randn(n, 21, generator=g)
        geometry = [[3, 3], None, [1, 1], [1, 1], [1, 1], 2] if conv else []
        try:
            if kind == "linear":
                out = op(x, w.values, *arrays, level, *args)
            elif kind == "conv2d":
                out = op(x, w.values, *arrays, level, *args, *geometry)
            else:
                gz = torch.randn(n, 6, 5, 5, generator=g) if conv else torch.randn(n, 13, generator=g)
                geo = [geometry[0], *geometry[2:]] if conv else []
                out = op(gz, x, w.values, *arrays, level, *args, *geo)[0]
            assert out.numel() > 0
            calls["ok"] += 1
        except RuntimeError as e:
            assert f"{fmt.name}_" in str(e), f"the error must name the op: {e}"
            calls["refused"] += 1

    check()
    assert calls["refused"] > 0, "no corruption was caught: the corpus is too weak"
