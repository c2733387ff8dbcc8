"""Dense model -> nested sparse model, and back."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from tqdm.auto import tqdm

from .activations import ACTIVATIONS, fusable_activation
from .formats import DEFAULT_BLOCK_SHAPE, FORMATS, FormatError
from .io import guard_save_pretrained
from .nn import (
    CONVERTIBLE,
    RECURRENT,
    LevelAware,
    NestedSparseConv1d,
    NestedSparseConv2d,
    NestedSparseLinear,
    NestedSparseModule,
    NestedSparseRNN,
    is_transposed_linear,
    keep_index_buffers_local,
    parent_module,
    recurrent_weights,
    tied_weights,
)
from .runtime.timing import median_time

__all__ = ["convert", "to_dense", "choose_dense_levels"]

# A model with this many weights to pack shows a progress bar (about 2 s of packing on one core).
_PROGRESS_ELEMENTS = 1 << 27


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
    _refuse_pruning_hooks(model)
    if not inplace:
        model = copy.deepcopy(model, _shared_weights(model, tags))
    modules = dict(model.named_modules())
    recurrent = _recurrent_tags(modules, tags)
    unknown = [k for k in tags if k not in modules and k.rpartition(".")[0] not in recurrent]
    if unknown:
        raise KeyError(f"convert: no module named {unknown[0]!r} in the model")
    tags = {name: _as_tensor(t) for name, t in tags.items()}
    for name, t in tags.items():
        if not isinstance(t, Tensor) or t.dtype == torch.bool or t.is_floating_point():
            what = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(
                f"convert: tags[{name!r}] is {what}; tags are int8 levels (-1 pruned, l kept up to level l). For "
                "per-level boolean masks use nestsparse.tags_from_masks([mask_level0, mask_level1, ...])"
            )
    levels_in_tags = 1 + max((int(t.max()) for t in tags.values() if t.numel()), default=0)
    if densities and len(densities) > levels_in_tags and num_levels is None:
        # (model_tags gives such tags when a density rounds to no weight in every layer)
        empty = ", ".join(map(str, range(levels_in_tags, len(densities))))
        warnings.warn(
            f"convert: {len(densities)} densities but the tags keep weights at {levels_in_tags} level(s) only: "
            f"level(s) {empty} keep no weight in any layer (their outputs are the biases alone). Give one density per "
            "level the tags have, or num_levels= to ask for empty levels without this warning",
            stacklevel=2,
        )
    if num_levels is None:
        num_levels = len(densities) or levels_in_tags
    recurrent = {rnn: {w: tags.pop(f"{rnn}.{w}" if rnn else w) for w in weights} for rnn, weights in recurrent.items()}
    for name, t in tags.items():
        m = modules[name]
        if not isinstance(m, CONVERTIBLE) and not is_transposed_linear(m):
            raise TypeError(
                f"convert: {name!r} is a {type(m).__name__}; only nn.Linear, nn.Conv2d, nn.Conv1d and transformers' "
                "Conv1D convert"
            )
        if tuple(t.shape) != tuple(m.weight.shape):
            raise ValueError(
                f"convert: tags for {name!r} have shape {tuple(t.shape)}, weight has {tuple(m.weight.shape)}"
            )
    _refuse_untranslatable(model, modules, tags)
    inputs, empty = {}, []
    if format == "auto" and example_input is not None:
        inputs = {n: args[0] for n, (args, _) in _layer_calls(model, list(tags), example_input).items()}
    large = sum(t.numel() for t in tags.values()) >= _PROGRESS_ELEMENTS
    for name, t in tqdm(tags.items(), desc="convert", unit="layer", disable=not large, leave=False):
        m = modules[name]
        parent, child = parent_module(model, name)
        act, follower = "none", None
        refs = _references(model, m)
        # A module registered at several places stays one module; the activation after one of its places is not
        # the others', so it is not fused.
        if fuse_activations and isinstance(parent, nn.Sequential) and len(refs) == 1:
            keys = list(parent._modules)
            i = keys.index(child)
            if i + 1 < len(keys):
                act = fusable_activation(parent._modules[keys[i + 1]]) or "none"
                follower = keys[i + 1] if act != "none" else None
        cls = (
            NestedSparseConv1d
            if isinstance(m, nn.Conv1d)
            else NestedSparseConv2d
            if isinstance(m, nn.Conv2d)
            else NestedSparseLinear
        )

        def build(fmt: str, m=m, t=t, cls=cls, act=act) -> NestedSparseModule:
            return cls.from_dense(
                m, t, activation=act, densities=densities, num_levels=num_levels, format=fmt, block_shape=block_shape
            )

        try:
            new = _pick_faster(build, inputs.get(name), num_levels) if format == "auto" else build(format)
        except ValueError as e:
            raise ValueError(f"convert: {name!r}: {e}") from e
        for p, c in refs:
            setattr(p, c, new)
        if follower is not None:
            setattr(parent, follower, nn.Identity())
        nothing = [lvl for lvl in range(num_levels) if new.nested().nnz(lvl) == 0]
        if nothing and t.numel():
            empty.append(f"{name} (level{'s' if len(nothing) > 1 else ''} {', '.join(map(str, nothing))})")
    for name, rnn_tags in recurrent.items():
        m = modules[name]
        for w, t in rnn_tags.items():
            if tuple(t.shape) != tuple(getattr(m, w).shape):
                raise ValueError(
                    f"convert: tags for {name}.{w} have shape {tuple(t.shape)}, weight has {tuple(getattr(m, w).shape)}"
                )
        new = NestedSparseRNN.from_dense(
            m,
            rnn_tags,
            densities=densities,
            num_levels=num_levels,
            format="ncsr" if format == "auto" else format,
            block_shape=block_shape,
        )
        for p, c in _references(model, m):
            setattr(p, c, new)
    if empty:
        warnings.warn(
            f"convert: {len(empty)} layer(s) keep no weight at some level, so their output there is the bias alone: "
            f"{'; '.join(empty[:6])}{' ...' if len(empty) > 6 else ''}. A global budget often empties the small "
            "layers (the classifier): keep them dense (model_tags(..., skip=[...])) or use a per-layer budget",
            stacklevel=2,
        )
    _slow_path_for_converted_encoders(model)
    _report_left_dense(model)
    return guard_save_pretrained(keep_index_buffers_local(model))


def _shared_weights(model: nn.Module, tags: Mapping[str, Tensor]) -> dict[int, Tensor]:
    """A deepcopy memo that shares the weights ``tags`` names with the copy instead of copying them: the copy's layers
    that hold them are replaced by nested ones, so a copy would only be thrown away (a second 1 GiB for a
    16384 x 16384 Linear)."""
    memo: dict[int, Tensor] = {}
    for key in tags:
        for name, attr in ((key, "weight"), key.rpartition(".")[::2]):  # a layer, or an LSTM's "rnn.weight_ih_l0"
            try:
                t = getattr(model.get_submodule(name), attr, None)
            except AttributeError:
                continue
            if isinstance(t, Tensor):
                memo[id(t)] = t
    return memo


def _recurrent_tags(modules: Mapping[str, nn.Module], tags: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """The nn.LSTM / nn.GRU layers the tags name through their weights ("rnn.weight_ih_l0", ...), with the weight
    names; ValueError if only some of a layer's weights have tags (all of them nest, or none)."""
    found: dict[str, set[str]] = {}
    for key in tags:
        owner, _, weight = key.rpartition(".")
        m = modules.get(owner)
        if isinstance(m, tuple(cls for cls, _ in RECURRENT.values())):
            if weight not in recurrent_weights(m):
                raise KeyError(f"convert: {key!r}: {owner!r} is an {type(m).__name__} without a weight {weight!r}")
            found.setdefault(owner, set()).add(weight)
    out = {}
    for owner, weights in found.items():
        every = recurrent_weights(modules[owner])
        missing = [w for w in every if w not in weights]
        if missing:
            raise ValueError(
                f"convert: tags name some weights of the {type(modules[owner]).__name__} {owner!r} but not "
                f"{missing}: give tags for all of its gate matrices (nestsparse.model_tags does), or none"
            )
        out[owner] = every
    return out


