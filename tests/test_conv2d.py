import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_reference, nested, random_tags
from nestsparse import ops

# (batch, Cin, Cout, H, W, kernel, stride, padding, dilation, groups)
CASES = [
    (1, 3, 5, 9, 11, 3, 1, 1, 1, 1),
    (3, 4, 6, 10, 7, 3, 2, 1, 1, 2),
    (2, 6, 6, 13, 9, 3, 2, 2, 2, 3),
    (1, 8, 16, 17, 17, 1, 1, 0, 1, 1),    # the direct 1x1 path (no copy)
    (2, 8, 12, 15, 15, 1, 2, 0, 1, 1),    # 1x1 stride 2 (projection shortcut)
    (1, 5, 7, 20, 1, (3, 1), (2, 1), (1, 0), 1, 1),
    (1, 6, 6, 8, 8, 3, 1, 1, 1, 6),        # depthwise
    (2, 3, 4, 31, 33, 5, 3, 2, (2, 1), 1),
    (1, 16, 8, 3, 3, 3, 1, 1, 1, 1),
]


def pair(v):
    return (v, v) if isinstance(v, int) else v


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_every_level_matches_float64_conv2d(isa, case):
    n, cin, cout, h, w_, k, s, p, d, g = case
    k, s, p, d = pair(k), pair(s), pair(p), pair(d)
    gen = torch.Generator().manual_seed(sum(pair(k)) + cin * 13 + cout)
    weight = torch.randn(cout, cin // g, *k, generator=gen)
    w = nested(weight, random_tags(weight.shape, 3, 0.5, empty_rows=1, generator=gen), 3)
    x = torch.randn(n, cin, h, w_, generator=gen)
    bias = torch.randn(cout, generator=gen)
    for level in range(3):
        for act, ref_act in (("none", lambda z: z), ("relu6", F.relu6), ("gelu", F.gelu)):
            out = ops.ncsr_conv2d(x, w.values, w.col_idx, w.row_ptr, w.row_end, level, k, bias, s, p, d, g, act)
            ref = ref_act(F.conv2d(x.double(), w.to_dense(level).double(), bias.double(), s, p, d, g))
            assert out.shape == ref.shape
            assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_conv_dtypes(dtype):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 4, 3, 3, generator=gen).to(dtype)
    w = nested(weight, random_tags(weight.shape, 2, 0.5, generator=gen), 2)
    x = torch.randn(2, 4, 9, 9, generator=gen).to(dtype)
    out = ops.ncsr_conv2d(x, w.values, w.col_idx, w.row_ptr, w.row_end, 1, (3, 3), None, 2, 1, 1, 1)
    assert out.dtype == dtype
    assert_close_to_reference(out, F.conv2d(x.double(), w.to_dense(1).double(), None, 2, 1), dtype)


def test_all_pruned_conv_gives_bias():
    w = nested(torch.randn(4, 3, 3, 3), torch.full((4, 3, 3, 3), -1, dtype=torch.int8), 1)
    bias = torch.randn(4)
    out = ops.ncsr_conv2d(torch.randn(1, 3, 6, 6), w.values, w.col_idx, w.row_ptr, w.row_end, 0, 3, bias, 1, 1)
    assert_close_to_reference(out, bias.double().view(1, 4, 1, 1).expand(1, 4, 6, 6), torch.float32)
