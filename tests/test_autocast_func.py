"""torch.autocast runs a converted model like a dense one (the ops run in the nested weight's dtype); torch.func's
differentiating transforms are refused with a message naming what works, vmap works."""

import pytest
import torch
from torch import nn

import nestsparse


def params(m):
    return dict(m.named_parameters())


def stem_and_nested(fmt_name="ncsr"):
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 10)
    )
    block = {"block_shape": (4, 4)} if fmt_name == "nbcr" else {}
    structure = "bcr" if fmt_name == "nbcr" else "unstructured"
    tags = nestsparse.model_tags(model, (0.5, 0.2), skip=["0"], structure=structure, **block)  # dense stem
    return nestsparse.convert(model, tags, format=fmt_name, **block)


@pytest.mark.parametrize("fmt_name", ["ncsr", "nbcr"])
def test_autocast_with_a_dense_stem_runs_and_trains(fmt_name):
    model = stem_and_nested(fmt_name)
    x = torch.randn(4, 3, 9, 9)
    want = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
        assert model[0](x).dtype == torch.bfloat16  # the dense stem does run in bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    got.float().square().sum().backward()
    for m in nestsparse.level_aware_modules(model).values():
        assert m.values.grad is not None and m.values.grad.dtype == torch.float32 and m.values.grad.abs().sum() > 0


def test_autocast_casts_the_op_inputs_to_the_weight_dtype():
    lin = nestsparse.NestedSparseLinear.from_dense(nn.Linear(16, 8), torch.randint(-1, 2, (8, 16)), num_levels=2)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x is BFloat16 but values are Float"):
        lin(x)  # outside autocast a mismatch is still an error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x, residual=torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.float32


@pytest.mark.parametrize("fmt_name", ["ncsr", "nbcr"])
@pytest.mark.parametrize(("values", "autocast"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_autocast_never_narrows_an_input_it_would_not_narrow(fmt_name, values, autocast):
    """float16 values under autocast(bfloat16) narrowed a bfloat16 x to float16: inf where the dense layer of the same
    weights stays finite. The product now runs in float32 (the values cast up for the call)."""
    torch.manual_seed(6)
    dense = nn.Linear(16, 8)
    block = {"block_shape": (4, 4)} if fmt_name == "nbcr" else {}
    tags = nestsparse.bcr_tags(dense.weight, (0.5, 0.25), (4, 4)) if block else torch.randint(-1, 2, (8, 16))
    lin = nestsparse.NestedSparseLinear.from_dense(dense, tags, num_levels=2, format=fmt_name, **block).to(values)
    x = torch.full((2, 16), 1e5 if autocast == torch.bfloat16 else 6e4, dtype=autocast)  # 1e5: beyond float16's range
    x[1] = torch.linspace(-3, 3, 16)
    want = x.double() @ lin.nested().to_dense(0).double().T + lin.bias.double()
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast):
        got = lin(x)
        lin.set_dense_levels([1])  # a dense level answers in the same dtype as a sparse one
        assert lin(x, level=1).dtype == got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_autocast_narrows_float32_to_the_autocast_dtype_as_a_dense_layer_does():
    dense = nn.Linear(16, 8).to(torch.bfloat16)
    lin = nestsparse.NestedSparseLinear.from_dense(dense, torch.randint(-1, 2, (8, 16)), num_levels=2)
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == dense(x).dtype == torch.bfloat16
        lin.set_dense_levels([0, 1])
        assert lin(x, level=0).dtype == lin(x, level=1).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "transform",
    [
        lambda m, x: torch.func.grad(lambda x: m(x).sum())(x),
        lambda m, x: torch.func.vjp(m, x),
        lambda m, x: torch.func.jacrev(m)(x[:1]),
        lambda m, x: torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,)).sum())(params(m)),
    ],
    ids=["grad", "vjp", "jacrev", "grad-params"],
)
def test_torch_func_differentiation_is_refused_naming_the_alternative(transform):
    model = stem_and_nested()
    with pytest.raises(RuntimeError, match=r"torch\.func transforms other than vmap.*torch\.autograd\.grad.*to_dense"):
        transform(model, torch.randn(2, 3, 9, 9))


def test_torch_func_vmap_matches_a_loop():
    model = stem_and_nested().eval()
    xs = torch.randn(3, 2, 3, 9, 9)
    with torch.no_grad():
        got = torch.func.vmap(model)(xs)
        want = torch.stack([model(x) for x in xs])
    torch.testing.assert_close(got, want)
