"""nbcr_conv2d against F.conv2d in float64: every level, geometry (stride, padding, dilation, groups), block shape,
activation, dtype and ISA."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_reference, bcr_args, nested_bcr, random_bcr_tags
from nestsparse import ops

ACTS = {"none": lambda z: z, "relu": F.relu, "relu6": F.relu6, "gelu": F.gelu}

# (batch, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, block shape)
CASES = [
    (1, 3, 5, 9, 11, 3, 1, 1, 1, 1, (3, 5)),
    (3, 4, 6, 10, 7, 3, 2, 1, 1, 2, (4, 4)),          # Cout/groups = 3: block row 0 straddles both groups
    (2, 6, 6, 13, 9, 3, 2, 2, 2, 3, (8, 8)),          # one block row (partial) spans all three groups
    (1, 8, 16, 17, 17, 1, 1, 0, 1, 1, (16, 16)),      # the direct 1x1 path (x read in place)
    (2, 12, 20, 6, 5, 1, 1, 0, 1, 4, (3, 5)),         # direct path with groups, Cout/groups = 5 straddled by bm=3
    (2, 8, 12, 15, 15, 1, 2, 0, 1, 1, (8, 8)),        # 1x1 stride 2 (projection shortcut)
    (1, 5, 7, 20, 1, (3, 1), (2, 1), (1, 0), 1, 1, (1, 1)),  # asymmetric kernel and stride, 1-wide image
    (1, 6, 6, 8, 8, 3, 1, 1, 1, 6, (4, 3)),           # depthwise, block rows straddle channels
    (2, 4, 4, 7, 6, 3, 2, 1, 1, 4, (1, 1)),           # depthwise, 1x1 blocks
    (2, 3, 4, 31, 33, 5, 3, 2, (2, 1), 1, (32, 32)),  # wide image: many 64-column tiles
    (1, 16, 8, 3, 3, 3, 1, 1, 1, 1, (16, 64)),        # small image, K = 144
    (5, 4, 9, 4, 4, 2, 1, 0, 1, 1, (16, 16)),         # batch 5, even kernel, Cout < bm
    (1, 3, 4, 1, 1, 1, 1, 0, 1, 1, (8, 8)),           # 1x1 image
    (2, 4, 10, 5, 6, (1, 3), (1, 2), (0, 1), 1, 2, (3, 5)),
    (1, 2, 3, 7, 7, 3, 1, 3, 3, 1, (2, 2)),           # dilation 3, padding 3
]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv(x, w, level, k, bias=None, s=1, p=0, d=1, groups=1, activation="none", plan=None):
    return ops.nbcr_conv2d(x, *bcr_args(w), level, w.shape[0], w.block_shape, k, bias, s, p, d, groups, activation,
                           plan)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_every_level_matches_float64_conv2d(isa, case):
    n, cin, cout, h, w_, k, s, p, d, g, bs = case
    k, s, p, d = pair(k), pair(s), pair(p), pair(d)
    gen = torch.Generator().manual_seed(sum(k) + cin * 13 + cout + bs[0])
    weight = torch.randn(cout, cin // g, *k, generator=gen)
    w = nested_bcr(weight, random_bcr_tags(weight.shape, bs, 3, keep=0.7, generator=gen), bs, 3)
    assert w.to_dense(0).shape == weight.shape
    plan = ops.nbcr_plan(w.block_ptr, w.counts, bs[0], 3)
    x = torch.randn(n, cin, h, w_, generator=gen)
    bias = torch.randn(cout, generator=gen)
    for level in range(3):
        wd = w.to_dense(level).double()
        z = F.conv2d(x.double(), wd, None, s, p, d, g)
        # Every activation at every level; with and without bias and plan in turn (each both ways over the levels).
        for i, (act, ref_act) in enumerate(ACTS.items()):
            b = bias if (i + level) % 2 == 0 else None
            pl = plan if (i // 2 + level) % 2 == 0 else None
            ref = ref_act(z if b is None else z + b.double().view(1, -1, 1, 1))
            out = conv(x, w, level, k, b, s, p, d, g, act, pl)
            assert out.shape == ref.shape and out.dtype == torch.float32
            assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("geometry", [dict(k=3, s=2, p=1, g=2), dict(k=1, s=1, p=0, g=1)], ids=["phases", "direct"])
def test_conv_dtypes(isa, dtype, geometry):
    gen = torch.Generator().manual_seed(1)
    k, g = geometry["k"], geometry["g"]
    weight = torch.randn(6, 4 // g, k, k, generator=gen).to(dtype)
    bs = (4, 4)
    w = nested_bcr(weight, random_bcr_tags(weight.shape, bs, 2, keep=0.7, generator=gen), bs, 2)
    x = torch.randn(2, 4, 9, 9, generator=gen).to(dtype)
    bias = torch.randn(6, generator=gen).to(dtype)
    for level in (0, 1):
        out = conv(x, w, level, k, bias, geometry["s"], geometry["p"], 1, g, "relu")
        assert out.dtype == dtype
        ref = F.relu(F.conv2d(x.double(), w.to_dense(level).double(), bias.double(), geometry["s"], geometry["p"], 1,
                              g))
        assert_close_to_reference(out, ref, dtype)


@pytest.mark.parametrize("k", [1, 3])
def test_empty_level_and_all_pruned_conv_give_bias(isa, k):
    gen = torch.Generator().manual_seed(k)
    bs = (4, 4)
    weight = torch.randn(6, 3, k, k, generator=gen)
    w = nested_bcr(weight, random_bcr_tags(weight.shape, bs, 3, keep=0.8, empty_level=1, generator=gen), bs, 3)
    assert w.nnz(0) > 0 and w.nnz(1) == 0
    bias = torch.randn(6, generator=gen)
    x = torch.randn(2, 3, 6, 5, generator=gen)
    pad = k // 2
    for level in (1, 2):
        out = conv(x, w, level, k, bias, 1, pad, 1, 1, "relu6")
        assert_close_to_reference(out, F.relu6(bias.double()).view(1, 6, 1, 1).expand(2, 6, 6, 5), torch.float32)
    out = conv(x, w, 0, k, bias, 1, pad)
    assert_close_to_reference(out, F.conv2d(x.double(), w.to_dense(0).double(), bias.double(), 1, pad), torch.float32)
    pruned = nested_bcr(weight, random_bcr_tags(weight.shape, bs, 1, all_pruned=True), bs, 1)
    assert pruned.num_blocks == 0
    out = conv(x, pruned, 0, k, bias, 1, pad)
    assert_close_to_reference(out, bias.double().view(1, 6, 1, 1).expand(2, 6, 6, 5), torch.float32)


def test_empty_batch_conv():
    weight = torch.randn(4, 3, 3, 3)
    w = nested_bcr(weight, random_bcr_tags(weight.shape, (2, 2), 1), (2, 2), 1)
    out = conv(torch.randn(0, 3, 5, 5), w, 0, 3)
    assert out.shape == (0, 4, 3, 3)


def test_conv_plan_and_threads_give_the_same_result():
    gen = torch.Generator().manual_seed(9)
    bs = (8, 8)
    weight = torch.randn(40, 8, 3, 3, generator=gen)
    w = nested_bcr(weight, random_bcr_tags(weight.shape, bs, 2, generator=gen), bs, 2)
    x = torch.randn(2, 8, 12, 11, generator=gen)
    base = conv(x, w, 1, 3, None, 1, 1)
    for chunks in (1, 2, 5, 9):
        plan = ops.nbcr_plan(w.block_ptr, w.counts, bs[0], chunks)
        torch.testing.assert_close(conv(x, w, 1, 3, None, 1, 1, 1, 1, "none", plan), base, rtol=0, atol=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = conv(x, w, 1, 3, None, 1, 1)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, base)