def _as_tensor(t):
    """Tags given as a numpy integer array become a tensor; anything else is checked as it is."""
    if type(t).__module__ == "numpy" and getattr(t, "dtype", None) is not None and t.dtype.kind in "iu":
        t = torch.as_tensor(t)
        if t.numel() and (int(t.min()) < -1 or int(t.max()) > 127):
            raise ValueError(f"convert: tags range over [{int(t.min())}, {int(t.max())}]; tags are -1 .. 127")
        return t.to(torch.int8)
    return t


def _refuse_pruning_hooks(model: nn.Module) -> None:
    """torch.nn.utils.prune keeps weight_orig and a mask applied by a hook: the weight convert would read is not a
    plain parameter (and deepcopy fails on it). Say what to do instead."""
    for name, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                raise ValueError(
                    f"convert: {name or 'the model'!r} carries a torch.nn.utils.prune mask on {hook._tensor_name!r}; "
                    f"make it permanent first (torch.nn.utils.prune.remove(module, {hook._tensor_name!r})), then "
                    "convert with tags that keep the pruned zeros out (e.g. nestsparse.tags_from_masks of the masks, "
                    "or model_tags, which never keeps a zero weight at a level that drops it)"
                )


def _refuse_untranslatable(model: nn.Module, modules: Mapping[str, nn.Module], tags: Mapping[str, Tensor]) -> None:
    """Layers that a nested module cannot stand in for: a weight shared with another module (tied weights: the
    nested values would be a new parameter, silently untied) and MultiheadAttention's out_proj (torch reads its
    .weight directly)."""
    tied = tied_weights(model)
    for name in tags:
        shared = tied.get(name)
        if shared is not None:
            raise ValueError(
                f"convert: {name}.weight is tied to {shared!r} (one parameter, two modules); a nested layer "
                "holds its own values, so converting it would untie them: leave it out of the tags, or untie the "
                "weights first"
            )
    for mname, m in modules.items():
        if isinstance(m, nn.MultiheadAttention):
            out = f"{mname}.out_proj" if mname else "out_proj"
            if out in tags:
                raise ValueError(
                    f"convert: {out!r} is the output projection of an nn.MultiheadAttention, which torch calls "
                    "through its .weight (F.multi_head_attention_forward), not as a module: it cannot be nested; "
                    "leave it out of the tags (nestsparse.model_tags does)"
                )


