"""Dense model -> nested sparse model, and back."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .activations import ACTIVATIONS, fusable_activation
from .formats import DEFAULT_BLOCK_SHAPE, FORMATS, FormatError
from .nn import NestedSparseConv2d, NestedSparseLinear, NestedSparseModule, parent_module
from .runtime.timing import median_time

__all__ = ["convert", "to_dense"]


def convert(
    model: nn.Module,
    tags: Mapping[str, Tensor],
    *,
    densities: tuple[float, ...] = (),
    num_levels: int | None = None,
    fuse_activations: bool = True,
    inplace: bool = False,
    format: str = "ncsr",
    block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
    example_input: Tensor | tuple | None = None,
) -> nn.Module:
    """Replaces each nn.Linear / nn.Conv2d named in ``tags`` by its nested sparse module.

    ``tags`` maps module names to int8 tags of the module's weight shape (see nestsparse.pruning). Every
    layer gets the same number of levels: ``num_levels``, else ``len(densities)``, else the highest tag + 1
    over all layers (a layer may keep nothing at the sparsest levels under a global budget). With
    ``fuse_activations``, an activation that directly follows a converted layer inside an nn.Sequential
    (a module of nestsparse.activations.ACTIVATIONS: ReLU, ReLU6, exact GELU) is folded into the kernel's
    epilogue and replaced by nn.Identity, so the output is written once.

    ``format``: a name of nestsparse.formats.FORMATS -- "ncsr" (nested CSR, any tags), "nbcr" (nested BCR of
    ``block_shape``; the tags must be block row/column structured, e.g. from nestsparse.bcr_tags) -- or "auto",
    which picks per layer among the formats that can store its tags (unstructured tags: NCSR only):
      - with ``example_input`` (what the model is called with): the model runs it once to capture every
        layer's real input, then each candidate runs that input at level 0 and at the sparsest level
        (nestsparse.runtime.median_time) and the smaller sum wins;
      - without it, a cost model: the format whose level-0 product reads fewer bytes (values + indices).
    The chosen format of each layer is its ``format`` attribute.
    """
    if format not in FORMATS and format != "auto":
        raise ValueError(f"convert: format must be one of {(*FORMATS, 'auto')}, got {format!r}")
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    unknown = [k for k in tags if k not in modules]
    if unknown:
        raise KeyError(f"convert: no module named {unknown[0]!r} in the model")
    if num_levels is None:
        num_levels = len(densities) or 1 + max((int(t.max()) for t in tags.values() if t.numel()), default=0)
    for name, t in tags.items():
        m = modules[name]
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"convert: {name!r} is a {type(m).__name__}; only nn.Linear and nn.Conv2d convert")
        if tuple(t.shape) != tuple(m.weight.shape):
            raise ValueError(
                f"convert: tags for {name!r} have shape {tuple(t.shape)}, weight has {tuple(m.weight.shape)}"
            )
    inputs = _layer_inputs(model, list(tags), example_input) if format == "auto" and example_input is not None else {}
    for name, t in tags.items():
        m = modules[name]
        parent, child = parent_module(model, name)
        act, follower = "none", None
        if fuse_activations and isinstance(parent, nn.Sequential):
            keys = list(parent._modules)
            i = keys.index(child)
            if i + 1 < len(keys):
                act = fusable_activation(parent._modules[keys[i + 1]]) or "none"
                follower = keys[i + 1] if act != "none" else None
        cls = NestedSparseLinear if isinstance(m, nn.Linear) else NestedSparseConv2d

        def build(fmt: str, m=m, t=t, cls=cls, act=act) -> NestedSparseModule:
            return cls.from_dense(
                m, t, activation=act, densities=densities, num_levels=num_levels, format=fmt, block_shape=block_shape
            )

        if format == "auto":
            new = _pick_faster(build, inputs.get(name), num_levels)
        else:
            new = build(format)
        setattr(parent, child, new)
        if follower is not None:
            setattr(parent, follower, nn.Identity())
    return model


def _layer_inputs(model: nn.Module, names: list[str], example_input) -> dict[str, Tensor]:
    """Each named layer's input when ``model`` runs ``example_input`` (one forward pass, no gradients)."""
    captured, hooks = {}, []
    for name in names:

        def hook(_mod, args, name=name):
            captured.setdefault(name, args[0].detach())

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _pick_faster(build, x: Tensor | None, num_levels: int) -> NestedSparseModule:
    candidates = []
    for fmt in FORMATS:
        try:
            candidates.append(build(fmt))
        except FormatError:  # the tags do not have the format's structure
            pass
    if len(candidates) == 1:
        return candidates[0]
    if x is None:
        return min(candidates, key=lambda mod: mod.nested().nbytes(0))
    levels = sorted({0, num_levels - 1})
    with torch.no_grad():
        cost = [
            sum(median_time(lambda mod=mod, lvl=lvl: mod(x, level=lvl), min_run_time=0.02) for lvl in levels)
            for mod in candidates
        ]
    return candidates[cost.index(min(cost))]


def to_dense(model: nn.Module, level: int = 0, *, inplace: bool = False) -> nn.Module:
    """Replaces each nested module by a dense nn.Linear / nn.Conv2d holding its level-``level`` weight
    (plus the fused activation as a following module), e.g. to fine-tune or export with stock layers. A BatchNorm
    folded into a layer (nestsparse.fuse) is folded into the dense weight and bias of that level; a fused model
    whose layers take residual inputs is refused (convert the model before fusing it)."""
    if isinstance(model, torch.fx.GraphModule) and any(
        n.op == "call_module" and "residual" in n.kwargs for n in model.graph.nodes
    ):
        raise ValueError(
            "to_dense: the model is fused (nestsparse.fuse gave its layers residual inputs a dense layer does not "
            "take); call to_dense on the converted model before fusing it"
        )
    if not inplace:
        model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if not isinstance(m, NestedSparseModule):
            continue
        w = m.nested().to_dense(level)
        bias = m.bias
        if m.epilogue_scale is not None:  # a folded BatchNorm: its scale into the weight, its shift is the bias
            scale = m.epilogue_scale[level]
            w = w * scale.view(-1, *([1] * (w.dim() - 1)))
            bias = m.epilogue_shift[level]
        if isinstance(m, NestedSparseLinear):
            dense = nn.Linear(m.in_features, m.out_features, bias=bias is not None)
        else:
            dense = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
                bias=bias is not None,
            )
        dense = dense.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if bias is not None:
                dense.bias.copy_(bias)
        act = ACTIVATIONS[m.activation]
        parent, child = parent_module(model, name)
        setattr(parent, child, nn.Sequential(dense, act.module()) if act is not None else dense)
    return model
