"""Saving and loading converted nested sparse models, as safetensors files (never pickle).

File layout (one standard safetensors file, readable by any safetensors reader):

- 8 bytes: little-endian u64 ``N``, the length of the JSON header that follows;
- ``N`` bytes: the JSON header (padded with spaces). It maps every tensor name to its dtype, shape and byte
  range, and holds ``"__metadata__"`` (str -> str): the user's ``metadata`` entries and, under the key
  ``"nestsparse"``, one JSON string describing the model (below);
- the raw bytes of every tensor of ``model.state_dict()``, contiguous, little-endian, no gaps.

The tensors are the model's state dict as it is, nothing duplicated: each nested layer contributes its ONE
values buffer (all levels) and its index arrays ("level tables": ``col_idx``/``row_ptr``/``row_end`` for
nested CSR, ``indices``/``block_ptr``/``blocks``/``counts`` for nested BCR) and its bias; a LevelBatchNorm its
per-level running statistics; every other module its ordinary parameters and buffers. A tensor tied under
two names is stored once and recorded as an alias. The file is therefore the densest level's storage plus
the dense rest plus the header.

The ``"nestsparse"`` description (JSON object, compact, ``checksum`` first):

- ``checksum``: ``"sha256:<hex>"`` over the user metadata, this description (with the checksum's hex digits
  replaced by zeros) and, in sorted name order, every tensor's name, dtype, shape and raw bytes;
- ``format_version`` (1; 2 when a convolution pads otherwise than symmetric zeros: a reader of version 1 would
  ignore ``padding_mode`` and compute another function, so it must refuse the file), ``nestsparse_version``;
- ``arch``: ``model.arch`` when the model has one (``{"name": ..., "kwargs": {...}}``, as the builders of the
  model zoo, nestsparse.apps.models, set it), else null; lets :func:`load` rebuild the skeleton without
  ``model=`` when a builder of that name is registered (:func:`register_architecture`; importing the zoo
  registers its models);
- ``level``: the level of every level-aware module (one int), a ``{module name: level}`` map when they
  differ, or null when the model has none;
- ``nested``: ``{module name: {kind: linear|conv2d|conv1d, format: ncsr|nbcr, weight_shape, densities,
  activation, bias, dtype, the format's options (block_shape for nbcr), stride, padding (a pair, or "same"),
  dilation, groups, and padding_mode when it is not "zeros"}}``
  (the geometry for the convolutions only; a conv1d is stored as the one-row conv2d it runs as: a (Cout,
  Cin/groups, 1, k) weight and pairs);
- ``recurrent`` (when there are any): ``{module name: NestedSparseRNN constructor arguments}``, its gate matrices
  under ``nested`` as ``<module name>.cells.<torch weight name>``;
- ``level_batchnorms``: ``{module name: LevelBatchNorm constructor arguments}``;
- ``identities``: names of the nn.Identity modules (where ``convert`` fused an activation into the layer
  before);
- ``aliases``: ``{name: stored name}`` for tensors tied to another state-dict entry.

Loading fills the skeleton in place and, like ``load_state_dict``, leaves its train/eval mode alone; a model that
``load`` builds from the arch itself is returned in eval mode (call ``.train()`` to fine-tune it). It never
executes code from the file: safetensors parses a JSON header and copies raw bytes, and
every index array is checked by its format's ``validate()`` before a kernel sees it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .formats import FORMATS, FormatError
from .nn import (
    RECURRENT,
    LevelBatchNorm,
    NestedSparseConv1d,
    NestedSparseConv2d,
    NestedSparseLinear,
    NestedSparseModule,
    NestedSparseRNN,
    is_transposed_linear,
    keep_index_buffers_local,
    level_aware_modules,
    parent_module,
)
from .version import __version__

__all__ = [
    "save",
    "load",
    "read_verified",
    "open_regular",
    "VerifiedCheckpoint",
    "guard_save_pretrained",
    "read_metadata",
    "register_architecture",
    "CheckpointError",
    "FORMAT_VERSION",
    "METADATA_KEY",
]

FORMAT_VERSION = 2
METADATA_KEY = "nestsparse"
_CHECKSUM_RE = re.compile(r'^\{"checksum":"sha256:([0-9a-f]{64})"')
_PLACEHOLDER = "0" * 64
_BN_ARGS = ("num_features", "num_levels", "eps", "momentum", "affine", "per_level_affine")


class CheckpointError(ValueError):
    """A checkpoint file cannot be loaded (or a model cannot be saved); the message names the file and why."""


# Builders of the architectures load() can rebuild without model=, by the name recorded in model.arch.
_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
# Installed packages name the modules that register architectures under this entry-point group (nestsparse's own
# model zoo among them, see pyproject.toml); load() imports them when it meets a name nothing registered yet.
ARCHITECTURE_ENTRY_POINTS = "nestsparse.architectures"


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Lets :func:`load` rebuild models whose ``arch`` names ``name`` as ``builder(**arch["kwargs"])`` (the
    model zoo, nestsparse.apps.models, registers its models when it is imported)."""
    if not isinstance(name, str) or not callable(builder):
        raise TypeError(f"register_architecture: expected a name and a callable, got {name!r}, {builder!r}")
    _ARCHITECTURES[name] = builder


