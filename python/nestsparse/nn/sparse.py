"""Modules that hold one nested weight buffer and run any of its levels through the sparse kernels."""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..activations import ACTIVATIONS
from ..formats import DEFAULT_BLOCK_SHAPE, FORMATS, NestedFormat
from ..formats import from_dense as pack
from .batchnorm import LevelBatchNorm
from .levels import LevelAware, refuse_baked_level
from .tree import is_transposed_linear

__all__ = [
    "NestedSparseModule",
    "NestedSparseLinear",
    "NestedSparseConv2d",
    "NestedSparseConv1d",
    "keep_index_buffers_local",
    "CONVERTIBLE",
]

# The torch layers a nested module stands in for (besides transformers' Conv1D, see tree.is_transposed_linear).
CONVERTIBLE = (nn.Linear, nn.Conv2d, nn.Conv1d)


_DENSE_LOCK = threading.Lock()
_SAME_BYTES = torch.ops.nestsparse.same_bytes.default  # ops.same_bytes without the wrapper's call
_ANY = object()


@dataclasses.dataclass(frozen=True, eq=False)
class _DenseCopies:
    """The dense weights of the levels a layer runs as a dense product (level -> (weight, bias)) and a snapshot of
    the tensors they were made from. Never changed once made: shallow and deep copies of a module share it, which
    is safe because each module checks its own tensors against ``source`` before serving a copy."""

    levels: tuple[int, ...]
    weights: dict[int, tuple[Tensor, Tensor]]
    source: tuple[Tensor | None, ...]

    def __deepcopy__(self, memo):
        return self


_PACKED_HERE = "_packed_for_a_module"


def _packed_here(weight: NestedFormat) -> NestedFormat:
    """Marks a weight a module's from_dense has just packed: the module takes its tensors unchecked and uncopied."""
    weight.__dict__[_PACKED_HERE] = True
    return weight


@functools.cache
def _has_plan(fmt: str, device_type: str) -> bool:
    """Whether <fmt>_plan has a kernel for the device type."""
    if device_type not in ("cpu", "cuda"):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"nestsparse::{fmt}_plan", device_type.upper())


