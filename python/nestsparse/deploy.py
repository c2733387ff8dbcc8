"""Deployment outside this Python process: a converted model exported with its level as an input.

``export(model, args)`` is ``torch.export.export`` of the model with one more input in front, the level (a 0-dim
int64 tensor), so one exported program serves every level: save it with ``torch.export.save``, run it in a process
that has only loaded the op library (``torch.ops.load_library(nestsparse.library_path())``), or compile it ahead of
time with ``torch._inductor.aoti_compile_and_package`` and run that from C++ with libtorch (examples/cpp). The ops
take the level as a symbolic int, so it is not baked in; the program checks it is in range.

A plain ``torch.export.export`` or ``torch.jit.trace`` of a converted model would bake the level in silently: the
nested modules refuse both and name this function (nn.levels.refuse_baked_level).

What an exported program does not do: switch the level in the middle of an inference (rerouting needs the Python
executor, nestsparse.runtime) or run a level as a dense product (set_dense_levels): every level runs the sparse
kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .nn import get_levels, level_aware_modules, shared_copy

__all__ = ["LevelInput", "export"]


class LevelInput(nn.Module):
    """``model`` with the level as its first input: ``LevelInput(model)(level, *args)`` runs ``model(*args)`` at
    ``level`` (a one-element integer tensor). It holds a shared copy of ``model`` (the same weights, its own level,
    no rerouting hooks), so the caller's model is left as it was."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.num_levels = get_levels(model)
        self.model = shared_copy(model)
        self._level_aware = list(level_aware_modules(self.model).values())

    def forward(self, level: Tensor, *args, **kwargs):
        if not isinstance(level, Tensor) or level.numel() != 1 or level.dtype.is_floating_point:
            raise ValueError(
                f"LevelInput: the level is a one-element integer tensor, e.g. torch.tensor(1), got {level!r}"
            )
        lvl = level.item()
        # constant messages: a message built from the symbolic level cannot be traced (strict export)
        out_of_range = f"LevelInput: the level is out of range (0 = densest .. {self.num_levels - 1})"
        torch._check(lvl >= 0, lambda: out_of_range)
        torch._check(lvl < self.num_levels, lambda: out_of_range)
        before = [m.level for m in self._level_aware]
        for m in self._level_aware:  # a plain int when called, a symbolic one while exported
            m.level = lvl
        try:
            return self.model(*args, **kwargs)
        finally:
            for m, b in zip(self._level_aware, before):
                m.level = b


def export(
    model: nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    dynamic_shapes: Sequence | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a converted (or fused) model whose program takes the level first:
    ``program.module()(torch.tensor(level), *args)``. ``args`` and ``kwargs`` are an example call of ``model``;
    ``dynamic_shapes``, if given, is one entry per element of ``args`` (e.g. ``({0: torch.export.Dim("batch")},)``
    for a dynamic batch). Export in eval mode, as for any inference program. The export is torch's default,
    non-strict one (it runs the model's Python with the level symbolic; strict mode's bytecode tracing does not
    carry the symbolic level through the modules' attributes)."""
    if not isinstance(args, tuple):
        raise TypeError(f"nestsparse.export: args is a tuple of example inputs, got {type(args).__name__}")
    if not level_aware_modules(model):
        raise ValueError("nestsparse.export: the model has no nested layers (convert it first), use torch.export")
    wrapped = LevelInput(model)
    example = (torch.tensor(0), *args)
    if dynamic_shapes is not None:
        if isinstance(dynamic_shapes, dict) or len(dynamic_shapes) != len(args):
            raise ValueError(
                f"nestsparse.export: dynamic_shapes is one entry per element of args ({len(args)}), "
                f"got {dynamic_shapes!r}"
            )
        dynamic_shapes = (None, tuple(dynamic_shapes))  # the level, then forward's *args as one group
    return torch.export.export(wrapped, example, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
