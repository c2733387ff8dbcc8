import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, assert_close_to_reference, nested, random_tags
from nestsparse import ops

ACTS = {"none": lambda z: z, "relu": F.relu, "relu6": F.relu6, "gelu": F.gelu}


def reference(x, w, level, bias, activation):
    z = x.double() @ w.to_dense(level).double().T
    if bias is not None:
        z = z + bias.double()
    return ACTS[activation](z)


# (batch, M, K): batch 1, 3 (spmv path), 17 (one narrow tile), 1000 (many tiles + a tail); K not a multiple of 16.
SHAPES = [(1, 33, 53), (3, 17, 100), (17, 64, 77), (1000, 40, 129), (5, 1, 1), (64, 130, 1000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,M,K", SHAPES, ids=[f"n{n}-{M}x{K}" for n, M, K in SHAPES])
@pytest.mark.parametrize("activation", list(ACTS))
def test_every_level_matches_float64_reference(isa, device, n, M, K, activation):
    g = torch.Generator().manual_seed(n * 7 + M)
    w = nested(torch.randn(M, K, generator=g), random_tags((M, K), 3, 0.4, empty_rows=min(2, M - 1), generator=g), 3)
    w = w.to(device)
    x = torch.randn(n, K, generator=g).to(device)
    bias = torch.randn(M, generator=g).to(device)
    for level in range(3):
        for b in (bias, None):
            out = ops.ncsr_linear(x, w.values, w.col_idx, w.row_ptr, w.row_end, level, b, activation)
            assert out.shape == (n, M)
            assert_close_to_reference(out.cpu(), reference(x.cpu(), w.to("cpu"), level, None if b is None else bias.cpu(), activation), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("n", [2, 40])
def test_value_and_index_dtypes(isa, dtype, index_dtype, n):
    g = torch.Generator().manual_seed(3)
    M, K = 23, 45
    w = nested(torch.randn(M, K, generator=g).to(dtype), random_tags((M, K), 2, 0.5, generator=g), 2, index_dtype)
    x = torch.randn(n, K, generator=g).to(dtype)
    bias = torch.randn(M, generator=g).to(dtype)
    out = ops.ncsr_linear(x, w.values, w.col_idx, w.row_ptr, w.row_end, 1, bias, "relu")
    assert out.dtype == dtype
    assert_close_to_reference(out, reference(x, w, 1, bias, "relu"), dtype)


def test_leading_batch_dimensions_and_empty_batch():
    w = nested(torch.randn(8, 12), random_tags((8, 12), 2), 2)
    x = torch.randn(2, 3, 5, 12)
    out = ops.ncsr_linear(x, w.values, w.col_idx, w.row_ptr, w.row_end, 0)
    assert out.shape == (2, 3, 5, 8)
    assert_close_to_reference(out, reference(x, w, 0, None, "none"), torch.float32)
    empty = ops.ncsr_linear(torch.randn(0, 12), w.values, w.col_idx, w.row_ptr, w.row_end, 0)
    assert empty.shape == (0, 8)


@pytest.mark.parametrize("n", [1, 4, 33])
def test_empty_level_and_all_pruned_give_bias(isa, n):
    M, K = 19, 37
    bias = torch.randn(M)
    x = torch.randn(n, K)
    w = nested(torch.randn(M, K), random_tags((M, K), 3, 0.5, empty_level=2), 3)
    assert w.nnz(2) == 0 and w.nnz(1) > 0
    out = ops.ncsr_linear(x, w.values, w.col_idx, w.row_ptr, w.row_end, 2, bias, "relu")
    assert_close_to_reference(out, F.relu(bias.double()).expand(n, M), torch.float32)
    pruned = nested(torch.randn(M, K), torch.full((M, K), -1, dtype=torch.int8), 2)
    assert pruned.values.numel() == 0
    out = ops.ncsr_linear(x, pruned.values, pruned.col_idx, pruned.row_ptr, pruned.row_end, 0, bias)
    assert_close_to_reference(out, bias.double().expand(n, M), torch.float32)


def test_plan_gives_the_same_result_as_none():
    g = torch.Generator().manual_seed(5)
    M, K = 300, 200
    w = nested(torch.randn(M, K, generator=g), random_tags((M, K), 2, 0.3, generator=g), 2)
    plan = ops.ncsr_plan(w.row_ptr, w.row_end, 7)
    assert plan.shape == (2, 8) and plan.dtype == torch.int32
    assert (plan[:, 0] == 0).all() and (plan[:, -1] == M).all() and (plan.diff(dim=1) >= 0).all()
    for n in (1, 50):
        x = torch.randn(n, K, generator=g)
        for level in (0, 1):
            a = ops.ncsr_linear(x, w.values, w.col_idx, w.row_ptr, w.row_end, level, None, "none", plan)
            b = ops.ncsr_linear(x, w.values, w.col_idx, w.row_ptr, w.row_end, level)
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plan_balances_uneven_rows():
    # Rows 0..9 hold almost every non-zero: an equal-rows split would give one chunk nearly all the work.
    tags = torch.full((100, 500), -1, dtype=torch.int8)
    tags[:10] = 0
    tags[10:, :2] = 0
    w = nested(torch.randn(100, 500), tags, 1)
    plan = ops.ncsr_plan(w.row_ptr, w.row_end, 2)
    assert 0 < int(plan[0, 1]) <= 10
