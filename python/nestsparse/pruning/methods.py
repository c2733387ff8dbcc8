"""Nested mask training: progressive core-first and joint (sandwich) training over one masked dense model.

Method 1, one-shot magnitude tags without training, is ``nestsparse.model_tags``. The two methods here
train a model that ``prepare`` has given level masks (and, optionally, per-level BatchNorm); they update
the masks' tags with the cubic schedule and grow-and-prune (nestsparse.pruning.schedules) and return the
tags. ``unmask`` then gives the plain model and tags that ``nestsparse.convert`` turns into sparse kernels.

A ``Task`` says what the training data is and how to score the model; ``SupervisedTask`` covers (x, y)
classification tensors. Under torch.distributed, the model passed in may be a DistributedDataParallel
wrapper around a prepared model, and the task gives each rank its share of every batch; masks are then
computed from synchronised weights and all-reduced gradients, so every rank holds the same tags.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..formats import DEFAULT_BLOCK_SHAPE
from ..nn import LevelBatchNorm, level_batchnorms, set_level
from .masks import apply_level_masks, level_masks, masked_tags, raw_weights
from .schedules import cubic_density, grow_and_prune
from .tags import LevelSpec, level_spec, prunable_layers, tags_from_scores, transposed_layers, weight_tags

__all__ = ["Task", "SupervisedTask", "shard_batches", "prepare", "train_dense", "core_first", "joint"]


class Task(Protocol):
    """What training needs to know about the data: the batches of an epoch (this rank's share under
    torch.distributed), the model's logits on a batch, the loss, and the test score (higher is better)."""

    def batches(self, epoch: int) -> Iterable: ...

    def logits(self, model: nn.Module, batch) -> Tensor: ...

    def loss(self, logits: Tensor, batch) -> Tensor: ...

    def evaluate(self, model: nn.Module) -> float: ...


@dataclass
class SupervisedTask:
    """Classification on tensors: ``train``/``test`` are (x, y); batches as ``shard_batches`` draws them."""

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    batch_size: int = 64
    seed: int = 0

    def batches(self, epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        x, y = self.train
        for idx in shard_batches(len(y), self.batch_size, self.seed, epoch):
            yield x[idx], y[idx]

    def logits(self, model: nn.Module, batch) -> Tensor:
        return model(batch[0])

    def loss(self, logits: Tensor, batch) -> Tensor:
        return F.cross_entropy(logits, batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        x, y = self.test
        was_training = model.training
        model.eval()
        correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(512), y.split(512)))
        model.train(was_training)
        return correct / max(len(y), 1)


def shard_batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterable[Tensor]:
    """Index batches of an epoch over ``n`` samples: a permutation seeded by ``seed`` and ``epoch`` cut into
    ``batch_size`` pieces; under torch.distributed, this rank's contiguous slice of each (a last batch
    that does not divide by the world size is dropped), so N ranks see together what one process sees."""
    rank, world = _rank_world()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not divide by the world size {world}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    for idx in perm.split(batch_size):
        if world > 1:
            if len(idx) % world:
                continue
            share = len(idx) // world
            idx = idx[rank * share : (rank + 1) * share]
        yield idx


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def prepare(
    model: nn.Module,
    num_levels: int,
    *,
    skip: Iterable[str] = (),
    per_level_bn: bool = True,
    per_level_affine: bool = False,
) -> nn.Module:
    """Gives ``model`` (in place) level masks on every Linear/Conv2d outside ``skip``, all weights present at
    every level to start with, and with ``per_level_bn`` a LevelBatchNorm for each BatchNorm. Call it before
    wrapping the model in DistributedDataParallel (it replaces parameters); the methods call it themselves
    on an unwrapped model that has no masks yet."""
    if per_level_bn:
        level_batchnorms(model, num_levels, per_level_affine)
    layers = prunable_layers(model, skip)
    if not layers:
        raise ValueError("prepare: the model has no layer that converts (nestsparse.prunable_layers) outside skip")
    full = {n: torch.full(m.weight.shape, num_levels - 1, dtype=torch.int8) for n, m in layers.items()}
    return apply_level_masks(model, full, num_levels)


