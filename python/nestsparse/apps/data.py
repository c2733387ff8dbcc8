"""Seeded datasets that need no download, one per model family of nestsparse.apps.models.

Every generator takes a ``seed`` and draws from its own ``torch.Generator`` (never the global RNG), so the
same arguments give bit-identical tensors on every call and every machine.

``digits(seed=0)``
    scikit-learn's bundled 8x8 handwritten digits (1797 images, no download): x (N, 1, 8, 8) float32
    standardised, y int64 in 0..9, split 70/30 by a seeded permutation. Returns ((x_tr, y_tr), (x_te, y_te)).
    For ``models.resnet_small`` and ``models.digits_cnn``; ``labelled_batches`` cuts a set into scored batches.

``point_clouds(n_per_class=100, num_points=128, seed=0, noise=0.02, test_fraction=0.3)``
    Point-cloud classification over the shapes in ``POINT_CLOUD_CLASSES`` (label = index in that tuple).
    Each cloud has ``num_points`` points sampled (roughly area-uniformly) on the surface of a parametric
    shape of unit size, stretched per axis by a factor drawn from ``SCALE_RANGE`` (anisotropic, so a sphere
    can look like a mild ellipsoid, a cube like a box), turned by a uniformly random 3-D rotation, centred at
    its mean and jittered by Gaussian noise of std ``noise``. Some pairs (sphere/ellipsoid, cone/pyramid,
    cube/cylinder) are deliberately close. ``test_fraction`` of each class goes to the test set. Returns
    ((x_tr, y_tr), (x_te, y_te)): x float32 (N, num_points, 3), y int64; the training set is shuffled.
    For ``models.pointnet2``.

``seq2seq(n_train=4000, n_test=500, seed=0, vocab=20, min_len=4, max_len=10, noise=0.05, task="reverse")``
    A sequence-to-sequence task. Tokens: ``PAD`` = 0, ``BOS`` = 1, ``EOS`` = 2, content tokens 3..vocab-1.
    A source is a uniformly random content sequence of uniformly random length in [min_len, max_len]; its
    target is the source reversed (``task="reverse"``) or sorted ascending (``task="sort"``), then EOS.
    Label noise: in the TRAINING targets only, each content token is replaced, with probability ``noise``,
    by a different random content token (the test set is clean; EOS and PAD are never touched, and the clean
    targets do not depend on ``noise``). Returns a ``Seq2SeqData``: src (N, max_len) without BOS/EOS, tgt
    (N, max_len + 1) = content + EOS, both int64 and right-padded with PAD. A decoder is fed
    BOS + tgt[:, :-1] (teacher forcing). For ``models.gnmt``.

``sbm_graph(num_nodes=600, num_classes=5, p_in=0.04, p_out=0.004, feature_dim=32, feature_noise=1.0, seed=0,
train_per_class=20, num_val=100, feature_scale=1.5)``
    Node classification on a stochastic block model: classes drawn uniformly, an undirected edge between
    nodes i < j with probability ``p_in`` if they share a class else ``p_out`` (symmetric, no duplicates),
    plus a self loop on every node. Features: a per-class mean (a random unit vector times
    ``feature_scale``) plus Gaussian noise of std ``feature_noise`` per dimension, so features alone are only
    moderately informative and the neighbourhood (mostly same-class) helps. Split like Planetoid:
    ``train_per_class`` random nodes of each class for training, ``num_val`` other random nodes for
    validation, the rest for test. Returns a ``Graph`` (x (N, F) float32, adj (N, N) bool dense adjacency
    with self loops, y int64, train/val/test boolean masks). For ``models.gat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "digits",
    "labelled_batches",
    "point_clouds",
    "POINT_CLOUD_CLASSES",
    "SCALE_RANGE",
    "seq2seq",
    "Seq2SeqData",
    "PAD",
    "BOS",
    "EOS",
    "sbm_graph",
    "Graph",
]


# ----------------------------------------------------------------------------------------------- digits


def digits(seed: int = 0):
    """scikit-learn's 8x8 digits (1797 images, shipped with the package), standardised, split 70/30."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the digits data comes with scikit-learn, an optional dependency of the demo: "
            "pip install 'nestsparse[demo]' (or pip install scikit-learn matplotlib)"
        ) from e

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    x = (x - x.mean()) / x.std()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.7 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return (x[tr], y[tr]), (x[te], y[te])


