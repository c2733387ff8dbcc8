"""Level masks on an ordinary dense model, for training.

``apply_level_masks`` registers a parametrization on each pruned layer's weight, so ``layer.weight`` is
``weight * (tags >= level)`` (torch.nn.utils.parametrize): the model stays a plain nn.Module that trains,
wraps in DistributedDataParallel and switches level with ``nestsparse.set_level``. The tags live in the
parametrization and are what every training method updates; ``unmask`` hands back the model without masks
(its per-level BatchNorm stays) plus the tags, ready for ``nestsparse.convert``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..nn import LevelAware, set_level

__all__ = ["LevelMask", "apply_level_masks", "level_masks", "masked_tags", "raw_weights", "unmask"]


class LevelMask(LevelAware, nn.Module):
    """Parametrization ``w -> where(frozen, frozen_values, w) * (tags >= level)``.

    ``tags``: int8, the weight's shape (see nestsparse.pruning.tags). ``frozen`` elements keep the values
    they had when frozen, whatever the optimizer (momentum, weight decay) does to the raw weight: that is
    how progressive training keeps a finished level's positions and values. With ``capture_grad`` on, the
    gradient of the masked weight (dense: it is non-zero at pruned positions too) is summed, signed, in
    ``grad_sum`` (over the levels of a step it adds up to the gradient of their summed loss, and under
    DistributedDataParallel an all-reduce makes it the global one); grow-and-prune regrows by its size."""

    def __init__(self, tags: Tensor, num_levels: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if tags.dtype != torch.int8:
            raise TypeError(f"LevelMask: tags must be int8, got {tags.dtype}")
        if tags.numel() and int(tags.max()) >= num_levels:
            raise ValueError(f"LevelMask: a tag is {int(tags.max())} but there are only {num_levels} levels")
        if tags.numel() and int(tags.min()) < -1:
            raise ValueError(f"LevelMask: a tag is {int(tags.min())}; tags are -1 (pruned) or a level")
        self.register_buffer("tags", tags.clone())
        self.register_buffer("frozen", torch.zeros(tags.shape, dtype=torch.bool, device=tags.device))
        # Kept in the weight's dtype, so a frozen value is the exact value it had.
        self.register_buffer("frozen_values", torch.zeros(tags.shape, dtype=dtype, device=tags.device))
        self.register_buffer("grad_sum", torch.zeros(0, dtype=dtype, device=tags.device))
        self._num_levels = num_levels
        self.level = 0

    @property
    def num_levels(self) -> int:
        return self._num_levels

    @property
    def capture_grad(self) -> bool:
        return self.grad_sum.numel() > 0

    @capture_grad.setter
    def capture_grad(self, on: bool) -> None:
        self.grad_sum = self.frozen_values.new_zeros(self.tags.shape if on else (0,))

    def freeze(self, where: Tensor, values: Tensor) -> None:
        """Fixes the elements ``where`` at ``values``."""
        self.frozen |= where
        self.frozen_values = torch.where(where, values.detach().to(self.frozen_values.dtype), self.frozen_values)

    def forward(self, w: Tensor) -> Tensor:
        if self.frozen.any():
            w = torch.where(self.frozen, self.frozen_values.to(w.dtype), w)
        out = w * (self.tags >= self.level).to(w.dtype)
        if self.capture_grad and out.requires_grad:
            out.register_hook(self._add_grad)
        return out

    def _add_grad(self, g: Tensor) -> None:
        self.grad_sum += g.detach().to(self.grad_sum.dtype)


def apply_level_masks(model: nn.Module, tags: Mapping[str, Tensor], num_levels: int) -> nn.Module:
    """Masks each layer named in ``tags`` (in place): its ``weight`` becomes the weight at the model's level.
    Layers that already have a mask get the new tags."""
    modules = dict(model.named_modules())
    for name, t in tags.items():
        m = modules.get(name)
        if m is None:
            raise KeyError(f"apply_level_masks: no module named {name!r} in the model")
        if not isinstance(getattr(m, "weight", None), Tensor):
            raise TypeError(f"apply_level_masks: {name!r} ({type(m).__name__}) has no weight tensor")
        if tuple(t.shape) != tuple(m.weight.shape):
            raise ValueError(
                f"apply_level_masks: tags for {name!r} have shape {tuple(t.shape)}, weight has {tuple(m.weight.shape)}"
            )
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"apply_level_masks: tags for {name!r} must be an integer tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= num_levels):
            raise ValueError(
                f"apply_level_masks: tags for {name!r} span [{int(t.min())}, {int(t.max())}]; with "
                f"{num_levels} levels they must lie in [-1, {num_levels - 1}]"
            )
        t = t.to(device=m.weight.device, dtype=torch.int8)
        mask = _mask_of(m)
        if mask is not None:
            if mask.num_levels != num_levels:
                raise ValueError(f"apply_level_masks: {name!r} has {mask.num_levels} levels, asked for {num_levels}")
            mask.tags.copy_(t)
        else:
            parametrize.register_parametrization(m, "weight", LevelMask(t, num_levels, m.weight.dtype))
    return model


def _mask_of(m: nn.Module) -> LevelMask | None:
    if parametrize.is_parametrized(m, "weight"):
        for p in m.parametrizations.weight:
            if isinstance(p, LevelMask):
                return p
    return None


def level_masks(model: nn.Module) -> dict[str, LevelMask]:
    """The LevelMask of every masked layer, by module name."""
    return {name: mask for name, m in model.named_modules() if (mask := _mask_of(m)) is not None}


def masked_tags(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every masked layer's tags, by module name."""
    return {name: mask.tags.clone() for name, mask in level_masks(model).items()}


def raw_weights(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """The trainable tensor behind each masked layer's weight (the parametrization's ``original``)."""
    mods = dict(model.named_modules())
    names = level_masks(model).keys() if names is None else names
    return {n: mods[n].parametrizations.weight.original for n in names}


@torch.no_grad()
def unmask(model: nn.Module) -> tuple[nn.Module, dict[str, Tensor]]:
    """Removes the masks (in place): each weight becomes its level-0 value (frozen values included, pruned
    positions zero). Returns the model and the tags, ready for ``nestsparse.convert(model, tags)``."""
    masks = level_masks(model)
    if not masks:
        raise ValueError("unmask: the model has no level masks")
    set_level(model, 0)
    tags = {name: mask.tags.clone() for name, mask in masks.items()}
    mods = dict(model.named_modules())
    for name in masks:
        m = mods[name]
        # Removal deletes the weight property from the module's generated class, which a deep copy of the
        # masked model shares with the original: give this module a class of its own first.
        cls = type(m)
        m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model, tags
