"""Loads the op library (libnestsparse.so), refusing one built for another torch with a message that says what to
do. The library is a plain torch op library with no Python in it (a C++ program running an exported model loads the
same file); the build facts Python checks before loading it are in the small generated module ``_build_info``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_REBUILD = "rebuild it against the torch you run: pip install --no-build-isolation --no-deps --force-reinstall ."
LIBRARY_NAME = "libnestsparse.dylib" if sys.platform == "darwin" else "libnestsparse.so"


def library_path() -> str:
    """The op library's path: what ``torch.ops.load_library`` takes in a process that runs an exported model
    without importing nestsparse, and what a C++ program dlopens or links next to libtorch."""
    from . import _build_info  # noqa: PLC0415  (installed next to the library, also in an editable install)

    return str(Path(_build_info.__file__).with_name(LIBRARY_NAME))


def _load():
    try:
        from . import _build_info
    except ImportError as exc:  # pragma: no cover - only without a build
        raise ImportError(
            f"nestsparse: the compiled library is missing ({exc}); build the package first: {_REBUILD}"
        ) from exc
    built, running = _build_info.TORCH_VERSION, torch.__version__
    if built.split("+")[0] != running.split("+")[0]:
        raise ImportError(
            f"nestsparse: the compiled library was built for torch {built}, but torch {running} is installed; "
            f"{_REBUILD}"
        )
    path = library_path()
    if not Path(path).is_file():
        raise ImportError(f"nestsparse: the compiled library {path} is missing; {_REBUILD}")
    try:
        torch.ops.load_library(path)
    except OSError as exc:
        raise ImportError(f"nestsparse: the compiled library failed to load ({exc}); {_REBUILD}") from exc
    return torch.ops.nestsparse


# The library's ops, its settings and build facts included (torch.ops.nestsparse.cpu_isa() and so on).
native = _load()