def labelled_batches(data: tuple[torch.Tensor, torch.Tensor], batch: int):
    """``inputs(i)``: the i-th batch of ``data`` (cycling), as an argument tuple; ``score(i, logits)``: its share
    of correct answers."""
    x, y = data
    n_batches = len(y) // batch
    if batch < 1 or n_batches < 1:
        raise ValueError(f"batch must be in [1, {len(y)}], got {batch}")

    def inputs(i):
        j = i % n_batches
        return (x[j * batch : (j + 1) * batch].contiguous(),)

    def score(i, out):
        j = i % n_batches
        return (out.argmax(1) == y[j * batch : (j + 1) * batch]).float().mean().item()

    return inputs, score


# ----------------------------------------------------------------------------------------- point clouds

POINT_CLOUD_CLASSES = ("sphere", "ellipsoid", "cube", "cylinder", "cone", "pyramid", "torus", "helix")
"""Class names of ``point_clouds``, in label order."""

SCALE_RANGE = (0.75, 1.25)
"""Per-axis stretch factors of ``point_clouds`` are drawn uniformly from this range."""


def _uniform(g: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float64)


def _pick(g: torch.Generator, weights: list[float], n: int) -> Tensor:
    """n indices drawn with probabilities proportional to ``weights`` (area weights of surface parts)."""
    w = torch.tensor(weights, dtype=torch.float64)
    return torch.multinomial(w / w.sum(), n, replacement=True, generator=g)


def _triangles(g: torch.Generator, tri: Tensor, n: int) -> Tensor:
    """n points uniform over the union of triangles ``tri`` (T, 3, 3), area-weighted."""
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=1)
    which = _pick(g, area.tolist(), n)
    u, v = _uniform(g, n, 1), _uniform(g, n, 1)
    flip = (u + v) > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    t = tri[which]
    return t[:, 0] + u * (t[:, 1] - t[:, 0]) + v * (t[:, 2] - t[:, 0])


def _sphere(g, n):
    p = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _ellipsoid(g, n):
    return _sphere(g, n) * torch.tensor([1.0, 0.6, 0.45], dtype=torch.float64)


def _cube(g, n):
    face = torch.randint(0, 6, (n,), generator=g)
    p = _uniform(g, n, 3) * 2 - 1
    axis, sign = face // 2, (face % 2).to(torch.float64) * 2 - 1
    p[torch.arange(n), axis] = sign
    return p * 0.8


def _disc_points(g, n, radius):
    r = radius * _uniform(g, n).sqrt()
    a = 2 * math.pi * _uniform(g, n)
    return r * torch.cos(a), r * torch.sin(a)


def _cylinder(g, n):
    r, h = 0.6, 1.6
    part = _pick(g, [2 * math.pi * r * h, math.pi * r * r, math.pi * r * r], n)
    a = 2 * math.pi * _uniform(g, n)
    side = torch.stack([r * torch.cos(a), r * torch.sin(a), h * (_uniform(g, n) - 0.5)], 1)
    dx, dy = _disc_points(g, n, r)
    cap = torch.stack([dx, dy, torch.where(part == 1, h / 2, -h / 2).to(torch.float64)], 1)
    return torch.where((part == 0).unsqueeze(1), side, cap)


def _cone(g, n):
    r, h = 0.6, 1.6
    slant = math.hypot(r, h)
    part = _pick(g, [math.pi * r * slant, math.pi * r * r], n)
    s = _uniform(g, n).sqrt()  # distance from the apex, area-uniform on the lateral surface
    a = 2 * math.pi * _uniform(g, n)
    side = torch.stack([s * r * torch.cos(a), s * r * torch.sin(a), h / 2 - s * h], 1)
    dx, dy = _disc_points(g, n, r)
    base = torch.stack([dx, dy, torch.full((n,), -h / 2, dtype=torch.float64)], 1)
    return torch.where((part == 0).unsqueeze(1), side, base)


def _pyramid(g, n):
    b, h = 0.8, 1.2
    c = [(-b, -b), (b, -b), (b, b), (-b, b)]
    apex = (0.0, 0.0, h / 2)
    tri = [[(*c[i], -h / 2), (*c[(i + 1) % 4], -h / 2), apex] for i in range(4)]
    tri += [[(*c[0], -h / 2), (*c[1], -h / 2), (*c[2], -h / 2)], [(*c[0], -h / 2), (*c[2], -h / 2), (*c[3], -h / 2)]]
    return _triangles(g, torch.tensor(tri, dtype=torch.float64), n)