def _architecture(name: str) -> Callable[..., nn.Module] | None:
    """The builder registered for ``name``, after importing the installed packages' architecture modules if
    none is yet. The modules come from the packages' metadata, never from the file being loaded."""
    if name not in _ARCHITECTURES:
        for entry in importlib.metadata.entry_points(group=ARCHITECTURE_ENTRY_POINTS):
            entry.load()
    return _ARCHITECTURES.get(name)


# ---- shared helpers ---------------------------------------------------------------------------------


def open_regular(path: str | os.PathLike):
    """``path`` opened for binary reading, refused with a ValueError naming it unless it is a regular file: opening a
    FIFO waits for a writer, a device never ends. The open does not block (O_NONBLOCK, which regular files ignore);
    fstat then says what was opened. A missing file raises FileNotFoundError as open does."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file (a directory, FIFO, socket or device)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _checksum(description: str, user: Mapping[str, str], tensors: Mapping[str, Tensor]) -> str:
    """The SHA-256 hex digest of the user metadata, the description string and every tensor (sorted by name)."""
    h = hashlib.sha256(b"nestsparse-checkpoint\n")
    h.update(json.dumps(sorted(user.items()), separators=(",", ":")).encode() + b"\n")
    h.update(description.encode() + b"\n")
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        h.update(json.dumps([name, str(t.dtype), list(t.shape), raw.numel()], separators=(",", ":")).encode() + b"\n")
        h.update(raw.numpy())
    return h.hexdigest()


def _key(module: str, tensor: str) -> str:
    """The state-dict key of ``tensor`` in the module named ``module`` ("" for the root)."""
    return f"{module}.{tensor}" if module else tensor


# ---- save -------------------------------------------------------------------------------------------


def _refuse_parametrized(model: nn.Module) -> None:
    """Raises ValueError naming the first module that still carries training-time parametrizations."""
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            raise ValueError(
                f"save: module {name or '<root>'!r} ({type(m).__name__}) still has training-time "
                "parametrizations (level masks); call nestsparse.pruning.unmask(model) and then "
                "nestsparse.convert(...) to get a nested sparse model before saving"
            )


def _kind(m: NestedSparseModule) -> str:
    """The layer kind a file records: "linear", "conv2d" or "conv1d" (a one-row conv2d, geometry as pairs)."""
    if isinstance(m, NestedSparseConv1d):
        return "conv1d"
    return "conv2d" if isinstance(m, NestedSparseConv2d) else "linear"


_KINDS = {
    "linear": (nn.Linear, NestedSparseLinear),
    "conv2d": (nn.Conv2d, NestedSparseConv2d),
    "conv1d": (nn.Conv1d, NestedSparseConv1d),
}


def _describe_nested(m: NestedSparseModule) -> dict[str, Any]:
    """The constructor arguments of a nested layer, besides its tensors."""
    d: dict[str, Any] = {
        "kind": _kind(m),
        "format": m.format,
        "weight_shape": [int(s) for s in m.weight_shape],
        **{k: [int(v) for v in o] for k, o in m.options.items()},
        "densities": [float(x) for x in m.densities],
        "activation": m.activation,
        "bias": m.bias is not None,
        "dtype": str(m.values.dtype).removeprefix("torch."),
    }
    if isinstance(m, NestedSparseConv2d):
        d.update(
            stride=[int(x) for x in m.stride],
            padding=m.padding if isinstance(m.padding, str) else [int(x) for x in m.padding],
            dilation=[int(x) for x in m.dilation],
            groups=int(m.groups),
        )
        if m.padding_mode != "zeros":
            d["padding_mode"] = m.padding_mode
    return d


def _describe_levels(model: nn.Module) -> int | dict[str, int] | None:
    """One level if every level-aware module uses the same, else a map by module name; None without any."""
    levels = {name: int(m.level) for name, m in level_aware_modules(model).items()}
    if not levels:
        return None
    distinct = set(levels.values())
    return distinct.pop() if len(distinct) == 1 else levels


def _describe(model: nn.Module) -> dict[str, Any]:
    """The "nestsparse" description of ``model`` (without checksum and aliases)."""
    arch = getattr(model, "arch", None)
    if arch is not None:
        try:
            arch = json.loads(json.dumps(arch))
        except (TypeError, ValueError) as e:
            raise ValueError(f"save: model.arch must be JSON-serialisable, got {arch!r}") from e
    nested, bns, identities, recurrent = {}, {}, [], {}
    for name, m in model.named_modules():
        if isinstance(m, (NestedSparseLinear, NestedSparseConv2d)):
            nested[name] = _describe_nested(m)
        elif isinstance(m, NestedSparseRNN):
            recurrent[name] = m.describe()
        elif isinstance(m, LevelBatchNorm):
            bns[name] = {
                "num_features": int(m.num_features),
                "num_levels": int(m.num_levels),
                "eps": float(m.eps),
                "momentum": None if m.momentum is None else float(m.momentum),
                "affine": bool(m.affine),
                "per_level_affine": bool(m.per_level_affine),
            }
        elif isinstance(m, nn.Identity) and name:
            identities.append(name)
    version_2 = any(d.get("padding_mode", "zeros") != "zeros" or d.get("padding") == "same" for d in nested.values())
    return {
        "format_version": 2 if version_2 else 1,
        "nestsparse_version": __version__,
        "arch": arch,
        "level": _describe_levels(model),
        "nested": nested,
        "level_batchnorms": bns,
        "identities": identities,
        **({"recurrent": recurrent} if recurrent else {}),
    }


def _stored_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict as contiguous CPU tensors, each storage once; and the aliases of tied entries."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in model.state_dict().items():
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        key = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out = t.cpu().contiguous()
        if t.numel() and storage in storages:
            out = out.clone()  # a view into storage another entry shares: safetensors stores each on its own
        storages.add(storage)
        tensors[name] = out
    return tensors, aliases


def save(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> int:
    """Writes a converted ``model`` to one safetensors file at ``path``; returns the bytes written."""
    from safetensors.torch import save_file

    _refuse_parametrized(model)
    user = dict(metadata or {})
    for k, v in user.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"save: metadata must map str to str, got {k!r}: {v!r}")
        if k == METADATA_KEY:
            raise ValueError(f"save: metadata key {METADATA_KEY!r} is reserved")
    tensors, aliases = _stored_tensors(model)
    desc = {"checksum": "sha256:" + _PLACEHOLDER, **_describe(model), "aliases": aliases}
    text = json.dumps(desc, separators=(",", ":"))
    digest = _checksum(text, user, tensors)
    text = text.replace(_PLACEHOLDER, digest, 1)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={**user, METADATA_KEY: text})
        os.replace(tmp, path)  # never leaves a half-written file under the real name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


# ---- load -------------------------------------------------------------------------------------------


def _read(path: str) -> tuple[dict[str, Any], str, dict[str, str], dict[str, Tensor]]:
    """The parsed description, its raw string, the user metadata and every tensor (on CPU), unverified."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"nestsparse.io.load: no such file: {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError and whatever a damaged header makes the parser raise
        raise CheckpointError(f"{path}: not a safetensors file, or truncated or damaged ({e})") from e
    text = meta.pop(METADATA_KEY, None)
    if text is None:
        raise CheckpointError(f"{path}: no {METADATA_KEY!r} metadata; the file was not written by nestsparse.io.save")
    try:
        desc = json.loads(text)
    except RecursionError as e:
        raise CheckpointError(f"{path}: the {METADATA_KEY!r} metadata nests too deeply: the file was altered") from e
    except ValueError as e:
        raise CheckpointError(
            f"{path}: the {METADATA_KEY!r} metadata is not valid JSON: the file was altered or damaged"
        ) from e
    if not isinstance(desc, dict):
        raise CheckpointError(
            f"{path}: the {METADATA_KEY!r} metadata is not a JSON object: the file was altered or damaged"
        )
    return desc, text, meta, tensors


def _verify(path: str, text: str, user: Mapping[str, str], tensors: Mapping[str, Tensor]) -> None:
    """Raises CheckpointError unless the stored checksum matches the metadata and tensors."""
    m = _CHECKSUM_RE.match(text)
    if m is None:
        raise CheckpointError(
            f"{path}: the nestsparse metadata has no checksum where it should: the file was altered or damaged"
        )
    stored = m.group(1)
    expect = _checksum(text.replace(stored, _PLACEHOLDER, 1), user, tensors)
    if expect != stored:
        raise CheckpointError(
            f"{path}: checksum mismatch (stored sha256 {stored[:12]}..., computed "
            f"{expect[:12]}...): the file was altered or damaged"
        )


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The nestsparse description of a checkpoint (checksum verified), with the user metadata under "user"."""
    path = os.fspath(path)
    desc, text, user, tensors = _read(path)
    _verify(path, text, user, tensors)
    return {**desc, "user": user}


def _skeleton_from_arch(path: str, arch: Any, device: str | None = None) -> nn.Module:
    """A fresh dense model of the recorded architecture, from its registered builder (its tensors on ``device``:
    "meta" builds it without allocating anything)."""
    if arch is None:
        raise CheckpointError(
            f"{path}: the file records no architecture (the saved model had no .arch); pass "
            "the dense model to fill as load(path, model=...)"
        )
    if (
        not isinstance(arch, dict)
        or not isinstance(arch.get("name"), str)
        or not isinstance(arch.get("kwargs", {}), dict)
    ):
        raise CheckpointError(f"{path}: malformed arch {arch!r}; expected {{'name': str, 'kwargs': dict}}")
    try:
        builder = _architecture(arch["name"])
    except Exception as e:
        raise CheckpointError(
            f"{path}: looking up arch {arch['name']!r}, an installed module that registers "
            f"architectures ({ARCHITECTURE_ENTRY_POINTS} entry point) failed to import: {e}"
        ) from e
    if builder is None:
        raise CheckpointError(
            f"{path}: unknown arch {arch['name']!r} (registered: {sorted(_ARCHITECTURES)}); "
            "import the module that registers it (the model zoo, nestsparse.apps.models, registers itself when "
            "nestsparse is installed) "
            "or pass the dense model as load(path, model=...)"
        )
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return builder(**arch.get("kwargs", {}))
    except Exception as e:
        raise CheckpointError(
            f"{path}: arch {arch['name']!r} cannot be built with the arguments {arch.get('kwargs', {})!r}: {e}"
        ) from e


def _conv_geometry(m: nn.Module, one_row: bool = False) -> dict[str, Any]:
    """Stride, padding ("same" or a list), dilation, groups and padding mode of a dense or nested conv, comparable
    with the file's; with
    ``one_row``, a dense nn.Conv1d's as the one-row conv2d it runs as."""
    padding = (0,) * len(m.stride) if m.padding == "valid" else m.padding
    geo = {"stride": m.stride, "padding": padding, "dilation": m.dilation}
    if one_row:
        geo = {k: v if isinstance(v, str) else (0 if k == "padding" else 1, *v) for k, v in geo.items()}
    return {
        **{k: v if isinstance(v, str) else [int(x) for x in v] for k, v in geo.items()},
        "groups": int(m.groups),
        "padding_mode": m.padding_mode,
    }


def _check_slot(path: str, model: nn.Module, name: str, d: Mapping[str, Any]) -> None:
    """Raises CheckpointError unless the skeleton has a layer of the recorded kind, shape and geometry."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"{path}: skeleton mismatch: the file has a nested {d['kind']} layer {name!r} but "
            "the model has no module of that name"
        ) from None
    kind = d["kind"]
    if kind not in _KINDS:
        raise CheckpointError(f"{path}: layer {name!r} has unknown kind {kind!r} (expected one of {list(_KINDS)})")
    dense_cls, nested_cls = _KINDS[kind]
    if isinstance(old, NestedSparseModule) and _kind(old) != kind:
        raise CheckpointError(
            f"{path}: skeleton mismatch at layer {name!r}: the file has a nested {kind} layer, the model a "
            f"nested {_kind(old)} layer"
        )
    if isinstance(old, nested_cls):
        shape, has_bias = tuple(old.weight_shape), old.bias is not None
    elif isinstance(old, dense_cls):
        shape, has_bias = tuple(old.weight.shape), old.bias is not None
        if kind == "conv1d":  # stored as the one-row conv2d it runs as
            shape = (*shape[:2], 1, *shape[2:])
    elif kind == "linear" and is_transposed_linear(old):  # transformers' Conv1D: weight (in, out)
        shape, has_bias = tuple(old.weight.shape[::-1]), old.bias is not None
    else:
        raise CheckpointError(
            f"{path}: skeleton mismatch at layer {name!r}: the file has a nested {kind} layer, "
            f"the model has a {type(old).__name__} (expected nn.{dense_cls.__name__})"
        )
    want = tuple(d["weight_shape"])
    if shape != want:
        raise CheckpointError(
            f"{path}: skeleton mismatch at layer {name!r}: weight shape in the file {want}, in the model {shape}"
        )
    if has_bias != bool(d["bias"]):
        raise CheckpointError(
            f"{path}: skeleton mismatch at layer {name!r}: the file "
            f"{'has' if d['bias'] else 'has no'} bias, the model {'has' if has_bias else 'has no'}"
        )
    if kind in ("conv2d", "conv1d"):
        got = _conv_geometry(old, one_row=kind == "conv1d" and not isinstance(old, nested_cls))
        want_geo = {k: d[k] for k in ("stride", "padding", "dilation", "groups")}
        want_geo["padding_mode"] = d.get("padding_mode", "zeros")
        if got != want_geo:
            raise CheckpointError(
                f"{path}: skeleton mismatch at layer {name!r}: conv geometry in the file {want_geo}, in the model {got}"
            )


def _nested_module(path: str, name: str, d: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> NestedSparseModule:
    """The nested layer ``name`` rebuilt from its description and stored tensors, its index arrays validated."""
    fmt = d["format"]
    cls = FORMATS.get(fmt)
    if cls is None:
        raise CheckpointError(f"{path}: layer {name!r} has unknown format {fmt!r}")
    needed = ("values",) + cls.index_names + (("bias",) if d["bias"] else ())
    missing = [_key(name, k) for k in needed if _key(name, k) not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing} of nested layer {name!r}")
    weight = cls.from_parts(
        tensors[_key(name, "values")],
        {k: tensors[_key(name, k)] for k in cls.index_names},
        [int(s) for s in d["weight_shape"]],
        d["densities"],
        **{k: d[k] for k in cls.option_lengths},
    )
    try:
        weight.validate()
    except FormatError as e:
        raise CheckpointError(f"{path}: corrupted index arrays in layer {name!r}: {e}") from e
    bias = tensors[_key(name, "bias")] if d["bias"] else None
    if bias is not None:
        _check_bias(path, name, bias, weight.values, int(weight.weight_shape[0]))
    if d["kind"] in ("conv2d", "conv1d"):
        return _KINDS[d["kind"]][1](
            weight,
            bias,
            d["stride"],
            d["padding"],
            d["dilation"],
            int(d["groups"]),
            d["activation"],
            padding_mode=d.get("padding_mode", "zeros"),
        )
    return NestedSparseLinear(weight, bias, d["activation"])


def _check_bias(path: str, name: str, bias: Tensor, values: Tensor, rows: int) -> None:
    """A nested layer's bias: 1-D of one entry per output row, in the dtype of the layer's values (the ops
    refuse anything else, so a model loaded with it would fail on every forward)."""
    if bias.dim() != 1 or bias.shape[0] != rows or bias.dtype != values.dtype:
        raise CheckpointError(
            f"{path}: layer {name!r} has a bias of shape {tuple(bias.shape)} and dtype {bias.dtype}; expected "
            f"({rows},) in the values' dtype {values.dtype}"
        )


def _check_batchnorm_args(path: str, name: str, args: Any) -> None:
    """The recorded LevelBatchNorm arguments, by type and range, before any module is built from them."""
    if not isinstance(args, dict) or set(args) != set(_BN_ARGS):
        raise CheckpointError(f"{path}: LevelBatchNorm {name!r} needs exactly the arguments {_BN_ARGS}, got {args!r}")

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 24

    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    ok = (
        count(args["num_features"])
        and count(args["num_levels"])
        and real(args["eps"])
        and args["eps"] > 0
        and (args["momentum"] is None or (real(args["momentum"]) and 0 <= args["momentum"] <= 1))
        and isinstance(args["affine"], bool)
        and isinstance(args["per_level_affine"], bool)
    )
    if not ok:
        raise CheckpointError(
            f"{path}: LevelBatchNorm {name!r} has invalid arguments {args!r} (num_features and num_levels positive "
            "ints, eps > 0, momentum None or in [0, 1], affine and per_level_affine booleans)"
        )


def _level_batchnorm(
    path: str, model: nn.Module, name: str, args: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> LevelBatchNorm:
    """A LevelBatchNorm with the recorded arguments, after checking the skeleton has a BatchNorm there."""
    _check_batchnorm_args(path, name, args)
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"{path}: skeleton mismatch: the file has a LevelBatchNorm {name!r} but the model "
            "has no module of that name"
        ) from None
    if not isinstance(old, (nn.modules.batchnorm._BatchNorm, LevelBatchNorm)):
        raise CheckpointError(
            f"{path}: skeleton mismatch at {name!r}: the file has a LevelBatchNorm, the model a "
            f"{type(old).__name__} (expected a BatchNorm)"
        )
    if int(old.num_features) != int(args["num_features"]):
        raise CheckpointError(
            f"{path}: skeleton mismatch at {name!r}: {args['num_features']} features in the "
            f"file, {old.num_features} in the model"
        )
    stats = tensors.get(_key(name, "running_mean"))
    if stats is None or tuple(stats.shape) != (int(args["num_levels"]), int(args["num_features"])):
        raise CheckpointError(
            f"{path}: LevelBatchNorm {name!r} records {args['num_levels']} levels of "
            f"{args['num_features']} features but its running_mean tensor is "
            f"{'missing' if stats is None else tuple(stats.shape)}"
        )
    return LevelBatchNorm(**{k: args[k] for k in _BN_ARGS})


_RNN_ARGS = ("mode", "input_size", "hidden_size", "num_layers", "batch_first", "dropout", "bidirectional")


def _recurrent_module(
    path: str, model: nn.Module, name: str, args: Mapping[str, Any], cells: dict[str, NestedSparseModule]
) -> NestedSparseRNN:
    """The nested LSTM / GRU ``name`` from its recorded arguments and its cells, checked against the skeleton's
    layer (a torch LSTM / GRU of the same configuration, or a nested one)."""
    if not isinstance(args, Mapping) or set(args) != set(_RNN_ARGS) or args["mode"] not in RECURRENT:
        raise CheckpointError(f"{path}: malformed recurrent layer {name!r}: {args!r}")
    try:
        new = NestedSparseRNN(cells=cells, **args)
    except ValueError as e:
        raise CheckpointError(f"{path}: recurrent layer {name!r}: {e}") from e
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"{path}: skeleton mismatch: the file has a nested {args['mode']} {name!r}, the model has no such module"
        ) from None
    if isinstance(old, NestedSparseRNN):
        got = old.describe()
    elif isinstance(old, RECURRENT[args["mode"]][0]) and not getattr(old, "proj_size", 0):
        got = {k: old.mode if k == "mode" else getattr(old, k) for k in _RNN_ARGS}
        got["dropout"] = float(got["dropout"])
        if old.bias != new.bias:  # (the cells have a bias each or none: NestedSparseRNN checked)
            raise CheckpointError(
                f"{path}: skeleton mismatch at {name!r}: bias={old.bias} in the model, bias={new.bias} in the file"
            )
    else:
        raise CheckpointError(
            f"{path}: skeleton mismatch at {name!r}: the file has a nested {args['mode']}, "
            f"the model a {type(old).__name__}"
        )
    want = {k: args[k] for k in _RNN_ARGS}
    if got != want:
        raise CheckpointError(f"{path}: skeleton mismatch at {name!r}: {want} in the file, {got} in the model")
    return new


def _replacements(
    path: str, model: nn.Module, desc: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> dict[str, nn.Module]:
    """Every module to put into the skeleton, by name, all built and checked before any is put in."""
    new: dict[str, nn.Module] = {}
    nested = dict(desc.get("nested", {}))
    for name, args in desc.get("recurrent", {}).items():  # a shell before its cells, which it holds
        prefix = f"{name}.cells." if name else "cells."
        mine = [k for k in nested if k.startswith(prefix)]
        cells = {k.removeprefix(prefix): _nested_module(path, k, nested.pop(k), tensors) for k in mine}
        new[name] = _recurrent_module(path, model, name, args, cells)
        new.update({prefix + k: cell for k, cell in cells.items()})
    for name, d in nested.items():
        _check_slot(path, model, name, d)
        new[name] = _nested_module(path, name, d, tensors)
    for name, args in desc.get("level_batchnorms", {}).items():
        new[name] = _level_batchnorm(path, model, name, args, tensors)
    for name in desc.get("identities", []):
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{path}: skeleton mismatch: the file has a fused activation (nn.Identity) at "
                f"{name!r} but the model has no module of that name"
            ) from None
        new[name] = nn.Identity()
    return new


def _check_state(path: str, model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Raises CheckpointError on missing or unexpected tensors or a shape mismatch, before anything is loaded."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the file does not fit the model: missing tensors {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    for k, t in expected.items():
        if tuple(t.shape) != tuple(tensors[k].shape):
            raise CheckpointError(
                f"{path}: skeleton mismatch: tensor {k!r} has shape {tuple(tensors[k].shape)} in "
                f"the file, {tuple(t.shape)} in the model"
            )


def _match_dtypes(path: str, model: nn.Module, tensors: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Gives every skeleton parameter and buffer the dtype stored in the file, so loading is exact. Returns what
    to put back if the load fails later: (tensor, its previous data)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    params = set(named)
    named.update(model.named_buffers(remove_duplicate=False))
    for k in params:
        if k in tensors and not (tensors[k].is_floating_point() or tensors[k].is_complex()):
            raise CheckpointError(f"{path}: parameter {k!r} is stored as {tensors[k].dtype}; parameters are floating")
    changed = []
    for k, t in named.items():
        if k in tensors and t is not None and t.dtype != tensors[k].dtype:
            changed.append((t, t.data))
            t.data = t.data.to(tensors[k].dtype)
    return changed


def _check_nested_layers(
    path: str, model: nn.Module, new: Mapping[str, nn.Module], tensors: Mapping[str, Tensor]
) -> None:
    """The file's arrays of every nested layer the skeleton already had (those in ``new`` were checked when built),
    validated before anything is copied: a refused file leaves the model as it was."""
    for name, mod in model.named_modules():
        if not isinstance(mod, NestedSparseModule) or name in new:
            continue
        prefix = f"{name}." if name else ""
        fmt = mod._format
        try:
            weight = fmt.from_parts(
                tensors[prefix + "values"],
                {n: tensors[prefix + n] for n in fmt.index_names},
                mod.weight_shape,
                mod.densities,
                **mod.options,
            )
            weight.validate()
        except FormatError as e:
            raise CheckpointError(f"{path}: layer {name!r} has corrupted index arrays: {e}") from e
        if mod.bias is not None:
            _check_bias(path, name, tensors[prefix + "bias"], weight.values, int(mod.weight_shape[0]))


def _restore_levels(path: str, model: nn.Module, level: Any, check_only: bool = False) -> None:
    """Puts every level-aware module back at its saved level (``check_only``: only checks that it can)."""
    if level is None:
        return
    try:
        mods = level_aware_modules(model)
        if not isinstance(level, dict):
            if not mods:
                raise ValueError("the model has no level-aware modules")
            level = dict.fromkeys(mods, level)
        checked = [(mods[name], mods[name].checked_level(lvl)) for name, lvl in level.items()]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot restore the saved level {level!r}: {e}") from e
    if not check_only:
        for m, lvl in checked:
            m.set_level(lvl)


def _fill(
    path: str, model: nn.Module, desc: Mapping[str, Any], tensors: Mapping[str, Tensor], check_only: bool = False
) -> nn.Module:
    """Puts the file's modules and tensors into ``model``. Everything is checked before the first tensor is
    copied, and a refused file leaves the model as it was (modules, dtypes and values). ``check_only``: stops
    after the checks and undoes the module replacements."""
    try:
        new = _replacements(path, model, desc, tensors)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed nestsparse metadata ({type(e).__name__}: {e})") from e
    undo, dtypes, target, filled = [], [], model, False
    try:
        for name, mod in new.items():
            if not name:  # the saved model was a single layer: it replaces the skeleton itself
                target = mod
                continue
            parent, child = parent_module(target, name)
            undo.append((parent, child, getattr(parent, child)))
            setattr(parent, child, mod)
        _check_state(path, target, tensors)
        _check_nested_layers(path, target, new, tensors)
        _restore_levels(path, target, desc.get("level"), check_only=True)
        if check_only:
            return model
        dtypes = _match_dtypes(path, target, tensors)
        target.load_state_dict(tensors, strict=True)
        _restore_levels(path, target, desc.get("level"))
        filled = True
        return target
    finally:
        if not filled:  # refused, or only checked: the model as it was
            for t, data in reversed(dtypes):
                t.data = data
            for parent, child, old in reversed(undo):
                setattr(parent, child, old)


@dataclasses.dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint file read once, its checksum, format version and aliases verified: what :func:`load` reads. For
    a caller that checks more before it builds a model (nestsparse.hf checks the config the user metadata pins)."""

    path: str
    description: dict[str, Any]
    user: dict[str, str]
    tensors: dict[str, Tensor]

    def check_fits(self, model: nn.Module) -> None:
        """Raises CheckpointError unless the file fits ``model`` (a skeleton, e.g. on the meta device); ``model`` is
        left as it was."""
        _fill(self.path, model, self.description, self.tensors, check_only=True)

    def load_into(self, model: nn.Module | None, map_location: str | torch.device | None = "cpu") -> nn.Module:
        """:func:`load` of this file: fills ``model`` (or the skeleton built from the file's arch)."""
        return _load_verified(self.path, self.description, self.tensors, model, map_location)


def read_verified(path: str | os.PathLike) -> VerifiedCheckpoint:
    """The checkpoint at ``path``, read once and verified (see VerifiedCheckpoint)."""
    path = os.fspath(path)
    desc, text, user, tensors = _read(path)
    _verify(path, text, user, tensors)
    version = desc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r} is not supported (this nestsparse reads up to "
            f"{FORMAT_VERSION}); upgrade nestsparse"
        )
    aliases = desc.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{path}: malformed nestsparse metadata (aliases must map tensor names to names)")
    for name, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is an alias of {target!r}, which is not in the file")
        tensors[name] = tensors[target]
    return VerifiedCheckpoint(path, desc, user, tensors)


