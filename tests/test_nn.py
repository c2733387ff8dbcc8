import functools

import pytest
import torch
from torch import nn

import nestsparse
from nestsparse import NestedSparseConv2d, NestedSparseLinear

from conftest import value_mask

BS = (4, 4)


def sparse_model(model, densities, fmt, **kwargs):
    """``model`` converted to ``fmt`` with one-shot tags of the format's structure."""
    tags = nestsparse.model_tags(model, densities, structure=fmt.structure, block_shape=BS, **kwargs)
    return nestsparse.convert(model, tags, format=fmt.name, block_shape=BS), tags


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.ReLU6(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.GELU(),
        nn.Linear(16, 5),
    )


def test_convert_replaces_layers_and_fuses_activations(fmt):
    model = small_cnn()
    sparse, _ = sparse_model(model, (0.6, 0.3, 0.1), fmt)
    assert all(sparse[i].format == fmt.name for i in (0, 2, 5, 7))
    kinds = [type(m).__name__ for m in sparse]
    assert kinds == [
        "NestedSparseConv2d",
        "Identity",
        "NestedSparseConv2d",
        "Identity",
        "Flatten",
        "NestedSparseLinear",
        "Identity",
        "NestedSparseLinear",
    ]
    assert [sparse[i].activation for i in (0, 2, 5, 7)] == ["relu", "relu6", "gelu", "none"]
    assert isinstance(model[0], nn.Conv2d), "convert must not modify its input unless inplace=True"


