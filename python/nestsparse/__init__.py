"""nestsparse: multi-level nested sparse neural networks.

One weight buffer holds several sparsity levels (level 0 densest); a sparser level's non-zeros, positions
and values, are a subset of every denser level's. Pick the level per call, or switch it mid-inference.
"""

from ._library import _C
from . import ops, pruning
from .convert import convert, to_dense
from .io import CheckpointError, load, save
from .formats import DEFAULT_BLOCK_SHAPE, FormatError, NestedBCR, NestedCSR
from .nn import (LevelBatchNorm, NestedSparseConv2d, NestedSparseLinear, NestedSparseModule, get_levels,
                 level_batchnorms, set_level)
from .pruning import (LevelSpec, bcr_tags, global_bcr_tags, global_magnitude_tags, magnitude_tags, masks_from_tags,
                      model_tags, prunable_layers, tags_from_masks)

__version__ = "0.1.0"


def cpu_isa() -> str:
    """The instruction set the CPU kernels use ('generic', 'avx2' or 'avx512')."""
    return _C.cpu_isa()


def build_info() -> dict:
    """How the compiled library was built and what it runs on here."""
    return {"version": __version__, "torch_built": _C.torch_version(), "with_cuda": _C.with_cuda(),
            "cpu_isa": _C.cpu_isa(), "cpu_isas": _C.cpu_isas()}


__all__ = [
    "NestedCSR", "NestedBCR", "DEFAULT_BLOCK_SHAPE", "FormatError", "bcr_tags", "global_bcr_tags", "NestedSparseLinear",
    "NestedSparseConv2d", "NestedSparseModule", "LevelBatchNorm", "level_batchnorms", "set_level", "get_levels",
    "convert", "to_dense", "LevelSpec", "magnitude_tags", "global_magnitude_tags", "model_tags", "masks_from_tags",
    "tags_from_masks", "prunable_layers", "save", "load", "CheckpointError", "ops", "pruning", "cpu_isa", "build_info",
]