def _torus(g, n):
    R, r = 0.7, 0.25
    # Rejection-free area weighting: the tube angle b has density proportional to R + r cos b.
    b = torch.empty(n, dtype=torch.float64)
    filled = 0
    while filled < n:
        cand = 2 * math.pi * _uniform(g, 2 * n)
        keep = cand[_uniform(g, 2 * n) * (R + r) <= R + r * torch.cos(cand)]
        take = min(n - filled, keep.numel())
        b[filled : filled + take] = keep[:take]
        filled += take
    a = 2 * math.pi * _uniform(g, n)
    return torch.stack(
        [(R + r * torch.cos(b)) * torch.cos(a), (R + r * torch.cos(b)) * torch.sin(a), r * torch.sin(b)], 1
    )


def _helix(g, n):
    turns, radius, height, tube = 3.0, 0.55, 1.6, 0.08
    t = _uniform(g, n)
    a = 2 * math.pi * turns * t
    centre = torch.stack([radius * torch.cos(a), radius * torch.sin(a), height * (t - 0.5)], 1)
    return centre + tube * _sphere(g, n)


_SHAPES = {
    "sphere": _sphere,
    "ellipsoid": _ellipsoid,
    "cube": _cube,
    "cylinder": _cylinder,
    "cone": _cone,
    "pyramid": _pyramid,
    "torus": _torus,
    "helix": _helix,
}


