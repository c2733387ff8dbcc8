"""Typed wrappers around ``torch.ops.nestsparse.*`` and their fake kernels (for torch.compile and torch.export).

The schemas are declared in C++ (csrc/ops/linear.h, conv2d.h, plan.h); the autograd formulas are in
csrc/ops/autograd.cpp (a Python autograd kernel would run on every call, gradients wanted or not, and cost about
10 us per op). The fake kernels below are written once for every format, from the schema's argument names.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ._library import native  # (loading the library registers the ops)

__all__ = [
    "ncsr_linear",
    "ncsr_conv2d",
    "ncsr_plan",
    "nbcr_linear",
    "nbcr_conv2d",
    "nbcr_plan",
    "pair",
    "refuse_grad_transforms",
    "set_deferred_checks",
    "deferred_checks",
    "check_errors",
    "same_bytes",
    "autocast_dtype",
]

_ops = torch.ops.nestsparse


def ncsr_linear(
    x: Tensor,
    values: Tensor,
    col_idx: Tensor,
    row_ptr: Tensor,
    row_end: Tensor,
    level: int = 0,
    bias: Tensor | None = None,
    activation: str = "none",
    plan: Tensor | None = None,
    scale: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """act(scale * (x @ W_level^T) + bias + residual) for x of shape (..., K) and W in nested CSR (scale per output
    channel, residual of the output's shape; both optional)."""
    refuse_grad_transforms("nestsparse.ops.ncsr_linear")
    return _ops.ncsr_linear(x, values, col_idx, row_ptr, row_end, level, bias, activation, plan, scale, residual)


def ncsr_conv2d(
    x: Tensor,
    values: Tensor,
    col_idx: Tensor,
    row_ptr: Tensor,
    row_end: Tensor,
    level: int,
    kernel_size: tuple[int, int],
    bias: Tensor | None = None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
    activation: str = "none",
    plan: Tensor | None = None,
    scale: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """act(scale * conv2d(x, W_level) + bias + residual) for NCHW x, W (Cout, Cin/groups, kh, kw) in nested CSR."""
    refuse_grad_transforms("nestsparse.ops.ncsr_conv2d")
    return _ops.ncsr_conv2d(
        x,
        values,
        col_idx,
        row_ptr,
        row_end,
        level,
        list(pair(kernel_size)),
        bias,
        list(pair(stride)),
        list(pair(padding)),
        list(pair(dilation)),
        groups,
        activation,
        plan,
        scale,
        residual,
    )


def set_deferred_checks(on: bool) -> bool:
    """Deferred index checks for the CUDA ops on or off; returns the previous setting.

    Off (the default), a CUDA op copies its four error counters to the host after its kernels, so a corrupted index
    array raises at that op, naming the index, at the cost of one synchronisation per call. On, the ops count into a
    per-device block and never wait: nothing stalls the stream and the calls can be captured in a CUDA graph (a call
    captured into a graph is always deferred). Errors then surface at ``check_errors()``, naming the first bad
    position but not the op, and the outputs in between are wrong. The CPU ops always raise at once."""
    if not native.with_cuda():
        return False
    return bool(_ops.cuda_set_deferred_checks(bool(on)))


def check_errors(device: torch.device | str | int | None = None) -> None:
    """Raises if a CUDA op on ``device`` (default: the current one) met a bad index since the last check, and clears
    the record. Waits for the device. Does nothing without CUDA."""
    if not native.with_cuda() or not torch.cuda.is_available():
        return
    d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    _ops.cuda_check_errors(torch.cuda.current_device() if d.index is None else d.index)


@contextlib.contextmanager
def deferred_checks(device: torch.device | str | int | None = None):
    """Runs the block with deferred CUDA index checks (``set_deferred_checks``) and checks once at its end."""
    before = set_deferred_checks(True)
    try:
        yield
    finally:
        set_deferred_checks(before)
    check_errors(device)


def refuse_grad_transforms(where: str) -> None:
    """torch.func.grad / vjp / jvp / jacrev cannot transform the ops' autograd, a C++ autograd Function (torch
    raises 'cannot use C++ torch::autograd::Function with functorch transforms'): say so with what works instead.
    torch.func.vmap alone works (torch runs the op once per batch element)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return  # torch.compile traces the op (and dynamo cannot trace the check below); or no transform at all
    stack = torch._C._functorch.get_interpreter_stack()
    if stack and any(i.key() != torch._C._functorch.TransformType.Vmap for i in stack):
        raise RuntimeError(
            f"{where}: torch.func transforms other than vmap (grad, vjp, jvp, jacrev, functionalize) "
            f"cannot differentiate the nested sparse ops, whose autograd is C++; use torch.autograd.grad or "
            f".backward() (for per-sample gradients, a loop over the samples), or differentiate "
            f"nestsparse.to_dense(model, level) with torch.func"
        )


def ncsr_plan(row_ptr: Tensor, row_end: Tensor, num_chunks: int | None = None) -> Tensor:
    """The per-weight plan to cache and pass as ``plan``: on the CPU, each level's rows split into ``num_chunks``
    pieces of equal work; on CUDA, each level's rows ordered by length for the kernels' sub-warp schedule
    (``num_chunks`` is ignored)."""
    return _ops.ncsr_plan(row_ptr, row_end, _chunks(num_chunks))


def nbcr_linear(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    block_ptr: Tensor,
    blocks: Tensor,
    counts: Tensor,
    level: int,
    rows: int,
    block_shape: tuple[int, int],
    bias: Tensor | None = None,
    activation: str = "none",
    plan: Tensor | None = None,
    scale: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """act(scale * (x @ W_level^T) + bias + residual) for x of shape (..., K) and W (``rows`` x K) in nested BCR."""
    refuse_grad_transforms("nestsparse.ops.nbcr_linear")
    return _ops.nbcr_linear(
        x,
        values,
        indices,
        block_ptr,
        blocks,
        counts,
        level,
        rows,
        list(pair(block_shape)),
        bias,
        activation,
        plan,
        scale,
        residual,
    )


def nbcr_conv2d(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    block_ptr: Tensor,
    blocks: Tensor,
    counts: Tensor,
    level: int,
    rows: int,
    block_shape: tuple[int, int],
    kernel_size: tuple[int, int],
    bias: Tensor | None = None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
    activation: str = "none",
    plan: Tensor | None = None,
    scale: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """act(scale * conv2d(x, W_level) + bias + residual) for NCHW x, W (Cout = ``rows``, Cin/groups, kh, kw) in
    nested BCR."""
    refuse_grad_transforms("nestsparse.ops.nbcr_conv2d")
    return _ops.nbcr_conv2d(
        x,
        values,
        indices,
        block_ptr,
        blocks,
        counts,
        level,
        rows,
        list(pair(block_shape)),
        list(pair(kernel_size)),
        bias,
        list(pair(stride)),
        list(pair(padding)),
        list(pair(dilation)),
        groups,
        activation,
        plan,
        scale,
        residual,
    )


def nbcr_plan(block_ptr: Tensor, counts: Tensor, rows_per_block: int, num_chunks: int | None = None) -> Tensor:
    """The per-weight plan to cache and pass as ``plan``: on the CPU, each level's block rows split into
    ``num_chunks`` pieces of equal work; on CUDA, each level's block rows ordered by work, heaviest first
    (``num_chunks`` is ignored)."""
    return _ops.nbcr_plan(block_ptr, counts, rows_per_block, _chunks(num_chunks))


def same_bytes(now, snapshot) -> bool:
    """Whether each tensor of ``now`` has the dtype, shape and bytes of the tensor at its place in ``snapshot``
    (contiguous CPU tensors; ``None`` matches ``None``): memcmp in C++ (4 MB: 86 us, torch.equal 2.8 ms)."""
    return _ops.same_bytes(now, snapshot)


def pair(v) -> tuple[int, int]:
    """An int or a pair as a pair (the int[2] arguments)."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _chunks(num_chunks: int | None) -> int:
    # Four chunks per thread: enough slack for uneven rows without paying much per chunk.
    return 4 * torch.get_num_threads() if num_chunks is None else num_chunks


# ---- fake kernels: shapes and dtypes only, one per op kind for every format ----------------------------------
# What the fake kernels need of each format's arguments: the weight's rows, and the tensor whose first dimension
# is the number of levels.
_WEIGHT_ROWS = {"ncsr": lambda a: a["row_ptr"].shape[0] - 1, "nbcr": lambda a: a["rows"]}
_LEVEL_TABLE = {"ncsr": "row_end", "nbcr": "counts"}
_LEVEL_TABLE_DIMS = {"row_end": 2, "counts": 3}  # (L, M) and (L, B, 2)
_PLAN_INPUT = {"ncsr": "row_ptr", "nbcr": "block_ptr"}


def _arguments(op: str, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by schema name, defaults filled in."""
    out = dict(kwargs)
    for i, a in enumerate(getattr(_ops, op).default._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name not in out and a.has_default_value():
            out[a.name] = a.default_value
    return out


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _fake_product(fmt: str, kind: str):
    op = f"{fmt}_{kind}"

    def fake(*args, **kwargs):
        a = _arguments(op, args, kwargs)
        x, values, level = a["x"], a["values"], a["level"]
        rows, table = _WEIGHT_ROWS[fmt](a), a[_LEVEL_TABLE[fmt]]
        torch._check(x.dtype == values.dtype, lambda: f"{op}: x is {x.dtype} but values are {values.dtype}")
        dims = _LEVEL_TABLE_DIMS[_LEVEL_TABLE[fmt]]
        torch._check(table.dim() == dims, lambda: f"{op}: {_LEVEL_TABLE[fmt]} must have {dims} dimensions")
        # Two checks, not a chained comparison: an exported program's level is a symbolic int (nestsparse.export)
        torch._check(level >= 0, lambda: f"{op}: level {level} out of range")
        torch._check(level < table.shape[0], lambda: f"{op}: level {level} out of range")
        for name in ("bias", "scale"):
            t = a.get(name)
            if t is not None:
                torch._check(t.shape == (rows,), lambda name=name, t=t: f"{op}: {name} shape {t.shape}")
        if kind == "linear":
            out = x.new_empty((*x.shape[:-1], rows))
        else:
            torch._check(x.dim() == 4, lambda: f"{op}: x must be NCHW")
            k, s, p, d = (pair(a[n]) for n in ("kernel_size", "stride", "padding", "dilation"))
            oh, ow = (_conv_out(x.shape[2 + i], k[i], s[i], p[i], d[i]) for i in range(2))
            out = x.new_empty((x.shape[0], rows, oh, ow))
        residual = a.get("residual")
        if residual is not None:
            torch._check(residual.shape == out.shape, lambda: f"{op}: residual shape {residual.shape}")
        return out

    return fake


def _fake_grads(grad_z, x, values, *rest):
    return x.new_empty(x.shape), values.new_empty(values.shape)


def _fake_plan(fmt: str):
    def fake(*args, **kwargs):
        a = _arguments(f"{fmt}_plan", args, kwargs)
        index, levels = a[_PLAN_INPUT[fmt]], a[_LEVEL_TABLE[fmt]].shape[0]
        if fmt == "ncsr" and index.device.type == "cuda":  # a header, then the M rows in order (ops/cuda/plan.cu)
            return index.new_empty((levels, _ops.cuda_plan_header() + index.shape[0] - 1))
        if fmt == "nbcr" and index.device.type == "cuda":  # the MB block rows in order
            return index.new_empty((levels, index.shape[0] - 1))
        return index.new_empty((levels, a["num_chunks"] + 1))

    return fake


for _fmt in _WEIGHT_ROWS:
    for _kind in ("linear", "conv2d"):
        torch.library.register_fake(f"nestsparse::{_fmt}_{_kind}")(_fake_product(_fmt, _kind))
        torch.library.register_fake(f"nestsparse::{_fmt}_{_kind}_backward")(_fake_grads)
    torch.library.register_fake(f"nestsparse::{_fmt}_plan")(_fake_plan(_fmt))


# ---- autocast: the ops run in the nested weight's dtype, never narrowing an input autocast would not narrow ------
# Under torch.autocast a dense layer before a nested one hands it a lower-precision x. The values stay in their own
# dtype where they can (casting them every call would copy the weight), so the products cast x, bias, scale and
# residual to the values' dtype, as autocast does for the ops it runs in float32; the next dense layer casts back
# down. An input that this would narrow beyond autocast's own contract (float32 to the autocast dtype) is not
# narrowed: float16 values under autocast(bfloat16) took a bfloat16 x to float16 and overflowed to inf where a dense
# layer stays finite. Then the product runs in the promoted dtype (the values cast up for the call).
_AUTOCAST_CAST = ("x", "bias", "scale", "residual")
_autocast_lib = torch.library.Library("nestsparse", "IMPL")


def autocast_dtype(values_dtype: torch.dtype, inputs, device_type: str) -> torch.dtype:
    """The dtype a product of weights in ``values_dtype`` computes in under autocast, given its floating inputs: the
    values' dtype, unless an input would be narrowed to it where autocast would not narrow it (float32 to the
    autocast dtype is autocast's own narrowing); then the promoted dtype (float16 and bfloat16 meet in float32).
    The dense-product levels (set_dense_levels) compute in the same dtype, so the output's dtype does not depend on
    the level."""
    low = torch.get_autocast_dtype(device_type)
    out = values_dtype
    for t in inputs:
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype == values_dtype:
            continue
        if t.dtype == torch.float32 and values_dtype == low:
            continue
        out = torch.promote_types(out, t.dtype)
    return out


def _autocast_kernel(op: str, key: str):
    overload = getattr(_ops, op).default
    excluded = torch._C.DispatchKeySet(key)
    device_type = "cuda" if key == "AutocastCUDA" else "cpu"

    def kernel(*args, **kwargs):
        a = _arguments(op, args, kwargs)
        dtype = autocast_dtype(a["values"].dtype, [a.get(n) for n in _AUTOCAST_CAST], device_type)
        if a["values"].dtype != dtype:
            a["values"] = a["values"].to(dtype)
        for name in _AUTOCAST_CAST:
            t = a.get(name)
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
                a[name] = t.to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return overload(**a)

    return kernel


for _fmt in _WEIGHT_ROWS:
    for _kind in ("linear", "conv2d"):
        for _key in ("AutocastCPU", "AutocastCUDA"):
            _autocast_lib.impl(f"{_fmt}_{_kind}", _autocast_kernel(f"{_fmt}_{_kind}", _key), _key)
