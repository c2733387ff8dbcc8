"""Graph attention network (Velickovic et al., ICLR 2018) on a dense boolean adjacency matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["gat", "GAT", "GATConv", "DENSE_LAYERS", "dense_layers"]

DENSE_LAYERS = ("conv2.lin",)
"""Left dense: the output layer's projection (hidden*heads -> classes, few weights). The per-head attention
vectors are nn.Parameters, never pruned."""


def dense_layers(model: nn.Module) -> list[str]:
    return list(DENSE_LAYERS)


class GATConv(nn.Module):
    """One graph attention layer: h = lin(x) split into ``heads`` of ``out_features``; for an edge j -> i,
    e_ij = LeakyReLU_0.2(att_dst . h_i + att_src . h_j); alpha_i = softmax of e_i over the neighbours of i
    (``adj[i, j]``, which should include i itself); out_i = sum_j alpha_ij h_j (+ bias), heads concatenated or
    averaged. Dropout on the input and on the attention coefficients in training."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        heads: int = 1,
        concat: bool = True,
        dropout: float = 0.0,
        negative_slope: float = 0.2,
    ):
        super().__init__()
        self.heads, self.out_features, self.concat = heads, out_features, concat
        self.negative_slope = negative_slope
        self.lin = nn.Linear(in_features, heads * out_features, bias=False)
        self.att_src = nn.Parameter(torch.empty(heads, out_features))
        self.att_dst = nn.Parameter(torch.empty(heads, out_features))
        self.bias = nn.Parameter(torch.zeros(heads * out_features if concat else out_features))
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.lin.weight)
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        """x (N, in_features), adj (N, N) bool with adj[i, j] = j is a neighbour of i -> (N, heads*out) or (N, out)."""
        N = x.shape[0]
        h = self.lin(self.dropout(x)).reshape(N, self.heads, self.out_features)  # (N, H, F)
        src = (h * self.att_src).sum(-1)  # (N, H)
        dst = (h * self.att_dst).sum(-1)
        e = F.leaky_relu(dst.T.unsqueeze(2) + src.T.unsqueeze(1), self.negative_slope)  # (H, N_i, N_j)
        e = e.masked_fill(~adj.unsqueeze(0), float("-inf"))
        alpha = self.attn_dropout(torch.softmax(e, -1).nan_to_num(0.0))  # a node without neighbours gets zeros
        out = (alpha @ h.transpose(0, 1)).transpose(0, 1)  # (N, H, F)
        out = out.reshape(N, -1) if self.concat else out.mean(1)
        return out + self.bias


class GAT(nn.Module):
    """Two-layer GAT: ``conv1`` (``heads`` heads of ``hidden`` features, concatenated, ELU) and ``conv2`` (one
    head of ``num_classes`` outputs). ``forward(x, adj)`` -> logits (N, num_classes).

    Normally left dense when pruning: ``conv2.lin`` (the output projection); the attention vectors are
    parameters, not layers, and stay dense. See ``DENSE_LAYERS``."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.conv1 = GATConv(in_features, hidden, heads, concat=True, dropout=dropout)
        self.act = nn.ELU()
        self.conv2 = GATConv(hidden * heads, num_classes, 1, concat=False, dropout=dropout)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        return self.conv2(self.act(self.conv1(x, adj)), adj)


def gat(in_features: int = 32, num_classes: int = 5, hidden: int = 8, heads: int = 8, dropout: float = 0.6) -> GAT:
    """A two-layer GAT (Cora-style sizes by default) for ``nestsparse.apps.data.sbm_graph``."""
    model = GAT(in_features, num_classes, hidden, heads, dropout)
    model.arch = {
        "name": "gat",
        "kwargs": {
            "in_features": in_features,
            "num_classes": num_classes,
            "hidden": hidden,
            "heads": heads,
            "dropout": dropout,
        },
    }
    return model
