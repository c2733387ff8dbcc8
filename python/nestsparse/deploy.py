"""Deployment outside this Python process: a converted model exported with its level as an input.

``export(model, args)`` is ``torch.export.export`` of the model with one more input in front, the level (a 0-dim
int64 tensor), so one exported program serves every level: save it with ``torch.export.save``, run it in a process
that has only loaded the op library (``torch.ops.load_library(nestsparse.library_path())``), or compile it ahead of
time with ``torch._inductor.aoti_compile_and_package`` and run that from C++ with libtorch (examples/cpp). The ops
take the level as a symbolic int, so it is not baked in.

The program checks itself: its first step is the op ``nestsparse::verified_level`` (csrc/ops/digest.h), in the graph
and so in every form of the program (``torch.export.load``, ``.module()``, an AOTInductor package). It refuses a
level out of range, naming the level and the range, and, once per program before the first result, compares every
constant (each parameter and buffer: the nested layers' values, index arrays, bias and epilogue tensors, and the
dense layers' weights) with the SHA-1 digest ``export`` recorded, naming the first constant that differs. The
kernels bound every index they read, but an index edited to another in-bounds value runs and silently changes the
outputs; the digests refuse every such edit. After the first call the check compares pointers only.

An exported program has plain outputs (tensors in dicts, lists and tuples), so a process loads it without the
classes of the model's library: a transformers ``ModelOutput`` becomes a dict of its fields.

A plain ``torch.export.export`` or ``torch.jit.trace`` of a converted model would bake the level in silently: the
nested modules refuse both and name this function (nn.levels.refuse_baked_level).

What an exported program does not do: switch the level in the middle of an inference (rerouting needs the Python
executor, nestsparse.runtime) or run a level as a dense product (set_dense_levels): every level runs the sparse
kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from .nn import NestedSparseModule, get_levels, level_aware_modules, shared_copy

__all__ = ["LevelInput", "export"]


@torch.library.register_fake("nestsparse::verified_level")
def _verified_level_fake(level, num_levels, constants, names, digests):
    return torch.empty((), dtype=torch.int64, device=level.device)


def _plain(out):
    """``out`` with every container a plain dict, list or tuple: a Mapping subclass (transformers' ModelOutput)
    becomes a dict of its items, a namedtuple a tuple. Loading a program whose outputs are another library's
    registered pytree classes needs that library imported first."""
    if isinstance(out, Mapping):
        return {k: _plain(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(map(_plain, out)) if type(out) in (list, tuple) else tuple(map(_plain, out))
    return out


def _compact(t: Tensor) -> Tensor:
    """``t`` in storage of its own size. torch.export.save writes the whole storage of each example input and
    constant, so a view of a larger tensor would put its base into the saved program (32.6 MB instead of 1.3 MB)."""
    return t.detach().clone().requires_grad_(t.requires_grad)


def _compact_constants(model: nn.Module) -> None:
    """Replaces each parameter or buffer of ``model`` that is a view into a larger storage by a copy of its own size
    (a tensor held by several modules stays one tensor). An expanded view, smaller than its shape, is left as is."""
    copies: dict[int, Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or t.untyped_storage().nbytes() <= t.nbytes:
                    continue
                if id(t) not in copies:
                    copy = _compact(t)
                    copies[id(t)] = nn.Parameter(copy, t.requires_grad) if isinstance(t, nn.Parameter) else copy
                table[name] = copies[id(t)]


class LevelInput(nn.Module):
    """``model`` with the level as its first input: ``LevelInput(model)(level, *args)`` runs ``model(*args)`` at
    ``level`` (a one-element integer tensor) and returns its output with plain containers (see ``_plain``). It
    holds a shared copy of ``model`` (the same weights, its own level, no rerouting hooks; a weight that is a view
    into a larger tensor is copied), so the caller's model is left as it was, and the digests of its constants as
    they are now: every call first runs ``nestsparse::verified_level``, which refuses a level out of range and,
    once, constants that changed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.num_levels = get_levels(model)
        self.model = shared_copy(model)
        _compact_constants(self.model)
        self._level_aware = list(level_aware_modules(self.model).values())
        names, constants = self._constants()
        self.constant_names = names
        # as the op takes them: one string each (a list of strings costs a conversion per element and call)
        self._names = "\n".join(names)
        self._digests = "".join(torch.ops.nestsparse.constant_digests(constants))

    def _constants(self) -> tuple[list[str], list[Tensor]]:
        """Every parameter and buffer, each once, by its name in the exported program (``model.<name>``); while
        exported, the tensors that stand for them."""
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        return [f"model.{name}" for name, _ in named], [t for _, t in named]

    def forward(self, level: Tensor, *args, **kwargs):
        if not isinstance(level, Tensor) or level.numel() != 1 or level.dtype.is_floating_point:
            raise ValueError(
                f"LevelInput: the level is a one-element integer tensor, e.g. torch.tensor(1), got {level!r}"
            )
        names, constants = self._constants()
        if names != self.constant_names:
            raise RuntimeError(
                "LevelInput: the model's parameters or buffers are not those it was wrapped with; wrap it again"
            )
        level = torch.ops.nestsparse.verified_level(level, self.num_levels, constants, self._names, self._digests)
        lvl = level.item()
        # verified_level has checked the range with a message that names it; these give the exported program's
        # symbolic level its range (constant messages: one built from the symbolic level cannot be traced)
        out_of_range = f"LevelInput: the level is out of range (0 = densest .. {self.num_levels - 1})"
        torch._check(lvl >= 0, lambda: out_of_range)
        torch._check(lvl < self.num_levels, lambda: out_of_range)
        before = [m.level for m in self._level_aware]
        for m in self._level_aware:  # a plain int when called, a symbolic one while exported
            m.level = lvl
        try:
            return _plain(self.model(*args, **kwargs))
        finally:
            for m, b in zip(self._level_aware, before):
                m.level = b


def export(
    model: nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    dynamic_shapes: Sequence | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a converted (or fused) model whose program takes the level first:
    ``program.module()(torch.tensor(level), *args)``. ``args`` and ``kwargs`` are an example call of ``model``;
    ``dynamic_shapes``, if given, is one entry per element of ``args`` (e.g. ``({0: torch.export.Dim("batch")},)``
    for a dynamic batch). Export in eval mode, as for any inference program. The export is torch's default,
    non-strict one (it runs the model's Python with the level symbolic; strict mode's bytecode tracing does not
    carry the symbolic level through the modules' attributes).

    The program checks its level and constants before its first result (see the module's docstring); the nested
    layers' index arrays are validated here, every level, so the digests recorded are of a well-formed weight. Its
    outputs are plain: a Mapping (transformers' ModelOutput) is returned as a dict of its fields
    (``out["last_hidden_state"]``), a namedtuple as a tuple. Example inputs are saved with the program, so each
    is copied into storage of its own size first, as is a parameter or buffer that is a view into a larger tensor
    (torch.export.save would write the whole base)."""
    if not isinstance(args, tuple):
        raise TypeError(f"nestsparse.export: args is a tuple of example inputs, got {type(args).__name__}")
    if not level_aware_modules(model):
        raise ValueError("nestsparse.export: the model has no nested layers (convert it first), use torch.export")
    for m in model.modules():
        if isinstance(m, NestedSparseModule):
            m.nested().validate()
    wrapped = LevelInput(model)
    args, kwargs = tree_map_only(Tensor, _compact, (args, kwargs))
    example = (torch.tensor(0), *args)
    if dynamic_shapes is not None:
        if isinstance(dynamic_shapes, dict) or len(dynamic_shapes) != len(args):
            raise ValueError(
                f"nestsparse.export: dynamic_shapes is one entry per element of args ({len(args)}), "
                f"got {dynamic_shapes!r}"
            )
        dynamic_shapes = (None, tuple(dynamic_shapes))  # the level, then forward's *args as one group
    program = torch.export.export(wrapped, example, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    _verify_lifted_constants(program)
    return program


def _verify_lifted_constants(program: torch.export.ExportedProgram) -> None:
    """Adds to the program's check the constants torch.export lifted that are no parameter or buffer (a plain
    tensor attribute, a tensor the forward creates): they are saved with the program too, but LevelInput cannot
    name them before the trace."""
    check = next(n for n in program.graph.nodes if n.target is torch.ops.nestsparse.verified_level.default)
    level, num_levels, constants, names, digests = check.args
    covered = {c.name for c in constants}
    lifted = [
        spec
        for spec in program.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.CONSTANT_TENSOR and spec.arg.name not in covered
    ]
    if not lifted:
        return
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    extra = torch.ops.nestsparse.constant_digests([program.constants[spec.target] for spec in lifted])
    check.args = (
        level,
        num_levels,
        [*constants, *(placeholders[spec.arg.name] for spec in lifted)],
        "\n".join([names, *(spec.target for spec in lifted)]),
        "".join([digests, *extra]),
    )
    program.graph_module.recompile()
