"""Inference lowering of a converted model: BatchNorm, residual adds and activations into the sparse products.

After ``nestsparse.convert`` a model still runs every BatchNorm, residual add and activation as a pass of its own
over each layer's output; on ResNet-50 those passes cost about 30% of the time at batch 1 and 40% at batch 16.
``fuse`` rewrites the model so that each nested sparse layer writes its output once, in the kernel's epilogue:

    y = act(scale[level] * (W_level x) + shift[level] + residual)

- an eval-mode BatchNorm (nn.BatchNorm1d/2d or LevelBatchNorm) that only reads a sparse layer's output is folded
  into a per-level scale and shift (LevelBatchNorm keeps statistics per level, so the epilogue does too; the
  layer passes the level's rows to the op, and a level switch still copies nothing);
- ``layer(x) + other`` (ResNet's skip connection) becomes the layer's residual operand;
- a ReLU, ReLU6 or exact GELU after either becomes the layer's activation;
- a BatchNorm2d after a dense nn.Conv2d (the stem) is folded into its weights (torch's own fuse_conv_bn_eval);
- an nn.MaxPool2d runs as two 1-D strided maxima (SeparableMaxPool2d): torch's NCHW max-pool kernel took 3.5 ms
  on ResNet-50's stem output at batch 1 (12% of the fused model's time), the separable form 0.6 ms.

The model is traced with torch.fx (nested sparse layers and LevelBatchNorm as leaves) and the result is a
torch.fx.GraphModule: ``nestsparse.set_level`` and ``torch.compile`` work on it as on the converted model, and the
rerouting executor with layer stages (``auto_stages(fused, "layer")``: the graph calls the layers directly, so the
blocks' hooks, which block stages use, never run). It is for inference: folded statistics no longer update and the
folded scale takes no gradient (fine-tune the converted model, then fuse it again).
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .activations import fusable_activation
from .nn import LevelBatchNorm, NestedSparseModule, NestedSparseRNN, keep_index_buffers_local
from .ops import pair

__all__ = ["fuse", "SeparableMaxPool2d"]

_ADDS = (operator.add, operator.iadd, torch.add)
# Activations written as functions or methods in a model's forward, by the name the kernels know (F.relu traces
# as a call with inplace=False; the in-place forms are left alone: their result may be unused).
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_ACT_METHODS = {"relu": "relu"}


class _Tracer(fx.Tracer):
    """Traces through everything but the level-aware leaves, whose forward checks shapes in Python."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaf = isinstance(m, (NestedSparseModule, NestedSparseRNN, LevelBatchNorm))
        return leaf or super().is_leaf_module(m, qualname)


def fuse(model: nn.Module, *, inplace: bool = False) -> fx.GraphModule:
    """``model`` (converted, in eval mode) with BatchNorms folded and residual adds and activations fused into
    the nested sparse layers' epilogues; same outputs at every level (up to float rounding). See the module
    docstring for what is fused. Raises ValueError if the model is in training mode, and names the torch.fx
    error if the model cannot be traced (data-dependent Python control flow in its forward)."""
    if model.training:
        raise ValueError("fuse: the model is in training mode; call .eval() first (fused BatchNorms stop updating)")
    if not inplace:
        model = copy.deepcopy(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # torch.fx raises many types; name it and say what to do
        raise ValueError(
            f"fuse: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); fuse the traceable "
            "submodules instead (e.g. each block)"
        ) from e
    gm = fx.GraphModule(model, graph, class_name=f"Fused{type(model).__name__}")
    calls = _module_calls(gm.graph)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node in gm.graph.nodes:
            mod = gm.get_submodule(node.target)
            if isinstance(mod, NestedSparseModule) and calls[node.target] == 1:
                _fuse_sparse(gm, node, mod)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)) and calls[node.target] == 1:
                _fold_dense(gm, node, mod)
            elif SeparableMaxPool2d.handles(mod):
                _set_submodule(gm, node.target, SeparableMaxPool2d(mod))
    # No eliminate_dead_code: it would drop in-place calls whose result is unused (y.relu_()); every node fuse
    # replaces is erased where it is replaced.
    gm.delete_all_unused_submodules()
    gm.recompile()
    return keep_index_buffers_local(gm)


def _module_calls(graph: fx.Graph) -> dict[str, int]:
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return calls


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_batchnorm(gm: fx.GraphModule, node: fx.Node | None, src: fx.Node) -> nn.Module | None:
    if node is None or node.op != "call_module" or node.args != (src,) or node.kwargs:
        return None
    bn = gm.get_submodule(node.target)
    is_bn = isinstance(bn, LevelBatchNorm) or (
        isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
    )
    return bn if is_bn and not bn.training else None


