"""Level specifications, nested tags and nested mask training.

- tags.py: LevelSpec and tag assignment (one-shot magnitude or block row/column, per layer or global);
- masks.py: level masks on a dense model (``weight * (tags >= level)``) and back to plain weights + tags;
- schedules.py: the cubic gradual-pruning schedule and grow-and-prune;
- methods.py: progressive core-first and joint (sandwich) training.
"""

from .masks import LevelMask, apply_level_masks, level_masks, masked_tags, raw_weights, unmask
from .methods import SupervisedTask, Task, core_first, joint, prepare, shard_batches, train_dense
from .schedules import cubic_density, grow_and_prune
from .tags import (
    LevelSpec,
    bcr_tags,
    global_bcr_tags,
    global_magnitude_tags,
    magnitude_tags,
    masks_from_tags,
    model_tags,
    prunable_layers,
    tags_from_masks,
    weight_tags,
)

__all__ = [
    "LevelSpec",
    "magnitude_tags",
    "global_magnitude_tags",
    "bcr_tags",
    "global_bcr_tags",
    "model_tags",
    "weight_tags",
    "masks_from_tags",
    "tags_from_masks",
    "prunable_layers",
    "LevelMask",
    "apply_level_masks",
    "level_masks",
    "masked_tags",
    "raw_weights",
    "unmask",
    "cubic_density",
    "grow_and_prune",
    "Task",
    "SupervisedTask",
    "shard_batches",
    "prepare",
    "train_dense",
    "core_first",
    "joint",
]
