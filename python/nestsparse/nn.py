"""Modules that hold one nested weight buffer and run any of its levels through the sparse kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .formats import DEFAULT_BLOCK_SHAPE, NestedBCR, NestedCSR

__all__ = ["LevelAware", "NestedSparseLinear", "NestedSparseConv2d", "NestedSparseModule", "LevelBatchNorm",
           "level_batchnorms", "set_level", "get_levels"]


class LevelAware:
    """What every module whose behaviour depends on the level shares: ``level`` (0 = densest), ``num_levels``
    and a checked ``set_level``. ``set_level(model, l)`` switches all of them at once."""

    level: int = 0

    @property
    def num_levels(self) -> int:
        raise NotImplementedError

    def set_level(self, level: int) -> None:
        """Selects the level used from now on. Copies nothing."""
        self.level = self._checked_level(level)

    def _checked_level(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"{type(self).__name__}: level {level!r} is out of range for {self.num_levels} levels "
                             "(0 = densest)")
        return level


_INDEX_BUFFERS = {NestedCSR: ("col_idx", "row_ptr", "row_end"),
                  NestedBCR: ("indices", "block_ptr", "blocks", "counts")}


def _nested_from_dense(weight: Tensor, tags: Tensor, fmt: str, num_levels, densities, block_shape) -> NestedCSR | NestedBCR:
    if fmt == "ncsr":
        return NestedCSR.from_dense(weight, tags, num_levels=num_levels, densities=densities)
    if fmt == "nbcr":
        return NestedBCR.from_dense(weight, tags, block_shape=block_shape, num_levels=num_levels, densities=densities)
    raise ValueError(f"format must be 'ncsr' or 'nbcr', got {fmt!r}")


class NestedSparseModule(LevelAware, nn.Module):
    """Common part: the nested weight's arrays (values trainable, indices as buffers), the level in use and
    the cached plan. The weight is nested CSR (``format == "ncsr"``) or nested BCR (``"nbcr"``)."""

    def __init__(self, weight: NestedCSR | NestedBCR, bias: Tensor | None, activation: str):
        super().__init__()
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {ops.ACTIVATIONS}, got {activation!r}")
        if not isinstance(weight, (NestedCSR, NestedBCR)):
            raise TypeError(f"weight must be a NestedCSR or NestedBCR, got {type(weight).__name__}")
        weight.validate()
        self.format = "ncsr" if isinstance(weight, NestedCSR) else "nbcr"
        self.block_shape = tuple(weight.block_shape) if self.format == "nbcr" else None
        self.values = nn.Parameter(weight.values.detach().clone())
        for name in _INDEX_BUFFERS[type(weight)]:
            self.register_buffer(name, getattr(weight, name).clone())
        self.bias = nn.Parameter(bias.detach().to(weight.values.dtype).clone()) if bias is not None else None
        self.weight_shape = tuple(weight.weight_shape)
        self.densities = tuple(weight.densities)
        self.activation = activation
        self.level = 0
        self._plan: Tensor | None = None
        self._plan_key: tuple | None = None

    def _index_tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, n) for n in _INDEX_BUFFERS[NestedCSR if self.format == "ncsr" else NestedBCR])

    @property
    def num_levels(self) -> int:
        return int((self.row_end if self.format == "ncsr" else self.counts).shape[0])

    def nested(self) -> NestedCSR | NestedBCR:
        """The weight as a NestedCSR / NestedBCR sharing this module's tensors."""
        if self.format == "ncsr":
            return NestedCSR(self.values.detach(), *self._index_tensors(), self.weight_shape, self.densities)
        return NestedBCR(self.values.detach(), *self._index_tensors(), self.weight_shape, self.block_shape,
                         self.densities)

    def plan(self) -> Tensor | None:
        """The row (or block-row) partition for the CPU kernels, built once per weight and thread count."""
        if self.values.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        # A buffer replaced, reloaded in place or moved invalidates the plan.
        idx = self._index_tensors()
        key = (tuple(t.data_ptr() for t in idx), tuple(t._version for t in idx), tuple(idx[-1].shape),
               torch.get_num_threads())
        if self._plan is None or self._plan_key != key:
            if self.format == "ncsr":
                self._plan = ops.ncsr_plan(self.row_ptr, self.row_end)
            else:
                self._plan = ops.nbcr_plan(self.block_ptr, self.counts, self.block_shape[0])
            self._plan_key = key
        return self._plan

    def nnz(self, level: int | None = None) -> int:
        return self.nested().nnz(self.level if level is None else level)

    def _extra(self) -> str:
        dens = ", ".join(f"{self.nested().density(lvl):.3f}" for lvl in range(self.num_levels))
        fmt = self.format if self.format == "ncsr" else f"nbcr {self.block_shape[0]}x{self.block_shape[1]}"
        return (f"format={fmt}, levels={self.num_levels} (densities {dens}), level={self.level}, "
                f"activation={self.activation}")