def _rotation(g: torch.Generator) -> Tensor:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, signs fixed, determinant +1)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(3, dtype=torch.float64))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def point_clouds(
    n_per_class: int = 100, num_points: int = 128, seed: int = 0, noise: float = 0.02, test_fraction: float = 0.3
):
    """Point clouds of the shapes in ``POINT_CLOUD_CLASSES``, randomly stretched, rotated, centred and jittered
    (see the module docstring). Returns ((x_tr, y_tr), (x_te, y_te)); x float32 (N, num_points, 3), y int64."""
    if n_per_class < 2 or num_points < 1:
        raise ValueError(f"point_clouds: need n_per_class >= 2 and num_points >= 1, got {n_per_class}, {num_points}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"point_clouds: test_fraction must lie in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    lo, hi = SCALE_RANGE
    n_test = max(1, min(n_per_class - 1, round(test_fraction * n_per_class)))
    xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
    for label, name in enumerate(POINT_CLOUD_CLASSES):
        clouds = []
        for _ in range(n_per_class):
            p = _SHAPES[name](g, num_points)
            p = p * (lo + (hi - lo) * _uniform(g, 3))
            p = p @ _rotation(g).T
            p = p - p.mean(0)
            p = p + noise * torch.randn(p.shape, generator=g, dtype=torch.float64)
            clouds.append(p)
        x = torch.stack(clouds).to(torch.float32)
        y = torch.full((n_per_class,), label, dtype=torch.int64)
        xs_tr.append(x[n_test:]), ys_tr.append(y[n_test:]), xs_te.append(x[:n_test]), ys_te.append(y[:n_test])
    x_tr, y_tr = torch.cat(xs_tr), torch.cat(ys_tr)
    perm = torch.randperm(len(y_tr), generator=g)
    return (x_tr[perm], y_tr[perm]), (torch.cat(xs_te), torch.cat(ys_te))


# -------------------------------------------------------------------------------------------- seq2seq

PAD, BOS, EOS = 0, 1, 2
"""Special tokens of ``seq2seq``; content tokens are 3..vocab-1."""


@dataclass
class Seq2SeqData:
    """Token tensors of ``seq2seq`` (int64, right-padded with PAD): src (N, max_len) is content only, tgt
    (N, max_len + 1) is content + EOS. ``vocab`` counts PAD, BOS and EOS."""

    src_train: Tensor
    tgt_train: Tensor
    src_test: Tensor
    tgt_test: Tensor
    vocab: int
    max_len: int
    task: str = "reverse"


def _sequences(g: torch.Generator, n: int, vocab: int, min_len: int, max_len: int, task: str):
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    tokens = torch.randint(3, vocab, (n, max_len), generator=g)
    pos = torch.arange(max_len)
    valid = pos < lengths[:, None]
    src = torch.where(valid, tokens, torch.full_like(tokens, PAD))
    if task == "reverse":
        idx = (lengths[:, None] - 1 - pos).clamp_min(0)
        content = torch.where(valid, src.gather(1, idx), torch.full_like(src, PAD))
    else:  # sort: PAD would sort first, so sort with PAD as +inf and it stays at the end
        content = torch.where(valid, src, torch.full_like(src, vocab)).sort(1).values
        content = torch.where(valid, content, torch.full_like(src, PAD))
    tgt = torch.cat([content, torch.full((n, 1), PAD, dtype=torch.int64)], 1)
    tgt[torch.arange(n), lengths] = EOS
    return src, tgt


def seq2seq(
    n_train: int = 4000,
    n_test: int = 500,
    seed: int = 0,
    vocab: int = 20,
    min_len: int = 4,
    max_len: int = 10,
    noise: float = 0.05,
    task: str = "reverse",
) -> Seq2SeqData:
    """Reverse or sort random token sequences, with label noise in the training targets only (see the module
    docstring)."""
    if task not in ("reverse", "sort"):
        raise ValueError(f"seq2seq: task must be 'reverse' or 'sort', got {task!r}")
    if vocab < 5:
        raise ValueError(f"seq2seq: vocab must be at least 5 (PAD, BOS, EOS and 2 content tokens), got {vocab}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"seq2seq: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"seq2seq: noise must lie in [0, 1], got {noise}")
    g = torch.Generator().manual_seed(seed)
    src_tr, tgt_tr = _sequences(g, n_train, vocab, min_len, max_len, task)
    src_te, tgt_te = _sequences(g, n_test, vocab, min_len, max_len, task)
    # Drawn whatever `noise` is, so the clean data never depends on it.
    u = torch.rand(tgt_tr.shape, generator=g)
    shift = torch.randint(1, vocab - 3, tgt_tr.shape, generator=g)
    flip = (u < noise) & (tgt_tr >= 3)
    noisy = (tgt_tr - 3 + shift) % (vocab - 3) + 3  # a different content token, uniform over the others
    tgt_tr = torch.where(flip, noisy, tgt_tr)
    return Seq2SeqData(src_tr, tgt_tr, src_te, tgt_te, vocab, max_len, task)


# ---------------------------------------------------------------------------------------------- graph


@dataclass
class Graph:
    """A node-classification graph: features x (N, F) float32, dense boolean adjacency adj (N, N) with self
    loops, labels y int64 and boolean train/val/test masks (disjoint, covering every node)."""

    x: Tensor
    adj: Tensor
    y: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1


def sbm_graph(
    num_nodes: int = 600,
    num_classes: int = 5,
    p_in: float = 0.04,
    p_out: float = 0.004,
    feature_dim: int = 32,
    feature_noise: float = 1.0,
    seed: int = 0,
    train_per_class: int = 20,
    num_val: int = 100,
    feature_scale: float = 1.5,
) -> Graph:
    """A stochastic block model graph with noisy class-mean features and a Planetoid-like split (see the
    module docstring)."""
    if num_classes < 2 or num_nodes < num_classes:
        raise ValueError(
            f"sbm_graph: need num_classes >= 2 and num_nodes >= num_classes, got {num_nodes}, {num_classes}"
        )
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (num_nodes,), generator=g)
    counts = torch.bincount(y, minlength=num_classes)
    if int(counts.min()) < train_per_class:
        raise ValueError(
            f"sbm_graph: a class has only {int(counts.min())} nodes, fewer than train_per_class={train_per_class}"
        )
    same = y[:, None] == y[None, :]
    p = torch.where(same, torch.tensor(p_in), torch.tensor(p_out))
    upper = (torch.rand(num_nodes, num_nodes, generator=g) < p).triu(1)
    adj = upper | upper.T | torch.eye(num_nodes, dtype=torch.bool)
    means = torch.randn(num_classes, feature_dim, generator=g)
    means = feature_scale * means / means.norm(dim=1, keepdim=True)
    x = means[y] + feature_noise * torch.randn(num_nodes, feature_dim, generator=g)
    train_mask = torch.zeros(num_nodes, dtype=torch.bool)
    for c in range(num_classes):
        idx = (y == c).nonzero().squeeze(1)
        train_mask[idx[torch.randperm(idx.numel(), generator=g)[:train_per_class]]] = True
    rest = (~train_mask).nonzero().squeeze(1)
    rest = rest[torch.randperm(rest.numel(), generator=g)]
    if num_val > rest.numel():
        raise ValueError(f"sbm_graph: num_val={num_val} exceeds the {rest.numel()} nodes outside the training set")
    val_mask = torch.zeros(num_nodes, dtype=torch.bool)
    val_mask[rest[:num_val]] = True
    test_mask = ~(train_mask | val_mask)
    return Graph(x.to(torch.float32), adj, y, train_mask, val_mask, test_mask)
