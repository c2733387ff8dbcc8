"""Levels run as a dense product (set_dense_levels, choose_dense_levels) are copies of the nested weight: a copy must
never be served after the tensors it was made from changed, whatever wrote them, and threads that read while the
copies are dropped or rebuilt must never see half a set."""

import copy
import threading
import time

import pytest
import torch
from torch import nn

import nestsparse


def dense_model(levels=(0, 1)):
    """A converted two-layer model whose first layer runs ``levels`` as dense products, in eval mode."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 5))
    tags = {"0": nestsparse.magnitude_tags(dense[0].weight, (0.6, 0.2))}
    model = nestsparse.convert(dense, tags).eval()
    model[0].set_dense_levels(levels)
    return model


def assert_levels_follow_the_values(model, x):
    """Every level of ``model`` gives what the dense model of its current values gives (to_dense reads the values)."""
    with torch.no_grad():
        for level in (0, 1):
            nestsparse.set_level(model, level)
            torch.testing.assert_close(model(x), nestsparse.to_dense(model, level)(x), rtol=1e-5, atol=1e-5)
        nestsparse.set_level(model, 0)


@pytest.mark.parametrize("fused", [True, False])
def test_an_optimizer_step_drops_the_dense_copies(fused):
    """Adam(fused=True) writes the values without bumping their version counter: a copy keyed on the version was
    served after the step (outputs off by about 3)."""
    model = dense_model()
    x = torch.randn(4, 24)
    before = model(x).detach()
    opt = torch.optim.Adam(model.parameters(), lr=0.5, fused=fused)
    model.train()
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), before)
    assert_levels_follow_the_values(model, x)


def unused_column(layer):
    """A column that row 0 of the nested CSR layer does not hold (moving an entry there keeps the weight valid)."""
    row = set(layer.col_idx[: int(layer.row_ptr[1])].tolist())
    return next(c for c in range(layer.in_features) if c not in row)


def test_writes_through_data_and_numpy_and_foreach_lerp_are_seen():
    model = dense_model()
    x = torch.randn(3, 24)
    layer = model[0]
    writes = [
        lambda: layer.values.data.mul_(-1),  # .data has a version counter of its own
        lambda: layer.values.detach().numpy().__imul__(2.0),  # a numpy view: no counter at all
        lambda: torch._foreach_lerp_([layer.values.data], [torch.zeros_like(layer.values)], 0.5),  # an EMA update
        lambda: layer.bias.data.add_(1.0),
        lambda: layer.col_idx.numpy().__setitem__(0, unused_column(layer)),  # the structure, too
    ]
    for write in writes:
        layer.set_dense_levels((0, 1))
        with torch.no_grad():
            layer(x, level=0)
        write()
        assert_levels_follow_the_values(model, x)
        assert layer.dense_levels == ()


def test_a_model_converted_under_inference_mode_drops_stale_copies():
    """Inference tensors keep no version counter: the copies' key was fixed at -1 for good."""
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(24, 32))
    with torch.inference_mode():
        model = nestsparse.convert(dense, {"0": nestsparse.magnitude_tags(dense[0].weight, (0.6, 0.2))}).eval()
        model[0].set_dense_levels((0,))
        x = torch.randn(2, 24)
        model(x)
        model[0].values.mul_(3)
        assert_levels_follow_the_values(model, x)


def test_torch_compile_never_serves_a_copy_made_before_a_write():
    """The version check was skipped while compiling, so the compiled graph read the old copy forever."""
    model = dense_model()
    x = torch.randn(2, 24)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        model[0].values.mul_(0.5)  # an in-place write the eager check sees; the graph has no check
        torch.testing.assert_close(compiled(x), nestsparse.to_dense(model, 0)(x), rtol=1e-5, atol=1e-5)
        model[0].set_dense_levels((0, 1))
        model[0].values.data.mul_(3)
        torch.testing.assert_close(compiled(x), nestsparse.to_dense(model, 0)(x), rtol=1e-5, atol=1e-5)


def test_moves_and_casts_rebuild_the_copies_and_a_gpu_weight_is_refused():
    model = dense_model((1,))
    x = torch.randn(2, 24, dtype=torch.float64)
    model.double()
    assert model[0].dense_levels == (1,)
    assert_levels_follow_the_values(model, x)
    meta = copy.deepcopy(model[0])
    with pytest.warns(UserWarning, match="CPU only"):
        meta.to("meta")
    assert meta.dense_levels == ()
    with pytest.raises(ValueError, match="CPU only"):
        meta.set_dense_levels((0,))


def test_copies_are_shared_by_deep_copies_and_checked_by_each():
    model = dense_model()
    twin = copy.deepcopy(model)
    assert twin[0]._dense is model[0]._dense  # immutable: no second dense weight in memory
    x = torch.randn(2, 24)
    with torch.no_grad():
        twin[0].values.mul_(2)
        assert_levels_follow_the_values(twin, x)
        assert model[0].dense_levels == (0, 1) and twin[0].dense_levels == ()
        assert_levels_follow_the_values(model, x)


def test_threads_reading_while_the_weight_changes_never_see_half_a_set():
    """Explicit-level calls from threads plus weight updates raised KeyError('dense_weight_0') (371 in 15 s): two
    readers dropping stale copies at once deleted the same buffer twice."""
    model = dense_model()
    layer = model[0]
    x = torch.randn(2, 24)
    errors, stop = [], threading.Event()

    def reader(level):
        while not stop.is_set():
            try:
                with torch.no_grad():
                    out = layer(x, level=level)
                assert out.shape == (2, 32)
            except Exception as e:  # noqa: BLE001  (any error is a failure)
                errors.append(repr(e))
                return

    threads = [threading.Thread(target=reader, args=(lvl,)) for lvl in (0, 1, 0, 1)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 3
        i = 0
        while time.monotonic() < deadline and not errors:
            with torch.no_grad():
                layer.values.mul_(1.0 + 1e-3 * (i % 2))  # every reader finds the copies stale at once
            if i % 7 == 0:
                layer.set_dense_levels((0, 1))
            i += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert_levels_follow_the_values(model, x)


def test_the_byte_comparison_never_reads_a_freed_storage():
    """A storage resized to nothing (how FSDP frees a parameter) was read out of bounds."""
    a = torch.randn(1000)
    b = a.clone()
    assert nestsparse.ops.same_bytes([a, None], [b, None]) and not nestsparse.ops.same_bytes([a], [None])
    a.untyped_storage().resize_(0)
    assert not nestsparse.ops.same_bytes([a], [b])
    with pytest.raises(RuntimeError, match=r"snapshot\[0\] must be a contiguous CPU tensor"):
        nestsparse.ops.same_bytes([b], [a])