class NestedSparseLinear(NestedSparseModule):
    """y = act(x @ W_level^T + b) with W stored once for all levels."""

    def __init__(self, weight: NestedCSR | NestedBCR, bias: Tensor | None = None, activation: str = "none"):
        if len(weight.weight_shape) != 2:
            raise ValueError(f"NestedSparseLinear needs a 2-D weight, got shape {weight.weight_shape}")
        super().__init__(weight, bias, activation)
        self.out_features, self.in_features = weight.weight_shape

    @classmethod
    def from_dense(cls, linear: nn.Linear, tags: Tensor, activation: str = "none", densities: tuple[float, ...] = (),
                   num_levels: int | None = None, format: str = "ncsr",
                   block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE) -> "NestedSparseLinear":
        """``format`` "ncsr" stores any nested tags; "nbcr" needs block row/column structured tags
        (nestsparse.bcr_tags) of ``block_shape``."""
        w = _nested_from_dense(linear.weight.detach(), tags, format, num_levels, densities, block_shape)
        return cls(w, linear.bias, activation)

    def forward(self, x: Tensor, level: int | None = None) -> Tensor:
        lvl = self.level if level is None else self._checked_level(level)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"NestedSparseLinear: expected input of shape (..., {self.in_features}), got {tuple(x.shape)}")
        if self.format == "ncsr":
            return ops.ncsr_linear(x.contiguous(), self.values, *self._index_tensors(), lvl, self.bias,
                                   self.activation, self.plan())
        return ops.nbcr_linear(x.contiguous(), self.values, *self._index_tensors(), lvl, self.out_features,
                               self.block_shape, self.bias, self.activation, self.plan())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._extra()}"


class NestedSparseConv2d(NestedSparseModule):
    """NCHW convolution with the weight (Cout, Cin/groups, kh, kw) stored once for all levels."""

    def __init__(self, weight: NestedCSR | NestedBCR, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, activation: str = "none"):
        if len(weight.weight_shape) != 4:
            raise ValueError(f"NestedSparseConv2d needs a 4-D weight, got shape {weight.weight_shape}")
        super().__init__(weight, bias, activation)
        self.out_channels = weight.weight_shape[0]
        self.in_channels = weight.weight_shape[1] * groups
        self.kernel_size = tuple(weight.weight_shape[2:])
        self.stride, self.padding, self.dilation = ops._pair(stride), ops._pair(padding), ops._pair(dilation)
        self.groups = groups

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, tags: Tensor, activation: str = "none", densities: tuple[float, ...] = (),
                   num_levels: int | None = None, format: str = "ncsr",
                   block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE) -> "NestedSparseConv2d":
        if conv.padding_mode != "zeros":
            raise ValueError(f"NestedSparseConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        padding = conv.padding
        if isinstance(padding, str):
            if padding != "valid":
                raise ValueError("NestedSparseConv2d: padding='same' is not supported; give explicit padding")
            padding = 0
        w = _nested_from_dense(conv.weight.detach(), tags, format, num_levels, densities, block_shape)
        return cls(w, conv.bias, conv.stride, padding, conv.dilation, conv.groups, activation)

    def forward(self, x: Tensor, level: int | None = None) -> Tensor:
        lvl = self.level if level is None else self._checked_level(level)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"NestedSparseConv2d: expected NCHW input with {self.in_channels} channels, "
                             f"got shape {tuple(x.shape)}")
        if self.format == "ncsr":
            return ops.ncsr_conv2d(x.contiguous(), self.values, *self._index_tensors(), lvl, self.kernel_size,
                                   self.bias, self.stride, self.padding, self.dilation, self.groups, self.activation,
                                   self.plan())
        return ops.nbcr_conv2d(x.contiguous(), self.values, *self._index_tensors(), lvl, self.out_channels,
                               self.block_shape, self.kernel_size, self.bias, self.stride, self.padding,
                               self.dilation, self.groups, self.activation, self.plan())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, {self._extra()}")


