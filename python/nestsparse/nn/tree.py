"""Walking a model's module tree."""

from __future__ import annotations

from torch import nn

__all__ = ["parent_module"]


def parent_module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the submodule ``name`` of ``model`` ("" for the root), and the attribute name inside it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