def _prepared(model: nn.Module, num_levels: int, skip, per_level_affine: bool) -> None:
    inner = _inner(model)
    masks = level_masks(inner)
    if not masks:
        if inner is not model:
            raise ValueError(
                "call nestsparse.pruning.prepare(model, ...) before wrapping it in DistributedDataParallel"
            )
        prepare(inner, num_levels, skip=skip, per_level_affine=per_level_affine)
    elif any(m.num_levels != num_levels for m in masks.values()):
        raise ValueError(
            f"the model's masks have {next(iter(masks.values())).num_levels} levels; the spec has {num_levels}"
        )


def _optimizer(
    params: Sequence[tuple[str, nn.Parameter]], lr: float, weight_decay: float, total_steps: int, model: nn.Module
):
    """AdamW (weight decay on weight matrices only, never on BatchNorm: decay would move the rows of levels
    that are not training) under a one-cycle schedule."""
    norm = {
        id(p)
        for m in model.modules()
        if isinstance(m, (LevelBatchNorm, nn.modules.batchnorm._BatchNorm))
        for p in m.parameters(recurse=False)
    }
    decay = [p for n, p in params if p.dim() > 1 and id(p) not in norm]
    rest = [p for n, p in params if p.dim() <= 1 or id(p) in norm]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total_steps, 1), pct_start=0.2)
    return opt, sched


def _check_task(where: str, task) -> None:
    """TypeError naming the mistake unless ``task`` has what training calls (a Task)."""
    missing = [m for m in ("batches", "logits", "loss", "evaluate") if not callable(getattr(task, m, None))]
    if missing:
        hint = " (data as (x, y) tuples: SupervisedTask((x, y), (x_test, y_test)))" if isinstance(task, tuple) else ""
        raise TypeError(
            f"{where}: task is a {type(task).__name__} without {', '.join(missing)}; a task is a "
            f"nestsparse.pruning.Task, e.g. nestsparse.pruning.SupervisedTask{hint}"
        )


def _epochs(task: Task, epochs: int, desc: str, progress: bool):
    show = progress and _rank_world()[0] == 0
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not show, leave=False):
        yield epoch, list(task.batches(epoch))


