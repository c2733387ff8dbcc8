"""Tag assignment (nestsparse.pruning), for every tag structure alike through the ``structure`` parameter: magnitude
tags ("unstructured", what NestedCSR stores) and block row/column tags ("bcr", what NestedBCR stores) meet their
densities and nest, keep everything at density one, share a global budget, come per model from model_tags, and
refuse bad arguments. Then what is each structure's own: magnitude tags keep the largest weights and give a global
budget to the largest magnitudes; BCR tags normalise layers for a global budget, reward structure, and take a block
shape."""

import pytest
import torch
from torch import nn

from nestsparse import LevelSpec, global_magnitude_tags, magnitude_tags, masks_from_tags, model_tags, tags_from_masks
from nestsparse.formats import DEFAULT_BLOCK_SHAPE, NestedBCR
from nestsparse.pruning import bcr_tags, global_bcr_tags

from conftest import FormatCase

STRUCTURES = ["unstructured", "bcr"]
FORMAT_OF = {"unstructured": "ncsr", "bcr": "nbcr"}  # the format that stores tags of each structure
DENSITIES = (0.5, 0.13, 0.05)
BAD_DENSITIES = [(), (0.5, 0.5), (0.3, 0.5), (0.5, 0.6), (0.0,), (1.2,), (0.5, -0.1)]


def layer_tags(structure, weight, densities, block_shape=None):
    """Tags of one layer: magnitude tags, or BCR tags in ``block_shape`` blocks (bcr_tags' default when None)."""
    if structure == "unstructured":
        return magnitude_tags(weight, densities)
    return bcr_tags(weight, densities) if block_shape is None else bcr_tags(weight, densities, block_shape)


def global_tags(structure, weights, densities, block_shape=None):
    """Tags of several layers under one budget per level (see layer_tags)."""
    if structure == "unstructured":
        return global_magnitude_tags(weights, densities)
    return (
        global_bcr_tags(weights, densities) if block_shape is None else global_bcr_tags(weights, densities, block_shape)
    )


def check_tags(structure, weight, tags, densities, block_shape=(16, 16)):
    """The tags nest, are the structure's, and pack into a valid object of its format that gives them back."""
    L = len(densities)
    assert tags.dtype == torch.int8 and tags.shape == weight.shape
    if tags.numel():
        assert -1 <= int(tags.min()) and int(tags.max()) <= L - 1
    for lvl in range(1, L):
        assert not ((tags >= lvl) & ~(tags >= lvl - 1)).any()
    assert torch.equal(tags_from_masks([masks_from_tags(tags, lvl) for lvl in range(L)]), tags)
    w = FormatCase(FORMAT_OF[structure]).weight(weight.detach(), tags, L, block_shape)
    assert torch.equal(w.tags(), tags)
    if structure == "bcr":
        rt, ct = NestedBCR.structured_tags(tags, block_shape)
        assert torch.equal(w.row_col_tags()[0], rt) and torch.equal(w.row_col_tags()[1], ct)
    return w


def assert_density_met(structure, kept, d, n, slack=None):
    """Magnitude tags keep exactly round(d n) elements. BCR tags keep whole rows and columns of blocks: at most d n,
    and no fewer than (d - slack) n (with no slack, at least one)."""
    if structure == "unstructured":
        assert kept == round(d * n), (kept, d * n)
    elif slack is None:
        assert 0 < kept <= d * n, (kept, d * n)
    else:
        assert d - slack <= kept / n <= d, (kept / n, d)


# ---- every structure alike ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_DENSITIES)
def test_level_spec_refuses_bad_densities(bad):
    with pytest.raises(ValueError, match="LevelSpec"):
        LevelSpec(bad)


@pytest.mark.parametrize("bad", BAD_DENSITIES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_tag_assignment_refuses_bad_densities(structure, bad):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="LevelSpec"):
        layer_tags(structure, torch.randn(4, 4), bad)
    with pytest.raises(ValueError, match="LevelSpec"):
        global_tags(structure, {"a": torch.randn(4, 4)}, bad)
    with pytest.raises(ValueError, match="LevelSpec"):
        model_tags(model, bad, structure=structure)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_global_tags_of_no_layer_are_empty(structure):
    assert global_tags(structure, {}, (0.5,)) == {}


