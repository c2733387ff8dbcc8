"""ResNets: the full-size ResNet-50 v1.5 of the paper and a small BasicBlock ResNet for the 8x8 digits.

Module names follow torchvision (conv1, bn1, layer1..layerN, fc; inside a block conv1/bn1/conv2/bn2[/conv3/bn3]
and downsample = nn.Sequential(conv 1x1, BatchNorm2d)), except that every block owns one nn.ReLU per use
(relu1, relu2[, relu3]) so that no activation module is shared.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["resnet50", "resnet_small", "ResNet", "BasicBlock", "Bottleneck", "DENSE_LAYERS", "dense_layers"]

DENSE_LAYERS = ("conv1", "fc")
"""Layers usually left dense when pruning a ResNet: the stem convolution and the classifier."""


def dense_layers(model: nn.Module) -> list[str]:
    return list(DENSE_LAYERS)


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (stride on the first)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = _downsample(inplanes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here: ResNet v1.5) -> 1x1 (x4 channels), with a residual connection."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu3 = nn.ReLU()
        self.downsample = _downsample(inplanes, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """A ResNet: stem (conv1, bn1, relu[, maxpool]), stages layer1..layerN, global average pool, fc.

    Normally left dense when pruning: ``conv1`` (the stem: few weights, every pixel goes through it) and
    ``fc`` (the classifier); see ``DENSE_LAYERS``."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        stem_width: int = 64,
        imagenet_stem: bool = True,
    ):
        super().__init__()
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet_stem else nn.Identity()
        inplanes = stem_width
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(block(inplanes, planes, stride if j == 0 else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 v1.5 (bottleneck blocks [3, 4, 6, 3], stride on the 3x3 conv), 224x224 RGB input: 25,557,032
    parameters with 1000 classes, as torchvision's."""
    model = ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), num_classes)
    model.arch = {"name": "resnet50", "kwargs": {"num_classes": num_classes}}
    return model


def resnet_small(
    num_classes: int = 10, in_channels: int = 1, width: int = 16, blocks: Sequence[int] = (2, 2, 2)
) -> ResNet:
    """A BasicBlock ResNet for tiny images such as the 8x8 digits: 3x3 stem at stride 1 without max pool, then
    one stage per entry of ``blocks`` at widths width, 2*width, 4*width, ... (stride 1, then 2 for each later
    stage), global average pool and fc."""
    blocks = [int(b) for b in blocks]
    model = ResNet(
        BasicBlock,
        blocks,
        [width * 2**i for i in range(len(blocks))],
        num_classes,
        in_channels=in_channels,
        stem_width=width,
        imagenet_stem=False,
    )
    model.arch = {
        "name": "resnet_small",
        "kwargs": {"num_classes": num_classes, "in_channels": in_channels, "width": width, "blocks": blocks},
    }
    return model
