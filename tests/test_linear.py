"""<format>_linear against a float64 dense reference, for every format: every level, batch path, activation, dtype,
block shape and ISA, odd shapes, empty rows, blocks and levels; the plan; thread counts."""

import pytest
import torch

from nestsparse.activations import ACTIVATIONS

from conftest import DEVICES, activation_reference, assert_close_to_reference, has_kernel


def reference(x, w, level, bias, activation):
    z = x.double() @ w.to_dense(level).double().T
    if bias is not None:
        z = z + bias.double()
    return activation_reference(activation)(z)


# (batch, M, K, NBCR block shape). Batch <= 4 takes the small-batch kernel, > 4 the panel kernel with tile width 16
# (N <= 16), 32 (N <= 32) or 64, narrowed to 32 for K > 2048 and 16 for K > 4096. M and K are mostly not multiples
# of the vector width or the block, so the last block row and column are partial.
CASES = [
    (1, 33, 53, (16, 16)),
    (3, 17, 100, (8, 8)),
    (17, 64, 77, (16, 64)),
    (1000, 40, 129, (32, 32)),
    (5, 1, 1, (1, 1)),
    (64, 130, 1000, (16, 16)),
    (1, 53, 77, (16, 16)),
    (2, 17, 129, (8, 8)),
    (3, 1, 1, (1, 1)),
    (4, 129, 53, (32, 32)),
    (5, 77, 17, (3, 5)),
    (16, 3, 77, (8, 8)),
    (17, 53, 1000, (16, 64)),
    (31, 129, 77, (16, 16)),
    (33, 17, 53, (32, 32)),
    (64, 53, 129, (3, 5)),
    (32, 29, 200, (16, 16)),
    (65, 40, 300, (8, 8)),
    (100, 77, 1000, (32, 32)),
    (129, 17, 77, (1, 1)),
    (100, 1000, 17, (16, 64)),
    (1, 1000, 129, (8, 8)),
    (70, 9, 3000, (16, 64)),
    (40, 5, 5000, (32, 32)),
    (2, 7, 5000, (1, 1)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,M,K,block_shape", CASES, ids=[f"n{n}-{M}x{K}-b{bm}x{bk}" for n, M, K, (bm, bk) in CASES])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_every_level_matches_float64_reference(isa, fmt, device, n, M, K, block_shape, activation):
    if not has_kernel(f"{fmt.name}_linear", device):
        pytest.skip(f"{fmt.name}_linear has no {device} kernel")
    g = torch.Generator().manual_seed(n * 7 + M + K)
    w = fmt.random((M, K), 3, g, density=0.4, block_shape=block_shape)
    plan = w.plan(5)
    w = w.to(device)
    x = torch.randn(n, K, generator=g).to(device)
    bias = torch.randn(M, generator=g).to(device)
    for level in range(3):
        # Both with and without bias and plan (the plan is the CPU kernels' partition).
        for i, b in enumerate((bias, None)):
            p = plan if device == "cpu" and (i + level) % 2 == 0 else None
            out = w.linear(x, level, b, activation, p)
            assert out.shape == (n, M) and out.dtype == torch.float32
            ref = reference(x.cpu(), w.to("cpu"), level, None if b is None else bias.cpu(), activation)
            assert_close_to_reference(out.cpu(), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [2, 40])
def test_value_and_index_dtypes(isa, fmt, dtype, n):
    g = torch.Generator().manual_seed(3)
    M, K = 23, 45
    w = fmt.random((M, K), 2, g, dtype, density=0.5)
    # NCSR takes int16 or int32 column indices; NBCR's local indices are always int16.
    index_dtypes = [torch.int16, torch.int32] if fmt.name == "ncsr" else [torch.int16]
    x = torch.randn(n, K, generator=g).to(dtype)
    bias = torch.randn(M, generator=g).to(dtype)
    for index_dtype in index_dtypes:
        if fmt.name == "ncsr":
            w.col_idx = w.col_idx.to(index_dtype)
        for level in (0, 1):
            for activation in ("none", "relu", "gelu"):
                out = w.linear(x, level, bias, activation)
                assert out.dtype == dtype and out.shape == (n, M)
                assert_close_to_reference(out, reference(x, w, level, bias, activation), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unbatched_leading_dimensions_and_empty_batch(isa, fmt, dtype):
    g = torch.Generator().manual_seed(4)
    M, K = 37, 50
    w = fmt.random((M, K), 3, g, dtype, block_shape=(16, 16))
    bias = torch.randn(M, generator=g, dtype=dtype)
    x1 = torch.randn(K, generator=g, dtype=dtype)
    out = w.linear(x1, 1, bias, "relu")
    assert out.shape == (M,)
    assert_close_to_reference(out, reference(x1, w, 1, bias, "relu"), dtype)
    # (B, T, K) and more leading dimensions: 6, 21, 1 and 30 rows go through both kernels.
    for shape in ((2, 3, K), (3, 7, K), (1, 1, K), (2, 3, 5, K)):
        x = torch.randn(shape, generator=g, dtype=dtype)
        for level in range(3):
            out = w.linear(x, level, bias, "relu6")
            assert out.shape == (*shape[:-1], M)
            assert_close_to_reference(out, reference(x, w, level, bias, "relu6"), dtype)
    assert w.linear(torch.randn(0, K, dtype=dtype), 0).shape == (0, M)
    assert w.linear(torch.randn(4, 0, K, dtype=dtype), 2, bias).shape == (4, 0, M)


@pytest.mark.parametrize("n", [1, 4, 33])
@pytest.mark.parametrize("block_shape", [(1, 1), (8, 8), (16, 64)])
def test_empty_level_and_all_pruned_give_bias(isa, fmt, n, block_shape):
    M, K = 19, 37
    g = torch.Generator().manual_seed(n)
    bias = torch.randn(M, generator=g)
    x = torch.randn(n, K, generator=g)
    w = fmt.random((M, K), 3, g, density=0.6, block_shape=block_shape, odd=False, empty_level=2)
    assert w.nnz(2) == 0 and w.nnz(1) > 0
    assert_close_to_reference(w.linear(x, 2, bias, "relu"), torch.relu(bias.double()).expand(n, M), torch.float32)
    assert_close_to_reference(w.linear(x, 2), torch.zeros(n, M, dtype=torch.float64), torch.float32)
    assert_close_to_reference(w.linear(x, 1, bias, "gelu"), reference(x, w, 1, bias, "gelu"), torch.float32)
    pruned = fmt.random((M, K), 2, g, block_shape=block_shape, all_pruned=True)
    assert pruned.values.numel() == 0 and pruned.nnz(0) == 0
    assert fmt.name != "nbcr" or pruned.num_blocks == 0  # blocks with nothing kept are not stored
    for level in (0, 1):
        assert_close_to_reference(pruned.linear(x, level, bias), bias.double().expand(n, M), torch.float32)
        assert_close_to_reference(
            pruned.linear(x, level, None, "relu6"), torch.zeros(n, M, dtype=torch.float64), torch.float32
        )


def test_nothing_pruned_at_level_0(fmt):
    """Every weight present at level 0 (every block full) and one full block row at level 1."""
    g = torch.Generator().manual_seed(8)
    M, K = 40, 70
    tags = torch.zeros(M, K, dtype=torch.int8)
    tags[:16] = 1
    w = fmt.weight(torch.randn(M, K, generator=g), tags, 2, block_shape=(16, 16))
    assert w.nnz(0) == M * K and w.nnz(1) == 16 * K
    for n in (1, 3, 20, 70):
        x = torch.randn(n, K, generator=g)
        for level in (0, 1):
            assert_close_to_reference(w.linear(x, level), reference(x, w, level, None, "none"), torch.float32)


def test_plan_gives_the_same_result_as_none(isa, fmt):
    g = torch.Generator().manual_seed(5)
    M, K = 300, 200
    w = fmt.random((M, K), 2, g, density=0.3, block_shape=(16, 16))
    units = fmt.units(w)
    for chunks in (1, 3, 7, units, units + 5):
        plan = w.plan(chunks)
        assert plan.shape == (2, chunks + 1) and plan.dtype == torch.int32
        assert (plan[:, 0] == 0).all() and (plan[:, -1] == units).all() and (plan.diff(dim=1) >= 0).all()
        for n in (1, 3, 50):
            x = torch.randn(n, K, generator=g)
            for level in (0, 1):
                torch.testing.assert_close(w.linear(x, level, None, "none", plan), w.linear(x, level), rtol=0, atol=0)
    # The default number of chunks follows the thread count.
    assert w.plan().shape == (2, 4 * torch.get_num_threads() + 1)


def test_plan_balances_uneven_rows(fmt):
    # The first 16 rows hold almost every non-zero: an equal-rows split would give one chunk nearly all the work.
    M, K = 160, 512
    tags = torch.full((M, K), -1, dtype=torch.int8)
    tags[:16] = 0
    tags[16:, :2] = 0
    w = fmt.weight(torch.randn(M, K), tags, 1, block_shape=(8, 8))
    plan = w.plan(2)
    assert 0 < int(plan[0, 1]) * fmt.rows_per_unit(w) <= 16
    # Per level: level 1 keeps only the last 8 rows, so its split leans to the end.
    tags = torch.zeros(M, K, dtype=torch.int8)
    tags[-8:] = 1
    w = fmt.weight(torch.randn(M, K), tags, 2, block_shape=(8, 64))
    plan = w.plan(2) * fmt.rows_per_unit(w)
    assert 72 <= int(plan[0, 1]) <= 88 and int(plan[1, 1]) >= 120


def test_thread_counts_give_the_same_result(fmt):
    g = torch.Generator().manual_seed(6)
    M, K = 200, 150
    w = fmt.random((M, K), 2, g)
    x = torch.randn(40, K, generator=g)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(w.linear(x, 1, None, "relu"))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1])
    assert_close_to_reference(outs[0], reference(x, w, 1, None, "relu"), torch.float32)
