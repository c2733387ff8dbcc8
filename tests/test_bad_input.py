"""Bad input raises a Python exception naming the problem; it never crashes or reads out of bounds."""

import pytest
import torch

from conftest import nested, random_tags
from nestsparse import ops


@pytest.fixture
def w():
    return nested(torch.randn(10, 20), random_tags((10, 20), 2, 0.5), 2)


def call(w, x, level=0, **kw):
    args = dict(values=w.values, col_idx=w.col_idx, row_ptr=w.row_ptr, row_end=w.row_end)
    args.update(kw)
    return ops.ncsr_linear(x, args["values"], args["col_idx"], args["row_ptr"], args["row_end"], level,
                           kw.get("bias"), kw.get("activation", "none"), kw.get("plan"))


def test_wrong_dtypes(w):
    with pytest.raises(RuntimeError, match="x is Double but values are Float"):
        call(w, torch.randn(2, 20, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="col_idx must be int16 or int32"):
        call(w, torch.randn(2, 20), col_idx=w.col_idx.long())
    with pytest.raises(RuntimeError, match="row_ptr must be int32"):
        call(w, torch.randn(2, 20), row_ptr=w.row_ptr.long())
    with pytest.raises(RuntimeError, match="values must be float32"):
        call(w, torch.randn(2, 20).int(), values=w.values.int())


def test_wrong_shapes_and_levels(w):
    with pytest.raises(RuntimeError, match="level 2 is out of range for a model with 2 levels"):
        call(w, torch.randn(2, 20), level=2)
    with pytest.raises(RuntimeError, match="level -1 is out of range"):
        call(w, torch.randn(2, 20), level=-1)
    with pytest.raises(RuntimeError, match="bias must have shape \\(10,\\)"):
        call(w, torch.randn(2, 20), bias=torch.randn(11))
    with pytest.raises(RuntimeError, match="row_end must have shape"):
        call(w, torch.randn(2, 20), row_end=w.row_end[:, :5].contiguous())
    with pytest.raises(RuntimeError, match="as many entries as values"):
        call(w, torch.randn(2, 20), col_idx=w.col_idx[:-1])
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        call(w, torch.randn(2, 20), activation="tanh")


def test_non_contiguous(w):
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        call(w, torch.randn(20, 2).T)
    with pytest.raises(RuntimeError, match="values must be contiguous"):
        call(w, torch.randn(2, 20), values=torch.randn(2 * w.values.numel())[::2])


@pytest.mark.parametrize("n", [1, 3, 40])
def test_corrupted_column_index_is_named(isa, w, n):
    cols = w.col_idx.clone()
    cols[5] = 20  # == K: one past the end
    with pytest.raises(RuntimeError, match=r"col_idx\[5\] = 20 .* outside \[0, K=20\)"):
        call(w, torch.randn(n, 20), col_idx=cols)
    cols[5] = -3
    with pytest.raises(RuntimeError, match=r"col_idx\[5\] = -3"):
        call(w, torch.randn(n, 20), col_idx=cols)
    cols[5] = 30000  # far outside: would fault if read
    with pytest.raises(RuntimeError, match="outside"):
        call(w, torch.randn(n, 20), col_idx=cols)


def test_corrupted_row_arrays_are_named(w):
    rp = w.row_ptr.clone()
    rp[3] = rp[2] - 1
    with pytest.raises(RuntimeError, match="row_ptr is not non-decreasing|outside its row"):
        call(w, torch.randn(2, 20), row_ptr=rp)
    rp = w.row_ptr.clone()
    rp[-1] = 10**6
    with pytest.raises(RuntimeError, match="exceeds the .* stored values|outside its row"):
        call(w, torch.randn(2, 20), row_ptr=rp)
    re = w.row_end.clone()
    re[1, 4] = 10**6
    with pytest.raises(RuntimeError, match=r"row_end\[1, 4\] = 1000000 is outside its row"):
        call(w, torch.randn(2, 20), level=1, row_end=re)


def test_bad_plan_is_refused(w):
    with pytest.raises(RuntimeError, match="plan"):
        call(w, torch.randn(2, 20), plan=torch.tensor([[0, 5], [0, 99]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="plan must be a contiguous int32"):
        call(w, torch.randn(2, 20), plan=torch.zeros(2, 3))


def test_conv_geometry_errors():
    wc = nested(torch.randn(6, 2, 3, 3), random_tags((6, 2, 3, 3), 1, 0.5), 1)

    def conv(x, **kw):
        a = dict(kernel_size=(3, 3), stride=1, padding=0, dilation=1, groups=2)
        a.update(kw)
        return ops.ncsr_conv2d(x, wc.values, wc.col_idx, wc.row_ptr, wc.row_end, 0, a["kernel_size"], None,
                               a["stride"], a["padding"], a["dilation"], a["groups"])

    with pytest.raises(RuntimeError, match="NCHW"):
        conv(torch.randn(4, 5, 5))
    with pytest.raises(RuntimeError, match="not divisible by groups"):
        conv(torch.randn(1, 5, 5, 5))
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        conv(torch.randn(1, 4, 2, 2))
    with pytest.raises(RuntimeError, match="stride must be positive"):
        conv(torch.randn(1, 4, 5, 5), stride=0)
    # The weight has 18 columns (2 channels per group x 3x3); read as a 1-channel 3x3 conv, K is 9.
    with pytest.raises(RuntimeError, match="outside \\[0, K=9\\)"):
        ops.ncsr_conv2d(torch.randn(1, 1, 5, 5), wc.values, wc.col_idx, wc.row_ptr, wc.row_end, 0, (3, 3))

def test_python_level_errors():
    import nestsparse
    from torch import nn

    model = nestsparse.convert(nn.Sequential(nn.Linear(4, 3)), {"0": torch.zeros(3, 4, dtype=torch.int8)})
    with pytest.raises(ValueError, match="level 5 is out of range"):
        nestsparse.set_level(model, 5)
    with pytest.raises(ValueError, match="level 1 is out of range"):
        model[0](torch.randn(1, 4), level=1)
    with pytest.raises(KeyError, match="no module named 'missing'"):
        nestsparse.convert(nn.Sequential(nn.Linear(4, 3)), {"missing": torch.zeros(3, 4)})


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=(5, 1), dilation=(2**62, 1)),                  # dh * (kh - 1) would wrap around
    dict(kernel_size=(2**32, 2**32), padding=(2**31, 2**31)),       # K = Cin * kh * kw would wrap around
    dict(kernel_size=(1, 1), padding=(2**40, 0)),
])
def test_conv_geometry_that_would_overflow_is_refused(geometry):
    w = nested(torch.randn(2, 1, 1, 2), torch.zeros(2, 1, 1, 2, dtype=torch.int8), 1)
    a = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1))
    a.update(geometry)
    with pytest.raises(RuntimeError, match="ncsr_conv2d: "):
        ops.ncsr_conv2d(torch.randn(1, 1, 1, 2), w.values, w.col_idx, w.row_ptr, w.row_end, 0, a["kernel_size"], None,
                        a["stride"], a["padding"], a["dilation"])