def _activation(gm: fx.GraphModule, node: fx.Node | None, src: fx.Node) -> str | None:
    """The kernel name of the activation ``node`` applies to ``src`` alone, or None."""
    if node is None or not node.args or node.args[0] is not src or len(node.args) != 1:
        return None
    if node.op == "call_module":
        return fusable_activation(gm.get_submodule(node.target))
    if node.op == "call_function" and node.kwargs in ({}, {"inplace": False}):
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method" and not node.kwargs:
        return _ACT_METHODS.get(node.target)
    return None


def _replace(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> None:
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)


def _fuse_sparse(gm: fx.GraphModule, node: fx.Node, mod: NestedSparseModule) -> None:
    if mod.activation != "none" or "residual" in node.kwargs or len(node.args) != 1:
        return
    user = _only_user(node)
    bn = _is_batchnorm(gm, user, node)
    if bn is not None and (not isinstance(bn, LevelBatchNorm) or bn.num_levels == mod.num_levels):
        mod.fold_batchnorm(bn)
        _replace(gm, user, node)
        user = _only_user(node)
    if _fuse_activation(gm, node, mod, user):
        return
    if user is None or user.op != "call_function" or user.target not in _ADDS or user.kwargs or len(user.args) != 2:
        return
    # `other += layer(x)` writes into other: only `layer(x) += other` (the result is the layer's) is fused.
    if user.target is operator.iadd and user.args[0] is not node:
        return
    other = user.args[1] if user.args[0] is node else user.args[0]
    if not isinstance(other, fx.Node) or other is node or _mutation_between(gm, node, user):
        return
    # The layer runs where the add did, after both operands exist (its own inputs precede it already; nothing
    # between the two writes into a tensor, checked above).
    user.prepend(node)
    node.kwargs = {**node.kwargs, "residual": other}
    _replace(gm, user, node)
    _fuse_activation(gm, node, mod, _only_user(node))


def _fuse_activation(gm: fx.GraphModule, node: fx.Node, mod: NestedSparseModule, user: fx.Node | None) -> bool:
    """Makes the activation ``user`` applies to the layer's output the layer's own; whether it did."""
    act = _activation(gm, user, node)
    if act is None:
        return False
    mod.activation = act
    _replace(gm, user, node)
    return True


def _mutation_between(gm: fx.GraphModule, first: fx.Node, last: fx.Node) -> bool:
    """Whether a node strictly between ``first`` and ``last`` may write into a tensor (an in-place method or
    function, an ``inplace=True`` argument or module): moving ``first`` past it could change what it reads."""
    n = first.next
    while n is not last:
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if n.op == "call_module":
            inplace = getattr(gm.get_submodule(n.target), "inplace", False)
        else:
            inplace = n.kwargs.get("inplace", False) or (name.endswith("_") and not name.startswith("_"))
            inplace = inplace or (n.op == "call_function" and name.startswith("i") and hasattr(operator, name))
        if inplace or n.op not in ("call_module", "call_function", "call_method", "get_attr"):
            return True
        n = n.next
    return False


def _fold_dense(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> None:
    user = _only_user(node)
    bn = _is_batchnorm(gm, user, node)
    if bn is None or isinstance(bn, LevelBatchNorm) or not bn.affine:
        return
    # A Linear followed by BatchNorm1d is left alone: on a 3-D input the BatchNorm normalises another dimension.
    if not (isinstance(mod, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        return
    fused = fuse_conv_bn_eval(mod, bn)
    _set_submodule(gm, node.target, fused)
    _replace(gm, user, node)


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, child = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


class SeparableMaxPool2d(nn.Module):
    """nn.MaxPool2d (no indices, no ceil mode, no dilation) as a maximum over strided slices along W, then along
    H, on the input padded with -inf: the same result, NaN included, several times faster than torch's NCHW
    kernel. Inputs it does not fit (not 4-D NCHW floating point) go to F.max_pool2d."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.kernel_size = pair(pool.kernel_size)
        self.stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)
        self.padding = pair(pool.padding)

    @staticmethod
    def handles(m: nn.Module) -> bool:
        return (
            type(m) is nn.MaxPool2d
            and not m.return_indices
            and not m.ceil_mode
            and pair(m.dilation) == (1, 1)
            and all(2 * p <= k for p, k in zip(pair(m.padding), pair(m.kernel_size)))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not x.is_floating_point() or not x.is_contiguous():
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
        x = _strided_max(x, 3, kw, sw)
        return _strided_max(x, 2, kh, sh)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def _strided_max(x: torch.Tensor, dim: int, k: int, s: int) -> torch.Tensor:
    """out[i] = max(x[i*s], ..., x[i*s + k - 1]) along ``dim``."""
    n = (x.shape[dim] - k) // s + 1
    out = None
    for j in range(k):
        part = x.narrow(dim, j, s * (n - 1) + 1)[(slice(None),) * dim + (slice(None, None, s),)]
        out = part if out is None else torch.maximum(out, part)
    return out.contiguous()
