"""Model zoo: the paper's four families (ResNet, PointNet++, GNMT, GAT), MobileNetV2, the demo's CNN and the 28x28
CNN in plain PyTorch; the pretrained all-MiniLM-L6-v2 with a classification head (transformers).

Every weight matrix worth sparsifying is an nn.Linear or nn.Conv2d (what nestsparse.prunable_layers and
nestsparse.convert handle), normalisation is nn.BatchNorm1d / nn.BatchNorm2d only, and no nn.ReLU module is
used twice. Each builder records how it was called in ``model.arch = {"name": ..., "kwargs": {...}}`` (JSON
data), so ``build(**)`` can rebuild the skeleton, e.g. to load saved weights without pickle:

    model = build(arch["name"], **arch["kwargs"])

``dense_layers(model)`` names the layers one normally leaves dense (stem, classifier, embeddings...), ready
for ``nestsparse.model_tags(model, densities, skip=dense_layers(model))``. Importing this package registers every
model with nestsparse.io, so ``nestsparse.load(path)`` rebuilds a saved zoo model without a skeleton.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...io import register_architecture
from . import cnn as _cnn
from . import gat as _gat
from . import gnmt as _gnmt
from . import minilm as _minilm
from . import mobilenet as _mobilenet
from . import pointnet as _pointnet
from . import resnet as _resnet
from .cnn import MnistCNN, digits_cnn, mnist_cnn
from .gat import GAT, GATConv, gat
from .gnmt import GNMT, LSTM, gnmt
from .minilm import MiniLMClassifier, minilm_classifier, minilm_path, minilm_tokenizer
from .mobilenet import MobileNetV2, mobilenet_v2
from .mobilenet import pretrained_path as mobilenet_pretrained_path
from .pointnet import PointNet2, pointnet2
from .resnet import ResNet, resnet50, resnet_small

__all__ = [
    "MODELS",
    "build",
    "dense_layers",
    "resnet50",
    "resnet_small",
    "mobilenet_v2",
    "MobileNetV2",
    "mobilenet_pretrained_path",
    "pointnet2",
    "gnmt",
    "gat",
    "digits_cnn",
    "mnist_cnn",
    "MnistCNN",
    "minilm_classifier",
    "minilm_tokenizer",
    "minilm_path",
    "MiniLMClassifier",
    "ResNet",
    "PointNet2",
    "GNMT",
    "LSTM",
    "GAT",
    "GATConv",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": resnet50,
    "resnet_small": resnet_small,
    "mobilenet_v2": mobilenet_v2,
    "pointnet2": pointnet2,
    "gnmt": gnmt,
    "gat": gat,
    "digits_cnn": digits_cnn,
    "mnist_cnn": mnist_cnn,
    "minilm_classifier": minilm_classifier,
}

_DENSE = {
    "resnet50": _resnet.dense_layers,
    "resnet_small": _resnet.dense_layers,
    "mobilenet_v2": _mobilenet.dense_layers,
    "pointnet2": _pointnet.dense_layers,
    "gnmt": _gnmt.dense_layers,
    "gat": _gat.dense_layers,
    "digits_cnn": _cnn.dense_layers,
    "mnist_cnn": _cnn.mnist_cnn_dense_layers,
    "minilm_classifier": _minilm.dense_layers,
}

for _name, _builder in MODELS.items():
    register_architecture(_name, _builder)


def build(name: str, **kwargs) -> nn.Module:
    """The model ``name`` of ``MODELS`` built with ``kwargs`` (its ``arch`` attribute records both)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def dense_layers(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` (built by this package) usually left dense when pruning."""
    arch = getattr(model, "arch", None)
    if not isinstance(arch, dict) or arch.get("name") not in _DENSE:
        raise ValueError(
            "dense_layers: the model has no arch record of a known model "
            f"(expected model.arch = {{'name': one of {sorted(MODELS)}, 'kwargs': ...}})"
        )
    return _DENSE[arch["name"]](model)
