"""How masks evolve during training: the cubic gradual-pruning schedule and the grow-and-prune update."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cubic_density", "grow_and_prune"]


def cubic_density(step: int, final: float, start: int, end: int, initial: float = 1.0) -> float:
    """Gradual magnitude pruning's density at ``step`` (Zhu & Gupta 2017): ``initial`` until ``start``, then
    ``final + (initial - final) * (1 - progress)^3`` with progress going 0 -> 1 over [start, end], then
    ``final``. Pruning fast early, while the network can recover, and slowly near the target."""
    if not 0.0 < final <= initial <= 1.0:
        raise ValueError(f"cubic_density: need 0 < final <= initial <= 1, got final={final}, initial={initial}")
    if end < start:
        raise ValueError(f"cubic_density: end ({end}) is before start ({start})")
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


@torch.no_grad()
def grow_and_prune(
    weight: Tensor,
    grad: Tensor,
    tags: Tensor,
    level: int,
    fraction: float,
    frozen: Tensor | None = None,
    regrow_from: int | None = None,
) -> int:
    """One grow-and-prune step on ``level``'s own weights (tags == level), in place; returns how many moved.

    Drops the ``fraction`` of them with the smallest |weight| (their tag becomes the candidates' tag, so
    with the default they stay in the denser levels) and regrows as many of the candidates with the largest
    |grad| (``grad``: the gradient of the masked weight, dense). Candidates are the weights the denser level
    keeps but this level does not (tag == level - 1; for level 0, the pruned ones, tag == -1), or those tagged
    ``regrow_from`` (-1 while
    denser levels are not assigned yet, as in core-first training). Regrown weights that were pruned start
    at zero; those taken from a denser level keep their value, which that level shares. Every level keeps
    its count, so densities and nesting hold. ``frozen`` weights neither drop nor regrow."""
    if weight.shape != tags.shape or grad.shape != tags.shape:
        raise ValueError(
            f"grow_and_prune: weight {tuple(weight.shape)}, grad {tuple(grad.shape)} and tags "
            f"{tuple(tags.shape)} must have one shape"
        )
    if not weight.is_contiguous():
        raise ValueError("grow_and_prune: weight must be contiguous")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"grow_and_prune: fraction must lie in [0, 1], got {fraction}")
    flat_t, flat_w, flat_g = tags.view(-1), weight.detach().reshape(-1), grad.reshape(-1)
    free = torch.ones_like(flat_t, dtype=torch.bool) if frozen is None else ~frozen.reshape(-1)
    own = ((flat_t == level) & free).nonzero().squeeze(1)
    source = level - 1 if regrow_from is None else regrow_from
    if not -1 <= source < level:
        raise ValueError(f"grow_and_prune: regrow_from must lie in [-1, {level}), got {regrow_from}")
    cand = ((flat_t == source) & free).nonzero().squeeze(1)
    n = min(int(fraction * own.numel()), cand.numel())
    if n == 0:
        return 0
    drop = own[torch.argsort(flat_w[own].abs(), stable=True)[:n]]
    grow = cand[torch.argsort(flat_g[cand].abs(), descending=True, stable=True)[:n]]
    flat_t[drop] = source
    flat_t[grow] = level
    if source == -1:
        weight.view(-1)[grow] = 0
    return n
