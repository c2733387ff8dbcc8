import functools

import pytest
import torch
import torch.nn.functional as F
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


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(("kernel", "padding", "dilation"), [(3, "same", 1), ((4, 3), "same", (2, 1)), (3, (2, 1), 1)])
def test_conv2d_same_padding_and_every_padding_mode_convert(fmt, kernel, padding, dilation, padding_mode):
    """model_tags skipped these and convert said nothing (the first symptom: set_level found no level-aware module):
    now they convert, the padding applied before the product where it is not symmetric zeros."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 8, kernel, padding=padding, dilation=dilation, padding_mode=padding_mode)
    model = nn.Sequential(conv, nn.ReLU())
    sparse, tags = sparse_model(model, (0.6, 0.3), fmt)
    assert isinstance(sparse[0], NestedSparseConv2d) and sparse[0].padding_mode == padding_mode
    x = torch.randn(2, 4, 9, 10)
    fused = nestsparse.fuse(sparse.eval())
    with torch.no_grad():
        for level in range(2):
            masked = nn.Conv2d(4, 8, kernel, padding=padding, dilation=dilation, padding_mode=padding_mode)
            masked.load_state_dict({"weight": conv.weight * (tags["0"] >= level), "bias": conv.bias})
            nestsparse.set_level(sparse, level)
            nestsparse.set_level(fused, level)
            want = masked(x).relu()
            torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(nestsparse.to_dense(sparse, level)(x), want, rtol=1e-5, atol=1e-5)
            sparse[0].set_dense_levels([level])
            torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)
            sparse[0].set_dense_levels(())


@pytest.mark.parametrize(
    ("cls", "shape", "kernel", "padding", "dilation"),
    [
        (nn.Conv1d, (3, 5, 300), 300, 0, 1),  # the kernel covers the input: one position
        (nn.Conv1d, (1, 2, 7), 3, 0, 3),  # dilated over the whole input
        (nn.Conv2d, (2, 3, 6, 5), (6, 5), 0, 1),
        (nn.Conv2d, (2, 3, 3, 3), 5, 1, 1),  # padding inside the one patch
    ],
)
def test_a_convolution_with_one_output_position_is_a_linear_product(fmt, cls, shape, kernel, padding, dilation):
    """The convolution kernels did quadratic work here (529x the matrix-vector product at k = L = 8192)."""
    torch.manual_seed(3)
    conv = cls(shape[1], 6, kernel, padding=padding, dilation=dilation).double()
    sparse, tags = sparse_model(nn.Sequential(conv), (0.7, 0.3), fmt)
    layer = sparse[0]
    layer._conv_product = None  # the convolution kernels must not run
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for level in range(2):
        masked = conv.weight * (tags["0"] >= level)
        ref = (F.conv1d if cls is nn.Conv1d else F.conv2d)(x, masked, conv.bias, padding=padding, dilation=dilation)
        residual = torch.randn_like(ref)
        got = layer(x, level=level, residual=residual)
        torch.testing.assert_close(got, ref + residual)
        (gx,) = torch.autograd.grad(got.square().sum(), x)
        (want,) = torch.autograd.grad((ref + residual).square().sum(), x)
        torch.testing.assert_close(gx, want)
    assert layer(x[:0], level=0).shape == (0, *ref.shape[1:])  # an empty batch


def test_geometry_the_kernels_refuse_is_refused_when_the_layer_is_made():
    """A Conv1d stride above what the kernels take converted, and every forward then failed."""
    model = nn.Sequential(nn.Conv1d(2, 4, 3, stride=70000))
    with pytest.raises(ValueError, match=r"convert: '0': NestedSparseConv1d: kernel_size, stride and dilation"):
        nestsparse.convert(model, nestsparse.model_tags(model, (0.5,)))
    w = nestsparse.NestedCSR.from_dense(torch.randn(4, 2, 3, 3), torch.zeros(4, 2, 3, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="padding must lie in"):
        NestedSparseConv2d(w, padding=1 << 25)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        NestedSparseConv2d(w, padding_mode="mirror")
    with pytest.raises(ValueError, match="'same' needs stride 1"):
        NestedSparseConv2d(w, padding="same", stride=2)


def test_a_level_out_of_range_is_refused_when_set():
    """LevelBatchNorm.level = -1 read the last level's statistics without a word."""
    bn = nestsparse.LevelBatchNorm(4, 3)
    lin = NestedSparseLinear.from_dense(nn.Linear(4, 4), torch.zeros(4, 4, dtype=torch.int8), num_levels=3)
    for m in (bn, lin):
        for bad in (-1, 3, 1.5, True, "1"):
            with pytest.raises(ValueError, match="out of range"):
                m.level = bad
        m.level = 2
        assert m.level == 2


def test_more_densities_than_the_tags_have_levels_is_said():
    """convert(densities=...) with an entry more than the tags have levels added an empty level silently."""
    model = nn.Sequential(nn.Linear(6, 5))
    tags = nestsparse.model_tags(model, (0.5, 0.2))
    with pytest.warns(
        UserWarning, match=r"3 densities but the tags keep weights at 2 level\(s\) only: level\(s\) 2 keep"
    ):
        assert nestsparse.convert(model, tags, densities=(0.5, 0.2, 0.1))[0].num_levels == 3
    assert nestsparse.convert(model, tags, densities=(0.5, 0.2))[0].num_levels == 2
    assert nestsparse.convert(model, tags, densities=(0.5, 0.2, 0.1), num_levels=3)[0].num_levels == 3  # asked for


def test_modules_pickled_before_the_checked_level_and_dense_copies_load(fmt):
    """torch.save(model) of a converted model from before: its level (a plain attribute then), its dense copies
    (buffers keyed on version counters) and a conv without padding modes."""
    import pickle  # noqa: PLC0415

    torch.manual_seed(7)
    model = sparse_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 5)), (0.5, 0.2), fmt)[
        0
    ]
    x = torch.randn(2, 3, 4, 4)
    nestsparse.set_level(model, 1)
    want = model(x)
    old = []
    for m in (model[0], model[2]):
        state = m.__getstate__().copy()
        state["level"] = state.pop("_level")
        state.pop("_dense")
        state.update(_dense_levels=(1,), _dense_key=None)
        state["_buffers"] = {**state["_buffers"], "dense_weight_1": torch.zeros(1), "dense_bias_1": torch.zeros(1)}
        if isinstance(m, NestedSparseConv2d):
            for k in ("padding_mode", "_op_padding", "_pre_padding"):
                state.pop(k)
        new = type(m).__new__(type(m))
        new.__setstate__(pickle.loads(pickle.dumps(state)))
        old.append(new)
    twin = nn.Sequential(old[0], nn.Flatten(), old[1])
    assert [m.level for m in old] == [1, 1] and [m.dense_levels for m in old] == [(), ()]
    torch.testing.assert_close(twin(x), want)
