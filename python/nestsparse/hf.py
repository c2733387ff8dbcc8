"""Hugging Face transformers models, converted: save and load a directory the way save_pretrained / from_pretrained
do, with the nested layers kept.

transformers' own ``from_pretrained`` builds every layer dense from the config and fills it from the state dict, so
a converted model saved with its ``save_pretrained`` comes back with its nested layers re-initialised (transformers
only logs the unexpected and missing keys); :func:`guard_save_pretrained` makes a converted model's own
``save_pretrained`` (and ``push_to_hub``) refuse instead. ``nestsparse.hf.save_pretrained(model, directory)`` writes
the config (and generation config) as transformers does, the tokenizer when it has one, and the weights as one
nestsparse checkpoint (safetensors, checksummed, nothing runs on load) whose metadata pins the config files: an edit
to them that keeps every shape (an eps, the activation, ``tie_word_embeddings``, the rope scaling) would otherwise
load silently and change every output. ``nestsparse.hf.from_pretrained(directory)`` verifies the checksum and the
pinned configs before it builds anything, checks the checkpoint against a skeleton on the meta device (a config can
ask for any size), and only then builds the dense skeleton and loads the checkpoint into it, so the outputs are
bit-identical at every level. It never runs code from the directory nor asks anything on stdin (every transformers
call has ``trust_remote_code=False``; the config class comes from the model class, never from ``auto_map``), and
anything wrong with the directory ends in :class:`~nestsparse.io.CheckpointError`. transformers' Conv1D (GPT-2)
converts like nn.Linear. Needs the ``transformers`` package; reads local directories only.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import CheckpointError, guard_save_pretrained, open_regular, read_verified, save

__all__ = ["save_pretrained", "from_pretrained", "guard_save_pretrained", "WEIGHTS_NAME"]

WEIGHTS_NAME = "nestsparse.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# The checkpoint's user metadata (under its checksum): the model class, and the canonical JSON of each config file.
_CLASS_KEY = "transformers_class"
_PINNED = {CONFIG_NAME: "transformers_config", GENERATION_CONFIG_NAME: "transformers_generation_config"}
_MAX_JSON_BYTES = 16 << 20  # a config file is a few KB; a bigger one is refused before it is read
# Files any of which makes a directory one a tokenizer can be loaded from.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _transformers():
    try:
        import transformers  # noqa: PLC0415  (an optional dependency)
    except ImportError as exc:
        raise ImportError("nestsparse.hf needs transformers: pip install transformers") from exc
    return transformers


def _canonical(obj: Any) -> str:
    """The JSON text that pins a config: sorted keys, no spaces; equal for equal parsed configs however the file was
    indented (NaN is written as NaN, so it compares equal to itself)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in the regular file ``path``, or CheckpointError saying what is wrong with it. Opened without
    blocking (a FIFO would otherwise wait for a writer) and refused unless a regular file of at most
    ``_MAX_JSON_BYTES`` (/dev/zero would otherwise be read forever)."""
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; nestsparse.hf.save_pretrained writes it next to {WEIGHTS_NAME} (restore it, or save "
            "the model again)"
        ) from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror or e})") from e
    try:
        with f:
            raw = f.read(_MAX_JSON_BYTES + 1)  # st_size is only a hint (a /proc file says 0): count what is read
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e
    if len(raw) > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: more than {_MAX_JSON_BYTES} bytes; a config file is a few KB")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: the JSON nests too deeply: the file was altered") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid UTF-8 JSON ({e}): the file was altered, truncated or damaged") from e
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        raise CheckpointError(f"{path}: holds {kind}, not a JSON object: the file was altered")
    return obj


def _pin(path: Path) -> str:
    """The canonical JSON of the config file transformers just wrote at ``path``, to pin it in the checkpoint."""
    return _canonical(_read_json(path))


def _pinned(weights: Path, user: dict[str, str], name: str) -> dict[str, Any] | None:
    """The config that the (verified) checkpoint pins for the file ``name``, parsed; None when it pins none."""
    text = user.get(_PINNED[name])
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{weights}: the {name} it pins ({_PINNED[name]!r} metadata) is not a JSON object")
    return obj


def _check_pinned(path: Path, pinned: dict[str, Any], weights: Path) -> None:
    """Raises CheckpointError, naming the keys, unless the config file ``path`` is the one ``weights`` pins."""
    found = _read_json(path)
    try:
        if _canonical(found) == _canonical(pinned):
            return
        keys = sorted(
            k
            for k in set(found) | set(pinned)
            if k not in found or k not in pinned or _canonical(found[k]) != _canonical(pinned[k])
        )
    except RecursionError:
        raise CheckpointError(f"{path}: the JSON nests too deeply: the file was altered") from None
    shown = ", ".join(repr(k[:80]) for k in keys[:12]) + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")
    raise CheckpointError(
        f"{path}: differs from the {path.name} that {weights.name} was saved with (pinned under its checksum) in "
        f"{shown}: the file was edited after saving, and loading it would change what the model computes; restore "
        "it, or build the model you mean and convert and save it again"
    )


def _weights_path(directory: Path) -> Path:
    """``directory``'s nestsparse checkpoint, or CheckpointError saying what the directory holds instead."""
    path = directory / WEIGHTS_NAME
    try:
        if path.is_file():
            return path
        if not directory.is_dir():
            what = "not a directory" if os.path.lexists(directory) else "no such directory"
            raise CheckpointError(f"{directory}: {what} (nestsparse.hf.from_pretrained reads a directory)")
        if os.path.lexists(path):
            raise CheckpointError(
                f"{path}: not a regular file (a directory, FIFO, device, or a symlink that leads to none); "
                "nestsparse.hf.save_pretrained writes a file there"
            )
        found = sorted(p.name for p in directory.glob("*.safetensors"))
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot be read ({e.strerror or e})") from e
    hint = f" (it has {', '.join(found)}: a dense save_pretrained? load that with transformers)" if found else ""
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} (written by nestsparse.hf.save_pretrained){hint}")


