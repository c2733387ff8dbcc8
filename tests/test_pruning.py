import pytest
import torch
from torch import nn

from nestsparse import LevelSpec, global_magnitude_tags, magnitude_tags, masks_from_tags, model_tags, tags_from_masks


@pytest.mark.parametrize("bad", [(), (0.5, 0.5), (0.3, 0.5), (0.0,), (1.2,), (0.5, -0.1)])
def test_level_spec_refuses_bad_densities(bad):
    with pytest.raises(ValueError, match="LevelSpec"):
        LevelSpec(bad)


def test_magnitude_tags_meet_densities_and_nest():
    w = torch.randn(50, 77)
    tags = magnitude_tags(w, (0.5, 0.13, 0.05))
    n = w.numel()
    for lvl, d in enumerate((0.5, 0.13, 0.05)):
        m = masks_from_tags(tags, lvl)
        assert int(m.sum()) == round(d * n)
        # the kept weights are the largest ones
        assert w.abs()[m].min() >= w.abs()[~m].max()
    assert torch.equal(tags_from_masks([masks_from_tags(tags, lvl) for lvl in range(3)]), tags)


def test_density_one_keeps_everything():
    tags = magnitude_tags(torch.randn(4, 5), (1.0, 0.5))
    assert (tags >= 0).all()


def test_global_budget_spans_layers():
    big = 1 + torch.rand(100, 100)  # every |w| in [1, 2)
    small = 0.01 * torch.rand(100, 100)  # every |w| below 0.01
    tags = global_magnitude_tags({"a": big, "b": small}, (0.5,))
    assert int((tags["a"] >= 0).sum()) + int((tags["b"] >= 0).sum()) == 10000
    assert int((tags["a"] >= 0).sum()) == 10000 and int((tags["b"] >= 0).sum()) == 0


def test_model_tags_scopes_and_skip():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    per_layer = model_tags(model, (0.5, 0.2), skip=["0"])
    assert set(per_layer) == {"3"}
    glob = model_tags(model, (0.5, 0.2), scope="global")
    assert set(glob) == {"0", "3"} and glob["0"].shape == model[0].weight.shape
    with pytest.raises(ValueError, match="scope"):
        model_tags(model, (0.5,), scope="block")


def test_tags_from_masks_refuses_non_nested():
    a = torch.tensor([True, False, True])
    b = torch.tensor([False, True, False])
    with pytest.raises(ValueError, match="nested"):
        tags_from_masks([a, b])