@pytest.mark.parametrize("geometry", [dict(k=1, s=1, p=0), dict(k=3, s=2, p=1)], ids=["direct", "phases"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_corrupted_column_index_is_named(geometry, dtype):
    k = geometry["k"]
    w = nested(torch.randn(4, 3, k, k, dtype=dtype), random_tags((4, 3, k, k), 1, 0.9), 1)
    cols = w.col_idx.clone()
    cols[2] = 3 * k * k
    with pytest.raises(RuntimeError, match=rf"col_idx\[2\] = {3 * k * k} .*outside \[0, K={3 * k * k}\)"):
        ops.ncsr_conv2d(torch.randn(2, 3, 6, 6, dtype=dtype), w.values, cols, w.row_ptr, w.row_end, 0, k, None,
                        geometry["s"], geometry["p"])


def test_backward_ops_check_columns(w):
    cols = w.col_idx.clone()
    cols[0] = 99
    with pytest.raises(RuntimeError, match=r"ncsr_linear_backward: col_idx\[0\] = 99"):
        torch.ops.nestsparse.ncsr_linear_backward(torch.randn(3, 10), torch.randn(3, 20), w.values, cols, w.row_ptr,
                                                  w.row_end, 0)


def test_plan_arguments_are_checked(w):
    with pytest.raises(RuntimeError, match="num_chunks must be >= 1"):
        ops.ncsr_plan(w.row_ptr, w.row_end, 0)
    with pytest.raises(RuntimeError, match="at most M \\+ 1024"):
        ops.ncsr_plan(w.row_ptr, w.row_end, 10**7)
    rp = w.row_ptr.clone()
    rp[4] = -5
    with pytest.raises(RuntimeError, match="ncsr_plan: row_ptr is not non-decreasing"):
        ops.ncsr_plan(rp, w.row_end, 4)


def test_modules_check_input_width():
    import nestsparse
    from torch import nn

    lin = nestsparse.convert(nn.Sequential(nn.Linear(20, 10)), {"0": torch.zeros(10, 20, dtype=torch.int8)})
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 20\)"):
        lin(torch.randn(3, 21))
    conv = nestsparse.convert(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), {"0": torch.zeros(6, 2, 3, 3, dtype=torch.int8)})
    with pytest.raises(ValueError, match="expected NCHW input with 4 channels"):
        conv(torch.randn(1, 6, 8, 8))