def _load_verified(
    path: str,
    desc: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    model: nn.Module | None,
    map_location: str | torch.device | None,
) -> nn.Module:
    """:func:`load` after :func:`read_verified`: fills ``model`` (or the skeleton built from the file's arch)."""
    built = model is None
    if model is None:
        # Everything the file says is checked against a skeleton on the meta device first: building the real one
        # costs what the file's arguments ask for (a 52 KB file asked for 4.8 GB), so it is built only for a file
        # that fits it. A builder that cannot run on the meta device is built for real directly.
        try:
            meta = _skeleton_from_arch(path, desc.get("arch"), device="meta")
        except CheckpointError as e:
            if not isinstance(e.__cause__, (NotImplementedError, RuntimeError)):
                raise
            meta = None
        if meta is not None:
            _fill(path, meta, desc, tensors, check_only=True)
        model = _skeleton_from_arch(path, desc.get("arch"))
    model = _fill(path, model, desc, tensors)
    if built:
        model.eval()  # built here for inference: a fresh module is in training mode, whose BatchNorm changes outputs
    if desc.get("arch") is not None and getattr(model, "arch", None) is None:
        model.arch = desc["arch"]  # so that saving the loaded model again records it too
    keep_index_buffers_local(model)
    return model.to(map_location) if map_location is not None else model


