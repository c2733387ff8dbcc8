"""Typed wrappers around ``torch.ops.nestsparse.*`` and their fake kernels (for torch.compile and
torch.export). The autograd formulas are in csrc/ops/autograd.cpp."""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import _C  # noqa: F401  (loading the library registers the ops)

__all__ = ["ncsr_linear", "ncsr_conv2d", "ncsr_plan", "nbcr_linear", "nbcr_conv2d", "nbcr_plan", "ACTIVATIONS"]

ACTIVATIONS = ("none", "relu", "relu6", "gelu")
_ops = torch.ops.nestsparse


def ncsr_linear(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, row_end: Tensor, level: int = 0,
                bias: Tensor | None = None, activation: str = "none", plan: Tensor | None = None) -> Tensor:
    """act(x @ W_level^T + bias) for x of shape (..., K) and W in nested CSR."""
    return _ops.ncsr_linear(x, values, col_idx, row_ptr, row_end, level, bias, activation, plan)


def ncsr_conv2d(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, row_end: Tensor, level: int,
                kernel_size: tuple[int, int], bias: Tensor | None = None, stride=(1, 1), padding=(0, 0),
                dilation=(1, 1), groups: int = 1, activation: str = "none", plan: Tensor | None = None) -> Tensor:
    """act(conv2d(x, W_level) + bias) for NCHW x, W (Cout, Cin/groups, kh, kw) in nested CSR."""
    return _ops.ncsr_conv2d(x, values, col_idx, row_ptr, row_end, level, list(_pair(kernel_size)), bias,
                            list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), groups, activation, plan)


def ncsr_plan(row_ptr: Tensor, row_end: Tensor, num_chunks: int | None = None) -> Tensor:
    """Per-level row partition of equal work, to cache per weight and pass as ``plan``."""
    return _ops.ncsr_plan(row_ptr, row_end, 4 * torch.get_num_threads() if num_chunks is None else num_chunks)


def nbcr_linear(x: Tensor, values: Tensor, indices: Tensor, block_ptr: Tensor, blocks: Tensor, counts: Tensor,
                level: int, rows: int, block_shape: tuple[int, int], bias: Tensor | None = None,
                activation: str = "none", plan: Tensor | None = None) -> Tensor:
    """act(x @ W_level^T + bias) for x of shape (..., K) and W (``rows`` x K) in nested BCR."""
    return _ops.nbcr_linear(x, values, indices, block_ptr, blocks, counts, level, rows, list(_pair(block_shape)), bias,
                            activation, plan)


def nbcr_conv2d(x: Tensor, values: Tensor, indices: Tensor, block_ptr: Tensor, blocks: Tensor, counts: Tensor,
                level: int, rows: int, block_shape: tuple[int, int], kernel_size: tuple[int, int],
                bias: Tensor | None = None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                activation: str = "none", plan: Tensor | None = None) -> Tensor:
    """act(conv2d(x, W_level) + bias) for NCHW x, W (Cout = ``rows``, Cin/groups, kh, kw) in nested BCR."""
    return _ops.nbcr_conv2d(x, values, indices, block_ptr, blocks, counts, level, rows, list(_pair(block_shape)),
                            list(_pair(kernel_size)), bias, list(_pair(stride)), list(_pair(padding)),
                            list(_pair(dilation)), groups, activation, plan)


def nbcr_plan(block_ptr: Tensor, counts: Tensor, rows_per_block: int, num_chunks: int | None = None) -> Tensor:
    """Per-level block-row partition of equal work, to cache per weight and pass as ``plan``."""
    return _ops.nbcr_plan(block_ptr, counts, rows_per_block,
                          4 * torch.get_num_threads() if num_chunks is None else num_chunks)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ---- fake kernels: shapes and dtypes only ---------------------------------------------------------
def _fake_checks(op: str, x: Tensor, values: Tensor, row_ptr: Tensor, row_end: Tensor, level: int, bias):
    torch._check(x.dtype == values.dtype, lambda: f"{op}: x is {x.dtype} but values are {values.dtype}")
    torch._check(row_end.dim() == 2, lambda: f"{op}: row_end must be (L, M)")
    torch._check(0 <= level < row_end.shape[0], lambda: f"{op}: level {level} out of range")
    if bias is not None:
        torch._check(bias.shape == (row_ptr.shape[0] - 1,), lambda: f"{op}: bias shape {bias.shape}")