def _recorded_class(transformers, weights: Path, user: dict[str, str]) -> type:
    """The transformers model class the checkpoint names; CheckpointError unless it is a PreTrainedModel of this
    transformers (the name comes from the file: any other object is refused, nothing else is imported)."""
    name = user.get(_CLASS_KEY)
    cls = None
    if isinstance(name, str) and name.isidentifier() and not name.startswith("_"):
        try:
            cls = getattr(transformers, name, None)
        except Exception as e:  # a lazy attribute whose module needs a missing optional dependency
            raise CheckpointError(
                f"{weights}: the recorded model class transformers.{name} cannot be imported ({type(e).__name__}: "
                f"{e}); install what it needs, or pass model_class"
            ) from e
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"{weights}: records no transformers model class this transformers has ({_CLASS_KEY} = {name!r}, not a "
            "PreTrainedModel subclass); pass model_class"
        )
    return cls


def _config(transformers, directory: Path, model_class: type, pinned: dict[str, Any]):
    """A fresh config of ``model_class``'s config class from the pinned dict (checked equal to config.json). The
    class comes from the model class, never from the file's ``auto_map``, so no code from the directory can run."""
    path = directory / CONFIG_NAME
    config_class = getattr(model_class, "config_class", None)
    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig  # (the 4.x name)
    if not (isinstance(config_class, type) and issubclass(config_class, base)):
        raise CheckpointError(f"{path}: {model_class.__name__} names no transformers config class to read it with")
    want = getattr(config_class, "model_type", "")
    if want and pinned.get("model_type") != want:
        raise CheckpointError(
            f"{path}: model_type {pinned.get('model_type', '(none)')!r}, but {model_class.__name__} reads {want!r} "
            "configs; pass the model_class this config is for"
        )
    try:
        return config_class.from_dict(json.loads(json.dumps(pinned)), name_or_path=str(directory))
    except Exception as e:  # whatever a config's own checks raise on values of the wrong type or range
        raise CheckpointError(
            f"{path}: transformers cannot build a {config_class.__name__} from it ({type(e).__name__}: {e})"
        ) from e


def _build(model_class: type, config, path: Path, device: str | None = None) -> nn.Module:
    """``model_class(config)`` (on ``device``), or CheckpointError naming the config it cannot be built from."""
    try:
        if device is None:
            return model_class(config)
        with torch.device(device):
            return model_class(config)
    except MemoryError:
        raise
    except Exception as e:
        where = " on the meta device" if device == "meta" else ""
        raise CheckpointError(
            f"{path}: {model_class.__name__} cannot be built{where} from it ({type(e).__name__}: {e})"
        ) from e


def _local_tokenizer(transformers, model: nn.Module):
    """The tokenizer in the local directory the model was loaded from (``config._name_or_path``), if it holds
    tokenizer files; None otherwise, or with a warning when it cannot be loaded. Never downloads, never runs code."""
    source = getattr(model.config, "_name_or_path", None)
    if not isinstance(source, str) or not source:
        return None
    src = Path(source)
    try:
        if not src.is_dir() or not any((src / name).is_file() for name in _TOKENIZER_FILES):
            return None
    except OSError:
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        warnings.warn(
            f"nestsparse.hf.save_pretrained: did not save the tokenizer of {src} (the model's config._name_or_path): "
            f"{type(e).__name__}: {e}; pass tokenizer= to save one",
            stacklevel=3,
        )
        return None