def _report_left_dense(model: nn.Module) -> None:
    """One warning line naming the weight layers no nested kernel serves (embeddings, recurrent layers, 1-D / 3-D /
    transposed convolutions, attention's packed projections), which stay dense. Linear / Conv2d layers left out of
    the tags are the caller's choice and are not listed."""
    left: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (LevelAware, NestedSparseRNN, *CONVERTIBLE, nn.modules.batchnorm._NormBase)):
            continue
        if is_transposed_linear(m):
            continue
        if any(p.dim() >= 2 and "weight" in n for n, p in m.named_parameters(recurse=False)):
            left.setdefault(type(m).__name__, []).append(name or "(root)")
    if left:
        kinds = "; ".join(f"{len(v)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for k, v in left.items())
        warnings.warn(f"convert: left dense, no nested kernel for them: {kinds}", stacklevel=3)


def _references(model: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (parent, attribute) that holds ``target``: a module registered at several places."""
    return [(parent, child) for parent in model.modules() for child, sub in parent._modules.items() if sub is target]


def _slow_path_for_converted_encoders(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer's inference fast path runs its own fused kernel on linear1.weight / linear2.weight,
    which a nested layer does not have (AttributeError in eval mode). activation_relu_or_gelu is one of the fast
    path's conditions and nothing else reads it: clearing it sends the layer through its regular path, which calls
    the nested modules (same activation, same result)."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(
            isinstance(sub, NestedSparseModule) for sub in (m.linear1, m.linear2)
        ):
            m.activation_relu_or_gelu = 0


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


def choose_dense_levels(
    model: nn.Module,
    example_input: Tensor | tuple,
    *,
    max_extra_bytes: int | None = None,
    threads: int | None = None,
    min_run_time: float = 0.02,
) -> list[dict]:
    """Per layer and level, runs the level as a dense product where that is faster than the sparse kernel on the
    layer's real input: a level too dense, or a layer too small, for sparsity to pay. ``model`` runs
    ``example_input`` once (what it is called with) to capture every nested layer's input; then each level of each
    layer is timed both ways (nestsparse.runtime.median_time at ``threads``, default torch's) and the dense levels
    that save the most time per byte are kept while their dense weights fit in ``max_extra_bytes`` (default: the
    size of one dense copy of the nested layers). Level switches stay copy-free (each chosen level keeps its own
    dense weight, NestedSparseModule.set_dense_levels). Returns one row per layer and level: name, level,
    sparse_ms, dense_ms, dense (chosen)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NestedSparseModule)}
    elsewhere = [n for n, m in layers.items() if m.values.device.type != "cpu"]
    if elsewhere:
        raise ValueError(
            f"choose_dense_levels: {elsewhere[0]!r} is on {layers[elsewhere[0]].values.device}; dense levels are "
            "served on the CPU only (checking that a weight has not changed since its dense copy was made would "
            "synchronise the device on every call)"
        )
    captured = _layer_calls(model, list(layers), example_input)
    missing = [n for n in layers if n not in captured]
    if missing:
        raise ValueError(f"choose_dense_levels: {missing[0]!r} did not run on the example input")
    rows, candidates = [], []
    with torch.inference_mode():
        for name, m in layers.items():
            args, kwargs = captured[name]
            m.set_dense_levels(range(m.num_levels))
            for level in range(m.num_levels):
                dense_s = median_time(
                    lambda m=m, level=level, args=args, kwargs=kwargs: m(*args, **{**kwargs, "level": level}),
                    min_run_time=min_run_time,
                    threads=threads,
                )
                rows.append({"name": name, "level": level, "dense_ms": dense_s * 1e3, "dense": False})
            m.set_dense_levels(())
            for i, level in enumerate(range(m.num_levels)):
                sparse_s = median_time(
                    lambda m=m, level=level, args=args, kwargs=kwargs: m(*args, **{**kwargs, "level": level}),
                    min_run_time=min_run_time,
                    threads=threads,
                )
                row = rows[len(rows) - m.num_levels + i]
                row["sparse_ms"] = sparse_s * 1e3
                if row["dense_ms"] < row["sparse_ms"]:
                    nbytes = m.values.element_size() * torch.Size(m.weight_shape).numel()
                    candidates.append(((row["sparse_ms"] - row["dense_ms"]) / nbytes, nbytes, row))
    budget = max_extra_bytes
    if budget is None:
        budget = sum(m.values.element_size() * torch.Size(m.weight_shape).numel() for m in layers.values())
    chosen: dict[str, list[int]] = {}
    for _, nbytes, row in sorted(candidates, key=lambda c: -c[0]):
        if nbytes <= budget:
            budget -= nbytes
            row["dense"] = True
            chosen.setdefault(row["name"], []).append(row["level"])
    for name, levels in chosen.items():
        layers[name].set_dense_levels(levels)
    return rows


def _layer_calls(model: nn.Module, names: list[str], example_input) -> dict[str, tuple[tuple, dict]]:
    """Each named layer's (args, kwargs) when ``model`` runs ``example_input`` (one forward pass, no gradients); a
    layer that did not run is missing."""
    captured, hooks = {}, []
    for name in names:

        def hook(_mod, args, kwargs, name=name):
            if name not in captured:
                captured[name] = (tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs))

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return captured


