"""Level-aware modules: nested sparse layers, per-level BatchNorm, and switching a model's level."""

from .batchnorm import LevelBatchNorm, level_batchnorms
from .levels import LevelAware, get_levels, level_aware_modules, set_level, shared_copy
from .sparse import NestedSparseConv2d, NestedSparseLinear, NestedSparseModule, keep_index_buffers_local
from .tree import parent_module

__all__ = [
    "LevelAware",
    "NestedSparseLinear",
    "NestedSparseConv2d",
    "NestedSparseModule",
    "keep_index_buffers_local",
    "LevelBatchNorm",
    "level_batchnorms",
    "level_aware_modules",
    "set_level",
    "get_levels",
    "shared_copy",
    "parent_module",
]
