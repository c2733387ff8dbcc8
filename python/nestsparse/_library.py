"""Loads the compiled library, refusing one built for another torch with a message that says what to do."""

from __future__ import annotations

import torch

_REBUILD = "rebuild it against the torch you run: pip install --no-build-isolation --no-deps --force-reinstall ."


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
    try:
        from . import _C
    except ImportError as exc:
        raise ImportError(f"nestsparse: the compiled library failed to load ({exc}); {_REBUILD}") from exc
    return _C


_C = _load()