def load(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: str | torch.device | None = "cpu"
) -> nn.Module:
    """Reads a file written by :func:`save` into ``model`` (a dense skeleton, or built from the file's arch)."""
    path = os.fspath(path)
    return read_verified(path).load_into(model, map_location)


# ---- transformers' own save_pretrained, refused on a converted model ----------------------------------------------


def _has_nested(model: nn.Module) -> bool:
    return any(isinstance(m, NestedSparseModule) for m in model.modules())


class _GuardedSavePretrained:
    """Stands in for a converted transformers model's own ``save_pretrained`` (an instance attribute, so ``push_to_hub``
    and Trainer, which call ``self.save_pretrained``, meet it too). Refuses while the model has nested layers;
    one that has none left (``nestsparse.to_dense(model, level, inplace=True)``) saves as transformers does. It
    holds the model itself, so ``copy.deepcopy`` (``to_dense``, ``fuse``, ``convert``) gives the copy a guard of
    its own, and it pickles by reference to this class."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        if _has_nested(model):
            raise CheckpointError(
                f"{type(model).__name__}.save_pretrained would write the nested layers as tensors that transformers' "
                "from_pretrained does not know, and reload them as re-initialised dense layers (it only logs the "
                "keys): save this converted model with nestsparse.hf.save_pretrained(model, directory) and load it "
                "with nestsparse.hf.from_pretrained(directory); for a dense transformers checkpoint, save "
                "nestsparse.to_dense(model, level)"
            )
        return type(model).save_pretrained(model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<nestsparse guard of {type(self.model).__name__}.save_pretrained>"


def _is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers PreTrainedModel, without importing transformers for any other model
    (its class or a base class is defined in a transformers module)."""
    if not any((getattr(c, "__module__", None) or "").partition(".")[0] == "transformers" for c in type(model).__mro__):
        return False
    transformers = sys.modules.get("transformers")  # imported: the model's class comes from it
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Makes ``model.save_pretrained(...)`` (and ``push_to_hub``, which calls it) raise CheckpointError naming
    nestsparse.hf.save_pretrained when ``model`` is a transformers PreTrainedModel with nested layers: transformers
    would save them under names its from_pretrained does not know and reload the model with those layers dense and
    re-initialised, logging only a line. Returns ``model`` (changed in place); any other model is returned as it is,
    without importing transformers. The guard survives ``copy.deepcopy`` and does not affect
    nestsparse.hf.save_pretrained."""
    if isinstance(model, nn.Module) and _is_transformers_model(model) and _has_nested(model):
        model.save_pretrained = _GuardedSavePretrained(model)
    return model
