"""Modules that hold one nested weight buffer and run any of its levels through the sparse kernels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from .formats import DEFAULT_BLOCK_SHAPE, NestedBCR, NestedCSR

__all__ = ["NestedSparseLinear", "NestedSparseConv2d", "NestedSparseModule", "set_level", "get_levels"]


_INDEX_BUFFERS = {NestedCSR: ("col_idx", "row_ptr", "row_end"),
                  NestedBCR: ("indices", "block_ptr", "blocks", "counts")}


def _nested_from_dense(weight: Tensor, tags: Tensor, fmt: str, num_levels, densities, block_shape) -> NestedCSR | NestedBCR:
    if fmt == "ncsr":
        return NestedCSR.from_dense(weight, tags, num_levels=num_levels, densities=densities)
    if fmt == "nbcr":
        return NestedBCR.from_dense(weight, tags, block_shape=block_shape, num_levels=num_levels, densities=densities)
    raise ValueError(f"format must be 'ncsr' or 'nbcr', got {fmt!r}")


class NestedSparseModule(nn.Module):
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

    def set_level(self, level: int) -> None:
        """Selects the level used when forward() is given none. Copies nothing."""
        self.level = self._checked_level(level)

    def _checked_level(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"{type(self).__name__}: level {level!r} is out of range for {self.num_levels} levels "
                             "(0 = densest)")
        return level

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


def get_levels(model: nn.Module) -> int:
    """The number of levels the nested modules of ``model`` share (ValueError if they disagree or none)."""
    counts = {m.num_levels for m in model.modules() if isinstance(m, NestedSparseModule)}
    if len(counts) != 1:
        raise ValueError(f"model has nested modules with level counts {sorted(counts)}; expected exactly one count")
    return counts.pop()


def set_level(model: nn.Module, level: int) -> nn.Module:
    """Switches every nested module of ``model`` to ``level``. Only an integer changes: no weight is copied."""
    mods = [m for m in model.modules() if isinstance(m, NestedSparseModule)]
    if not mods:
        raise ValueError("set_level: the model has no nested sparse modules (convert it first)")
    for m in mods:
        m._checked_level(level)
    for m in mods:
        m.level = level
    return model
