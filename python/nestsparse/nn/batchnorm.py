"""BatchNorm with running statistics (and optionally scale and shift) per level."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .levels import LevelAware, refuse_baked_level
from .tree import parent_module

__all__ = ["LevelBatchNorm", "level_batchnorms"]


class LevelBatchNorm(LevelAware, nn.Module):
    """BatchNorm with running statistics per level (and, if ``per_level_affine``, a scale and shift per
    level), switched with the level. Levels share the convolution's weights but not its output statistics:
    a sparser level's activations are smaller, so one set of running statistics would fit none of them.

    Normalises over dim 1 like nn.BatchNorm1d/2d/3d, for inputs of 2 to 5 dims. Cost: (L-1) x 2C more
    buffer floats (plus (L-1) x 2C parameters with per-level affine) and no extra time: the forward is
    F.batch_norm on the level's rows."""

    def __init__(
        self,
        num_features: int,
        num_levels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        per_level_affine: bool = False,
    ):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"LevelBatchNorm: num_levels must be >= 1, got {num_levels}")
        if per_level_affine and not affine:
            raise ValueError("LevelBatchNorm: per_level_affine needs affine=True")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.per_level_affine = affine, per_level_affine
        shape = (num_levels, num_features) if per_level_affine else (num_features,)
        self.weight = nn.Parameter(torch.ones(shape)) if affine else None
        self.bias = nn.Parameter(torch.zeros(shape)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_levels, num_features))
        self.register_buffer("running_var", torch.ones(num_levels, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_levels, dtype=torch.long))
        self.level = 0

    @property
    def num_levels(self) -> int:
        return int(self.running_mean.shape[0])

    @classmethod
    def from_batchnorm(
        cls, bn: nn.modules.batchnorm._BatchNorm, num_levels: int, per_level_affine: bool = False
    ) -> LevelBatchNorm:
        """Every level starts from ``bn``'s statistics and affine parameters."""
        if not bn.track_running_stats:
            raise ValueError("LevelBatchNorm.from_batchnorm: the BatchNorm must track running statistics")
        new = cls(bn.num_features, num_levels, bn.eps, bn.momentum, bn.affine, per_level_affine)
        new = new.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            new.running_mean.copy_(bn.running_mean.expand_as(new.running_mean))
            new.running_var.copy_(bn.running_var.expand_as(new.running_var))
            new.num_batches_tracked.fill_(int(bn.num_batches_tracked))
            if bn.affine:
                new.weight.copy_(bn.weight.expand_as(new.weight))
                new.bias.copy_(bn.bias.expand_as(new.bias))
        return new.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        if not 2 <= x.dim() <= 5 or x.shape[1] != self.num_features:
            raise ValueError(f"LevelBatchNorm: expected input (N, {self.num_features}, ...), got {tuple(x.shape)}")
        lvl = self.level
        refuse_baked_level(self, lvl)
        weight, bias = self.weight, self.bias
        if self.per_level_affine:
            weight, bias = weight[lvl], bias[lvl]
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked[lvl] += 1
            if momentum is None:  # cumulative average, as nn.BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked[lvl])
        # Rows of the (L, C) buffers are contiguous views, so F.batch_norm updates the level's statistics in place.
        return F.batch_norm(
            x, self.running_mean[lvl], self.running_var[lvl], weight, bias, self.training, momentum or 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, levels={self.num_levels}, level={self.level}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, per_level_affine={self.per_level_affine}"
        )


def level_batchnorms(model: nn.Module, num_levels: int, per_level_affine: bool = False) -> nn.Module:
    """Replaces (in place) every nn.BatchNorm1d/2d/3d of ``model`` by a LevelBatchNorm initialised from it."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            parent, child = parent_module(model, name)
            setattr(parent, child, LevelBatchNorm.from_batchnorm(m, num_levels, per_level_affine))
    return model
