"""Level specifications and nested tags.

A tag per weight element says the sparsest level that still keeps it (-1: pruned at every level), so
masks of all levels are nested by construction: ``mask(l) = tags >= l``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..formats.blocks import DEFAULT_BLOCK_SHAPE, blocked, check_block_shape, element_tags, grid, inside, matrix_shape
from ..nn import CONVERTIBLE, RECURRENT, is_transposed_linear, recurrent_weights, tied_weights

__all__ = [
    "LevelSpec",
    "level_spec",
    "tags_from_scores",
    "magnitude_tags",
    "global_magnitude_tags",
    "bcr_tags",
    "global_bcr_tags",
    "model_tags",
    "weight_tags",
    "masks_from_tags",
    "tags_from_masks",
    "prunable_layers",
    "transposed_layers",
]


@dataclass(frozen=True)
class LevelSpec:
    """Target densities of the levels, densest first: strictly decreasing, each in (0, 1]."""

    densities: tuple[float, ...]

    def __post_init__(self):
        d = tuple(float(x) for x in self.densities)
        if not d:
            raise ValueError("LevelSpec: at least one level density is needed")
        for i, x in enumerate(d):
            if not 0.0 < x <= 1.0:
                raise ValueError(f"LevelSpec: density of level {i} is {x}; densities must lie in (0, 1]")
        for i in range(1, len(d)):
            if not d[i] < d[i - 1]:
                raise ValueError(
                    f"LevelSpec: densities must be strictly decreasing (level 0 densest), "
                    f"but level {i} has {d[i]} >= level {i - 1}'s {d[i - 1]}"
                )
        object.__setattr__(self, "densities", d)

    @property
    def num_levels(self) -> int:
        return len(self.densities)


def level_spec(densities) -> LevelSpec:
    """``densities`` as a LevelSpec (checked)."""
    if isinstance(densities, LevelSpec):
        return densities
    if isinstance(densities, numbers.Real) or (isinstance(densities, Tensor) and densities.dim() == 0):
        raise TypeError(
            f"densities is one number ({densities!r}); give one density per level, densest first, e.g. "
            f"({float(densities)},) for one level or (0.3, 0.1) for two"
        )
    return LevelSpec(tuple(densities))


def tags_from_scores(scores: Tensor, spec: LevelSpec) -> Tensor:
    """Tags from importance scores: level l keeps the round(d_l * n) highest scores (ties by position)."""
    flat = scores.detach().flatten()
    n = flat.numel()
    order = torch.argsort(flat, descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.int64, device=flat.device)
    rank[order] = torch.arange(n, device=flat.device)
    tags = torch.full((n,), -1, dtype=torch.int8, device=flat.device)
    for d in spec.densities:
        tags += (rank < round(d * n)).to(torch.int8)
    return tags.reshape(scores.shape)


def magnitude_tags(weight: Tensor, densities: LevelSpec | Sequence[float]) -> Tensor:
    """One-shot nested magnitude tags of one layer: level l keeps the largest |w|, density d_l."""
    return tags_from_scores(weight.abs(), level_spec(densities))


def global_magnitude_tags(weights: Mapping[str, Tensor], densities: LevelSpec | Sequence[float]) -> dict[str, Tensor]:
    """Nested magnitude tags with one budget across all layers: each level keeps d_l of all weights
    together, so layers with many small weights give up more of them."""
    spec = level_spec(densities)
    if not weights:
        return {}
    names = list(weights)
    flat = torch.cat([weights[k].detach().abs().flatten().float().cpu() for k in names])
    tags = tags_from_scores(flat, spec)
    out, start = {}, 0
    for k in names:
        n = weights[k].numel()
        out[k] = tags[start : start + n].reshape(weights[k].shape).to(weights[k].device)
        start += n
    return out


def _bcr_level(w2: Tensor, cand_r: Tensor, cand_c: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """One level of structured selection over blocks ``w2`` (B, bm, bk) of squared weights: the kept rows
    (B, bm) and columns (B, bk), among the candidates, with at most ``budget`` elements (see bcr_tags)."""
    B, bm, bk = w2.shape
    # Squared L2 norms (they rank as the norms do): rows over the candidate columns, columns over the rows.
    row_score = (w2 @ cand_c.to(w2.dtype).unsqueeze(2)).squeeze(2)
    col_score = (cand_r.to(w2.dtype).unsqueeze(1) @ w2).squeeze(1)

    def ranking(score: Tensor, cand: Tensor) -> Tensor:  # flat positions of the candidates, best first
        ids = cand.flatten().nonzero().squeeze(1)
        return ids[torch.argsort(score.flatten()[ids], descending=True, stable=True)]

    rows, cols = ranking(row_score, cand_r), ranking(col_score, cand_c)
    Nr, Nc = rows.numel(), cols.numel()
    if not Nr:
        return cand_r, cand_c

    def sorted_ranks(order: Tensor, width: int) -> Tensor:  # (B, width): each block's ranks, ascending
        ranks = torch.full((B * width,), order.numel(), dtype=torch.int64, device=order.device)
        ranks[order] = torch.arange(order.numel(), device=order.device)
        return ranks.reshape(B, width).sort(1).values

    row_ranks, col_ranks = sorted_ranks(rows, bm), sorted_ranks(cols, bk)

    def kept(t: int) -> tuple[int, int]:  # the rows and columns the fraction rho = t / (Nr * Nc) keeps
        return t // Nc, t // Nr

    def nnz(t: int) -> int:  # the sum over blocks of rows kept x columns kept
        r = torch.searchsorted(row_ranks, torch.full((B, 1), kept(t)[0], device=w2.device))
        c = torch.searchsorted(col_ranks, torch.full((B, 1), kept(t)[1], device=w2.device))
        return int((r * c).sum())

    # Bisection for the largest rho within budget, over the steps of t = rho * Nr * Nc where a row or a
    # column joins (multiples of Nc or Nr); lo and hi are always such steps.
    def step_after(t: int) -> int:
        return min((t // Nc + 1) * Nc, (t // Nr + 1) * Nr)

    lo, hi = 0, Nr * Nc
    if nnz(hi) <= budget:
        lo = hi
    while lo < hi and step_after(lo) < hi:
        mid = max((lo + hi) // 2 // Nc * Nc, (lo + hi) // 2 // Nr * Nr, step_after(lo))
        lo, hi = (mid, hi) if nnz(mid) <= budget else (lo, mid)
    kr, kc = kept(lo)
    keep_r = torch.zeros(B * bm, dtype=torch.bool, device=w2.device)
    keep_c = torch.zeros(B * bk, dtype=torch.bool, device=w2.device)
    keep_r[rows[:kr]], keep_c[cols[:kc]] = True, True
    keep_r, keep_c = keep_r.reshape(B, bm), keep_c.reshape(B, bk)
    both = keep_r.any(1, keepdim=True) & keep_c.any(1, keepdim=True)
    keep_r, keep_c = keep_r & both, keep_c & both
    if not both.any():  # even one row and one column is too many: keep the best element
        b = int(rows[0]) // bm
        keep_r.view(-1)[rows[0]] = True
        keep_c[b, col_score[b].masked_fill(~cand_c[b], -math.inf).argmax()] = True
    return keep_r, keep_c


def _bcr_tags(mats: Sequence[Tensor], spec: LevelSpec, block_shape: tuple[int, int]) -> list[Tensor]:
    """Element tags (M, K) of (M, K) matrices that share one budget per level."""
    bm, bk = block_shape
    grids = [grid(*m.shape, block_shape) for m in mats]
    w2 = torch.cat([blocked(m.float() ** 2, block_shape, 0).reshape(-1, bm, bk) for m in mats])
    inner = [inside(*m.shape, block_shape, m.device) for m in mats]
    cand_r = torch.cat([r.expand(MB, KB, bm).reshape(-1, bm) for (r, _), (MB, KB) in zip(inner, grids)])
    cand_c = torch.cat([c.expand(MB, KB, bk).reshape(-1, bk) for (_, c), (MB, KB) in zip(inner, grids)])
    n = sum(m.numel() for m in mats)
    row_tags = torch.full(cand_r.shape, -1, dtype=torch.int8, device=w2.device)
    col_tags = torch.full(cand_c.shape, -1, dtype=torch.int8, device=w2.device)
    for lvl, d in enumerate(spec.densities):
        cand_r, cand_c = _bcr_level(w2, cand_r, cand_c, math.floor(d * n + 1e-6))
        row_tags[cand_r], col_tags[cand_c] = lvl, lvl
    out, start = [], 0
    for m, (MB, KB) in zip(mats, grids):
        rt, ct = row_tags[start : start + MB * KB], col_tags[start : start + MB * KB]
        out.append(element_tags(rt.reshape(MB, KB, bm), ct.reshape(MB, KB, bk), *m.shape))
        start += MB * KB
    return out


def bcr_tags(
    weight: Tensor, densities: LevelSpec | Sequence[float], block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE
) -> Tensor:
    """Nested block row/column (BCR) tags of one layer, ready for NestedBCR.from_dense (weight-shaped int8;
    a conv weight is seen as (Cout, Cin/g*kh*kw)).

    Levels go from densest to sparsest; level l chooses among the rows and columns kept at level l-1
    (every one at level 0), so levels nest. In each block, a candidate row scores the L2 norm of its
    elements in the block's candidate columns, a candidate column the L2 norm over the candidate rows.
    All candidate rows of the layer are ranked together, and so are the columns (ties: first position
    first); the top fraction rho of each ranking is kept, and a block keeping rows but no columns (or
    the reverse) keeps nothing. rho is the largest value (bisection) keeping at most d_l of the weights;
    if even the first row and column are too many, the level keeps the single best element."""
    spec, bs = level_spec(densities), check_block_shape("bcr_tags", block_shape)
    M, K = matrix_shape(tuple(weight.shape))
    return _bcr_tags([weight.detach().reshape(M, K)], spec, bs)[0].reshape(weight.shape)


def global_bcr_tags(
    weights: Mapping[str, Tensor],
    densities: LevelSpec | Sequence[float],
    block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
) -> dict[str, Tensor]:
    """Nested BCR tags (see bcr_tags) with one budget across all layers: each level keeps d_l of all weights
    together, the rows and columns of every layer ranked against each other. So that layers of different
    scales compete fairly, each layer's scores are divided by the RMS of its weights."""
    spec, bs = level_spec(densities), check_block_shape("global_bcr_tags", block_shape)
    mats = []
    for w in weights.values():
        m = w.detach().float().cpu().reshape(matrix_shape(tuple(w.shape)))
        rms = float(m.pow(2).mean().sqrt()) if m.numel() else 0.0
        mats.append(m / rms if rms > 0 else m)
    tags = _bcr_tags(mats, spec, bs) if mats else []
    return {k: t.reshape(w.shape).to(w.device) for (k, w), t in zip(weights.items(), tags)}


