import pytest
import torch

import nestsparse
from nestsparse import NestedCSR

ISAS = nestsparse._C.cpu_isas()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every op fills its output with NaN before its kernel runs, so an element it never writes fails."""
    nestsparse._C.set_poison_outputs(True)
    yield
    nestsparse._C.set_poison_outputs(False)


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once per CPU instruction set this processor supports."""
    before = nestsparse._C.cpu_isa()
    nestsparse._C.set_cpu_isa(request.param)
    yield request.param
    nestsparse._C.set_cpu_isa(before)


def random_tags(shape, num_levels, density=0.3, empty_rows=0, empty_level=None, generator=None):
    """Nested tags with odd features: level l keeps about density/(l+1); `empty_rows` leading rows are
    pruned at every level; `empty_level` (an index) keeps nothing at that level and beyond."""
    g = generator or torch.Generator().manual_seed(0)
    u = torch.rand(shape, generator=g)
    tags = torch.full(shape, -1, dtype=torch.int8)
    for lvl in range(num_levels):
        if empty_level is not None and lvl >= empty_level:
            break
        tags[u < density / (lvl + 1)] = lvl
    if empty_rows:
        tags[:empty_rows] = -1
    return tags


def nested(weight, tags, num_levels, index_dtype=None):
    w = NestedCSR.from_dense(weight, tags, num_levels=num_levels)
    if index_dtype is not None:
        w.col_idx = w.col_idx.to(index_dtype)
    return w.validate()


def tolerance(dtype):
    return {torch.float32: 2e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


def assert_close_to_reference(out, ref, dtype):
    """`ref` is float64; the error is measured relative to the reference's scale."""
    assert not torch.isnan(out).any(), "an output element was never written (NaN poison survived)"
    scale = ref.abs().max().item() + 1.0
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= tolerance(dtype) * scale, f"max error {err:.3g} > {tolerance(dtype)} x scale {scale:.3g}"