@torch.library.register_fake("nestsparse::ncsr_linear")
def _(x, values, col_idx, row_ptr, row_end, level, bias=None, activation="none", plan=None):
    _fake_checks("ncsr_linear", x, values, row_ptr, row_end, level, bias)
    return x.new_empty((*x.shape[:-1], row_ptr.shape[0] - 1))


@torch.library.register_fake("nestsparse::ncsr_linear_backward")
def _(grad_z, x, values, col_idx, row_ptr, row_end, level):
    return x.new_empty(x.shape), values.new_empty(values.shape)


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("nestsparse::ncsr_conv2d")
def _(x, values, col_idx, row_ptr, row_end, level, kernel_size, bias=None, stride=(1, 1), padding=(0, 0),
      dilation=(1, 1), groups=1, activation="none", plan=None):
    _fake_checks("ncsr_conv2d", x, values, row_ptr, row_end, level, bias)
    torch._check(x.dim() == 4, lambda: "ncsr_conv2d: x must be NCHW")
    oh = _conv_out(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _conv_out(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1, oh, ow))


@torch.library.register_fake("nestsparse::ncsr_conv2d_backward")
def _(grad_z, x, values, col_idx, row_ptr, row_end, level, kernel_size, stride, padding, dilation, groups):
    return x.new_empty(x.shape), values.new_empty(values.shape)


@torch.library.register_fake("nestsparse::ncsr_plan")
def _(row_ptr, row_end, num_chunks):
    return row_ptr.new_empty((row_end.shape[0], num_chunks + 1))


def _fake_nbcr_checks(op: str, x: Tensor, values: Tensor, counts: Tensor, level: int, rows: int, bias):
    torch._check(x.dtype == values.dtype, lambda: f"{op}: x is {x.dtype} but values are {values.dtype}")
    torch._check(counts.dim() == 3, lambda: f"{op}: counts must be (L, B, 2)")
    torch._check(0 <= level < counts.shape[0], lambda: f"{op}: level {level} out of range")
    if bias is not None:
        torch._check(bias.shape == (rows,), lambda: f"{op}: bias shape {bias.shape}")


@torch.library.register_fake("nestsparse::nbcr_linear")
def _(x, values, indices, block_ptr, blocks, counts, level, rows, block_shape, bias=None, activation="none",
      plan=None):
    _fake_nbcr_checks("nbcr_linear", x, values, counts, level, rows, bias)
    return x.new_empty((*x.shape[:-1], rows))


@torch.library.register_fake("nestsparse::nbcr_linear_backward")
def _(grad_z, x, values, indices, block_ptr, blocks, counts, level, rows, block_shape):
    return x.new_empty(x.shape), values.new_empty(values.shape)


@torch.library.register_fake("nestsparse::nbcr_conv2d")
def _(x, values, indices, block_ptr, blocks, counts, level, rows, block_shape, kernel_size, bias=None, stride=(1, 1),
      padding=(0, 0), dilation=(1, 1), groups=1, activation="none", plan=None):
    _fake_nbcr_checks("nbcr_conv2d", x, values, counts, level, rows, bias)
    torch._check(x.dim() == 4, lambda: "nbcr_conv2d: x must be NCHW")
    oh = _conv_out(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _conv_out(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], rows, oh, ow))


@torch.library.register_fake("nestsparse::nbcr_conv2d_backward")
def _(grad_z, x, values, indices, block_ptr, blocks, counts, level, rows, block_shape, kernel_size, stride, padding,
      dilation, groups):
    return x.new_empty(x.shape), values.new_empty(values.shape)


@torch.library.register_fake("nestsparse::nbcr_plan")
def _(block_ptr, counts, rows_per_block, num_chunks):
    return block_ptr.new_empty((counts.shape[0], num_chunks + 1))


# ---- autograd ---------------------------------------------------------------------------------------
# The four products have their autograd in C++ (csrc/ops/autograd.cpp): a Python autograd kernel
# would run on every call, gradients wanted or not, and cost about 10 us per op.
