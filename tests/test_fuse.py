"""nestsparse.fuse: BatchNorm folded per level, residual adds and activations fused into the sparse layers, the
dense stem's BatchNorm folded; same outputs as the converted model at every level, for every format."""

import pytest
import torch
from torch import nn

import nestsparse as ns
from nestsparse.apps.models import dense_layers, resnet50, resnet_small


def randomise_batchnorms(model, seed=0):
    """Non-trivial affine parameters and running statistics (per level for LevelBatchNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, ns.LevelBatchNorm)):
                for t in (m.weight, m.running_var):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                for t in (m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model


def converted(model, fmt, levels=(0.4, 0.2), level_bn=False):
    structure = "bcr" if fmt.name == "nbcr" else "unstructured"
    tags = ns.model_tags(model, levels, structure=structure, block_shape=(4, 4), skip=dense_layers(model))
    s = ns.convert(model, tags, format=fmt.name, block_shape=(4, 4))
    if level_bn:
        ns.level_batchnorms(s, len(levels), per_level_affine=True)
    return randomise_batchnorms(s).eval()


def assert_same_at_every_level(a, b, x, levels):
    with torch.inference_mode():
        for level in range(levels):
            ns.set_level(a, level), ns.set_level(b, level)
            ya, yb = a(x), b(x)
            assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-4 * (1 + ya.abs().max().item())), level


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("level_bn", [False, True], ids=["batchnorm", "level-batchnorm"])
def test_basic_block_resnet_fuses_everything_sparse(fmt, level_bn):
    torch.manual_seed(0)
    s = converted(resnet_small(width=8), fmt, level_bn=level_bn)
    f = ns.fuse(s)
    assert_same_at_every_level(s, f, torch.randn(3, 1, 8, 8), 2)
    sparse = {n: m for n, m in f.named_modules() if isinstance(m, ns.NestedSparseModule)}
    assert all(
        m.epilogue_scale is not None and m.epilogue_scale.shape == (2, m.weight_shape[0]) for m in sparse.values()
    )
    # Each of the 6 blocks: its first conv took the ReLU, and its add and second ReLU went into its second conv
    # or its downsample conv.
    assert [n for n, m in sparse.items() if m.activation == "relu" and n.endswith("conv1")] == [
        f"layer{i}.{j}.conv1" for i in (1, 2, 3) for j in (0, 1)
    ]
    assert sum(m.activation == "relu" for m in sparse.values()) == 12
    # The stem's BatchNorm follows a dense conv: folded into it unless it is per level.
    assert count(f, (nn.BatchNorm2d, ns.LevelBatchNorm)) == (1 if level_bn else 0)
    assert count(f, nn.ReLU) == 1  # the stem's
    code = f.code
    assert code.count("residual") == 6 and " + " not in code and "add" not in code


def test_bottleneck_resnet50_at_small_resolution(fmt):
    torch.manual_seed(1)
    s = converted(resnet50(num_classes=10), fmt, levels=(0.1, 0.05))
    f = ns.fuse(s)
    assert_same_at_every_level(s, f, torch.randn(2, 3, 32, 32), 2)
    assert count(f, nn.BatchNorm2d) == 0 and count(f, nn.ReLU) == 1
    # Every block's add went into its third conv (or, with a downsample, whichever of the two runs last).
    assert f.code.count("residual") == 16


def test_sequential_linear_batchnorm1d_and_functional_activations(fmt):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Linear(12, 16), nn.BatchNorm1d(16)
            self.b, self.c, self.act = nn.Linear(16, 16), nn.Linear(16, 5), nn.ReLU6()

        def forward(self, x):
            h = torch.relu(self.bn(self.a(x)))
            h = self.b(h) + h  # a skip connection around b
            return self.act(self.c(h)) + 1.0  # an add of a number is not a residual

    torch.manual_seed(2)
    model = Net()
    structure = "bcr" if fmt.name == "nbcr" else "unstructured"
    tags = ns.model_tags(model, (0.5, 0.25), structure=structure, block_shape=(4, 4))
    s = randomise_batchnorms(ns.convert(model, tags, format=fmt.name, block_shape=(4, 4))).eval()
    f = ns.fuse(s)
    assert_same_at_every_level(s, f, torch.randn(9, 12), 2)
    assert (f.a.activation, f.b.activation, f.c.activation) == ("relu", "none", "relu6")
    assert f.a.epilogue_scale is not None and count(f, nn.BatchNorm1d) == 0


def test_a_broadcasting_add_keeps_its_meaning():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 6)
            self.register_buffer("offset", torch.randn(6))

        def forward(self, x):
            return torch.relu(self.a(x) + self.offset)  # (N, 6) + (6,): not the output's shape

    model = Net()
    s = ns.convert(model, ns.model_tags(model, (0.5, 0.25))).eval()
    f = ns.fuse(s)
    assert_same_at_every_level(s, f, torch.randn(5, 8), 2)


def test_fused_model_compiles_and_switches_level():
    torch.manual_seed(3)

    class Fmt:
        name = "ncsr"

    s = converted(resnet_small(width=8), Fmt())
    f = ns.fuse(s)
    x = torch.randn(2, 1, 8, 8)
    compiled = torch.compile(f, fullgraph=True)
    with torch.inference_mode():
        for level in (1, 0):
            ns.set_level(f, level), ns.set_level(s, level)
            assert torch.allclose(compiled(x), s(x), atol=1e-4)


def test_refusals_name_the_problem():
    model = resnet_small(width=8)
    s = ns.convert(model, ns.model_tags(model, (0.5,), skip=dense_layers(model)))
    with pytest.raises(ValueError, match="training mode"):
        ns.fuse(s)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x  # data-dependent control flow

    m = Untraceable()
    with pytest.raises(ValueError, match="torch.fx cannot trace Untraceable"):
        ns.fuse(ns.convert(m, ns.model_tags(m, (0.5,))).eval())


@pytest.mark.parametrize(
    "k,s,p,shape",
    [
        (3, 2, 1, (2, 3, 11, 12)),
        (2, 2, 0, (1, 4, 7, 9)),
        (3, 1, 1, (1, 2, 5, 5)),
        ((3, 2), (2, 1), (1, 0), (2, 2, 9, 6)),
    ],
)
def test_separable_max_pool_equals_torch_nan_included(k, s, p, shape):
    from nestsparse.fuse import SeparableMaxPool2d

    pool = nn.MaxPool2d(k, s, p)
    x = torch.randn(shape)
    x[0, 0, 1, 1] = float("nan")
    assert SeparableMaxPool2d.handles(pool)
    out = SeparableMaxPool2d(pool)(x)
    assert torch.equal(out.isnan(), pool(x).isnan()) and torch.equal(out.nan_to_num(0), pool(x).nan_to_num(0))
    assert not SeparableMaxPool2d.handles(nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert not SeparableMaxPool2d.handles(nn.MaxPool2d(3, 2, 1, return_indices=True))


def test_channels_last_pointwise_conv_runs_the_linear_product(fmt):
    g = torch.Generator().manual_seed(4)
    w = fmt.random((24, 16, 1, 1), 2, g, density=0.4, block_shape=(4, 4))
    layer = ns.NestedSparseConv2d(w, torch.randn(24, generator=g), activation="relu")
    x = torch.randn(3, 16, 7, 5, generator=g)
    xcl = x.contiguous(memory_format=torch.channels_last)
    res = torch.randn(3, 24, 7, 5, generator=g)
    with torch.inference_mode():
        for level in range(2):
            for r in (None, res, res.contiguous(memory_format=torch.channels_last)):
                ref = layer(x, level, r)
                out = layer(xcl, level, r)
                assert out.is_contiguous(memory_format=torch.channels_last)
                assert torch.allclose(out, ref, atol=1e-5)


def test_fused_mobilenet_v2_in_channels_last():
    from nestsparse.apps.models import mobilenet_v2

    torch.manual_seed(5)
    m = mobilenet_v2(num_classes=10)
    tags = ns.model_tags(m, (0.2, 0.1), skip=dense_layers(m))
    s = randomise_batchnorms(ns.convert(m, tags)).eval()
    f = ns.fuse(s).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    assert count(f, nn.BatchNorm2d) == 0
    assert f.code.count("residual") == 10  # every inverted residual block with a skip connection
    assert_same_at_every_level(s, f, x.contiguous(memory_format=torch.channels_last), 2)


class _Lin(nn.Module):
    """One sparse-able Linear and a forward given as a function, for the graph-rewrite cases below."""

    def __init__(self, forward):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("p", torch.randn(8))
        self._fwd = forward

    def forward(self, x):
        return self._fwd(self, x)


@pytest.mark.parametrize(
    "forward",
    [
        lambda m, x: (lambda y: (y.relu_(), y * 2)[1])(m.fc(x)),  # an in-place op whose result is unused
        lambda m, x: (lambda y, x2: y + x2)(m.fc(x), m.act(x)),  # x changed in place between the layer and the add
        lambda m, x: m.fc(x, level=0) + x,  # the layer's own level argument
        lambda m, x: (lambda z: z.__iadd__(m.fc(x)) + x)(x.clone()),  # other += layer(x)
        lambda m, x: m.fc(x) + x.shape[0],  # a number, not a tensor
        lambda m, x: torch.nn.functional.relu(m.fc(x) + m.p),  # a broadcasting add, then F.relu
    ],
    ids=["unused-inplace", "mutation-between", "level-kwarg", "iadd-right", "number", "broadcast"],
)
def test_fuse_keeps_the_meaning_of_tricky_graphs(forward):
    torch.manual_seed(7)
    model = _Lin(forward)
    s = ns.convert(model, ns.model_tags(model, (0.6, 0.3)), fuse_activations=False).eval()
    f = ns.fuse(s)
    for level in (1, 0):
        ns.set_level(s, level), ns.set_level(f, level)
        x = torch.randn(5, 8)
        with torch.inference_mode():
            assert torch.allclose(f(x.clone()), s(x.clone()), atol=1e-5)


def test_to_dense_folds_the_epilogue_and_refuses_fused_graphs():
    torch.manual_seed(8)
    s = converted(resnet_small(width=8), type("F", (), {"name": "ncsr"})(), level_bn=True)
    conv = s.layer1[0].conv1
    conv.fold_batchnorm(s.layer1[0].bn1)
    x = torch.randn(2, 8, 8, 8)
    for level in range(2):
        dense = ns.to_dense(nn.Sequential(conv), level)
        with torch.inference_mode():
            assert torch.allclose(dense(x), conv(x, level=level), atol=1e-5)
    with pytest.raises(ValueError, match="to_dense: the model is fused"):
        ns.to_dense(ns.fuse(converted(resnet_small(width=8), type("F", (), {"name": "ncsr"})())))


def test_channels_last_with_a_broadcast_residual_and_3d_input_to_a_folded_linear():
    torch.manual_seed(9)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(8, 8, 1)
            self.register_buffer("p", torch.randn(8, 1, 1))

        def forward(self, x):
            return self.c(x) + self.p

    m = Net()
    s = ns.convert(m, ns.model_tags(m, (0.5,))).eval()
    f = ns.fuse(s).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.allclose(f(x), s(x), atol=1e-5)
    seq = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    fs = ns.fuse(ns.convert(seq, ns.model_tags(seq, (0.5,))).eval())
    with pytest.raises(ValueError, match="folded into this layer normalised dimension 1 of a 2-D input"):
        fs(torch.randn(3, 4, 6))