class NestedSparseModule(LevelAware, nn.Module):
    """Common part: the nested weight's arrays (values trainable, index tensors as buffers), the level in use and
    the cached plan. The weight is in any format of nestsparse.formats (``format``: its name, "ncsr" or "nbcr");
    the format's options (NestedBCR's ``block_shape``) become attributes of the module."""

    def __init__(self, weight: NestedFormat, bias: Tensor | None, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if not isinstance(weight, NestedFormat):
            raise TypeError(
                f"weight must be a nested format ({', '.join(c.__name__ for c in FORMATS.values())}), "
                f"got {type(weight).__name__}"
            )
        # A weight from_dense packed for this module is valid by construction (tests/test_formats.py validates every
        # packer's output) and referenced nowhere else: its tensors are taken as they are. Checking and copying a
        # 16384 x 16384 layer's doubled the time and memory of converting it. Any other weight is checked and copied.
        owned = weight.__dict__.pop(_PACKED_HERE, False)
        if not owned:
            weight.validate()
        self.format = weight.name
        self._format = type(weight)
        self.values = nn.Parameter(weight.values.detach() if owned else weight.values.detach().clone())
        for name, t in zip(weight.index_names, weight.index_tensors()):
            self.register_buffer(name, t if owned else t.clone())
        self.bias = nn.Parameter(bias.detach().to(weight.values.dtype).clone()) if bias is not None else None
        self.weight_shape = tuple(weight.weight_shape)
        self.densities = tuple(weight.densities)
        self.options = weight.options()
        self._op_args = weight.op_args()
        # The same, as the registered op takes them (int lists): the modules call it directly, without the wrapper.
        self._raw_op_args = tuple(list(a) if isinstance(a, tuple) else a for a in self._op_args)
        self.activation = activation
        self.level = 0
        self._plan: Tensor | None = None
        self._plan_key: tuple | None = None
        # The inference epilogue (nestsparse.fuse): a folded BatchNorm as a per-level (L, M) scale and shift; the
        # level's rows go to the op as its scale and bias, so a level switch still copies nothing.
        self.register_buffer("epilogue_scale", None)
        self.register_buffer("epilogue_shift", None)
        # Levels run as a dense product (set_dense_levels): one immutable _DenseCopies, replaced whole, never edited,
        # so a reader on another thread sees the old set or the new one. Not saved (rebuilt from the nested weight).
        self._dense: _DenseCopies | None = None

    def __setstate__(self, state: dict) -> None:
        # A module pickled before the dense copies were one checked set: its copies (buffers dense_weight_<l>,
        # keyed on versions no write has to bump) are dropped; set_dense_levels makes checked ones.
        state.pop("_dense_levels", None), state.pop("_dense_key", None)
        buffers = state.get("_buffers", {})
        for name in [n for n in buffers if n.startswith(("dense_weight_", "dense_bias_"))]:
            del buffers[name]
        state.setdefault("_dense", None)
        super().__setstate__(state)

    @property
    def block_shape(self) -> tuple[int, int] | None:
        """The block shape of a nested BCR weight (None for a format without blocks)."""
        return self.options.get("block_shape")

    def index_tensors(self) -> tuple[Tensor, ...]:
        """The format's index buffers, in the order its ops take them."""
        buffers = self._buffers  # not getattr: nn.Module's attribute lookup cost 3.6 us for three buffers
        return tuple(buffers[n] for n in self._format.index_names)

    @property
    def num_levels(self) -> int:
        return int(getattr(self, self._format.level_table).shape[0])

    def nested(self) -> NestedFormat:
        """The weight as its format's object, sharing this module's tensors."""
        return self._format.from_parts(
            self.values.detach(),
            dict(zip(self._format.index_names, self.index_tensors())),
            self.weight_shape,
            self.densities,
            **self.options,
        )

    def plan(self, index: tuple[Tensor, ...] | None = None) -> Tensor | None:
        """The format's per-weight plan for the device the weight is on (CPU: the row or block-row partition of
        equal work; CUDA: the rows ordered by length per level), built once per weight (and CPU thread count).
        ``index``: the index tensors, when the caller has them already (forward)."""
        device = self.values.device
        if torch.compiler.is_compiling() or not _has_plan(self._format.name, device.type):
            return None
        # A buffer replaced, reloaded in place or moved invalidates the plan. Inference tensors (a module copied
        # under torch.inference_mode) keep no version counter: for them only a replaced buffer does. Memory safety
        # never rests on this cache: the op checks the plan and the kernels bound every index they read.
        key = self._plan_key_of(self.index_tensors() if index is None else index)
        if self._plan is None or self._plan_key != key:
            self._plan = self.nested().plan()
            self._plan_key = key
        return self._plan

    @staticmethod
    def _plan_key_of(idx: tuple[Tensor, ...]) -> tuple:
        device = idx[0].device
        return (
            device,
            *(t.data_ptr() for t in idx),
            *(-1 if t.is_inference() else t._version for t in idx),
            idx[-1].shape,
            torch.get_num_threads() if device.type == "cpu" else 0,
        )

    def _apply(self, fn, recurse=True):
        # A CUDA plan depends on the weight only, so .to() another CUDA device moves it with the buffers; a CPU
        # plan (a partition per thread count) and a move between CPU and CUDA rebuild it on the next call.
        plan = (
            self._plan if self._plan is not None and self._plan_key == self._plan_key_of(self.index_tensors()) else None
        )
        dense = self.dense_levels
        out = super()._apply(fn, recurse)
        self._plan = self._plan_key = None
        if dense:  # rebuilt from the converted (moved, cast) weight; dropped off the CPU (set_dense_levels)
            self._swap_dense(None)
            if self.values.device.type == "cpu":
                self.set_dense_levels(dense)
            else:
                warnings.warn(
                    f"{type(self).__name__}: dense levels {dense} dropped: they are served on the CPU only",
                    stacklevel=3,
                )
        if plan is not None and plan.device.type == "cuda":
            moved = fn(plan)
            if isinstance(moved, Tensor) and moved.device.type == "cuda" and moved.device == self.values.device:
                self._plan, self._plan_key = moved, self._plan_key_of(self.index_tensors())
        return out

    def fold_batchnorm(self, bn: nn.Module) -> None:
        """Folds ``bn``, an eval-mode nn.BatchNorm1d/2d or LevelBatchNorm applied to this layer's output, into the
        epilogue: per level, y = scale[level] * (W_level x) + shift[level], which is bn(this layer(x)). The
        layer's bias (and any BatchNorm folded before) is folded in too; ``bias`` becomes None. For inference:
        the folded statistics no longer update, and the scale takes no gradient."""
        name = type(self).__name__
        if self.activation != "none":
            raise ValueError(f"{name}.fold_batchnorm: the layer applies {self.activation!r} before the BatchNorm")
        if bn.training:
            raise ValueError(f"{name}.fold_batchnorm: the BatchNorm is in training mode; call .eval() first")
        L, M = self.num_levels, self.weight_shape[0]
        if isinstance(bn, LevelBatchNorm):
            if bn.num_levels != L:
                raise ValueError(f"{name}.fold_batchnorm: the LevelBatchNorm has {bn.num_levels} levels, layer {L}")
            mean, var = bn.running_mean, bn.running_var
        elif isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
            mean, var = bn.running_mean.expand(L, -1), bn.running_var.expand(L, -1)
        else:
            raise TypeError(f"{name}.fold_batchnorm: expected a BatchNorm with running statistics, got {bn!r}")
        if bn.num_features != M:
            raise ValueError(f"{name}.fold_batchnorm: the BatchNorm has {bn.num_features} features, layer {M} outputs")
        with torch.no_grad():
            f64 = dict(dtype=torch.float64, device=self.values.device)
            gamma = torch.ones(L, M, **f64) if bn.weight is None else bn.weight.to(**f64).expand(L, M)
            beta = torch.zeros(L, M, **f64) if bn.bias is None else bn.bias.to(**f64).expand(L, M)
            s = gamma / torch.sqrt(var.to(**f64) + bn.eps)
            if self.epilogue_scale is not None:
                s0, t0 = self.epilogue_scale.to(**f64), self.epilogue_shift.to(**f64)
            else:
                s0 = torch.ones(L, M, **f64)
                t0 = (torch.zeros(M, **f64) if self.bias is None else self.bias.to(**f64)).expand(L, M)
            scale, shift = s * s0, s * (t0 - mean.to(**f64)) + beta
        self.epilogue_scale = scale.to(self.values.dtype).contiguous()
        self.epilogue_shift = shift.to(self.values.dtype).contiguous()
        self.bias = None
        if self.dense_levels:  # rebuilt with the new epilogue folded in
            self.set_dense_levels(self.dense_levels)

    def set_dense_levels(self, levels) -> None:
        """Runs ``levels`` as a dense product (torch's F.linear / F.conv2d on the level's dense weight) instead of
        the sparse kernel: for a level that is too dense, or a layer too small, for sparsity to pay
        (nestsparse.choose_dense_levels measures which). Costs one dense weight per level plus a snapshot of the
        nested weight; a level switch still copies nothing. ``()`` removes them.

        A dense weight is a copy, so it is served only while the tensors it was made from (values, index buffers,
        bias, folded epilogue) still hold the snapshot's bytes, compared on every call (ops/same_bytes.h: about one
        dense matrix-vector product of time). Any write is seen, whatever made it: an optimizer step (fused ones
        included), a ``.data`` or numpy write, a load, a weight converted under inference mode. After a change the
        dense copies are dropped and the sparse kernel runs. They are also passed over when gradients are wanted
        and inside torch.compile and torch.export (the graph could not check them): the sparse kernel runs there.
        CPU weights only (the check would synchronise a GPU on every call)."""
        levels = sorted({self.checked_level(lvl) for lvl in levels})
        if not levels:
            self._swap_dense(None)
            return
        if self.values.device.type != "cpu":
            raise ValueError(
                f"{type(self).__name__}.set_dense_levels: the weight is on {self.values.device}; dense levels are "
                "served on the CPU only (checking that the weight has not changed would synchronise the device on "
                "every call)"
            )
        w = self.nested()
        with torch.no_grad():
            source = tuple(
                None if t is None else t.detach().clone(memory_format=torch.contiguous_format)
                for t in self._dense_sources()
            )
            weights = {}
            for lvl in levels:
                dense = w.to_dense(lvl).to(self.values.dtype)
                bias, scale = self._epilogue(lvl)
                if scale is not None:
                    dense = dense * scale.view(-1, *([1] * (dense.dim() - 1)))
                bias = torch.zeros(dense.shape[0], dtype=dense.dtype) if bias is None else bias.detach().clone()
                weights[lvl] = (dense.contiguous(), bias)
        self._swap_dense(_DenseCopies(tuple(levels), weights, source))

    @property
    def dense_levels(self) -> tuple[int, ...]:
        """The levels that run as a dense product (set_dense_levels)."""
        dense = self._dense
        return () if dense is None else dense.levels

    def _dense_sources(self) -> tuple[Tensor | None, ...]:
        """What the dense copies are made from: values, index buffers and epilogue. (The dicts, not getattr: nn.Module's
        attribute lookup made this 3.4 us of the 7.6 us a check took on a small layer.)"""
        p, b = self._parameters, self._buffers
        bias = p["bias"] if "bias" in p else self.__dict__.get("bias")  # a parameter, or None (never registered)
        return (p["values"], *[b[n] for n in self._format.index_names], bias, b["epilogue_scale"], b["epilogue_shift"])

    def _swap_dense(self, new: _DenseCopies | None, only_if=_ANY) -> None:
        """Replaces the dense copies by ``new`` (if they are still ``only_if``, when given): one attribute write under
        a lock, so two readers dropping stale copies at once, or a reader and set_dense_levels, never interleave."""
        with _DENSE_LOCK:
            if only_if is _ANY or self._dense is only_if:
                self._dense = new

    def _dense_weight(self, level: int) -> tuple[Tensor, Tensor] | None:
        """(weight, bias) of ``level`` if it runs dense now, else None. Copies whose sources changed are dropped."""
        dense = self._dense
        if dense is None or isinstance(level, torch.SymInt) or level not in dense.weights:
            return None
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and self._parameters["values"].requires_grad):
            return None
        if not _SAME_BYTES(self._dense_sources(), dense.source):
            self._swap_dense(None, dense)  # trained, written or reloaded since: the copies are stale
            return None
        return dense.weights[level]

    def _dense_product(self, product, x: Tensor, weight: Tensor, bias: Tensor, *args) -> Tensor:
        """``product`` (F.linear / F.conv2d) of a dense level, in the dtype the sparse kernel computes in: under
        autocast the same dtype as the other levels (ops.autocast_dtype), so the output's dtype does not depend on the
        level."""
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return product(x, weight, bias, *args)
        dtype = ops.autocast_dtype(weight.dtype, (x,), device_type)
        with torch.autocast(device_type, enabled=False):
            return product(x.to(dtype), weight.to(dtype), bias.to(dtype), *args)

    def _dense_finish(self, z: Tensor, residual) -> Tensor:
        """The rest of the epilogue after a dense product that added the bias: the residual, the activation."""
        if residual is not None:
            z = z + residual
        act = ACTIVATIONS[self.activation]
        return z if act is None else act.function(z)

    def _epilogue(self, level: int) -> tuple[Tensor | None, Tensor | None]:
        """(bias, scale) the op takes at ``level``."""
        if self.epilogue_scale is None:
            return self.bias, None
        return self.epilogue_shift[level], self.epilogue_scale[level]

    def _run(self, product, x: Tensor, level: int, residual: Tensor | None, out_shape) -> Tensor:
        """``product`` (the op) at ``level`` with this layer's epilogue. ``out_shape()`` gives the output's shape;
        a residual of another shape or dtype (an add that broadcasts or promotes) is added after the product, as
        the unfused model did, and the activation after it."""
        ops.refuse_grad_transforms(type(self).__name__)
        bias, scale = self._epilogue(level)
        if residual is None:
            return product(x.contiguous(), level, bias, scale, self.activation, None)
        if (
            isinstance(residual, Tensor)
            and tuple(residual.shape) == out_shape()
            and residual.dtype == self.values.dtype
            and residual.device == self.values.device
        ):
            return product(x.contiguous(), level, bias, scale, self.activation, residual.contiguous())
        out = product(x.contiguous(), level, bias, scale, "none", None) + residual
        act = ACTIVATIONS[self.activation]
        return out if act is None else act.module()(out)

    def _linear_product(self, x, level, bias, scale, activation, residual) -> Tensor:
        """The format's linear op over x (..., K): this layer's weight seen as an (M, K) matrix."""
        index = self.index_tensors()
        return self._format.linear_overload(
            x, self.values, *index, level, *self._raw_op_args, bias, activation, self.plan(index), scale, residual
        )

    def nnz(self, level: int | None = None) -> int:
        return self.nested().nnz(self.level if level is None else level)

    def _extra(self) -> str:
        w = self.nested()
        dens = ", ".join(f"{w.density(lvl):.3f}" for lvl in range(self.num_levels))
        return (
            f"format={w.describe()}, levels={self.num_levels} (densities {dens}), level={self.level}, "
            f"activation={self.activation}"
        )


