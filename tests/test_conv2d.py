"""<format>_conv2d against F.conv2d in float64, for every format: every level, geometry (stride, padding, dilation,
groups), block shape, activation, dtype and ISA; empty levels, all-pruned weights, empty batches; plan and threads."""

import pytest
import torch
import torch.nn.functional as F

from nestsparse.activations import ACTIVATIONS

from conftest import activation_reference, assert_close_to_reference


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# (batch, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, NBCR block shape)
CASES = [
    (1, 3, 5, 9, 11, 3, 1, 1, 1, 1, (3, 5)),
    (3, 4, 6, 10, 7, 3, 2, 1, 1, 2, (4, 4)),  # Cout/groups = 3: block row 0 straddles both groups
    (2, 6, 6, 13, 9, 3, 2, 2, 2, 3, (8, 8)),  # one block row (partial) spans all three groups
    (1, 8, 16, 17, 17, 1, 1, 0, 1, 1, (16, 16)),  # the direct 1x1 path (x read in place)
    (2, 12, 20, 6, 5, 1, 1, 0, 1, 4, (3, 5)),  # direct path with groups, Cout/groups = 5 straddled by bm=3
    (2, 8, 12, 15, 15, 1, 2, 0, 1, 1, (8, 8)),  # 1x1 stride 2 (projection shortcut)
    (1, 5, 7, 20, 1, (3, 1), (2, 1), (1, 0), 1, 1, (1, 1)),  # asymmetric kernel and stride, 1-wide image
    (1, 6, 6, 8, 8, 3, 1, 1, 1, 6, (4, 3)),  # depthwise, block rows straddle channels
    (2, 4, 4, 7, 6, 3, 2, 1, 1, 4, (1, 1)),  # depthwise, 1x1 blocks
    (2, 3, 4, 31, 33, 5, 3, 2, (2, 1), 1, (32, 32)),  # wide image: many 64-column tiles
    (1, 16, 8, 3, 3, 3, 1, 1, 1, 1, (16, 64)),  # small image, K = 144
    (5, 4, 9, 4, 4, 2, 1, 0, 1, 1, (16, 16)),  # batch 5, even kernel, Cout < bm
    (1, 3, 4, 1, 1, 1, 1, 0, 1, 1, (8, 8)),  # 1x1 image
    (2, 4, 10, 5, 6, (1, 3), (1, 2), (0, 1), 1, 2, (3, 5)),
    (1, 2, 3, 7, 7, 3, 1, 3, 3, 1, (2, 2)),  # dilation 3, padding 3
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_every_level_matches_float64_conv2d(isa, fmt, case):
    n, cin, cout, h, w_, k, s, p, d, g, bs = case
    k, s, p, d = pair(k), pair(s), pair(p), pair(d)
    gen = torch.Generator().manual_seed(sum(k) + cin * 13 + cout + bs[0])
    w = fmt.random((cout, cin // g, *k), 3, gen, density=0.5, block_shape=bs)
    assert w.to_dense(0).shape == (cout, cin // g, *k)
    plan = w.plan(3)
    x = torch.randn(n, cin, h, w_, generator=gen)
    bias = torch.randn(cout, generator=gen)
    for level in range(3):
        z = F.conv2d(x.double(), w.to_dense(level).double(), None, s, p, d, g)
        # Every activation at every level; with and without bias and plan in turn (each both ways over the levels).
        for i, act in enumerate(ACTIVATIONS):
            b = bias if (i + level) % 2 == 0 else None
            pl = plan if (i // 2 + level) % 2 == 0 else None
            ref = activation_reference(act)(z if b is None else z + b.double().view(1, -1, 1, 1))
            out = w.conv2d(x, level, k, b, s, p, d, g, act, pl)
            assert out.shape == ref.shape and out.dtype == torch.float32
            assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "geometry",
    [dict(k=3, s=2, p=1, g=2), dict(k=3, s=2, p=1, g=1), dict(k=1, s=1, p=0, g=1)],
    ids=["phases-grouped", "phases", "direct"],
)
def test_conv_dtypes(isa, fmt, dtype, geometry):
    gen = torch.Generator().manual_seed(1)
    k, g = geometry["k"], geometry["g"]
    w = fmt.random((6, 4 // g, k, k), 2, gen, dtype, density=0.5, block_shape=(4, 4))
    x = torch.randn(2, 4, 9, 9, generator=gen).to(dtype)
    bias = torch.randn(6, generator=gen).to(dtype)
    for level in (0, 1):
        for b, act in ((bias, "relu"), (None, "none")):
            out = w.conv2d(x, level, k, b, geometry["s"], geometry["p"], 1, g, act)
            assert out.dtype == dtype
            ref = F.conv2d(
                x.double(),
                w.to_dense(level).double(),
                None if b is None else b.double(),
                geometry["s"],
                geometry["p"],
                1,
                g,
            )
            assert_close_to_reference(out, activation_reference(act)(ref), dtype)


@pytest.mark.parametrize("k", [1, 3])
def test_empty_level_and_all_pruned_conv_give_bias(isa, fmt, k):
    gen = torch.Generator().manual_seed(k)
    w = fmt.random((6, 3, k, k), 3, gen, density=0.6, block_shape=(4, 4), empty_level=1)
    assert w.nnz(0) > 0 and w.nnz(1) == 0
    bias = torch.randn(6, generator=gen)
    x = torch.randn(2, 3, 6, 5, generator=gen)
    pad = k // 2
    for level in (1, 2):
        out = w.conv2d(x, level, k, bias, 1, pad, 1, 1, "relu6")
        assert_close_to_reference(out, F.relu6(bias.double()).view(1, 6, 1, 1).expand(2, 6, 6, 5), torch.float32)
    out = w.conv2d(x, 0, k, bias, 1, pad)
    assert_close_to_reference(out, F.conv2d(x.double(), w.to_dense(0).double(), bias.double(), 1, pad), torch.float32)
    pruned = fmt.random((6, 3, k, k), 1, gen, block_shape=(4, 4), all_pruned=True)
    assert pruned.nnz(0) == 0 and pruned.values.numel() == 0
    assert fmt.name != "nbcr" or pruned.num_blocks == 0
    out = pruned.conv2d(x, 0, k, bias, 1, pad)
    assert_close_to_reference(out, bias.double().view(1, 6, 1, 1).expand(2, 6, 6, 5), torch.float32)


def test_empty_batch_conv(fmt):
    w = fmt.random((4, 3, 3, 3), 1, block_shape=(2, 2))
    assert w.conv2d(torch.randn(0, 3, 5, 5), 0, 3).shape == (0, 4, 3, 3)


def test_conv_plan_and_threads_give_the_same_result(fmt):
    gen = torch.Generator().manual_seed(9)
    w = fmt.random((40, 8, 3, 3), 2, gen, block_shape=(8, 8))
    x = torch.randn(2, 8, 12, 11, generator=gen)
    base = w.conv2d(x, 1, 3, None, 1, 1)
    for chunks in (1, 2, 5, 9):
        torch.testing.assert_close(w.conv2d(x, 1, 3, None, 1, 1, 1, 1, "none", w.plan(chunks)), base, rtol=0, atol=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = w.conv2d(x, 1, 3, None, 1, 1)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, base)
    assert_close_to_reference(base, F.conv2d(x.double(), w.to_dense(1).double(), None, 1, 1), torch.float32)
