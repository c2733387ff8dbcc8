"""convert on the torch modules users already have: Transformer layers (whose eval fast path reads .weight),
MultiheadAttention, torch.nn.utils.prune masks, boolean masks and tied or reused weights."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import nestsparse as ns

LEVELS = (0.3, 0.1)


def assert_levels_match_dense(sparse, *inputs):
    with torch.no_grad():
        for level in range(len(LEVELS)):
            ns.set_level(sparse, level)
            ref = ns.to_dense(sparse, level).eval()
            torch.testing.assert_close(sparse(*inputs), ref(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_in_eval_mode(fmt, batch_first, norm_first, activation):
    # In eval mode torch's fast path reads linear1.weight: it crashed with AttributeError on a converted layer.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        32, 4, 64, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first
    )
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    kw = {"structure": "bcr", "block_shape": (8, 8)} if fmt.name == "nbcr" else {}
    tags = ns.model_tags(model, LEVELS, **kw)
    assert sorted(tags) == [f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    sparse = ns.convert(model, tags, format=fmt.name, block_shape=(8, 8)).eval()
    x = torch.randn(3, 7, 32)
    assert_levels_match_dense(sparse, x)
    with torch.inference_mode():
        sparse(x)


def test_transformer_decoder_layer(fmt):
    torch.manual_seed(1)
    model = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    kw = {"structure": "bcr", "block_shape": (8, 8)} if fmt.name == "nbcr" else {}
    sparse = ns.convert(model, ns.model_tags(model, LEVELS, **kw), format=fmt.name, block_shape=(8, 8)).eval()
    assert isinstance(sparse.linear1, ns.NestedSparseLinear) and isinstance(sparse.linear2, ns.NestedSparseLinear)
    assert_levels_match_dense(sparse, torch.randn(2, 5, 32), torch.randn(2, 3, 32))


def test_multihead_attention_out_proj_is_refused_by_name():
    mha = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    assert "0.out_proj" not in ns.model_tags(mha, LEVELS)  # model_tags leaves it dense
    tags = {"0.out_proj": ns.magnitude_tags(mha[0].out_proj.weight, LEVELS)}
    with pytest.raises(ValueError, match=r"'0.out_proj' is the output projection of an nn.MultiheadAttention"):
        ns.convert(mha, tags)


def test_torch_prune_masks_get_an_actionable_message_and_work_once_removed():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    tags = {"0": ns.magnitude_tags(model[0].weight.detach(), LEVELS)}
    with pytest.raises(ValueError, match=r"torch.nn.utils.prune mask on 'weight'.*prune.remove\(module, 'weight'\)"):
        ns.convert(model, tags)
    prune.remove(model[0], "weight")
    mask = model[0].weight != 0
    tags = {"0": ns.tags_from_masks([mask, mask & (torch.rand(mask.shape) < 0.5)])}
    sparse = ns.convert(model, tags).eval()
    assert_levels_match_dense(sparse, torch.randn(5, 20))
    with torch.no_grad():  # level 0 is the pruned model itself
        ns.set_level(sparse, 0)
        torch.testing.assert_close(sparse(torch.ones(1, 20)), model(torch.ones(1, 20)), rtol=1e-5, atol=1e-5)


def test_boolean_or_float_tags_point_to_tags_from_masks():
    model = nn.Sequential(nn.Linear(8, 8))
    for bad in (torch.ones(8, 8, dtype=torch.bool), torch.ones(8, 8)):
        with pytest.raises(TypeError, match=r"tags\['0'\] is torch\.(bool|float32).*nestsparse.tags_from_masks"):
            ns.convert(model, {"0": bad})


def test_a_layer_used_twice_stays_one_layer_and_keeps_its_meaning():
    # The ReLU follows only the first use: it must not be fused into the shared layer (the second use would gain
    # it). The reference is the dense model with each level's weights, computed by hand.
    torch.manual_seed(3)
    shared = nn.Linear(12, 12)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    tags = ns.magnitude_tags(shared.weight, LEVELS)
    sparse = ns.convert(model, {"0": tags}).eval()
    assert isinstance(sparse[0], ns.NestedSparseLinear) and sparse[2] is sparse[0]
    assert isinstance(sparse[1], nn.ReLU) and sparse[0].activation == "none"
    x = torch.randn(4, 12)
    with torch.no_grad():
        for level in range(len(LEVELS)):
            ns.set_level(sparse, level)
            w = shared.weight * (tags >= level)
            expected = nn.functional.linear(torch.relu(nn.functional.linear(x, w, shared.bias)), w, shared.bias)
            torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)
            dense = ns.to_dense(sparse, level)
            assert dense[2] is dense[0]
            torch.testing.assert_close(dense(x), expected, rtol=1e-5, atol=1e-5)


def test_tied_weights_are_refused_not_silently_untied():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(30, 16)
            self.head = nn.Linear(16, 30, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    model = TiedLM()
    with pytest.raises(ValueError, match=r"head.weight is tied to 'embed.weight'.*untie"):
        ns.convert(model, {"head": ns.magnitude_tags(model.head.weight.detach(), LEVELS)})


def test_a_layer_that_keeps_nothing_at_a_level_is_named_in_a_warning():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    model[2].weight.data.mul_(1e-3)  # one global magnitude budget leaves the small classifier nothing at level 1
    tags = ns.model_tags(model, LEVELS, scope="global")
    assert int((tags["2"] >= 1).sum()) == 0
    message = r"1 layer\(s\) keep no weight at some level.*: 2 \(levels? [0-9, ]*1\).*skip"
    with pytest.warns(UserWarning, match=message):
        ns.convert(model, tags)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ns.convert(model, ns.model_tags(model, LEVELS, skip=["2"]))  # classifier kept dense: no warning


def test_a_deadline_that_looks_like_milliseconds_is_named():
    from nestsparse.runtime import ReroutingExecutor  # noqa: PLC0415

    dense = nn.Sequential(nn.Linear(8, 8))
    model = ns.convert(dense, {"0": ns.magnitude_tags(dense[0].weight, LEVELS)})
    with ReroutingExecutor(model, ["0"]) as ex:
        with pytest.warns(UserWarning, match=r"deadline=40 is in seconds; for 40 ms pass 0.04"):
            ex(torch.randn(2, 8), deadline=40, policy="static:0")