class NestedSparseLinear(NestedSparseModule):
    """y = act(x @ W_level^T + b) with W stored once for all levels."""

    def __init__(self, weight: NestedFormat, bias: Tensor | None = None, activation: str = "none"):
        if len(weight.weight_shape) != 2:
            raise ValueError(f"NestedSparseLinear needs a 2-D weight, got shape {weight.weight_shape}")
        super().__init__(weight, bias, activation)
        self.out_features, self.in_features = weight.weight_shape

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        tags: Tensor,
        activation: str = "none",
        densities: tuple[float, ...] = (),
        num_levels: int | None = None,
        format: str = "ncsr",
        block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
    ) -> NestedSparseLinear:
        """``format`` "ncsr" stores any nested tags; "nbcr" needs block row/column structured tags
        (nestsparse.bcr_tags) of ``block_shape``. ``linear`` may also be transformers' Conv1D (GPT-2), whose weight
        and tags are (in, out): both are transposed."""
        weight = linear.weight.detach()
        if is_transposed_linear(linear):
            weight, tags = weight.t().contiguous(), tags.t().contiguous()
        w = pack(format, weight, tags, num_levels=num_levels, densities=densities, block_shape=block_shape)
        return cls(_packed_here(w), linear.bias, activation)

    def forward(self, x: Tensor, level: int | None = None, residual: Tensor | None = None) -> Tensor:
        """act(W_level x + bias [+ residual]); ``residual`` (the output's shape) is added before the activation."""
        lvl = self.level if level is None else self.checked_level(level)
        refuse_baked_level(self, lvl)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"NestedSparseLinear: expected input of shape (..., {self.in_features}), got {tuple(x.shape)}"
            )
        if self.epilogue_scale is not None and x.dim() != 2:
            raise ValueError(
                f"NestedSparseLinear: a BatchNorm folded into this layer normalised dimension 1 of a 2-D input; "
                f"this input is {x.dim()}-D (fuse the model that runs {x.dim()}-D inputs without folding it)"
            )
        dense = self._dense_weight(lvl) if self._dense is not None else None
        if dense is not None:
            return self._dense_finish(self._dense_product(F.linear, x, *dense), residual)
        return self._run(self._linear_product, x, lvl, residual, lambda: (*x.shape[:-1], self.out_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._extra()}"


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# The geometry the conv2d kernels take (csrc/ops/conv2d.cpp, conv_shape): refused when the layer is made, not at
# every forward.
_MAX_TAP, _MAX_PAD = 1 << 16, 1 << 24


def _conv_padding(where: str, padding, mode: str, kernel, stride, dilation):
    """(the kernels' symmetric zero padding, the padding to apply to x before the product or None) for nn.Conv2d's
    ``padding`` ("same" or a pair) and ``padding_mode``. "same" pads d * (k - 1) in all, the odd one after, as
    torch does; stride 1 only, as torch requires."""
    if mode not in PADDING_MODES:
        raise ValueError(f"{where}: padding_mode must be one of {PADDING_MODES}, got {mode!r}")
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"{where}: padding='same' needs stride 1 (as nn.Conv2d), got stride {stride}")
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        (top, bottom), (left, right) = ((t // 2, t - t // 2) for t in total)
    else:
        (top, left), (bottom, right) = padding, padding
    if any(p < 0 for p in (top, bottom, left, right)):
        raise ValueError(f"{where}: padding must be non-negative, got {padding}")
    if mode == "zeros" and top == bottom and left == right:
        return (top, left), None
    return (0, 0), (left, right, top, bottom)


def _check_geometry(where: str, kernel, stride, padding, dilation, groups: int) -> None:
    """The bounds the conv2d kernels check on every call (csrc/ops/conv2d.cpp), checked once here."""
    if not all(1 <= v <= _MAX_TAP for v in (*kernel, *stride, *dilation)):
        raise ValueError(
            f"{where}: kernel_size, stride and dilation must lie in [1, {_MAX_TAP}], got {kernel}, {stride}, {dilation}"
        )
    if not all(0 <= p <= _MAX_PAD for p in padding):
        raise ValueError(f"{where}: padding must lie in [0, {_MAX_PAD}], got {padding}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{where}: groups must be a positive int, got {groups!r}")


class NestedSparseConv2d(NestedSparseModule):
    """NCHW convolution with the weight (Cout, Cin/groups, kh, kw) stored once for all levels. ``padding`` and
    ``padding_mode`` as nn.Conv2d takes them ("same", "valid" or sizes; "zeros", "reflect", "replicate",
    "circular"): symmetric zero padding is the kernels' own, any other is applied to x before the product, as
    nn.Conv2d does."""

    def __init__(
        self,
        weight: NestedFormat,
        bias: Tensor | None = None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        activation: str = "none",
        padding_mode: str = "zeros",
    ):
        if len(weight.weight_shape) != 4:
            raise ValueError(f"NestedSparseConv2d needs a 4-D weight, got shape {weight.weight_shape}")
        super().__init__(weight, bias, activation)
        self.out_channels = weight.weight_shape[0]
        self.in_channels = weight.weight_shape[1] * groups
        self.kernel_size = tuple(weight.weight_shape[2:])
        self.stride, self.dilation = ops.pair(stride), ops.pair(dilation)
        self.groups = groups
        self.padding = padding if padding == "same" else (0, 0) if padding == "valid" else ops.pair(padding)
        self.padding_mode = padding_mode
        self._op_padding, self._pre_padding = _conv_padding(
            type(self).__name__, self.padding, padding_mode, self.kernel_size, self.stride, self.dilation
        )
        _check_geometry(type(self).__name__, self.kernel_size, self.stride, self._op_padding, self.dilation, groups)
        self._one_position = self._one_position_sizes()

    def __setstate__(self, state: dict) -> None:
        if "_op_padding" not in state:  # pickled before padding modes: symmetric zero padding, the kernels' own
            state.update(padding_mode="zeros", _op_padding=state["padding"], _pre_padding=None)
        super().__setstate__(state)
        if "_one_position" not in state:
            self._one_position = self._one_position_sizes()

    def _one_position_sizes(self) -> tuple[range, range]:
        """The heights and widths of a (pre-padded) input that give one output position, computed once so the
        forward tests two ints instead of working out the output shape on every call."""
        return tuple(
            range(d * (k - 1) + 1 - 2 * p, d * (k - 1) + 1 - 2 * p + s)
            for k, s, p, d in zip(self.kernel_size, self.stride, self._op_padding, self.dilation)
        )

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        tags: Tensor,
        activation: str = "none",
        densities: tuple[float, ...] = (),
        num_levels: int | None = None,
        format: str = "ncsr",
        block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
    ) -> NestedSparseConv2d:
        weight, tags = cls._as_2d(conv.weight.detach(), tags)
        w = pack(format, weight, tags, num_levels=num_levels, densities=densities, block_shape=block_shape)
        return cls(
            _packed_here(w),
            conv.bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            activation,
            padding_mode=conv.padding_mode,
        )

    @staticmethod
    def _as_2d(weight: Tensor, tags: Tensor) -> tuple[Tensor, Tensor]:
        """The dense weight and its tags as the 4-D (Cout, Cin/groups, kh, kw) this module stores."""
        return weight, tags

    def forward(self, x: Tensor, level: int | None = None, residual: Tensor | None = None) -> Tensor:
        """act(conv(x, W_level) + bias [+ residual]); ``residual`` (the output's shape) is added before the
        activation."""
        lvl = self.level if level is None else self.checked_level(level)
        refuse_baked_level(self, lvl)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"NestedSparseConv2d: expected NCHW input with {self.in_channels} channels, got shape {tuple(x.shape)}"
            )
        if self._pre_padding is not None:  # "same" with an even kernel, reflect / replicate / circular padding
            x = F.pad(x, self._pre_padding, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        dense = self._dense_weight(lvl) if self._dense is not None else None
        if dense is not None:
            z = self._dense_product(F.conv2d, x, *dense, self.stride, self._op_padding, self.dilation, self.groups)
            return self._dense_finish(z, residual)
        rows, cols = self._one_position
        if x.shape[2] in rows and x.shape[3] in cols and self.groups == 1:
            # One output position: the convolution is the linear product over the one patch the kernel covers (the
            # convolution kernels' per-position work was 529x the matrix-vector product at k = L = 8192, Conv1d).
            out_shape = (x.shape[0], self.out_channels, 1, 1)
            if residual is None or (isinstance(residual, Tensor) and tuple(residual.shape) == out_shape):
                res = None if residual is None else residual.reshape(out_shape[:2])
                z = self._run(self._linear_product, self._only_patch(x), lvl, res, lambda: out_shape[:2])
                return z.reshape(out_shape)
        if (
            self._pointwise
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
            and (residual is None or (isinstance(residual, Tensor) and residual.dim() == 4))
        ):
            # Channels-last input: a 1x1 stride-1 convolution is the linear product over the pixels of x viewed
            # (N, H, W, C), no copy; the output comes back channels-last, as a dense layer's would.
            xl = x.permute(0, 2, 3, 1)
            res = None if residual is None else residual.permute(0, 2, 3, 1)
            out_shape = (*xl.shape[:-1], self.out_channels)
            return self._run(self._linear_product, xl, lvl, res, lambda: out_shape).permute(0, 3, 1, 2)
        return self._run(self._conv_product, x, lvl, residual, lambda: self.output_shape(x, padded=True))

    def _only_patch(self, x: Tensor) -> Tensor:
        """(N, Cin * kh * kw): the one patch a convolution with one output position reads (x already pre-padded),
        in the weight's column order."""
        (ph, pw), (kh, kw), (dh, dw) = self._op_padding, self.kernel_size, self.dilation
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        return x[:, :, : (kh - 1) * dh + 1 : dh, : (kw - 1) * dw + 1 : dw].flatten(1)

    @property
    def _pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded, ungrouped convolution: a linear product over the pixels."""
        return (
            self.kernel_size == (1, 1)
            and self.stride == (1, 1)
            and self._op_padding == (0, 0)
            and self._pre_padding is None
            and self.groups == 1
        )

    def _conv_product(self, x, level, bias, scale, activation, residual) -> Tensor:
        index = self.index_tensors()
        return self._format.conv2d_overload(
            x,
            self.values,
            *index,
            level,
            *self._raw_op_args,
            list(self.kernel_size),
            bias,
            list(self.stride),
            list(self._op_padding),
            list(self.dilation),
            self.groups,
            activation,
            self.plan(index),
            scale,
            residual,
        )

    def output_shape(self, x: Tensor, padded: bool = False) -> tuple[int, int, int, int]:
        """The shape of this layer's output for the NCHW input ``x`` (``padded``: x has had the padding applied
        before the product already)."""
        pre = (0, 0, 0, 0) if padded or self._pre_padding is None else self._pre_padding
        extra = (pre[2] + pre[3], pre[0] + pre[1])
        size = [
            (x.shape[2 + i] + extra[i] + 2 * self._op_padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
            // self.stride[i]
            + 1
            for i in range(2)
        ]
        return (x.shape[0], self.out_channels, *size)

    def extra_repr(self) -> str:
        mode = f", padding_mode={self.padding_mode}" if self.padding_mode != "zeros" else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}{mode}, dilation={self.dilation}, groups={self.groups}, {self._extra()}"
        )


def _one_row(v, first: int) -> tuple[int, int]:
    """A 1-D convolution argument (an int or a 1-tuple) as the (h, w) pair of a one-row 2-D convolution; a pair
    passes unchanged."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    return (first, int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


