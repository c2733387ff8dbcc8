"""nbcr_linear against a float64 dense reference: every level, block shape, batch path, activation, dtype and ISA."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_reference, bcr_args, nested_bcr, random_bcr_tags
from nestsparse import ops

ACTS = {"none": lambda z: z, "relu": F.relu, "relu6": F.relu6, "gelu": F.gelu}


def reference(x, w, level, bias, activation):
    z = x.double() @ w.to_dense(level).double().T
    if bias is not None:
        z = z + bias.double()
    return ACTS[activation](z)


def linear(x, w, level, bias=None, activation="none", plan=None):
    return ops.nbcr_linear(x, *bcr_args(w), level, w.shape[0], w.block_shape, bias, activation, plan)


# (batch, M, K, block shape). Batch <= 4 takes the block dot-product kernel, > 4 the panel micro-kernel with tile
# width 16 (N <= 16), 32 (N <= 32) or 64, narrowed to 32 for K > 2048 and 16 for K > 4096. M and K are mostly
# not multiples of the block, so the last block row and column are partial.
CASES = [
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


@pytest.mark.parametrize("n,M,K,block_shape", CASES, ids=[f"n{n}-{M}x{K}-b{bm}x{bk}" for n, M, K, (bm, bk) in CASES])
def test_every_level_matches_float64_reference(isa, n, M, K, block_shape):
    g = torch.Generator().manual_seed(n * 7 + M + K)
    w = nested_bcr(torch.randn(M, K, generator=g), random_bcr_tags((M, K), block_shape, 3, generator=g), block_shape, 3)
    plan = ops.nbcr_plan(w.block_ptr, w.counts, block_shape[0], 5)
    x = torch.randn(n, K, generator=g)
    bias = torch.randn(M, generator=g)
    for level in range(3):
        dense = w.to_dense(level).double()
        # Every activation at every level; with and without bias and plan in turn (each both ways over the levels).
        for i, (activation, act) in enumerate(ACTS.items()):
            b = bias if (i + level) % 2 == 0 else None
            p = plan if (i // 2 + level) % 2 == 0 else None
            ref = act(x.double() @ dense.T + (0 if b is None else b.double()))
            out = linear(x, w, level, b, activation, p)
            assert out.shape == (n, M) and out.dtype == torch.float32
            assert_close_to_reference(out, ref, torch.float32)


def test_random_tags_have_the_odd_features():
    """The weights above really hold empty blocks, blocks with nothing at a higher level, and partial blocks."""
    g = torch.Generator().manual_seed(0)
    M, K, bs = 53, 77, (8, 8)
    tags = random_bcr_tags((M, K), bs, 3, generator=g)
    w = nested_bcr(torch.randn(M, K, generator=g), tags, bs, 3)
    MB, KB = w.grid
    assert w.num_blocks < MB * KB  # some blocks are not stored
    assert (w.counts[1, :, 0] == 0).any() and (w.counts[2, :, 0] == 0).any()  # blocks empty at higher levels
    assert (w.counts[0, :, 0] < bs[0]).any() and (w.counts[0, :, 1] < bs[1]).any()
    assert 0 < w.nnz(2) < w.nnz(1) < w.nnz(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [2, 40])
def test_value_dtypes(isa, dtype, n):
    g = torch.Generator().manual_seed(3)
    M, K, bs = 23, 45, (8, 8)
    w = nested_bcr(torch.randn(M, K, generator=g).to(dtype), random_bcr_tags((M, K), bs, 2, generator=g), bs, 2)
    x = torch.randn(n, K, generator=g).to(dtype)
    bias = torch.randn(M, generator=g).to(dtype)
    for level in (0, 1):
        for activation in ("none", "gelu"):
            out = linear(x, w, level, bias, activation)
            assert out.dtype == dtype and out.shape == (n, M)
            assert_close_to_reference(out, reference(x, w, level, bias, activation), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unbatched_and_3d_input(isa, dtype):
    g = torch.Generator().manual_seed(4)
    M, K, bs = 37, 50, (16, 16)
    w = nested_bcr(torch.randn(M, K, generator=g, dtype=dtype), random_bcr_tags((M, K), bs, 3, generator=g), bs, 3)
    bias = torch.randn(M, generator=g, dtype=dtype)
    x1 = torch.randn(K, generator=g, dtype=dtype)
    out = linear(x1, w, 1, bias, "relu")
    assert out.shape == (M,)
    assert_close_to_reference(out, reference(x1, w, 1, bias, "relu"), dtype)
    for shape in ((2, 3, K), (3, 7, K), (1, 1, K)):  # (B, T, K): 6 and 21 rows go through the two kernels
        x = torch.randn(shape, generator=g, dtype=dtype)
        for level in range(3):
            out = linear(x, w, level, bias, "relu6")
            assert out.shape == (*shape[:-1], M)
            assert_close_to_reference(out, reference(x, w, level, bias, "relu6"), dtype)
    empty = linear(torch.randn(0, K, dtype=dtype), w, 0)
    assert empty.shape == (0, M)
    empty = linear(torch.randn(4, 0, K, dtype=dtype), w, 2, bias)
    assert empty.shape == (4, 0, M)


@pytest.mark.parametrize("n", [1, 4, 33])
@pytest.mark.parametrize("block_shape", [(1, 1), (8, 8), (16, 64)])
def test_empty_level_and_all_pruned_give_bias(isa, n, block_shape):
    M, K = 19, 37
    g = torch.Generator().manual_seed(n)
    bias = torch.randn(M, generator=g)
    x = torch.randn(n, K, generator=g)
    tags = random_bcr_tags((M, K), block_shape, 3, keep=0.8, empty_blocks=0, level0_only_blocks=0, empty_level=2,
                           generator=g)
    w = nested_bcr(torch.randn(M, K, generator=g), tags, block_shape, 3)
    assert w.nnz(2) == 0 and w.nnz(1) > 0
    out = linear(x, w, 2, bias, "relu")
    assert_close_to_reference(out, F.relu(bias.double()).expand(n, M), torch.float32)
    out = linear(x, w, 2)
    assert_close_to_reference(out, torch.zeros(n, M, dtype=torch.float64), torch.float32)
    assert_close_to_reference(linear(x, w, 1, bias, "gelu"), reference(x, w, 1, bias, "gelu"), torch.float32)
    tags = random_bcr_tags((M, K), block_shape, 2, all_pruned=True)
    pruned = nested_bcr(torch.randn(M, K, generator=g), tags, block_shape, 2)
    assert pruned.values.numel() == 0 and pruned.num_blocks == 0
    for level in (0, 1):
        out = linear(x, pruned, level, bias)
        assert_close_to_reference(out, bias.double().expand(n, M), torch.float32)
        out = linear(x, pruned, level, None, "relu6")
        assert_close_to_reference(out, torch.zeros(n, M, dtype=torch.float64), torch.float32)


def test_dense_blocks_match():
    """Nothing pruned at level 0 (every block full) and one full block row at level 1."""
    g = torch.Generator().manual_seed(8)
    M, K, bs = 40, 70, (16, 16)
    tags = torch.zeros(M, K, dtype=torch.int8)
    tags[:16] = 1
    w = nested_bcr(torch.randn(M, K, generator=g), tags, bs, 2)
    assert w.nnz(0) == M * K
    for n in (1, 3, 20, 70):
        x = torch.randn(n, K, generator=g)
        for level in (0, 1):
            assert_close_to_reference(linear(x, w, level), reference(x, w, level, None, "none"), torch.float32)


def test_plan_gives_the_same_result_as_none(isa):
    g = torch.Generator().manual_seed(5)
    M, K, bs = 300, 200, (16, 16)
    w = nested_bcr(torch.randn(M, K, generator=g), random_bcr_tags((M, K), bs, 2, generator=g), bs, 2)
    MB = w.grid[0]
    for chunks in (1, 3, 7, MB, MB + 5):
        plan = ops.nbcr_plan(w.block_ptr, w.counts, bs[0], chunks)
        assert plan.shape == (2, chunks + 1) and plan.dtype == torch.int32
        assert (plan[:, 0] == 0).all() and (plan[:, -1] == MB).all() and (plan.diff(dim=1) >= 0).all()
        for n in (1, 3, 50):
            x = torch.randn(n, K, generator=g)
            for level in (0, 1):
                a = linear(x, w, level, None, "none", plan)
                b = linear(x, w, level)
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The default number of chunks follows the thread count.
    assert ops.nbcr_plan(w.block_ptr, w.counts, bs[0]).shape == (2, 4 * torch.get_num_threads() + 1)


def test_plan_balances_uneven_block_rows():
    # Block rows 0..1 hold almost every stored value: an equal-rows split would give one chunk nearly all the work.
    M, K, bs = 160, 512, (8, 8)
    tags = torch.full((M, K), -1, dtype=torch.int8)
    tags[:16] = 0
    tags[16:, :2] = 0
    w = nested_bcr(torch.randn(M, K), tags, bs, 1)
    plan = ops.nbcr_plan(w.block_ptr, w.counts, bs[0], 2)
    assert 0 < int(plan[0, 1]) <= 2
    # Per level: level 1 keeps only the last block row, so its split leans to the end.
    bs = (8, 64)
    tags = torch.zeros(M, K, dtype=torch.int8)
    tags[-8:] = 1
    w = nested_bcr(torch.randn(M, K), tags, bs, 2)
    plan = ops.nbcr_plan(w.block_ptr, w.counts, bs[0], 2)
    assert int(plan[0, 1]) in range(9, 12) and int(plan[1, 1]) >= 15


def test_thread_counts_give_the_same_result():
    g = torch.Generator().manual_seed(6)
    M, K, bs = 200, 150, (8, 8)
    w = nested_bcr(torch.randn(M, K, generator=g), random_bcr_tags((M, K), bs, 2, generator=g), bs, 2)
    x = torch.randn(40, K, generator=g)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(linear(x, w, 1, None, "relu"))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1])
    assert_close_to_reference(outs[0], reference(x, w, 1, None, "relu"), torch.float32)
