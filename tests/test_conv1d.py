"""nn.Conv1d converts to NestedSparseConv1d, a one-row 2-D convolution on the same kernels: against a float64
reference on odd shapes at every level and ISA, unbatched input, residual, gradients, save / load, to_dense, fuse."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nestsparse
from nestsparse import NestedSparseConv1d

from conftest import value_positions

# (Cin, Cout, k, stride, padding, dilation, groups, L)
GEOMETRIES = [
    (3, 17, 3, 1, 1, 1, 1, 1),
    (8, 5, 5, 2, 3, 1, 1, 41),
    (6, 9, 3, 1, 0, 2, 3, 17),
    (16, 16, 1, 1, 0, 1, 1, 1000),
]


def conv1d_pair(fmt, geometry, num_levels=3, seed=0, **tag_options):
    cin, cout, k, s, p, d, g, _ = geometry
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Conv1d(cin, cout, k, s, p, d, g).double()
    with torch.no_grad():
        dense.weight.copy_(torch.randn(dense.weight.shape, generator=gen, dtype=torch.float64))
    tags = fmt.tags(dense.weight.shape, num_levels, gen, block_shape=(4, 4), **tag_options)
    block = {"block_shape": (4, 4)} if fmt.name == "nbcr" else {}
    nested = NestedSparseConv1d.from_dense(dense, tags, num_levels=num_levels, format=fmt.name, **block)
    return dense, tags, nested


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_conv1d_matches_a_float64_reference_at_every_level(fmt, isa, geometry):
    dense, tags, nested = conv1d_pair(fmt, geometry, empty_level=2)
    x = torch.randn(3, geometry[0], geometry[7], dtype=torch.float64)

    def reference(level):
        geometry = (*dense.stride, *dense.padding, *dense.dilation, dense.groups)
        return F.conv1d(x, dense.weight * (tags >= level), dense.bias, *geometry)

    for level in range(3):
        want = reference(level)
        torch.testing.assert_close(nested(x, level=level), want)
        torch.testing.assert_close(nested(x[0], level=level), want[0])  # unbatched (C, L)
    res = torch.randn_like(want)
    nested.activation = "relu"
    torch.testing.assert_close(nested(x, level=1, residual=res), torch.relu(reference(1) + res))


def test_conv1d_gradients_match_the_dense_reference(fmt):
    dense, tags, nested = conv1d_pair(fmt, GEOMETRIES[1])
    x = torch.randn(2, 8, 41, dtype=torch.float64, requires_grad=True)
    nested(x, level=1).square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    w = dense.weight.detach().clone().requires_grad_(True)
    F.conv1d(xr, w * (tags >= 1), dense.bias, 2, 3).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    # each stored value's gradient is the dense weight's at its position if level 1 keeps it, else zero
    idx, rows, cols = value_positions(nested.nested(), 1)
    want = torch.zeros_like(nested.values)
    want[idx] = w.grad.reshape(w.shape[0], -1)[rows, cols]
    torch.testing.assert_close(nested.values.grad, want)


def test_conv1d_model_converts_saves_loads_and_goes_back_to_dense(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.Conv1d(16, 8, 3, stride=2), nn.Flatten()
    ).eval()
    model[1].running_mean.uniform_(-1, 1)
    tags = nestsparse.model_tags(model, (0.5, 0.2))
    assert set(tags) == {"0", "3"}
    sparse = nestsparse.convert(model, tags).eval()
    assert isinstance(sparse[0], NestedSparseConv1d) and isinstance(sparse[3], NestedSparseConv1d)
    x = torch.randn(2, 4, 23)
    nestsparse.save(sparse, tmp_path / "m.safetensors")
    loaded = nestsparse.load(tmp_path / "m.safetensors", model=model).eval()  # a dense skeleton
    fused = nestsparse.fuse(sparse)
    with torch.no_grad():
        for level in range(2):
            for m in (sparse, loaded, fused):
                nestsparse.set_level(m, level)
            want = sparse(x)
            assert torch.equal(loaded(x), want)
            torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
            dense = nestsparse.to_dense(sparse, level)
            assert isinstance(dense[0], nn.Conv1d)
            torch.testing.assert_close(dense(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(N, 4, L\) or \(4, L\) input"):
        sparse(torch.randn(2, 3, 23))


def test_conv1d_broadcasting_residual_and_what_does_not_convert():
    torch.manual_seed(0)
    lin = nn.Conv1d(4, 16, 3, padding=1)
    nested = NestedSparseConv1d.from_dense(lin, torch.randint(-1, 2, lin.weight.shape, dtype=torch.int8), num_levels=2)
    x, res = torch.randn(2, 4, 20), torch.randn(16, 1)  # broadcasts over the batch and the length
    want = F.conv1d(x, lin.weight * (nested.nested().to_dense(0).squeeze(2) != 0), lin.bias, padding=1) + res
    torch.testing.assert_close(nested(x, level=0, residual=res), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(("kernel", "padding", "dilation"), [(3, "same", 1), (4, "same", 1), (4, "same", 3), (3, 2, 1)])
def test_conv1d_same_padding_and_every_padding_mode_convert(kernel, padding, dilation, padding_mode, tmp_path):
    """Left dense without a word before (model_tags skipped them, convert did not say): now they convert, the
    padding applied before the product where it is not symmetric zeros."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(4, 6, kernel, padding=padding, dilation=dilation, padding_mode=padding_mode))
    tags = nestsparse.model_tags(model, (0.6, 0.3))
    assert set(tags) == {"0"}
    sparse = nestsparse.convert(model, tags).eval()
    x = torch.randn(2, 4, 11)
    nestsparse.save(sparse, tmp_path / "m.safetensors")
    loaded = nestsparse.load(tmp_path / "m.safetensors", model=copy.deepcopy(model))
    with torch.no_grad():
        for level in range(2):
            nestsparse.set_level(sparse, level)
            nestsparse.set_level(loaded, level)
            masked = nn.Conv1d(4, 6, kernel, padding=padding, dilation=dilation, padding_mode=padding_mode)
            masked.load_state_dict({"weight": model[0].weight * (tags["0"] >= level), "bias": model[0].bias})
            torch.testing.assert_close(sparse(x), masked(x), rtol=1e-5, atol=1e-5)
            assert torch.equal(loaded(x), sparse(x))
            torch.testing.assert_close(nestsparse.to_dense(sparse, level)(x), masked(x), rtol=1e-5, atol=1e-5)


def test_a_file_of_conv1d_layers_does_not_fill_conv2d_slots(tmp_path):
    model = nn.Sequential(nn.Conv1d(4, 8, 3))
    sparse = nestsparse.convert(model, nestsparse.model_tags(model, (0.5,)))
    nestsparse.save(sparse, tmp_path / "c.safetensors")
    wrong = nestsparse.convert(nn.Sequential(nn.Conv2d(4, 8, (1, 3))), {"0": torch.zeros(8, 4, 1, 3, dtype=torch.int8)})
    with pytest.raises(nestsparse.CheckpointError, match="file has a nested conv1d layer, the model a nested conv2d"):
        nestsparse.load(tmp_path / "c.safetensors", model=wrong)
