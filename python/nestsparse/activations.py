"""The activations the sparse ops fuse into their epilogue, and the torch module each stands for.

The one Python place to edit when an activation is added (the C++ side is csrc/ops/activation.h): ``convert``
folds a module of the table into the layer before it, ``to_dense`` puts it back, the modules check their
``activation`` against it, and the tests use the module as the reference of the fused kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._library import native

__all__ = ["Activation", "ACTIVATIONS", "fusable_activation"]


@dataclass(frozen=True)
class Activation:
    """A torch module class, and the attribute values an instance must have to be what the kernels compute; and the
    same as a function of a tensor (what a layer's dense product applies after it)."""

    module_class: type[nn.Module]
    function: Callable[[Tensor], Tensor]
    attributes: dict[str, Any] = field(default_factory=dict)

    def module(self) -> nn.Module:
        """A new module computing this activation."""
        return self.module_class(**self.attributes)

    def matches(self, m: nn.Module) -> bool:
        return type(m) is self.module_class and all(getattr(m, k) == v for k, v in self.attributes.items())


ACTIVATIONS: dict[str, Activation | None] = {
    "none": None,
    "relu": Activation(nn.ReLU, torch.relu),
    "relu6": Activation(nn.ReLU6, F.relu6),
    "gelu": Activation(nn.GELU, F.gelu, {"approximate": "none"}),  # the kernels compute the exact (erf) GELU
}

if tuple(ACTIVATIONS) != tuple(native.activations()):  # pragma: no cover - only when the two sides disagree
    raise ImportError(
        f"nestsparse: the Python activations {tuple(ACTIVATIONS)} differ from the compiled library's "
        f"{tuple(native.activations())} (csrc/ops/activation.h); rebuild, or add the activation to both"
    )


def fusable_activation(m: nn.Module) -> str | None:
    """The name of the activation ``m`` computes, if the kernels can fuse it; else None."""
    for name, act in ACTIVATIONS.items():
        if act is not None and act.matches(m):
            return name
    return None