def train_dense(
    model: nn.Module,
    task: Task,
    epochs: int,
    *,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    max_grad_norm: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Ordinary training (the dense baseline the methods start from). AdamW under a one-cycle schedule;
    ``max_grad_norm`` clips the gradient norm (recurrent models want it)."""
    _check_task("train_dense", task)
    _check_counts("train_dense", epochs=epochs)
    torch.manual_seed(seed)
    steps = epochs * len(list(task.batches(0)))
    opt, sched = _optimizer(list(model.named_parameters()), lr, weight_decay, steps, model)
    model.train()
    for _, batches in _epochs(task, epochs, "dense training", progress):
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            task.loss(task.logits(model, batch), batch).backward()
            _step(model, opt, sched, max_grad_norm)
    return model.eval()


def _step(model: nn.Module, opt, sched, max_grad_norm: float | None) -> None:
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    sched.step()


def _distill(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    s = student.reshape(-1, student.shape[-1]) / temperature
    t = teacher.reshape(-1, teacher.shape[-1]) / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True) * temperature**2


def _scheduled_tags(
    model: nn.Module, densities: Sequence[float], scope: str, structure: str, block_shape, num_levels: int
) -> dict[str, Tensor]:
    """Tags of the raw weights for levels num_levels - len(densities) .. num_levels - 1 at ``densities``
    (densest first), among the weights level 0 keeps now. The levels before them are left as they are."""
    masks = level_masks(model)
    weights = {n: (w.detach() * (masks[n].tags >= 0)).float() for n, w in raw_weights(model).items()}
    spec = LevelSpec(tuple(densities))
    tags = weight_tags(weights, spec, scope, structure, block_shape, transposed_layers(model, weights))
    shift = num_levels - spec.num_levels
    return {n: torch.where(t >= 0, t + shift, t).to(torch.int8) for n, t in tags.items()}


def _check_counts(fn: str, **counts: int) -> None:
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{fn}: {name} must be a non-negative integer, got {v!r}")


def _all_reduce_grads(masks) -> None:
    if _rank_world()[1] > 1:
        for m in masks.values():
            dist.all_reduce(m.grad_sum)


def joint(
    model: nn.Module,
    task: Task,
    densities: LevelSpec | Sequence[float],
    epochs: int,
    *,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    prune_fraction: float = 0.5,
    tag_updates: int = 40,
    sandwich: bool = True,
    distill: float = 0.5,
    temperature: float = 2.0,
    skip: Iterable[str] = (),
    scope: str = "layer",
    structure: str = "unstructured",
    block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
    per_level_affine: bool = False,
    grow_prune_every: int = 0,
    grow_prune_fraction: float = 0.1,
    max_grad_norm: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Joint nested training (method 3): every step sums the losses of several levels over the shared weights.

    The levels of a step follow the sandwich rule: the densest, the sparsest and (with three or more
    levels) one drawn at random in between; ``sandwich=False`` uses every level. With ``distill`` > 0, a
    sparser level's loss is ``(1 - distill) * task loss + distill * KL(densest || level)`` at ``temperature``,
    the densest level's logits (detached) as the teacher. Each level keeps its own BatchNorm statistics
    (and its own affine with ``per_level_affine``, which applies when joint prepares the model itself).

    Masks: over the first ``prune_fraction`` of the steps every level's density follows the cubic schedule
    from 1 to its target (``tag_updates`` times), its tags recomputed from the weights' magnitudes among
    those level 0 still keeps (nested by construction); afterwards, with ``grow_prune_every`` > 0, every
    that many steps level 0 drops ``grow_prune_fraction`` of its own weights by magnitude and regrows as
    many pruned ones by gradient magnitude (starting at zero). Returns the tags; the model keeps its masks
    (evaluate levels with ``set_level``; ``unmask`` before ``convert``)."""
    spec = level_spec(densities)
    L = spec.num_levels
    if grow_prune_every and structure != "unstructured":
        raise ValueError("joint: grow-and-prune moves single weights; use it with structure='unstructured'")
    _check_task("joint", task)
    _check_counts("joint", epochs=epochs, tag_updates=tag_updates, grow_prune_every=grow_prune_every)
    if not 0.0 < prune_fraction <= 1.0 or not 0.0 <= distill <= 1.0 or temperature <= 0:
        raise ValueError(
            f"joint: need 0 < prune_fraction <= 1, 0 <= distill <= 1 and temperature > 0, got "
            f"{prune_fraction}, {distill}, {temperature}"
        )
    _prepared(model, L, skip, per_level_affine)
    inner = _inner(model)
    masks = level_masks(inner)
    torch.manual_seed(seed)
    pick = random.Random(seed)
    steps_per_epoch = len(list(task.batches(0)))
    total = epochs * steps_per_epoch
    prune_end = max(1, int(prune_fraction * total))
    update_every = max(1, prune_end // max(tag_updates, 1))
    opt, sched = _optimizer(list(model.named_parameters()), lr, weight_decay, total, model)
    ddp = model is not inner

    def prune(step: int) -> None:
        dens = [cubic_density(step, d, 0, prune_end) for d in spec.densities]
        apply_level_masks(inner, _scheduled_tags(inner, dens, scope, structure, block_shape, L), L)

    model.train()
    step = 0
    for _, batches in _epochs(task, epochs, "joint training", progress):
        for batch in batches:
            if step and step <= prune_end and (step % update_every == 0 or step == prune_end):
                prune(step)
            gp_now = grow_prune_every and step > prune_end and (step - prune_end) % grow_prune_every == 0
            for m in masks.values():
                m.capture_grad = bool(gp_now)
            levels = [0, L - 1] if L > 1 else [0]
            if L > 2:
                levels += [pick.randrange(1, L - 1)] if sandwich else list(range(1, L - 1))
            opt.zero_grad(set_to_none=True)
            teacher = None
            for i, lvl in enumerate(levels):
                set_level(inner, lvl)
                sync = contextlib.nullcontext() if not ddp or i == len(levels) - 1 else model.no_sync()
                with sync:
                    logits = task.logits(model, batch)
                    loss = task.loss(logits, batch)
                    if lvl == 0:
                        teacher = logits.detach()
                    elif distill > 0:
                        loss = (1 - distill) * loss + distill * _distill(logits, teacher, temperature)
                    (loss / len(levels)).backward()
            _step(model, opt, sched, max_grad_norm)
            if gp_now:
                _all_reduce_grads(masks)
                raws = raw_weights(inner)
                for name, m in masks.items():
                    grow_and_prune(raws[name].data, m.grad_sum, m.tags, 0, grow_prune_fraction, m.frozen)
                    m.capture_grad = False
            step += 1
    if step <= prune_end:  # the schedule ends with the last step: the targets still hold
        prune(prune_end)
    set_level(inner, 0)
    model.eval()
    return masked_tags(inner)


def _grow(masks, reference: dict[str, Tensor], level: int, density: float, scope: str) -> None:
    """Core-first growth: level ``level`` keeps every weight of the sparser levels plus the largest
    |reference| weights among the rest, ``density`` in all (per layer, or one budget with scope="global")."""
    scores = {
        n: torch.where(m.tags > level, torch.full_like(reference[n], float("inf")), reference[n].abs())
        for n, m in masks.items()
    }
    spec = LevelSpec((density,))
    if scope == "global":
        names = list(scores)
        flat = tags_from_scores(torch.cat([scores[n].flatten() for n in names]), spec)
        sizes = [scores[n].numel() for n in names]
        new = dict(zip(names, (t.reshape(scores[n].shape) for t, n in zip(flat.split(sizes), names))))
    else:
        new = {n: tags_from_scores(s, spec) for n, s in scores.items()}
    for n, m in masks.items():
        grown = (new[n] >= 0) & (m.tags < 0)
        m.tags[grown] = level


def core_first(
    model: nn.Module,
    task: Task,
    densities: LevelSpec | Sequence[float],
    *,
    prune_epochs: int,
    core_epochs: int,
    level_epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    tag_updates: int = 40,
    skip: Iterable[str] = (),
    scope: str = "layer",
    structure: str = "unstructured",
    block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE,
    grow_prune_every: int = 0,
    grow_prune_fraction: float = 0.1,
    max_grad_norm: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Progressive core-first training (method 2, the source paper's recipe), from a trained dense model.

    1. Core: the sparsest level is pruned by the cubic schedule over ``prune_epochs`` (magnitude, among the
       weights still kept) and trained ``core_epochs`` more; then its positions and values are frozen.
       With structure="bcr" the block row/column tags of all levels are chosen once from the dense weights
       (nestsparse.bcr_tags, nested by construction) and each level is trained in the same order.
    2. Each denser level, sparsest first, grows around the frozen ones: it adds the positions with the largest
       dense (pre-pruning) magnitude up to its density, the new weights starting at zero (so the level
       starts out computing what the sparser one does), and trains ``level_epochs`` with only its new
       weights and its own BatchNorm moving; then it is frozen too.
    Biases and layers left dense are trained with the core and then fixed, so a finished level's function
    never changes. BatchNorm gets per-level statistics and affine parameters (on a model that ``prepare``
    gave a shared BatchNorm affine, that affine stays as the core left it and only statistics are per level).
    The budget is per epoch of ``task.batches`` (with structure="bcr", ``prune_epochs`` is not used). With
    ``grow_prune_every`` > 0 (unstructured), the weights being trained also drop and regrow (grow-and-prune) that
    often, in steps.
    Returns the tags; the model keeps its masks."""
    spec = level_spec(densities)
    L = spec.num_levels
    if grow_prune_every and structure != "unstructured":
        raise ValueError("core_first: grow-and-prune moves single weights; use it with structure='unstructured'")
    _check_task("core_first", task)
    _check_counts(
        "core_first",
        prune_epochs=prune_epochs,
        core_epochs=core_epochs,
        level_epochs=level_epochs,
        tag_updates=tag_updates,
        grow_prune_every=grow_prune_every,
    )
    _prepared(model, L, skip, per_level_affine=True)
    inner = _inner(model)
    masks = level_masks(inner)
    raws = raw_weights(inner)
    reference = {n: w.detach().clone() for n, w in raws.items()}
    torch.manual_seed(seed)
    steps_per_epoch = len(list(task.batches(0)))
    fixed = None
    if structure == "bcr":
        fixed = weight_tags(reference, spec, scope, structure, block_shape, transposed_layers(inner, reference))
        apply_level_masks(inner, {n: torch.where(t == L - 1, t, -1).to(torch.int8) for n, t in fixed.items()}, L)

    def train_level(level: int, epochs: int, params, prune_steps: int = 0) -> None:
        total = epochs * steps_per_epoch
        opt, sched = _optimizer(params, lr, weight_decay, total, model)
        update_every = max(1, prune_steps // max(tag_updates, 1))
        set_level(inner, level)
        model.train()

        def prune(step: int) -> None:
            d = cubic_density(step, spec.densities[-1], 0, prune_steps)
            apply_level_masks(inner, _scheduled_tags(inner, [d], scope, structure, block_shape, L), L)

        step = 0
        for _, batches in _epochs(task, epochs, f"core-first level {level}", progress):
            for batch in batches:
                if prune_steps and step and step <= prune_steps and (step % update_every == 0 or step == prune_steps):
                    prune(step)
                gp_now = grow_prune_every and step > prune_steps and (step - prune_steps) % grow_prune_every == 0
                for m in masks.values():
                    m.capture_grad = bool(gp_now)
                opt.zero_grad(set_to_none=True)
                task.loss(task.logits(model, batch), batch).backward()
                _step(model, opt, sched, max_grad_norm)
                if gp_now:
                    _all_reduce_grads(masks)
                    for name, m in masks.items():
                        grow_and_prune(
                            raws[name].data, m.grad_sum, m.tags, level, grow_prune_fraction, m.frozen, regrow_from=-1
                        )
                        m.capture_grad = False
                step += 1
        if prune_steps and step <= prune_steps:  # the schedule ends with the last step: the target still holds
            prune(prune_steps)
        for name, m in masks.items():
            m.freeze(m.tags == level, raws[name])

    # Core: every parameter trains with the sparsest level; without pruning epochs, pruned at once.
    prune_steps = 0 if structure == "bcr" else prune_epochs * steps_per_epoch
    if structure != "bcr" and not prune_steps:
        apply_level_masks(inner, _scheduled_tags(inner, [spec.densities[-1]], scope, structure, block_shape, L), L)
    train_level(
        L - 1, (prune_epochs if structure != "bcr" else 0) + core_epochs, list(model.named_parameters()), prune_steps
    )
    # Denser levels: only the masked weights (whose frozen part cannot move) and the level's BatchNorm rows.
    # A BatchNorm affine shared by the levels (prepared with per_level_affine=False) stays as the core left it.
    bn_params = [
        (f"{n}.{p}", getattr(m, p))
        for n, m in inner.named_modules()
        if isinstance(m, LevelBatchNorm) and m.per_level_affine
        for p in ("weight", "bias")
    ]
    for level in range(L - 2, -1, -1):
        with torch.no_grad():
            if fixed is not None:
                for n, m in masks.items():
                    m.tags[(fixed[n] >= level) & (m.tags < 0)] = level
            else:
                _grow(masks, reference, level, spec.densities[level], scope)
            # New weights start at zero and the level's BatchNorm at the sparser level's: the level starts out
            # computing exactly what the sparser one does.
            for n, m in masks.items():
                raws[n].data[m.tags == level] = 0
            for bn in inner.modules():
                if isinstance(bn, LevelBatchNorm):
                    for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias):
                        if t is not None and t.dim() == 2:
                            t.data[level] = t.data[level + 1]
        train_level(level, level_epochs, list(raws.items()) + bn_params)
    set_level(inner, 0)
    model.eval()
    return masked_tags(inner)