class NestedSparseConv1d(NestedSparseConv2d):
    """NCL convolution (nn.Conv1d) run as a one-row 2-D convolution by the same kernels: the weight
    (Cout, Cin/groups, k) is stored as (Cout, Cin/groups, 1, k) and x (N, C, L) is viewed as (N, C, 1, L), no copy."""

    def __init__(
        self,
        weight: NestedFormat,
        bias: Tensor | None = None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        activation: str = "none",
        padding_mode: str = "zeros",
    ):
        if len(weight.weight_shape) != 4 or weight.weight_shape[2] != 1:
            raise ValueError(f"NestedSparseConv1d needs a (Cout, Cin/groups, 1, k) weight, got {weight.weight_shape}")
        padding = padding if isinstance(padding, str) else _one_row(padding, 0)
        super().__init__(
            weight, bias, _one_row(stride, 1), padding, _one_row(dilation, 1), groups, activation, padding_mode
        )

    @staticmethod
    def _as_2d(weight: Tensor, tags: Tensor) -> tuple[Tensor, Tensor]:
        """(Cout, Cin/groups, k) -> the one-row (Cout, Cin/groups, 1, k); from_dense is NestedSparseConv2d's."""
        return weight.unsqueeze(2), tags.unsqueeze(2)

    def forward(self, x: Tensor, level: int | None = None, residual: Tensor | None = None) -> Tensor:
        """act(conv1d(x, W_level) + bias [+ residual]) for x (N, C, L) or (C, L)."""
        if x.dim() not in (2, 3) or x.shape[-2] != self.in_channels:
            raise ValueError(
                f"NestedSparseConv1d: expected (N, {self.in_channels}, L) or ({self.in_channels}, L) input, "
                f"got shape {tuple(x.shape)}"
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
            residual = residual.unsqueeze(0) if isinstance(residual, Tensor) else residual
        if isinstance(residual, Tensor) and residual.dim() >= 2:  # the row dimension, second from the end
            residual = residual.unsqueeze(-2)
        out = super().forward(x.unsqueeze(2), level, residual).squeeze(2)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        padding = self.padding if isinstance(self.padding, str) else self.padding[1:]
        mode = f", padding_mode={self.padding_mode}" if self.padding_mode != "zeros" else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size[1:]}, stride={self.stride[1:]}, "
            f"padding={padding}{mode}, dilation={self.dilation[1:]}, groups={self.groups}, {self._extra()}"
        )


def keep_index_buffers_local(model: nn.Module) -> nn.Module:
    """Lists every nested layer's index buffers in ``model._ddp_params_and_buffers_to_ignore``, the attribute
    DistributedDataParallel reads on the module it wraps: gloo and NCCL cannot broadcast int16 (DDP failed at
    construction with "Invalid scalar type"), and the indices are structure, not trained, the same on every rank
    that converted the same tags. convert, load and fuse call it on what they return; call it again on a module
    that wraps a converted model before handing that to DDP."""
    names = [
        f"{prefix}.{n}" if prefix else n
        for prefix, m in model.named_modules()
        if isinstance(m, NestedSparseModule)
        for n in m._format.index_names
    ]
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))
    return model
