"""PointNet++ (single-scale grouping) classifier for (B, N, 3) point clouds.

Two set-abstraction stages (farthest point sampling from a fixed start point, k-nearest-neighbour grouping,
relative coordinates concatenated to the neighbours' features, a shared MLP, max over the neighbourhood),
a global stage (shared MLP over every remaining point, max over points) and an MLP classifier. Sampling and
grouping look only at coordinates and run without gradients, so they are deterministic and identical at every
sparsity level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "pointnet2",
    "PointNet2",
    "SetAbstraction",
    "SharedMLP",
    "farthest_point_sample",
    "knn",
    "DENSE_LAYERS",
    "dense_layers",
]

DENSE_LAYERS = ("sa1.mlp.linears.0", "fc")
"""Layers usually left dense: the first point-wise layer (3 inputs, few weights) and the classifier output."""


def dense_layers(model: nn.Module) -> list[str]:
    return list(DENSE_LAYERS)


@torch.no_grad()
def farthest_point_sample(xyz: Tensor, npoint: int) -> Tensor:
    """Indices (B, npoint) of farthest point sampling of ``xyz`` (B, N, 3), starting at point 0 (ties: lowest
    index)."""
    B, N, _ = xyz.shape
    npoint = min(npoint, N)
    idx = torch.zeros(B, npoint, dtype=torch.int64, device=xyz.device)
    dist = torch.full((B, N), float("inf"), dtype=xyz.dtype, device=xyz.device)
    batch = torch.arange(B, device=xyz.device)
    far = torch.zeros(B, dtype=torch.int64, device=xyz.device)
    for i in range(npoint):
        idx[:, i] = far
        centre = xyz[batch, far].unsqueeze(1)
        dist = torch.minimum(dist, (xyz - centre).pow(2).sum(-1))
        far = dist.argmax(1)
    return idx


@torch.no_grad()
def knn(query: Tensor, points: Tensor, k: int) -> Tensor:
    """Indices (B, S, k) of the k nearest ``points`` (B, N, 3) of each ``query`` point (B, S, 3), nearest first."""
    d = (query.unsqueeze(2) - points.unsqueeze(1)).pow(2).sum(-1)
    return d.topk(min(k, points.shape[1]), dim=2, largest=False, sorted=True).indices


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, C) gathered by idx (B, *S) -> (B, *S, C)."""
    B = x.shape[0]
    flat = idx.reshape(B, -1)
    out = x.gather(1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.reshape(*idx.shape, x.shape[-1])


class SharedMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU, repeated, applied to the last dimension of a (..., C) tensor (BatchNorm
    over the channels of every point: the input is seen as (-1, C))."""

    def __init__(self, in_features: int, widths: Sequence[int]):
        super().__init__()
        self.linears, self.norms, self.acts = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for w in widths:
            self.linears.append(nn.Linear(in_features, w, bias=False))
            self.norms.append(nn.BatchNorm1d(w))
            self.acts.append(nn.ReLU())
            in_features = w
        self.out_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        for lin, bn, act in zip(self.linears, self.norms, self.acts):
            x = lin(x)
            shape = x.shape
            x = act(bn(x.reshape(-1, shape[-1])).reshape(shape))
        return x


class SetAbstraction(nn.Module):
    """Samples ``npoint`` centres, groups their ``k`` nearest neighbours, and summarises each group by a shared
    MLP over [relative xyz, neighbour features] and a max."""

    def __init__(self, npoint: int, k: int, in_features: int, widths: Sequence[int]):
        super().__init__()
        self.npoint, self.k = npoint, k
        self.mlp = SharedMLP(in_features + 3, widths)

    def forward(self, xyz: Tensor, feats: Tensor | None) -> tuple[Tensor, Tensor]:
        centres_idx = farthest_point_sample(xyz, self.npoint)
        centres = _gather(xyz, centres_idx)  # (B, S, 3)
        group_idx = knn(centres, xyz, self.k)  # (B, S, k)
        rel = _gather(xyz, group_idx) - centres.unsqueeze(2)  # (B, S, k, 3)
        x = rel if feats is None else torch.cat([rel, _gather(feats, group_idx)], -1)
        return centres, self.mlp(x).amax(2)


class PointNet2(nn.Module):
    """PointNet++ SSG classifier: ``sa1``, ``sa2`` (set abstraction), ``glob`` (shared MLP over [xyz, features],
    max over points), ``head`` (Linear-BatchNorm1d-ReLU-Dropout) and ``fc`` (the output layer).

    Normally left dense when pruning: ``sa1.mlp.linears.0`` (first point-wise layer, 3 inputs) and ``fc``
    (classifier output); see ``DENSE_LAYERS``."""

    def __init__(
        self,
        num_classes: int,
        sa1: tuple[int, int, Sequence[int]],
        sa2: tuple[int, int, Sequence[int]],
        global_mlp: Sequence[int],
        hidden: int,
        dropout: float,
    ):
        super().__init__()
        self.sa1 = SetAbstraction(sa1[0], sa1[1], 0, sa1[2])
        self.sa2 = SetAbstraction(sa2[0], sa2[1], self.sa1.mlp.out_features, sa2[2])
        self.glob = SharedMLP(self.sa2.mlp.out_features + 3, global_mlp)
        self.head = nn.Sequential(
            nn.Linear(self.glob.out_features, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, xyz: Tensor) -> Tensor:
        if xyz.dim() != 3 or xyz.shape[-1] != 3:
            raise ValueError(f"PointNet2: expected points of shape (B, N, 3), got {tuple(xyz.shape)}")
        xyz1, f1 = self.sa1(xyz, None)
        xyz2, f2 = self.sa2(xyz1, f1)
        g = self.glob(torch.cat([xyz2, f2], -1)).amax(1)
        return self.fc(self.head(g))


def pointnet2(
    num_classes: int = 8,
    sa1_points: int = 64,
    sa1_k: int = 16,
    sa1_mlp: Sequence[int] = (32, 32, 64),
    sa2_points: int = 16,
    sa2_k: int = 16,
    sa2_mlp: Sequence[int] = (64, 64, 128),
    global_mlp: Sequence[int] = (128, 256),
    hidden: int = 128,
    dropout: float = 0.4,
) -> PointNet2:
    """A small PointNet++ SSG for ~128-point clouds: ``sa1_points`` centres with ``sa1_k`` neighbours, then
    ``sa2_points`` with ``sa2_k``, each with its shared MLP widths; the global MLP; a hidden classifier layer."""
    sa1_mlp, sa2_mlp, global_mlp = [int(w) for w in sa1_mlp], [int(w) for w in sa2_mlp], [int(w) for w in global_mlp]
    model = PointNet2(
        num_classes, (sa1_points, sa1_k, sa1_mlp), (sa2_points, sa2_k, sa2_mlp), global_mlp, hidden, dropout
    )
    model.arch = {
        "name": "pointnet2",
        "kwargs": {
            "num_classes": num_classes,
            "sa1_points": sa1_points,
            "sa1_k": sa1_k,
            "sa1_mlp": sa1_mlp,
            "sa2_points": sa2_points,
            "sa2_k": sa2_k,
            "sa2_mlp": sa2_mlp,
            "global_mlp": global_mlp,
            "hidden": hidden,
            "dropout": dropout,
        },
    }
    return model