def to_dense(model: nn.Module, level: int = 0, *, inplace: bool = False) -> nn.Module:
    """Replaces each nested module by a dense nn.Linear / nn.Conv2d holding its level-``level`` weight
    (plus the fused activation as a following module), e.g. to fine-tune or export with stock layers; level-aware
    modules that stay (LevelBatchNorm) are set to ``level``. A BatchNorm folded into a layer (nestsparse.fuse) is
    folded into the dense weight and bias of that level; a fused model whose layers take residual inputs is refused
    (convert the model before fusing it)."""
    if isinstance(model, torch.fx.GraphModule) and any(
        n.op == "call_module" and "residual" in n.kwargs for n in model.graph.nodes
    ):
        raise ValueError(
            "to_dense: the model is fused (nestsparse.fuse gave its layers residual inputs a dense layer does not "
            "take); call to_dense on the converted model before fusing it"
        )
    if not inplace:
        model = copy.deepcopy(model)
    for m in list(model.modules()):  # recurrent layers first: their cells are nested modules
        if isinstance(m, NestedSparseRNN):
            replacement = m.to_dense(level)
            for parent, child in _references(model, m):
                setattr(parent, child, replacement)
    for m in list(model.modules()):
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
        elif isinstance(m, NestedSparseConv1d):
            w = w.squeeze(2)
            dense = nn.Conv1d(
                m.in_channels,
                m.out_channels,
                m.kernel_size[1],
                m.stride[1],
                m.padding if isinstance(m.padding, str) else m.padding[1],
                m.dilation[1],
                m.groups,
                bias=bias is not None,
                padding_mode=m.padding_mode,
            )
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
                padding_mode=m.padding_mode,
            )
        dense = dense.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if bias is not None:
                dense.bias.copy_(bias)
        act = ACTIVATIONS[m.activation]
        replacement = nn.Sequential(dense, act.module()) if act is not None else dense
        for parent, child in _references(model, m):  # a layer registered at several places stays one layer
            setattr(parent, child, replacement)
    for m in model.modules():  # what stays level-aware (LevelBatchNorm) computes level ``level`` too
        if isinstance(m, LevelAware):
            m.level = m.checked_level(level)
    return model
