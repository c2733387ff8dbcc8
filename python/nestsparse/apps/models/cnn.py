"""The demo's small CNN for the 8x8 digits: two convolutions and two linear layers."""

from __future__ import annotations

from torch import nn

__all__ = ["digits_cnn", "dense_layers"]


def dense_layers(model: nn.Module) -> list[str]:
    """The first convolution (9 weights per filter) and the classifier stay dense, as pruning practice does."""
    return ["0", str(len(model) - 1)]


def digits_cnn(width: int = 64) -> nn.Sequential:
    """1x8x8 -> 10 logits; ``width`` channels in the first convolution."""
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 16 * width),
        nn.ReLU(),
        nn.Linear(16 * width, 10),
    )
    model.arch = {"name": "digits_cnn", "kwargs": {"width": width}}
    return model
