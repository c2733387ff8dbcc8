"""nestsparse: multi-level nested sparse neural networks.

One weight buffer holds several sparsity levels (level 0 densest); a sparser level's non-zeros, positions
and values, are a subset of every denser level's. Pick the level per call, or switch it mid-inference.

This package is the library core; the applications built on it (demo, qos command, load scenarios, model zoo,
datasets, training tasks) are in nestsparse.apps. ARCHITECTURE.md maps the code.
"""

from . import formats, ops, pruning, runtime
from ._library import library_path, native
from .convert import choose_dense_levels, convert, to_dense
from .deploy import LevelInput, export
from .formats import DEFAULT_BLOCK_SHAPE, FORMATS, FormatError, NestedBCR, NestedCSR, NestedFormat
from .fuse import fuse
from .io import CheckpointError, load, register_architecture, save
from .nn import (
    LevelAware,
    LevelBatchNorm,
    NestedSparseConv1d,
    NestedSparseConv2d,
    NestedSparseLinear,
    NestedSparseModule,
    NestedSparseRNN,
    get_levels,
    keep_index_buffers_local,
    level_aware_modules,
    level_batchnorms,
    set_level,
    shared_copy,
)
from .ops import check_errors, deferred_checks, set_deferred_checks
from .pruning import (
    LevelSpec,
    bcr_tags,
    global_bcr_tags,
    global_magnitude_tags,
    magnitude_tags,
    masks_from_tags,
    model_tags,
    prunable_layers,
    tags_from_masks,
)
from .version import __version__


def cpu_isa() -> str:
    """The instruction set the CPU kernels use ('generic', 'avx2' or 'avx512')."""
    return native.cpu_isa()


def set_output_pool_limit(nbytes: int) -> int:
    """The most bytes of freed large CPU outputs (>= 1 MiB) the ops keep to reuse; returns the previous limit.

    Reusing them saves the page faults of fresh memory on every forward (ResNet-50 at batch 16: 217k faults and
    a third of the CPU time without it). The default is 1 GiB; 0 gives every buffer back to the system at once.
    """
    return native.set_output_pool_limit(int(nbytes))


def output_pool_stats() -> dict:
    """The CPU output pool: bytes cached now, and allocations served from it (hits) or from the system (misses)."""
    cached, hits, misses = native.output_pool_stats()
    return {"cached_bytes": cached, "hits": hits, "misses": misses}


def build_info() -> dict:
    """How the compiled library was built and what it runs on here."""
    return {
        "version": __version__,
        "torch_built": native.torch_version(),
        "with_cuda": native.with_cuda(),
        "cpu_isa": native.cpu_isa(),
        "cpu_isas": native.cpu_isas(),
        "library": library_path(),
    }


__all__ = [
    "check_errors",
    "deferred_checks",
    "set_deferred_checks",
    "fuse",
    "choose_dense_levels",
    "set_output_pool_limit",
    "output_pool_stats",
    "NestedFormat",
    "NestedCSR",
    "NestedBCR",
    "FORMATS",
    "DEFAULT_BLOCK_SHAPE",
    "FormatError",
    "bcr_tags",
    "global_bcr_tags",
    "NestedSparseLinear",
    "NestedSparseConv2d",
    "NestedSparseConv1d",
    "NestedSparseRNN",
    "NestedSparseModule",
    "LevelAware",
    "LevelBatchNorm",
    "level_batchnorms",
    "level_aware_modules",
    "set_level",
    "shared_copy",
    "get_levels",
    "keep_index_buffers_local",
    "convert",
    "to_dense",
    "LevelSpec",
    "magnitude_tags",
    "global_magnitude_tags",
    "model_tags",
    "masks_from_tags",
    "tags_from_masks",
    "prunable_layers",
    "save",
    "load",
    "register_architecture",
    "CheckpointError",
    "formats",
    "ops",
    "pruning",
    "runtime",
    "cpu_isa",
    "build_info",
    "library_path",
    "native",
    "export",
    "LevelInput",
]