class LevelBatchNorm(LevelAware, nn.Module):
    """BatchNorm with running statistics per level (and, if ``per_level_affine``, a scale and shift per
    level), switched with the level. Levels share the convolution's weights but not its output statistics:
    a sparser level's activations are smaller, so one set of running statistics would fit none of them.

    Normalises over dim 1 like nn.BatchNorm1d/2d/3d, for inputs of 2 to 5 dims. Cost: (L-1) x 2C more
    buffer floats (plus (L-1) x 2C parameters with per-level affine) and no extra time: the forward is
    F.batch_norm on the level's rows."""

    def __init__(self, num_features: int, num_levels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, per_level_affine: bool = False):
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
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, num_levels: int,
                       per_level_affine: bool = False) -> "LevelBatchNorm":
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
        weight, bias = self.weight, self.bias
        if self.per_level_affine:
            weight, bias = weight[lvl], bias[lvl]
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked[lvl] += 1
            if momentum is None:  # cumulative average, as nn.BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked[lvl])
        # Rows of the (L, C) buffers are contiguous views, so F.batch_norm updates the level's statistics in place.
        return F.batch_norm(x, self.running_mean[lvl], self.running_var[lvl], weight, bias, self.training,
                            momentum or 0.0, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, levels={self.num_levels}, level={self.level}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, per_level_affine={self.per_level_affine}")


def level_batchnorms(model: nn.Module, num_levels: int, per_level_affine: bool = False) -> nn.Module:
    """Replaces (in place) every nn.BatchNorm1d/2d/3d of ``model`` by a LevelBatchNorm initialised from it."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LevelBatchNorm.from_batchnorm(m, num_levels, per_level_affine))
    return model


def _level_aware(model: nn.Module) -> list[LevelAware]:
    # Parametrizations (nestsparse.pruning's level masks) are modules too, so model.modules() reaches them.
    return [m for m in model.modules() if isinstance(m, LevelAware)]


def get_levels(model: nn.Module) -> int:
    """The number of levels the level-aware modules of ``model`` share (ValueError if they disagree or none)."""
    counts = {m.num_levels for m in _level_aware(model)}
    if len(counts) != 1:
        raise ValueError(f"model has level-aware modules with level counts {sorted(counts)}; expected exactly one count")
    return counts.pop()


def set_level(model: nn.Module, level: int) -> nn.Module:
    """Switches every level-aware module of ``model`` (nested sparse layers, level masks, LevelBatchNorm) to
    ``level``. Only an integer changes: no weight is copied."""
    mods = _level_aware(model)
    if not mods:
        raise ValueError("set_level: the model has no level-aware modules (convert it or apply level masks first)")
    for m in mods:
        m._checked_level(level)
    for m in mods:
        m.level = level
    return model