def prunable_layers(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The modules of ``model`` a nested layer can stand in for, by qualified name, without those in ``skip``:
    nn.Linear, nn.Conv2d, nn.Conv1d and transformers' Conv1D (GPT-2), except nn.MultiheadAttention's projections
    (torch reads out_proj.weight directly) and layers whose weight is tied to another module's (an LM head sharing
    its embedding's matrix: converting it would untie them). A name in ``skip`` that is no module of the model is
    refused."""
    skip = set(skip)
    every = dict(model.named_modules(remove_duplicate=False))  # a module at two places: both names
    unknown = sorted(n for n in skip if n not in every)
    if unknown:  # a typo would leave the layer it meant pruned, silently
        layers = [n for n, m in model.named_modules() if isinstance(m, CONVERTIBLE) or is_transposed_linear(m)]
        raise ValueError(
            f"skip names {unknown[:4]}, which are no module of the model (layers are named as named_modules() "
            f"names them: {layers[:6]}{' ...' if len(layers) > 6 else ''})"
        )
    skip |= {name for name, m in model.named_modules() if any(every.get(n) is m for n in skip)}  # by any name
    inside_mha = {
        f"{name}.{child}"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_modules()
        if child
    }
    tied = tied_weights(model)
    return {
        name: m
        for name, m in model.named_modules()
        if (isinstance(m, CONVERTIBLE) or is_transposed_linear(m))
        and name not in skip
        and name not in inside_mha
        and name not in tied
    }


def model_tags(
    model: nn.Module,
    densities: LevelSpec | Sequence[float],
    scope: str = "layer",
    skip: Iterable[str] = (),
    structure: str = "unstructured",
    block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
) -> dict[str, Tensor]:
    """Nested tags for every layer of ``model`` that converts (prunable_layers, minus ``skip``) and every gate
    matrix of its nn.LSTM / nn.GRU layers, per layer or with one global budget (``scope="global"``): magnitude tags
    (``structure="unstructured"``, for NestedCSR) or block row/column tags (``structure="bcr"``, for NestedBCR with
    ``block_shape``). Keys are module names (for a recurrent layer ``f"{name}.weight_ih_l0"`` and so on), ready
    for ``nestsparse.convert``. This is training method 1 (one-shot, no training)."""
    layers = prunable_layers(model, skip)
    weights = {name: m.weight for name, m in layers.items()}
    recurrent = tuple(cls for cls, _ in RECURRENT.values())
    for name, m in model.named_modules():
        if isinstance(m, recurrent) and name not in skip and not getattr(m, "proj_size", 0):
            weights.update({f"{name}.{w}" if name else w: getattr(m, w) for w in recurrent_weights(m)})
    return weight_tags(weights, densities, scope, structure, block_shape, transposed_layers(model, layers))


def weight_tags(
    weights: Mapping[str, Tensor],
    densities: LevelSpec | Sequence[float],
    scope: str = "layer",
    structure: str = "unstructured",
    block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
    transposed: Collection[str] = (),
) -> dict[str, Tensor]:
    """model_tags on named weight tensors (scores are their magnitudes). The weights named in ``transposed`` are
    stored (in, out) (transformers' Conv1D): they are scored as the (out, in) matrix the nested layer stores, so
    block tags have its blocks, and their tags come back in the stored shape."""
    if structure not in ("unstructured", "bcr"):
        raise ValueError(f"model_tags: structure must be 'unstructured' or 'bcr', got {structure!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"model_tags: scope must be 'layer' or 'global', got {scope!r}")
    weights = {name: w.t() if name in transposed else w for name, w in weights.items()}
    if structure == "bcr":
        if scope == "global":
            tags = global_bcr_tags(weights, densities, block_shape)
        else:
            tags = {name: bcr_tags(w, densities, block_shape) for name, w in weights.items()}
    elif scope == "global":
        tags = global_magnitude_tags(weights, densities)
    else:
        tags = {name: magnitude_tags(w, densities) for name, w in weights.items()}
    return {name: t.t().contiguous() if name in transposed else t for name, t in tags.items()}


def transposed_layers(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Those of the submodules ``names`` whose weight is stored (in, out) (transformers' Conv1D)."""
    return {name for name in names if is_transposed_linear(model.get_submodule(name))}


def masks_from_tags(tags: Tensor, level: int) -> Tensor:
    """Boolean mask of level ``level``."""
    if level < 0:
        raise ValueError(f"masks_from_tags: level must be >= 0, got {level}")
    return tags >= level


def tags_from_masks(masks: Sequence[Tensor]) -> Tensor:
    """Tags from per-level masks (densest first); refuses masks that are not nested."""
    if not masks:
        raise ValueError("tags_from_masks: no masks given")
    tags = torch.full(masks[0].shape, -1, dtype=torch.int8, device=masks[0].device)
    for lvl, m in enumerate(masks):
        m = m.to(torch.bool)
        if lvl and (m & ~masks[lvl - 1].to(torch.bool)).any():
            raise ValueError(
                f"tags_from_masks: level {lvl} keeps weights that level {lvl - 1} prunes; levels must be nested"
            )
        tags[m] = lvl
    return tags
