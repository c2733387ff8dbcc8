import pytest
import torch
from torch import nn

from nestsparse.formats import DEFAULT_BLOCK_SHAPE, NestedBCR
from nestsparse.pruning import bcr_tags, global_bcr_tags, model_tags

DENSITIES = (0.5, 0.13, 0.05)


def check_structured(weight, tags, block_shape, densities):
    """The tags nest, are block row/column structured and pack into a valid NestedBCR."""
    assert tags.dtype == torch.int8 and tags.shape == weight.shape
    w = NestedBCR.from_dense(weight, tags, block_shape, num_levels=len(densities)).validate()
    rt, ct = NestedBCR.structured_tags(tags, block_shape)
    assert torch.equal(w.tags(), tags) and torch.equal(w.row_col_tags()[0], rt)
    for lvl in range(1, len(densities)):
        assert not ((tags >= lvl) & ~(tags >= lvl - 1)).any()
    return w


@pytest.mark.parametrize("block_shape", [(32, 32), (16, 16), (8, 8), (3, 5)])
def test_densities_are_met(block_shape):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 512, generator=g)
    tags = bcr_tags(weight, DENSITIES, block_shape)
    for lvl, d in enumerate(DENSITIES):
        realised = float((tags >= lvl).sum()) / weight.numel()
        assert d - 0.02 <= realised <= d, (lvl, realised)
    check_structured(weight, tags, block_shape, DENSITIES)


@pytest.mark.parametrize("shape", [(100, 77), (64, 32, 3, 3), (1, 300), (300, 1)])
def test_odd_and_conv_shapes(shape):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=g)
    densities = (0.4, 0.1)
    tags = bcr_tags(weight, densities, (16, 16))
    n = weight.numel()
    for lvl, d in enumerate(densities):
        assert 0 < int((tags >= lvl).sum()) <= d * n
    check_structured(weight, tags, (16, 16), densities)


def test_strong_rows_and_columns_are_kept():
    g = torch.Generator().manual_seed(2)
    weight = 0.01 * torch.randn(64, 64, generator=g)
    weight[:8, :8] = torch.randn(8, 8, generator=g).sign() * (1 + torch.rand(8, 8, generator=g))
    tags = bcr_tags(weight, (64 / 4096,), (16, 16))
    assert (tags[:8, :8] == 0).all() and int((tags >= 0).sum()) == 64


def test_density_one_keeps_everything_and_tiny_density_keeps_the_best_element():
    weight = torch.randn(20, 30)
    assert (bcr_tags(weight, (1.0, 0.5), (8, 8)) >= 0).all()
    tags = bcr_tags(weight, (0.001,), (8, 8))
    assert int((tags >= 0).sum()) == 1


def test_deterministic_also_with_ties():
    weight = torch.randn(200, 150, generator=torch.Generator().manual_seed(3))
    assert torch.equal(bcr_tags(weight, DENSITIES, (16, 16)), bcr_tags(weight.clone(), DENSITIES, (16, 16)))
    ones = torch.ones(64, 64)
    a, b = bcr_tags(ones, (0.25, 0.0625), (16, 16)), bcr_tags(ones, (0.25, 0.0625), (16, 16))
    assert torch.equal(a, b) and int((a >= 0).sum()) == 1024 and int((a >= 1).sum()) == 256
    check_structured(ones, a, (16, 16), (0.25, 0.0625))


def test_all_zero_and_empty_weights():
    tags = bcr_tags(torch.zeros(40, 40), (0.5, 0.1), (16, 16))
    assert int((tags >= 0).sum()) <= 800 and int((tags >= 1).sum()) <= 160
    check_structured(torch.zeros(40, 40), tags, (16, 16), (0.5, 0.1))
    assert bcr_tags(torch.zeros(0, 5), (0.5,), (4, 4)).shape == (0, 5)


def test_global_budget_is_fair_across_scales():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 384, generator=g)
    weights = {"a": 1024 * a, "b": b / 1024}
    tags = global_bcr_tags(weights, (0.13, 0.05), (16, 16))
    n = a.numel() + b.numel()
    for lvl, d in enumerate((0.13, 0.05)):
        kept = {k: int((t >= lvl).sum()) for k, t in tags.items()}
        assert d - 0.02 <= sum(kept.values()) / n <= d
        for k, w in weights.items():  # per-layer RMS normalisation: neither layer takes the whole budget
            assert abs(kept[k] / w.numel() - d) < 0.03, (k, lvl, kept[k] / w.numel())
    # scaling a layer by a power of two changes nothing
    assert all(torch.equal(tags[k], t) for k, t in global_bcr_tags({"a": a, "b": b}, (0.13, 0.05), (16, 16)).items())
    for k, w in weights.items():
        check_structured(w, tags[k], (16, 16), (0.13, 0.05))


def test_global_budget_moves_to_the_layer_with_more_structure():
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(128, 128, generator=g)
    peaked = torch.randn(128, 128, generator=g) * 0.05
    peaked[:, :32] *= 40  # a quarter of the columns holds almost all of the layer's energy
    tags = global_bcr_tags({"flat": flat, "peaked": peaked}, (0.1,), (16, 16))
    assert (tags["peaked"][:, :32] >= 0).float().mean() > 0.25
    assert int((tags["peaked"] >= 0).sum()) > int((tags["flat"] >= 0).sum())


def test_model_tags_structure_and_scope():
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Flatten(), nn.Linear(40, 70))
    for scope in ("layer", "global"):
        tags = model_tags(model, (0.5, 0.2), scope=scope, structure="bcr", block_shape=(8, 8))
        assert set(tags) == {"0", "3"}
        for name, t in tags.items():
            check_structured(model.get_submodule(name).weight.detach(), t, (8, 8), (0.5, 0.2))
    default = model_tags(model, (0.5,), structure="bcr")
    NestedBCR.from_dense(model[3].weight.detach(), default["3"], DEFAULT_BLOCK_SHAPE).validate()
    assert set(model_tags(model, (0.5,), structure="unstructured")) == {"0", "3"}
    with pytest.raises(ValueError, match="structure must be 'unstructured' or 'bcr', got 'block'"):
        model_tags(model, (0.5,), structure="block")
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global', got 'all'"):
        model_tags(model, (0.5,), scope="all", structure="bcr")


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_shape must be two ints .* got \\(0, 4\\)"):
        bcr_tags(torch.randn(4, 4), (0.5,), (0, 4))
    with pytest.raises(ValueError, match="LevelSpec"):
        bcr_tags(torch.randn(4, 4), (0.5, 0.6))
    assert global_bcr_tags({}, (0.5,)) == {}
