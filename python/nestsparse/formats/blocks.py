"""The block grid of a matrix, shared by NestedBCR and the BCR tag assignment (nestsparse.pruning.tags)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MAX_BLOCK_DIM",
    "DEFAULT_BLOCK_SHAPE",
    "matrix_shape",
    "check_block_shape",
    "grid",
    "inside",
    "blocked",
    "element_tags",
]

MAX_BLOCK_DIM = 256  # kMaxBlockDim in csrc/formats/nbcr.h

DEFAULT_BLOCK_SHAPE = (32, 32)  # (bm, bk) of NestedBCR when none is given


def matrix_shape(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(M, K): a weight seen as a matrix, rows by the first dimension (a conv weight as (Cout, Cin/g*kh*kw))."""
    if len(weight_shape) < 1:
        raise ValueError("a weight must have at least one dimension")
    rows = weight_shape[0]
    return rows, math.prod(weight_shape[1:]) if len(weight_shape) > 1 else 1


def check_block_shape(where: str, block_shape) -> tuple[int, int]:
    """``block_shape`` as (bm, bk), each in [1, MAX_BLOCK_DIM]; ValueError naming ``where`` otherwise."""
    bs = tuple(block_shape) if isinstance(block_shape, (tuple, list)) else None
    if (
        bs is None
        or len(bs) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in bs)
        or not all(1 <= b <= MAX_BLOCK_DIM for b in bs)
    ):
        raise ValueError(f"{where}: block_shape must be two ints (bm, bk) in [1, {MAX_BLOCK_DIM}], got {block_shape!r}")
    return bs


def grid(M: int, K: int, block_shape: tuple[int, int]) -> tuple[int, int]:
    """(MB, KB): the block rows and block columns of an (M, K) matrix, the last ones maybe partial."""
    return -(-M // block_shape[0]), -(-K // block_shape[1])


def inside(M: int, K: int, block_shape: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    """Which local rows (MB, 1, bm) and columns (1, KB, bk) of the block grid lie inside the matrix."""
    (bm, bk), (MB, KB) = block_shape, grid(M, K, block_shape)
    rows = torch.arange(MB * bm, device=device).reshape(MB, 1, bm) < M
    cols = torch.arange(KB * bk, device=device).reshape(1, KB, bk) < K
    return rows, cols


def blocked(matrix: Tensor, block_shape: tuple[int, int], fill) -> Tensor:
    """An (M, K) matrix padded with ``fill`` to the block grid and viewed as (MB, KB, bm, bk) (a copy)."""
    (M, K), (bm, bk) = matrix.shape, block_shape
    MB, KB = grid(M, K, block_shape)
    padded = matrix.new_full((MB * bm, KB * bk), fill)
    padded[:M, :K] = matrix
    return padded.reshape(MB, bm, KB, bk).permute(0, 2, 1, 3)


def element_tags(row_tags: Tensor, col_tags: Tensor, M: int, K: int) -> Tensor:
    """Element tags (M, K) = min(row tag, column tag), from row tags (MB, KB, bm) and column tags (MB, KB, bk)."""
    MB, KB, bm = row_tags.shape
    t = torch.minimum(row_tags.unsqueeze(3), col_tags.unsqueeze(2))  # (MB, KB, bm, bk)
    return t.permute(0, 2, 1, 3).reshape(MB * bm, KB * col_tags.shape[2])[:M, :K]
