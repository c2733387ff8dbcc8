"""Stages and checkpoints: where a model can switch level in the middle of an inference.

A model is split into *stages* at *checkpoints*. A stage is a module of the model (a residual block, a layer)
or a group of modules (a layer and the LevelBatchNorm after it); its checkpoint is a forward pre-hook on its
first module, so the model's own forward runs unchanged, residual connections included. Every level-aware
module (nested sparse layers, level masks, LevelBatchNorm) must belong to exactly one stage; that is what
"the stages cover the model" means, and what lets a checkpoint switch the rest of the inference to another
level: because levels are nested in one buffer, every switch is valid and copies nothing.
"""

from __future__ import annotations

from torch import fx, nn

from ..nn import LevelAware, LevelBatchNorm, level_aware_modules

__all__ = ["auto_stages", "check_stages", "is_layer"]


def is_layer(m: nn.Module) -> bool:
    """A sparsifiable layer that is level-aware itself (nested sparse) or through a level mask."""
    if isinstance(m, LevelAware) and hasattr(m, "weight_shape"):
        return True
    params = getattr(m, "parametrizations", None)
    return params is not None and any(isinstance(p, LevelAware) for p in params.modules())


def auto_stages(model: nn.Module, granularity: str = "block") -> list[tuple[str, ...]]:
    """Stages that cover ``model``, in registration order (the executor learns the execution order).

    ``"block"``: from the root, descend through nn.Sequential / nn.ModuleList containers; every other module
    holding a level-aware module is a stage: a residual block, a layer, a LevelBatchNorm of the stem. In a
    torch.fx graph (nestsparse.fuse) the blocks are never called, only the modules the graph calls: those are the
    stages (the layers, with the BatchNorms folded into them).
    ``"layer"``: every sparsifiable layer (nested sparse module or level-masked Linear/Conv2d) is a stage,
    grouped with the LevelBatchNorms registered after it up to the next layer (its own normalisation, so a
    switch never falls between a layer and its statistics); a LevelBatchNorm before any layer is its own stage.
    """
    if granularity not in ("block", "layer"):
        raise ValueError(f"auto_stages: granularity must be 'block' or 'layer', got {granularity!r}")
    aware = list(level_aware_modules(model))
    if not aware:
        raise ValueError("auto_stages: the model has no level-aware modules (convert it or apply level masks first)")
    if granularity == "layer":
        stages: list[list[str]] = []
        for name, m in model.named_modules():
            if is_layer(m):
                stages.append([name])
            elif isinstance(m, LevelBatchNorm):
                if stages:
                    stages[-1].append(name)
                else:
                    stages.append([name])
        return [tuple(s) for s in stages]

    def holds_aware(name: str) -> bool:
        prefix = name + "." if name else ""
        return any(a == name or a.startswith(prefix) for a in aware)

    out: list[tuple[str, ...]] = []
    called = (
        {n.target for n in model.graph.nodes if n.op == "call_module"} if isinstance(model, fx.GraphModule) else None
    )

    def visit(name: str, m: nn.Module) -> None:
        if name and not isinstance(m, (nn.Sequential, nn.ModuleList)) and (called is None or name in called):
            out.append((name,))
            return
        for child, sub in m.named_children():
            full = f"{name}.{child}" if name else child
            if holds_aware(full):
                visit(full, sub)

    if isinstance(model, LevelAware):
        raise ValueError("auto_stages: the model itself is one level-aware layer; there is nothing to split")
    visit("", model)
    return out


def check_stages(model: nn.Module, stages) -> list[tuple[str, ...]]:
    """``stages`` (a granularity of auto_stages, or a list of module names or name tuples) as tuples of names,
    checked: every name a module of ``model``, every level-aware module in exactly one stage."""
    if not list(level_aware_modules(model)):
        raise ValueError("stages: the model has no level-aware modules (convert it or apply level masks first)")
    if isinstance(stages, str):
        stages = auto_stages(model, stages)
    stages = [tuple([s]) if isinstance(s, str) else tuple(s) for s in stages]
    if not stages or any(not s for s in stages):
        raise ValueError("stages: give at least one stage, each with at least one module name")
    modules = dict(model.named_modules())
    owner: dict[str, str] = {}
    for stage in stages:
        for name in stage:
            if not isinstance(name, str) or name not in modules or name == "":
                raise ValueError(f"stages: no module named {name!r} in the model (stage {stage[0]!r})")
            for sub, m in modules[name].named_modules(prefix=name):
                if isinstance(m, LevelAware):
                    if sub in owner and owner[sub] != stage[0]:
                        raise ValueError(f"stages: module {sub!r} is in stage {owner[sub]!r} and in stage {stage[0]!r}")
                    owner[sub] = stage[0]
    heads = [s[0] for s in stages]
    if len(set(heads)) != len(heads):
        raise ValueError("stages: two stages start at the same module")
    missing = [n for n in list(level_aware_modules(model)) if n not in owner]
    if missing:
        raise ValueError(
            f"stages do not cover the model: level-aware module {missing[0]!r} "
            f"({type(modules[missing[0]]).__name__}) is in no stage"
            + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; add it to a stage, e.g. grouped with the layer before it"
        )
    return stages