def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Writes ``model`` (a converted transformers PreTrainedModel) to ``directory``: config.json (and
    generation_config.json) as transformers writes them, the tokenizer, and the weights as nestsparse.safetensors,
    whose checksummed metadata pins both config files (from_pretrained refuses them edited). Returns the weights
    file's path.

    ``tokenizer`` (a transformers tokenizer) is written with its own ``save_pretrained``. Without one, the tokenizer
    of the local directory the model was loaded from (``model.config._name_or_path``), if it holds tokenizer files,
    is loaded (AutoTokenizer, local files only, no remote code) and written; a user then loads it with AutoTokenizer
    from ``directory``. from_pretrained reads the model only; the tokenizer files are not pinned."""
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"nestsparse.hf.save_pretrained: expected a transformers PreTrainedModel, got {type(model).__name__} "
            "(use nestsparse.save for other models)"
        )
    if tokenizer is not None and not isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        raise TypeError(
            f"nestsparse.hf.save_pretrained: tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
        )
    if tokenizer is None:
        tokenizer = _local_tokenizer(transformers, model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)  # first: the config files written next are the ones pinned
    model.config.save_pretrained(directory)
    metadata = {_CLASS_KEY: type(model).__name__, _PINNED[CONFIG_NAME]: _pin(directory / CONFIG_NAME)}
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
        metadata[_PINNED[GENERATION_CONFIG_NAME]] = _pin(directory / GENERATION_CONFIG_NAME)
    path = directory / WEIGHTS_NAME
    save(model, path, metadata=metadata)
    return path


def from_pretrained(directory: str | os.PathLike, model_class: type | None = None, map_location="cpu") -> nn.Module:
    """The model ``save_pretrained`` wrote to ``directory``, in eval mode, its own ``save_pretrained`` guarded
    (:func:`guard_save_pretrained`): the config's model class (or ``model_class``, a transformers PreTrainedModel
    subclass) built from config.json, then the nested checkpoint loaded into it (checked against it layer by layer).

    In this order, so that a hostile directory costs no more than its files' size and runs nothing: the checkpoint's
    checksum is verified; config.json (and generation_config.json when the checkpoint pins one; an unpinned one is
    ignored) must be the one the checkpoint pins; the model is built on the meta device and the checkpoint checked
    against it; only then is the real model built and filled. Anything wrong ends in CheckpointError."""
    transformers = _transformers()
    if model_class is not None and not (
        isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
    ):
        raise TypeError(f"nestsparse.hf.from_pretrained: model_class must be a PreTrainedModel subclass: {model_class}")
    directory = Path(directory)
    weights = _weights_path(directory)
    try:
        checkpoint = read_verified(weights)
    except CheckpointError:
        raise
    except Exception as e:  # the file vanished or changed kind since it was looked at
        raise CheckpointError(f"{weights}: cannot be read ({type(e).__name__}: {e})") from e
    user = checkpoint.user
    config_dict = _pinned(weights, user, CONFIG_NAME)
    if config_dict is None:
        raise CheckpointError(
            f"{weights}: pins no config.json (written by another tool, or by an older nestsparse.hf that did not "
            "pin it); load it into a model you build as nestsparse.load(path, model=...), then save that with "
            "nestsparse.hf.save_pretrained"
        )
    _check_pinned(directory / CONFIG_NAME, config_dict, weights)
    generation = _pinned(weights, user, GENERATION_CONFIG_NAME)
    if generation is not None:
        _check_pinned(directory / GENERATION_CONFIG_NAME, generation, weights)
    if model_class is None:
        model_class = _recorded_class(transformers, weights, user)
    config_path = directory / CONFIG_NAME
    meta = _build(model_class, _config(transformers, directory, model_class, config_dict), config_path, "meta")
    try:
        checkpoint.check_fits(meta)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{weights}: does not fit the {model_class.__name__} of {config_path} ({type(e).__name__}: {e})"
        ) from e
    del meta
    skeleton = _build(model_class, _config(transformers, directory, model_class, config_dict), config_path)
    if generation is not None and skeleton.can_generate():
        try:
            gen = transformers.GenerationConfig.from_dict(generation)
            gen._original_object_hash = hash(gen)  # as GenerationConfig.from_pretrained marks it unmodified
        except Exception as e:
            raise CheckpointError(
                f"{directory / GENERATION_CONFIG_NAME}: transformers cannot build a GenerationConfig from it "
                f"({type(e).__name__}: {e})"
            ) from e
        skeleton.generation_config = gen
    try:
        model = checkpoint.load_into(skeleton, map_location)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{weights}: cannot be loaded into {model_class.__name__} ({type(e).__name__}: {e})"
        ) from e
    return guard_save_pretrained(model.eval())
