"""Level-aware modules: what every module whose behaviour depends on the level shares, and switching a model."""

from __future__ import annotations

import copy
import operator

import torch
from torch import nn

__all__ = ["LevelAware", "level_aware_modules", "set_level", "get_levels", "shared_copy", "refuse_baked_level"]


class LevelAware:
    """What every module whose behaviour depends on the level shares: ``level`` (0 = densest), ``num_levels``
    and a checked ``set_level``. ``set_level(model, l)`` switches all of them at once."""

    _level: int = 0

    @property
    def level(self) -> int:
        """The level this module computes (0 = densest). Setting it checks the range: a LevelBatchNorm at level -1
        would silently read the last level's statistics. A symbolic int (nestsparse.export) passes unchecked; the
        exported program checks it."""
        return self._level

    @level.setter
    def level(self, value) -> None:
        self.__dict__["_level"] = value if isinstance(value, torch.SymInt) else self.checked_level(value)

    def __setstate__(self, state: dict) -> None:
        if "level" in state and "_level" not in state:  # pickled before the level was a checked property
            state["_level"] = state.pop("level")
        super().__setstate__(state)

    @property
    def num_levels(self) -> int:
        raise NotImplementedError

    def set_level(self, level: int) -> None:
        """Selects the level used from now on. Copies nothing."""
        self.level = self.checked_level(level)

    def checked_level(self, level: int) -> int:
        """``level`` as an int if it is an integer in [0, num_levels) (numpy integers and one-element integer
        tensors count); ValueError naming the module and the mistake otherwise."""
        if not isinstance(level, int) or isinstance(level, bool):
            try:
                if isinstance(level, bool):
                    raise TypeError
                level = operator.index(level)
            except TypeError:
                raise ValueError(
                    f"{type(self).__name__}: level {level!r} is out of range: a level is an int "
                    f"(0 = densest .. {self.num_levels - 1}), got {type(level).__name__} {level!r}"
                ) from None
        if not 0 <= level < self.num_levels:
            raise ValueError(
                f"{type(self).__name__}: level {level!r} is out of range for {self.num_levels} levels (0 = densest)"
            )
        return level


def refuse_baked_level(module: nn.Module, level) -> None:
    """Raises if ``module`` is being traced by torch.jit.trace or exported by a plain torch.export.export (or
    torch.onnx.export, which uses one of them) with ``level`` a plain int: the artefact would run that level
    forever, whatever set_level says later. nestsparse.export makes the level an input of the exported program
    (a symbolic int here, which passes)."""
    if isinstance(level, torch.SymInt):
        return
    if torch.compiler.is_exporting():
        how = "torch.export"
    elif torch.compiler.is_compiling() or torch._C._get_tracing_state() is None:
        return  # eager or torch.compile: the fast path of every call (about 0.1 us)
    else:
        how = "torch.jit.trace"
    if how:
        how = "torch.onnx.export" if torch.onnx.is_in_onnx_export() else how
        raise RuntimeError(
            f"{type(module).__name__}: {how} would bake level {level} into the artefact (set_level would no longer "
            f"change it). Export with nestsparse.export(model, args), whose program takes the level as its first "
            f"input; for ONNX or another runtime without the nestsparse ops, export "
            f"nestsparse.to_dense(model, level) (the level's weights, dense with zeros)"
        )


def level_aware_modules(model: nn.Module) -> dict[str, LevelAware]:
    """Every level-aware module of ``model`` by qualified name: nested sparse layers, LevelBatchNorm, and the level
    masks of nestsparse.pruning (parametrizations are modules too, so named_modules reaches them)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LevelAware)}


def get_levels(model: nn.Module) -> int:
    """The number of levels the level-aware modules of ``model`` share (ValueError if they disagree or none)."""
    counts = {m.num_levels for m in level_aware_modules(model).values()}
    if len(counts) != 1:
        raise ValueError(
            f"model has level-aware modules with level counts {sorted(counts)}; expected exactly one count"
        )
    return counts.pop()


def set_level(model: nn.Module, level: int) -> nn.Module:
    """Switches every level-aware module of ``model`` (nested sparse layers, level masks, LevelBatchNorm) to
    ``level``. Only an integer changes: no weight is copied."""
    mods = list(level_aware_modules(model).values())
    if not mods:
        raise ValueError("set_level: the model has no level-aware modules (convert it or apply level masks first)")
    checked = [m.checked_level(level) for m in mods]
    for m, lvl in zip(mods, checked):
        m.level = lvl
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose modules are new objects holding the same parameters and buffers: no tensor is
    copied, and its levels are its own. A module's level is plain state that ``set_level`` changes for every
    thread; to serve several levels at once from threads, give each thread its own shared copy (a change to the
    weights, by training or loading, is seen by all of them). A rerouting executor's checkpoint hooks are not
    copied: wrap the copy in an executor of its own."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo)
    for m in twin.modules():  # a rerouting executor's checkpoints act on the original's inference, not the copy's
        for key in [k for k, hook in m._forward_pre_hooks.items() if getattr(hook, "rerouting_checkpoint", False)]:
            del m._forward_pre_hooks[key]
    return twin
