"""Level specifications and nested tags.

A tag per weight element says the sparsest level that still keeps it (-1: pruned at every level), so
masks of all levels are nested by construction: ``mask(l) = tags >= l``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LevelSpec", "magnitude_tags", "global_magnitude_tags", "model_tags", "masks_from_tags",
           "tags_from_masks", "prunable_layers"]


@dataclass(frozen=True)
class LevelSpec:
    """Target densities of the levels, densest first: strictly decreasing, each in (0, 1]."""

    densities: tuple[float, ...]

    def __post_init__(self):
        d = tuple(float(x) for x in self.densities)
        if not d:
            raise ValueError("LevelSpec: at least one level density is needed")
        for i, x in enumerate(d):
            if not 0.0 < x <= 1.0:
                raise ValueError(f"LevelSpec: density of level {i} is {x}; densities must lie in (0, 1]")
        for i in range(1, len(d)):
            if not d[i] < d[i - 1]:
                raise ValueError(f"LevelSpec: densities must be strictly decreasing (level 0 densest), "
                                 f"but level {i} has {d[i]} >= level {i - 1}'s {d[i - 1]}")
        object.__setattr__(self, "densities", d)

    @property
    def num_levels(self) -> int:
        return len(self.densities)


def _spec(densities) -> LevelSpec:
    return densities if isinstance(densities, LevelSpec) else LevelSpec(tuple(densities))


def _tags_from_scores(scores: Tensor, spec: LevelSpec) -> Tensor:
    """Tags from importance scores: level l keeps the round(d_l * n) highest scores (ties by position)."""
    flat = scores.detach().flatten()
    n = flat.numel()
    order = torch.argsort(flat, descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.int64, device=flat.device)
    rank[order] = torch.arange(n, device=flat.device)
    tags = torch.full((n,), -1, dtype=torch.int8, device=flat.device)
    for d in spec.densities:
        tags += (rank < round(d * n)).to(torch.int8)
    return tags.reshape(scores.shape)


def magnitude_tags(weight: Tensor, densities: LevelSpec | Sequence[float]) -> Tensor:
    """One-shot nested magnitude tags of one layer: level l keeps the largest |w|, density d_l."""
    return _tags_from_scores(weight.abs(), _spec(densities))


def global_magnitude_tags(weights: Mapping[str, Tensor], densities: LevelSpec | Sequence[float]) -> dict[str, Tensor]:
    """Nested magnitude tags with one budget across all layers: each level keeps d_l of all weights
    together, so layers with many small weights give up more of them."""
    spec = _spec(densities)
    if not weights:
        return {}
    names = list(weights)
    flat = torch.cat([weights[k].detach().abs().flatten().float().cpu() for k in names])
    tags = _tags_from_scores(flat, spec)
    out, start = {}, 0
    for k in names:
        n = weights[k].numel()
        out[k] = tags[start:start + n].reshape(weights[k].shape).to(weights[k].device)
        start += n
    return out


def prunable_layers(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The nn.Linear and nn.Conv2d modules of ``model`` by qualified name, without those in ``skip``."""
    skip = set(skip)
    # nn.MultiheadAttention reads its out_proj.weight directly, so its projection must stay an nn.Linear.
    inside_mha = {f"{name}.{child}" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for child, _ in m.named_modules() if child}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name not in skip and name not in inside_mha}


def model_tags(model: nn.Module, densities: LevelSpec | Sequence[float], scope: str = "layer",
               skip: Iterable[str] = ()) -> dict[str, Tensor]:
    """Nested magnitude tags for every Linear/Conv2d of ``model`` (minus ``skip``), per layer or with one
    global budget (``scope="global"``). Keys are module names, ready for ``nestsparse.convert``."""
    layers = prunable_layers(model, skip)
    weights = {name: m.weight for name, m in layers.items()}
    if scope == "layer":
        return {name: magnitude_tags(w, densities) for name, w in weights.items()}
    if scope == "global":
        return global_magnitude_tags(weights, densities)
    raise ValueError(f"model_tags: scope must be 'layer' or 'global', got {scope!r}")


def masks_from_tags(tags: Tensor, level: int) -> Tensor:
    """Boolean mask of level ``level``."""
    if level < 0:
        raise ValueError(f"masks_from_tags: level must be >= 0, got {level}")
    return tags >= level


def tags_from_masks(masks: Sequence[Tensor]) -> Tensor:
    """Tags from per-level masks (densest first); refuses masks that are not nested."""
    if not masks:
        raise ValueError("tags_from_masks: no masks given")
    tags = torch.full(masks[0].shape, -1, dtype=torch.int8, device=masks[0].device)
    for lvl, m in enumerate(masks):
        m = m.to(torch.bool)
        if lvl and (m & ~masks[lvl - 1].to(torch.bool)).any():
            raise ValueError(f"tags_from_masks: level {lvl} keeps weights that level {lvl - 1} prunes; "
                             "levels must be nested")
        tags[m] = lvl
    return tags
