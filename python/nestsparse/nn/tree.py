"""Walking a model's module tree."""

from __future__ import annotations

from torch import nn

__all__ = ["parent_module", "is_transposed_linear", "tied_weights"]


def parent_module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the submodule ``name`` of ``model`` ("" for the root), and the attribute name inside it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def is_transposed_linear(m: nn.Module) -> bool:
    """Whether ``m`` is transformers' Conv1D (GPT-2 and its kin): a linear layer y = x @ W + b whose weight is
    stored (in, out), the transpose of nn.Linear's. Its tags follow its own weight's shape; the nested layer it
    converts to stores the transpose."""
    cls = type(m)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers.")
        and isinstance(getattr(m, "weight", None), nn.Parameter)
    )


def tied_weights(model: nn.Module) -> dict[str, str]:
    """For every submodule whose ``weight`` is also another module's parameter (tied weights: an LM head sharing
    its embedding's matrix), its name -> the other parameter's name. One pass over the model."""
    every = dict(model.named_modules(remove_duplicate=False))  # a module registered twice has two names
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append((pname, every.get(pname.rpartition(".")[0])))
    tied = {}
    for name, m in every.items():
        weight = m._parameters.get("weight") if isinstance(m, nn.Module) else None
        if weight is None:
            continue
        others = [pname for pname, owner in owners.get(id(weight), []) if owner is not m]
        if others:
            tied[name] = others[0]
    return tied
