"""Level-aware modules: nested sparse layers, per-level BatchNorm, and switching a model's level."""

from .batchnorm import LevelBatchNorm, level_batchnorms
from .levels import LevelAware, get_levels, level_aware_modules, set_level, shared_copy
from .recurrent import RECURRENT, NestedSparseRNN, recurrent_weights
from .sparse import (
    CONVERTIBLE,
    NestedSparseConv1d,
    NestedSparseConv2d,
    NestedSparseLinear,
    NestedSparseModule,
    keep_index_buffers_local,
)
from .tree import is_transposed_linear, parent_module, tied_weights

__all__ = [
    "LevelAware",
    "NestedSparseLinear",
    "NestedSparseConv2d",
    "NestedSparseConv1d",
    "NestedSparseModule",
    "keep_index_buffers_local",
    "LevelBatchNorm",
    "level_batchnorms",
    "level_aware_modules",
    "set_level",
    "get_levels",
    "shared_copy",
    "parent_module",
    "CONVERTIBLE",
    "NestedSparseRNN",
    "RECURRENT",
    "recurrent_weights",
    "is_transposed_linear",
    "tied_weights",
]
