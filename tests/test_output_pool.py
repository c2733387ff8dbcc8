"""The pool of large CPU outputs: recycled buffers give the same results, the limit is kept and checked."""

import pytest
import torch
import torch.nn.functional as F

import nestsparse as ns


def test_outputs_are_recycled_and_results_unchanged(fmt):
    w = fmt.random((64, 16, 3, 3), 2, torch.Generator().manual_seed(0), density=0.3, block_shape=(8, 8))
    x = torch.randn(4, 16, 40, 40)  # output 4 x 64 x 38 x 38 floats: 1.4 MiB, pooled
    ref = F.conv2d(x.double(), w.to_dense(1).double())
    before = ns.output_pool_stats()
    for _ in range(3):
        out = w.conv2d(x, 1, (3, 3))
        assert torch.allclose(out.double(), ref, atol=1e-4)
        del out
    after = ns.output_pool_stats()
    assert after["hits"] - before["hits"] >= 2  # the first call's buffer served the next two


def test_limit_is_kept_and_checked():
    previous = ns.set_output_pool_limit(0)
    try:
        assert ns.output_pool_stats()["cached_bytes"] == 0
        with pytest.raises(RuntimeError, match="must be >= 0"):
            ns.set_output_pool_limit(-1)
    finally:
        ns.set_output_pool_limit(previous)


def test_pooled_outputs_resize_like_any_tensor():
    lin = torch.nn.Linear(256, 1024)
    w = ns.NestedCSR.from_dense(lin.weight.detach(), ns.magnitude_tags(lin.weight.detach(), (0.5,)))
    out = w.linear(torch.randn(512, 256), 0)  # 2 MiB: pooled
    out.resize_(1024, 1024)  # grows: moves to new memory, the buffer goes back to the pool
    assert out.shape == (1024, 1024)
    torch.mm(torch.randn(1024, 8), torch.randn(8, 1024), out=out)