@pytest.mark.parametrize("shape", [(50, 77), (512, 512)])
@pytest.mark.parametrize(
    "structure,block_shape",
    [("unstructured", None), ("bcr", (32, 32)), ("bcr", (16, 16)), ("bcr", (8, 8)), ("bcr", (3, 5))],
)
def test_densities_are_met_and_levels_nest(structure, block_shape, shape):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g)
    tags = layer_tags(structure, weight, DENSITIES, block_shape)
    for lvl, d in enumerate(DENSITIES):
        assert_density_met(structure, int(masks_from_tags(tags, lvl).sum()), d, weight.numel(), slack=0.02)
    check_tags(structure, weight, tags, DENSITIES, block_shape)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_density_one_keeps_everything_and_tiny_density_keeps_one_element(structure):
    assert (layer_tags(structure, torch.randn(4, 5), (1.0, 0.5), (4, 4)) >= 0).all()
    weight = torch.randn(20, 30)
    assert (layer_tags(structure, weight, (1.0, 0.5), (8, 8)) >= 0).all()
    tags = layer_tags(structure, weight, (0.001,), (8, 8))
    assert int((tags >= 0).sum()) == 1


@pytest.mark.parametrize("shape", [(100, 77), (64, 32, 3, 3), (1, 300), (300, 1)])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_odd_and_conv_shapes(structure, shape):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=g)
    densities = (0.4, 0.1)
    tags = layer_tags(structure, weight, densities, (16, 16))
    n = weight.numel()
    for lvl, d in enumerate(densities):
        kept = int((tags >= lvl).sum())
        assert kept > 0
        assert_density_met(structure, kept, d, n)
    check_tags(structure, weight, tags, densities, (16, 16))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_strong_weights_are_kept(structure):
    g = torch.Generator().manual_seed(2)
    weight = 0.01 * torch.randn(64, 64, generator=g)
    weight[:8, :8] = torch.randn(8, 8, generator=g).sign() * (1 + torch.rand(8, 8, generator=g))
    tags = layer_tags(structure, weight, (64 / 4096,), (16, 16))
    assert (tags[:8, :8] == 0).all() and int((tags >= 0).sum()) == 64


@pytest.mark.parametrize("structure", STRUCTURES)
def test_deterministic_also_with_ties(structure):
    weight = torch.randn(200, 150, generator=torch.Generator().manual_seed(3))
    assert torch.equal(
        layer_tags(structure, weight, DENSITIES, (16, 16)), layer_tags(structure, weight.clone(), DENSITIES, (16, 16))
    )
    ones = torch.ones(64, 64)
    a = layer_tags(structure, ones, (0.25, 0.0625), (16, 16))
    b = layer_tags(structure, ones, (0.25, 0.0625), (16, 16))
    assert torch.equal(a, b) and int((a >= 0).sum()) == 1024 and int((a >= 1).sum()) == 256
    check_tags(structure, ones, a, (0.25, 0.0625), (16, 16))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_all_zero_and_empty_weights(structure):
    tags = layer_tags(structure, torch.zeros(40, 40), (0.5, 0.1), (16, 16))
    assert int((tags >= 0).sum()) <= 800 and int((tags >= 1).sum()) <= 160
    check_tags(structure, torch.zeros(40, 40), tags, (0.5, 0.1), (16, 16))
    assert layer_tags(structure, torch.zeros(0, 5), (0.5,), (4, 4)).shape == (0, 5)


@pytest.mark.parametrize("densities", [(0.5,), (0.13, 0.05)])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_global_budget_spans_layers(structure, densities):
    g = torch.Generator().manual_seed(6)
    big = 1 + torch.rand(100, 100, generator=g)  # every |w| in [1, 2)
    small = 0.01 * torch.rand(100, 100, generator=g)  # every |w| below 0.01
    weights = {"a": big, "b": small}
    tags = global_tags(structure, weights, densities, (16, 16))
    assert set(tags) == {"a", "b"}
    for lvl, d in enumerate(densities):
        kept = int((tags["a"] >= lvl).sum()) + int((tags["b"] >= lvl).sum())
        assert_density_met(structure, kept, d, 20000, slack=0.02)  # one budget for both layers together
    for k, w in weights.items():
        check_tags(structure, w, tags[k], densities, (16, 16))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_model_tags_scope_skip_and_structure(structure):
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Flatten(), nn.Linear(40, 70))
    for scope in ("layer", "global"):
        tags = model_tags(model, (0.5, 0.2), scope=scope, structure=structure, block_shape=(8, 8))
        assert set(tags) == {"0", "3"}
        for name, t in tags.items():
            weight = model.get_submodule(name).weight
            assert t.shape == weight.shape
            check_tags(structure, weight, t, (0.5, 0.2), (8, 8))
        skipped = model_tags(model, (0.5, 0.2), scope=scope, skip=["0"], structure=structure, block_shape=(8, 8))
        assert set(skipped) == {"3"}
        if scope == "layer":  # per layer, skipping one layer changes nothing for the others
            assert torch.equal(skipped["3"], tags["3"])
    for bad in ("block", "all"):
        with pytest.raises(ValueError, match=f"scope must be 'layer' or 'global', got '{bad}'"):
            model_tags(model, (0.5,), scope=bad, structure=structure)


