"""Storage formats for nested sparse weights: every level of a weight in one buffer.

- ``NestedCSR`` (nested CSR, any tags) and ``NestedBCR`` (nested block column-row, structured tags) implement
  ``NestedFormat``, the interface the rest of the library uses;
- ``FORMATS`` maps a format's name ("ncsr", "nbcr": the prefix of its ops) to its class.

The C++ contracts are at the top of csrc/formats/ncsr.h and csrc/formats/nbcr.h.
"""

from .base import FormatError, NestedFormat
from .blocks import DEFAULT_BLOCK_SHAPE
from .nbcr import NestedBCR
from .ncsr import NestedCSR

__all__ = [
    "NestedFormat",
    "NestedCSR",
    "NestedBCR",
    "FormatError",
    "DEFAULT_BLOCK_SHAPE",
    "FORMATS",
    "format_class",
    "from_dense",
]

FORMATS: dict[str, type[NestedFormat]] = {cls.name: cls for cls in (NestedCSR, NestedBCR)}


def format_class(name: str) -> type[NestedFormat]:
    """The format class named ``name``; ValueError naming the known formats otherwise."""
    cls = FORMATS.get(name)
    if cls is None:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return cls


def from_dense(
    format: str, weight, tags, *, num_levels: int | None = None, densities: tuple[float, ...] = (), **options
) -> NestedFormat:
    """``weight`` packed by ``tags`` in the format named ``format``. Options the format does not have (block_shape
    for "ncsr") are not used."""
    cls = format_class(format)
    own = {k: v for k, v in options.items() if k in cls.option_lengths}
    return cls.from_dense(weight, tags, num_levels=num_levels, densities=densities, **own)