@pytest.mark.parametrize("level", [0, 1, 2])
def test_every_level_equals_the_masked_dense_model(fmt, level):
    model = small_cnn()
    sparse, tags = sparse_model(model, (0.6, 0.3, 0.1), fmt, scope="global")
    masked = small_cnn()
    with torch.no_grad():
        for name, t in tags.items():
            masked.get_submodule(name).weight.mul_(t >= level)
    x = torch.randn(3, 3, 8, 8)
    nestsparse.set_level(sparse, level)
    torch.testing.assert_close(sparse(x), masked(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nestsparse.to_dense(sparse, level)(x), masked(x), rtol=1e-4, atol=1e-5)


def test_switching_levels_copies_nothing(fmt):
    sparse, _ = sparse_model(small_cnn(), (0.6, 0.3), fmt)
    ptrs = {n: t.data_ptr() for n, t in sparse.state_dict().items()}
    x = torch.randn(1, 3, 8, 8)
    outs = []
    for level in (0, 1, 0):
        nestsparse.set_level(sparse, level)
        outs.append(sparse(x))
    assert {n: t.data_ptr() for n, t in sparse.state_dict().items()} == ptrs
    torch.testing.assert_close(outs[0], outs[2])
    assert not torch.allclose(outs[0], outs[1])
    assert nestsparse.get_levels(sparse) == 2


def test_per_call_level_overrides_module_level(fmt):
    lin = nn.Linear(20, 10)
    tags = nestsparse.model_tags(nn.Sequential(lin), (0.5, 0.1), structure=fmt.structure, block_shape=BS)["0"]
    sl = NestedSparseLinear.from_dense(lin, tags, format=fmt.name, block_shape=BS)
    x = torch.randn(4, 20)
    sl.set_level(0)
    a = sl(x, level=1)
    sl.set_level(1)
    torch.testing.assert_close(a, sl(x))


def test_plan_is_built_once_and_reused(fmt):
    lin = nn.Linear(64, 32)
    tags = nestsparse.model_tags(nn.Sequential(lin), (0.5,), structure=fmt.structure, block_shape=BS)["0"]
    sl = NestedSparseLinear.from_dense(lin, tags, format=fmt.name, block_shape=BS)
    sl(torch.randn(2, 64))
    plan = sl._plan
    assert plan is not None
    sl(torch.randn(5, 64))
    assert sl._plan is plan


def test_training_updates_values_and_keeps_structure(fmt):
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    sparse, _ = sparse_model(model, (0.5, 0.25), fmt)
    before = [m.values.detach().clone() for m in sparse if isinstance(m, NestedSparseLinear)]
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    nestsparse.set_level(sparse, 1)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(sparse(x), y).backward()
        opt.step()
    for m, b in zip([m for m in sparse if isinstance(m, NestedSparseLinear)], before):
        changed = m.values.detach() != b
        in_level1 = value_mask(m.nested(), 1)
        assert changed[in_level1].any() and not changed[~in_level1].any()


def test_conv_module_from_dense_refuses_unsupported_padding_mode():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        NestedSparseConv2d.from_dense(conv, torch.zeros(conv.weight.shape, dtype=torch.int8))


def test_build_info_and_version_mismatch_message(monkeypatch):
    info = nestsparse.build_info()
    assert info["torch_built"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_isa"] in info["cpu_isas"]
    import importlib

    from nestsparse import _build_info, _library

    monkeypatch.setattr(_build_info, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError, match="built for torch 1.0.0, but torch .* is installed"):
        importlib.reload(_library)


def test_plan_is_rebuilt_when_buffers_change(fmt):
    lin = nn.Linear(64, 32)
    tags = fmt.tags((32, 64), 2, torch.Generator().manual_seed(1), block_shape=BS)
    sl = NestedSparseLinear.from_dense(lin, tags, format=fmt.name, block_shape=BS)
    sl(torch.randn(2, 64))
    first = sl._plan
    # The rows in reverse order: other positions, the same array sizes (and still block row/column structured).
    other = NestedSparseLinear.from_dense(lin, tags.flip(0), format=fmt.name, block_shape=BS)
    assert not torch.equal(other.nested().tags(), sl.nested().tags())
    sl.load_state_dict(other.state_dict())  # in place: same storage, new contents
    x = torch.randn(3, 64)
    torch.testing.assert_close(sl(x), other(x))
    assert sl._plan is not first


def test_multihead_attention_projection_is_not_pruned():
    model = nn.Sequential(nn.Linear(8, 8))
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    assert set(nestsparse.prunable_layers(model)) == {"0"}


def test_bias_is_cast_to_the_value_dtype(fmt):
    lin = nn.Linear(8, 4)
    w = fmt.weight(lin.weight.detach(), fmt.tags((4, 8), 1, block_shape=(2, 2)), 1, block_shape=(2, 2))
    sl = NestedSparseLinear(w.to(dtype=torch.bfloat16), lin.bias)
    assert sl.bias.dtype == torch.bfloat16
    assert sl(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_module_copied_under_inference_mode_runs():
    import copy

    lin = torch.nn.Linear(12, 7)
    m = nestsparse.convert(torch.nn.Sequential(lin), {"0": nestsparse.magnitude_tags(lin.weight, (0.5, 0.25))})
    x = torch.randn(3, 12)
    with torch.inference_mode():
        c = copy.deepcopy(m)  # its buffers are inference tensors: no version counter
        assert torch.equal(c(x), m(x))


def test_dense_levels_give_the_level_and_follow_the_weight(fmt):
    g = torch.Generator().manual_seed(3)
    w = fmt.random((12, 5, 3, 3), 3, g, density=0.5, block_shape=(4, 4))
    conv = NestedSparseConv2d(w, torch.randn(12, generator=g), padding=1, activation="relu")
    x = torch.randn(2, 5, 6, 6, generator=g)
    with torch.no_grad():
        sparse = [conv(x, level=lvl) for lvl in range(3)]
        conv.set_dense_levels([0, 2])
        assert conv.dense_levels == (0, 2)
        for lvl in range(3):  # dense or sparse, every level gives the same output
            assert torch.allclose(conv(x, level=lvl), sparse[lvl], atol=1e-5)
        conv.values.mul_(2)  # trained or reloaded: the dense copies are stale and dropped
        doubled = conv(x, level=0)
        assert conv.dense_levels == ()
        assert torch.allclose(doubled, conv(x, level=0)) and not torch.allclose(doubled, sparse[0])
    conv.set_dense_levels([1])
    out = conv(x, level=1)  # gradients wanted: the sparse kernel runs, values get their gradient
    out.sum().backward()
    assert conv.values.grad is not None and conv.values.grad.abs().sum() > 0
    assert "dense_weight_1" not in conv.state_dict()  # not saved: rebuilt from the nested weight


def test_choose_dense_levels_measures_and_keeps_the_budget():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    tags = {"0": nestsparse.magnitude_tags(model[0].weight, (0.9, 0.05))}
    s = nestsparse.convert(model, tags).eval()
    x = torch.randn(1, 64)
    rows = nestsparse.choose_dense_levels(s, x, max_extra_bytes=10**9, min_run_time=0.01)
    assert [(r["name"], r["level"]) for r in rows] == [("0", 0), ("0", 1)]
    assert all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    assert s[0].dense_levels == tuple(r["level"] for r in rows if r["dense"])
    for r in rows:
        assert r["dense"] == (r["dense_ms"] < r["sparse_ms"])
    nestsparse.choose_dense_levels(s, x, max_extra_bytes=0, min_run_time=0.01)
    assert s[0].dense_levels == ()
    nestsparse.choose_dense_levels(s, x, min_run_time=0.01)  # default budget: one dense copy of the layers
    assert len(s[0].dense_levels) <= 1
    with torch.inference_mode():
        for lvl in range(2):
            nestsparse.set_level(s, lvl)
            assert torch.allclose(s(x), nestsparse.to_dense(s, lvl)(x), atol=1e-5)


def test_levels_given_as_numpy_ints_or_tensors_work_and_other_types_are_named():
    import numpy as np  # noqa: PLC0415

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(6, 5))
    model = nestsparse.convert(dense, {"0": nestsparse.magnitude_tags(dense[0].weight, (0.5, 0.2))})
    x = torch.randn(2, 6)
    with torch.no_grad():
        ref = model[0](x, level=1)
        for level in (np.int64(1), torch.tensor(1), np.int32(1)):
            nestsparse.set_level(model, level)
            assert type(model[0].level) is int and model[0].level == 1
            assert torch.equal(model(x), ref) and torch.equal(model[0](x, level=level), ref)
    for bad in ("1", 1.0, np.float32(1), torch.tensor(1.0), True, None):
        with pytest.raises(ValueError, match=r"a level is an int \(0 = densest \.\. 1\), got"):
            nestsparse.set_level(model, bad)
    with pytest.raises(ValueError, match="out of range for 2 levels"):
        nestsparse.set_level(model, np.int64(2))


def test_first_hour_mistakes_are_named_or_accepted():
    import numpy as np  # noqa: PLC0415

    from nestsparse import pruning  # noqa: PLC0415

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    for scalar in (0.1, np.float32(0.1), torch.tensor(0.1)):
        with pytest.raises(TypeError, match=r"densities is one number .*; give one density per level"):
            nestsparse.model_tags(dense, scalar)
    # numpy integer tags are tags
    tags = {k: t.numpy() for k, t in nestsparse.model_tags(dense, (0.5, 0.2)).items()}
    model = nestsparse.convert(dense, tags)
    want = nestsparse.convert(dense, {k: torch.from_numpy(t) for k, t in tags.items()})
    x = torch.randn(3, 6)
    assert torch.equal(model(x), want(x))
    with pytest.raises(TypeError, match="tags are int8 levels"):
        nestsparse.convert(dense, {"0": np.zeros((5, 6), np.float32)})
    with pytest.raises(ValueError, match=r"tags range over \[0, 290\]"):
        nestsparse.convert(dense, {"0": np.arange(30).reshape(5, 6) * 10})
    data = (torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
    core_first = functools.partial(pruning.core_first, prune_epochs=1, core_epochs=1, level_epochs=1)
    for method, args in ((pruning.train_dense, (1,)), (pruning.joint, ((0.5, 0.2), 1)), (core_first, ((0.5,),))):
        with pytest.raises(TypeError, match=r"task is a tuple without batches.*SupervisedTask\(\(x, y\)"):
            method(dense, data, *args)


def test_the_demo_data_names_its_optional_dependency(monkeypatch):
    import builtins  # noqa: PLC0415

    from nestsparse.apps import data  # noqa: PLC0415

    real = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'nestsparse\[demo\]'"):
        data.digits()