def test_model_tags_defaults_and_unknown_structure():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    per_layer = model_tags(model, (0.5, 0.2), skip=["0"])  # unstructured, per layer
    assert set(per_layer) == {"3"} and torch.equal(per_layer["3"], magnitude_tags(model[3].weight, (0.5, 0.2)))
    glob = model_tags(model, (0.5, 0.2), scope="global")
    assert set(glob) == {"0", "3"} and glob["0"].shape == model[0].weight.shape
    with pytest.raises(ValueError, match="scope"):
        model_tags(model, (0.5,), scope="block")
    with pytest.raises(ValueError, match="structure must be 'unstructured' or 'bcr', got 'block'"):
        model_tags(model, (0.5,), structure="block")


def test_tags_from_masks_refuses_non_nested():
    a = torch.tensor([True, False, True])
    b = torch.tensor([False, True, False])
    with pytest.raises(ValueError, match="nested"):
        tags_from_masks([a, b])


# ---- unstructured (magnitude) tags' own ------------------------------------------------------------------------


def test_unstructured_tags_keep_the_largest_weights():
    w = torch.randn(50, 77)
    tags = magnitude_tags(w, DENSITIES)
    n = w.numel()
    for lvl, d in enumerate(DENSITIES):
        m = masks_from_tags(tags, lvl)
        assert int(m.sum()) == round(d * n)
        # the kept weights are the largest ones
        assert w.abs()[m].min() >= w.abs()[~m].max()
    assert torch.equal(tags_from_masks([masks_from_tags(tags, lvl) for lvl in range(3)]), tags)


def test_unstructured_global_budget_goes_to_the_largest_magnitudes():
    big = 1 + torch.rand(100, 100)  # every |w| in [1, 2)
    small = 0.01 * torch.rand(100, 100)  # every |w| below 0.01
    tags = global_magnitude_tags({"a": big, "b": small}, (0.5,))
    assert int((tags["a"] >= 0).sum()) + int((tags["b"] >= 0).sum()) == 10000
    assert int((tags["a"] >= 0).sum()) == 10000 and int((tags["b"] >= 0).sum()) == 0


# ---- BCR tags' own ---------------------------------------------------------------------------------------------------


def test_bcr_global_budget_is_fair_across_scales():
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
        check_tags("bcr", w, tags[k], (0.13, 0.05), (16, 16))


def test_bcr_global_budget_moves_to_the_layer_with_more_structure():
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(128, 128, generator=g)
    peaked = torch.randn(128, 128, generator=g) * 0.05
    peaked[:, :32] *= 40  # a quarter of the columns holds almost all of the layer's energy
    tags = global_bcr_tags({"flat": flat, "peaked": peaked}, (0.1,), (16, 16))
    assert (tags["peaked"][:, :32] >= 0).float().mean() > 0.25
    assert int((tags["peaked"] >= 0).sum()) > int((tags["flat"] >= 0).sum())


def test_bcr_model_tags_default_block_shape():
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Flatten(), nn.Linear(40, 70))
    default = model_tags(model, (0.5,), structure="bcr")
    NestedBCR.from_dense(model[3].weight.detach(), default["3"], DEFAULT_BLOCK_SHAPE).validate()
    assert torch.equal(default["3"], bcr_tags(model[3].weight, (0.5,), DEFAULT_BLOCK_SHAPE))


def test_bcr_tags_refuse_a_bad_block_shape():
    with pytest.raises(ValueError, match="block_shape must be two ints .* got \\(0, 4\\)"):
        bcr_tags(torch.randn(4, 4), (0.5,), (0, 4))
    with pytest.raises(ValueError, match="global_bcr_tags: block_shape must be two ints .* got \\(0, 4\\)"):
        global_bcr_tags({"a": torch.randn(4, 4)}, (0.5,), (0, 4))
    with pytest.raises(ValueError, match="block_shape must be two ints .* got \\(4, 257\\)"):
        model_tags(nn.Sequential(nn.Linear(4, 4)), (0.5,), structure="bcr", block_shape=(4, 257))


def test_a_skip_name_that_matches_no_module_is_refused():
    """A typo in skip=[...] left the layer it meant pruned, silently."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    assert set(model_tags(model, (0.5,), skip=["2"])) == {"0"}
    with pytest.raises(ValueError, match=r"skip names \['classifier'\], which are no module of the model.*'0', '2'"):
        model_tags(model, (0.5,), skip=["classifier"])
    shared = nn.Linear(5, 5)
    twice = nn.Sequential(shared, nn.ReLU(), shared)  # one module at two places: both names count
    assert model_tags(twice, (0.5,), skip=["2"]) == {}
