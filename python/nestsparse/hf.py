"""Hugging Face transformers models, converted: save and load a directory the way save_pretrained / from_pretrained
do, with the nested layers kept.

transformers' own ``from_pretrained`` builds every layer dense from the config and fills it from the state dict, so
a converted model saved with its ``save_pretrained`` comes back with its nested layers re-initialised (transformers
only logs the unexpected and missing keys). ``nestsparse.hf.save_pretrained(model, directory)`` writes the config
(and generation config) as transformers does and the weights as one nestsparse checkpoint (safetensors, checksummed,
nothing runs on load); ``nestsparse.hf.from_pretrained(directory)`` builds the dense skeleton from the config and
loads the checkpoint into it, so the outputs are bit-identical at every level. transformers' Conv1D (GPT-2)
converts like nn.Linear. Needs the ``transformers`` package; reads local directories only.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from .io import CheckpointError, load, save

__all__ = ["save_pretrained", "from_pretrained", "WEIGHTS_NAME"]

WEIGHTS_NAME = "nestsparse.safetensors"
_CLASS_KEY = "transformers_class"


def _transformers():
    try:
        import transformers  # noqa: PLC0415  (an optional dependency)
    except ImportError as exc:
        raise ImportError("nestsparse.hf needs transformers: pip install transformers") from exc
    return transformers


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes ``model`` (a converted transformers PreTrainedModel) to ``directory``: config.json (and
    generation_config.json) as transformers writes them, and the weights as nestsparse.safetensors. Returns the
    weights file's path."""
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"nestsparse.hf.save_pretrained: expected a transformers PreTrainedModel, got {type(model).__name__} "
            "(use nestsparse.save for other models)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    path = directory / WEIGHTS_NAME
    save(model, path, metadata={_CLASS_KEY: type(model).__name__})
    return path


def from_pretrained(directory: str | os.PathLike, model_class: type | None = None, map_location="cpu") -> nn.Module:
    """The model ``save_pretrained`` wrote to ``directory``, in eval mode: the config's model class (or
    ``model_class``, a transformers PreTrainedModel subclass) built from config.json, then the nested checkpoint
    loaded into it (checked against it layer by layer)."""
    transformers = _transformers()
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        found = sorted(p.name for p in directory.glob("*.safetensors")) if directory.is_dir() else []
        hint = f" (it has {', '.join(found)}: a dense save_pretrained? load that with transformers)" if found else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} (written by nestsparse.hf.save_pretrained){hint}")
    if model_class is None:
        try:
            with safe_open(path, "pt") as f:  # the header only: load() reads and verifies the whole file once
                name = (f.metadata() or {}).get(_CLASS_KEY)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        model_class = getattr(transformers, name, None) if isinstance(name, str) else None
        if model_class is None:
            raise CheckpointError(
                f"{path}: records no transformers model class this transformers has ({name!r}); pass model_class"
            )
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise TypeError(f"nestsparse.hf.from_pretrained: model_class must be a PreTrainedModel subclass: {model_class}")
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    skeleton = model_class(config)
    if skeleton.can_generate() and (directory / "generation_config.json").is_file():
        skeleton.generation_config = transformers.GenerationConfig.from_pretrained(directory, local_files_only=True)
    return load(path, model=skeleton, map_location=map_location).eval()
