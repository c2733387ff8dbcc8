"""The interface every nested format implements, and what the formats share.

A nested weight holds every sparsity level in one buffer. Levels are numbered 0 (densest) .. L-1 (sparsest); an
element's *tag* is the highest level at which it is present, -1 if pruned everywhere. The C++ contracts of the
formats are at the top of csrc/formats/<name>.h.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import ops
from .blocks import matrix_shape

__all__ = [
    "NestedFormat",
    "FormatError",
    "VALUE_DTYPES",
    "first_index",
    "check_integer",
    "check_weight_dtype",
    "level_count",
    "check_dense_args",
    "row_slabs",
    "SLAB_ELEMENTS",
]

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class FormatError(ValueError):
    """A nested sparse object breaks one of its format's invariants; the message names it."""


class NestedFormat:
    """A weight of ``weight_shape``, seen as an (M, K) matrix, with ``num_levels`` levels in one ``values`` buffer.

    A format is a dataclass holding ``values``, then its index tensors (``index_names``, in the order its ops take
    them), the ``weight_shape``, its options (``option_lengths``: NestedBCR's block_shape) and the level
    ``densities``. Everything the library does with a nested weight (modules, convert, save/load) goes through
    this interface, so a third format is one new subclass plus its kernels: ops named ``<name>_linear``,
    ``<name>_conv2d``, which take ``(x, values, *index tensors, level, *op_args(), ...)``, and ``<name>_plan``.
    """

    name: ClassVar[str] = ""
    index_names: ClassVar[tuple[str, ...]] = ()
    level_table: ClassVar[str] = ""  # the index tensor whose first dimension is the number of levels
    option_lengths: ClassVar[dict[str, int]] = {}  # options besides weight_shape and densities: int tuples
    linear_op: ClassVar[Any]  # nestsparse.ops.<name>_linear
    conv2d_op: ClassVar[Any]  # nestsparse.ops.<name>_conv2d
    # The registered overloads themselves (torch.ops.nestsparse.<name>_linear.default, ...): the modules call these,
    # with int lists ready, since the typed wrappers' conversions cost a few microseconds per call.
    linear_overload: ClassVar[Any]
    conv2d_overload: ClassVar[Any]

    values: Tensor
    weight_shape: tuple[int, ...]
    densities: tuple[float, ...]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            cls.linear_op = staticmethod(getattr(ops, f"{cls.name}_linear"))
            cls.conv2d_op = staticmethod(getattr(ops, f"{cls.name}_conv2d"))
            cls.linear_overload = getattr(torch.ops.nestsparse, f"{cls.name}_linear").default
            cls.conv2d_overload = getattr(torch.ops.nestsparse, f"{cls.name}_conv2d").default

    # ---- what each format defines --------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, weight: Tensor, tags: Tensor, num_levels: int | None = None, densities: tuple[float, ...] = (), **options
    ) -> NestedFormat:
        """Packs the entries of ``weight`` whose tag is >= 0 (``tags``: int8, the weight's shape)."""
        raise NotImplementedError

    def nnz(self, level: int = 0) -> int:
        """Non-zeros of ``level``."""
        raise NotImplementedError

    def nbytes(self, level: int | None = None) -> int:
        """Bytes stored (``level=None``), or bytes a product at ``level`` reads."""
        raise NotImplementedError

    def tags(self) -> Tensor:
        """The int8 element tags, weight-shaped (the inverse of from_dense)."""
        raise NotImplementedError

    def to_dense(self, level: int = 0) -> Tensor:
        """The level-``level`` weight as a dense tensor of the original weight shape."""
        raise NotImplementedError

    def validate(self) -> NestedFormat:
        """Checks every invariant of the format; raises FormatError naming the first one broken."""
        raise NotImplementedError

    def plan(self, num_chunks: int | None = None) -> Tensor:
        """The per-level partition of equal work for the CPU kernels (``<name>_plan``), to cache per weight."""
        raise NotImplementedError

    def op_args(self) -> tuple:
        """What the format's ops take between the level and their own arguments (NestedBCR: rows, block_shape)."""
        return ()

    # ---- shared -------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """The matrix shape (M, K)."""
        return matrix_shape(self.weight_shape)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def num_levels(self) -> int:
        return int(getattr(self, self.level_table).shape[0])

    def index_tensors(self) -> tuple[Tensor, ...]:
        """The index tensors, in the order the ops take them."""
        return tuple(getattr(self, n) for n in self.index_names)

    def options(self) -> dict[str, tuple[int, ...]]:
        """The format's options by name (what ``from_dense`` and ``from_parts`` take besides tensors)."""
        return {n: tuple(getattr(self, n)) for n in self.option_lengths}

    def describe(self) -> str:
        """The format and its options, e.g. "nbcr 32x32"."""
        return " ".join([self.name] + ["x".join(str(v) for v in o) for o in self.options().values()])

    def _check_level(self, level: int) -> int:
        if not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"level {level!r} is out of range for {self.num_levels} levels (0 = densest)")
        return level

    def density(self, level: int = 0) -> float:
        M, K = self.shape
        return self.nnz(level) / max(M * K, 1)

    def flops(self, level: int, n: int) -> int:
        """Multiply-adds x 2 of a product with ``n`` dense columns (batch rows, or output pixels for a conv)."""
        return 2 * self.nnz(level) * int(n)

    def mask(self, level: int = 0) -> Tensor:
        return self.tags() >= self._check_level(level)

    # ---- products -----------------------------------------------------------------------------------------
    def linear(
        self,
        x: Tensor,
        level: int = 0,
        bias: Tensor | None = None,
        activation: str = "none",
        plan: Tensor | None = None,
        scale: Tensor | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        """act(scale * (x @ W_level^T) + bias + residual) for x of shape (..., K)."""
        return self.linear_op(
            x, self.values, *self.index_tensors(), level, *self.op_args(), bias, activation, plan, scale, residual
        )

    def conv2d(
        self,
        x: Tensor,
        level: int,
        kernel_size,
        bias: Tensor | None = None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        activation: str = "none",
        plan: Tensor | None = None,
        scale: Tensor | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        """act(scale * conv2d(x, W_level) + bias + residual) for NCHW x, the weight (Cout, Cin/groups, kh, kw)."""
        return self.conv2d_op(
            x,
            self.values,
            *self.index_tensors(),
            level,
            *self.op_args(),
            kernel_size,
            bias,
            stride,
            padding,
            dilation,
            groups,
            activation,
            plan,
            scale,
            residual,
        )

    # ---- movement and serialisation -------------------------------------------------------------------------
    @classmethod
    def from_parts(
        cls, values: Tensor, index: Mapping[str, Tensor], weight_shape, densities=(), **options
    ) -> NestedFormat:
        """An object from its tensors (``index`` by name), shape, densities and options; not validated."""
        return cls(
            values=values,
            **{n: index[n] for n in cls.index_names},
            weight_shape=tuple(weight_shape),
            densities=tuple(float(d) for d in densities),
            **{n: tuple(int(v) for v in options[n]) for n in cls.option_lengths},
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NestedFormat:
        """A copy on ``device`` and/or with values cast to ``dtype`` (index tensors keep their dtypes)."""
        return replace(
            self,
            values=self.values.to(device=device, dtype=dtype),
            **{n: t.to(device) for n, t in zip(self.index_names, self.index_tensors())},
        )

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only, so safetensors can store it."""
        sd = {
            "values": self.values,
            **dict(zip(self.index_names, self.index_tensors())),
            "weight_shape": torch.tensor(self.weight_shape, dtype=torch.int64),
        }
        sd.update({n: torch.tensor(v, dtype=torch.int64) for n, v in self.options().items()})
        sd["densities"] = torch.tensor(self.densities, dtype=torch.float64)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> NestedFormat:
        """Rebuilds and validates; a missing key or a broken invariant raises FormatError."""
        where = cls.__name__
        missing = {"values", *cls.index_names, "weight_shape", *cls.option_lengths, "densities"} - set(sd)
        if missing:
            raise FormatError(f"{where}: state dict lacks {sorted(missing)}")
        ws = sd["weight_shape"]
        if ws.dtype != torch.int64 or ws.dim() != 1 or ws.numel() < 1 or (ws < 0).any():
            raise FormatError(f"{where}: weight_shape must be a 1-D non-empty non-negative int64 tensor, got {ws}")
        for name, n in cls.option_lengths.items():
            if sd[name].dtype != torch.int64 or sd[name].shape != (n,):
                raise FormatError(f"{where}: {name} must be an int64 tensor of shape ({n},), got {sd[name]}")
        obj = cls.from_parts(
            sd["values"], sd, ws.tolist(), sd["densities"].tolist(), **{n: sd[n].tolist() for n in cls.option_lengths}
        )
        return obj.validate()


# ---- checks shared by the formats' constructors ----------------------------------------------------------------


# Elements of a slab (row_slabs): 1 Mi, so a slab's int64 temporaries are about 30 MB whatever the matrix.
SLAB_ELEMENTS = 1 << 20


def row_slabs(rows: int, width: int, row_ptr: Tensor | None = None) -> list[tuple[int, int]]:
    """(start, stop) of consecutive slabs of ``rows`` rows of about SLAB_ELEMENTS elements each (at least one row):
    rows of ``width`` elements, or, given ``row_ptr`` (M + 1 offsets), rows of the entries it delimits. How the
    packers and checks walk a large matrix with temporaries of a slab's size, not the matrix's."""
    elements = SLAB_ELEMENTS
    if row_ptr is None:
        step = max(1, elements // max(width, 1))
        return [(r, min(r + step, rows)) for r in range(0, rows, step)]
    total = int(row_ptr[-1]) if rows else 0
    cuts = []
    if total > elements:
        marks = torch.arange(elements, total, elements, dtype=row_ptr.dtype, device=row_ptr.device)
        cuts = torch.searchsorted(row_ptr, marks, right=True).tolist()
    bounds = sorted({0, rows, *(min(max(int(x), 1), rows) for x in cuts)})
    return list(zip(bounds[:-1], bounds[1:]))


def first_index(mask: Tensor) -> int:
    """The flat index of the first True of ``mask``."""
    return int(mask.nonzero()[0, 0]) if mask.dim() == 1 else int(mask.flatten().nonzero()[0, 0])


def check_integer(where: str, name: str, t: Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{where}: {name} must be an integer tensor, got {t.dtype}")


def check_weight_dtype(where: str, weight: Tensor) -> None:
    if weight.dtype not in VALUE_DTYPES:
        raise ValueError(f"{where}: weight dtype {weight.dtype} is not a supported value dtype")


def level_count(
    where: str, name: str, tags: tuple[Tensor, ...], num_levels: int | None, densities: tuple[float, ...]
) -> int:
    """The number of levels (given, or one more than the largest tag), once every tag lies in [-1, L-1]."""
    seen = [(int(t.min()), int(t.max())) for t in tags if t.numel()]
    lo, hi = (min(s[0] for s in seen), max(s[1] for s in seen)) if seen else (-1, -1)
    L = num_levels if num_levels is not None else max(hi + 1, len(densities), 1)
    if L < 1:
        raise ValueError(f"{where}: num_levels must be >= 1, got {L}")
    if lo < -1 or hi >= L:
        raise ValueError(f"{where}: {name} must lie in [-1, {L - 1}], got [{lo}, {hi}]")
    if densities and len(densities) != L:
        raise ValueError(f"{where}: {len(densities)} densities for {L} levels")
    return L


def check_dense_args(
    where: str, weight: Tensor, tags: Tensor, num_levels: int | None, densities: tuple[float, ...]
) -> tuple[int, int, Tensor, int]:
    """The checks of every ``from_dense``; returns M, K, the tags as an (M, K) view in their own integer dtype (an
    int64 copy of a 16384 x 16384 layer's tags would be 2 GiB), and L."""
    if tags.shape != weight.shape:
        raise ValueError(f"{where}: tags shape {tuple(tags.shape)} != weight shape {tuple(weight.shape)}")
    check_weight_dtype(where, weight)
    check_integer(where, "tags", tags)
    M, K = matrix_shape(tuple(weight.shape))
    t = tags.detach().reshape(M, K)
    return M, K, t, level_count(where, "tags", (t,), num_levels, densities)
