"""nestsparse.apps.data: shapes, dtypes, determinism and the layout each generator promises."""

import pytest
import torch

from nestsparse.apps import data
from nestsparse.apps.data import BOS, EOS, PAD


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def flat(d):
    if isinstance(d, (data.Seq2SeqData, data.Graph)):
        return [v for v in vars(d).values() if isinstance(v, torch.Tensor)]
    (x, y), (xt, yt) = d
    return [x, y, xt, yt]


GENERATORS = {
    "point_clouds": lambda seed: data.point_clouds(n_per_class=6, num_points=32, seed=seed),
    "seq2seq": lambda seed: data.seq2seq(n_train=200, n_test=50, seed=seed),
    "sbm_graph": lambda seed: data.sbm_graph(num_nodes=120, num_classes=3, train_per_class=5, num_val=20, seed=seed),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_same_seed_same_tensors_other_seed_other_tensors(name):
    gen = GENERATORS[name]
    assert_same(flat(gen(3)), flat(gen(3)))
    assert any(not torch.equal(a, b) for a, b in zip(flat(gen(3)), flat(gen(4))))


@pytest.mark.parametrize("name", GENERATORS)
def test_global_rng_is_left_alone(name):
    before = torch.random.get_rng_state()
    GENERATORS[name](0)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_digits():
    (x, y), (xt, yt) = data.digits(0)
    assert x.shape == (1257, 1, 8, 8) and xt.shape == (540, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    full = torch.cat([x, xt])
    assert abs(full.mean().item()) < 1e-4 and abs(full.std().item() - 1) < 1e-3
    assert_same(flat(data.digits(0)), [x, y, xt, yt])
    assert not torch.equal(data.digits(1)[0][1], y)


def test_point_clouds_layout():
    (x, y), (xt, yt) = data.point_clouds(n_per_class=10, num_points=48, seed=0, noise=0.0, test_fraction=0.3)
    k = len(data.POINT_CLOUD_CLASSES)
    assert k >= 8
    assert x.shape == (7 * k, 48, 3) and xt.shape == (3 * k, 48, 3)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y, minlength=k).tolist() == [7] * k
    assert torch.bincount(yt, minlength=k).tolist() == [3] * k
    assert torch.isfinite(x).all()
    both = torch.cat([x, xt])
    torch.testing.assert_close(both.mean(1), torch.zeros(len(both), 3), atol=1e-5, rtol=0)  # centred
    radius = both.norm(dim=2).amax(1)
    assert (radius > 0.3).all() and (radius < 2.0).all()
    # Randomly rotated: an ellipsoid's principal axes are not the coordinate axes (off-diagonal covariance).
    ell = both[torch.cat([y, yt]) == data.POINT_CLOUD_CLASSES.index("ellipsoid")]
    cov = ell.transpose(1, 2) @ ell / ell.shape[1]
    off = (cov - torch.diag_embed(cov.diagonal(dim1=1, dim2=2))).abs().sum((1, 2))
    assert (off / cov.diagonal(dim1=1, dim2=2).sum(1)).mean() > 0.2


def test_point_cloud_noise_is_gaussian_jitter():
    clean = data.point_clouds(n_per_class=3, num_points=64, seed=5, noise=0.0)[0][0]
    noisy = data.point_clouds(n_per_class=3, num_points=64, seed=5, noise=0.05)[0][0]
    diff = (noisy - clean).reshape(len(clean), -1)
    # Same shapes and poses, plus noise of std 0.05 (minus its per-cloud mean, as the clouds were centred).
    assert 0.03 < diff.std().item() < 0.07


def check_seq_layout(src, tgt, vocab, min_len, max_len):
    assert src.dtype == torch.int64 and tgt.dtype == torch.int64
    assert src.shape[1] == max_len and tgt.shape[1] == max_len + 1
    lengths = (src != PAD).sum(1)
    assert ((lengths >= min_len) & (lengths <= max_len)).all()
    pos = torch.arange(max_len)
    real = pos < lengths[:, None]
    assert torch.equal(src != PAD, real)  # right-padded, no PAD inside
    assert ((src[real] >= 3) & (src[real] < vocab)).all()
    assert (tgt[torch.arange(len(tgt)), lengths] == EOS).all()
    assert ((tgt == EOS).sum(1) == 1).all() and not (src == EOS).any() and not (src == BOS).any()
    assert not (tgt == BOS).any()
    pos1 = torch.arange(max_len + 1)
    assert (tgt[pos1 > lengths[:, None]] == PAD).all()
    content = pos1 < lengths[:, None]
    assert ((tgt[content] >= 3) & (tgt[content] < vocab)).all()
    return lengths


@pytest.mark.parametrize("task", ["reverse", "sort"])
def test_seq2seq_layout_and_clean_test_targets(task):
    d = data.seq2seq(n_train=300, n_test=100, seed=1, vocab=12, min_len=3, max_len=7, noise=0.0, task=task)
    assert d.vocab == 12 and d.max_len == 7
    assert d.src_train.shape == (300, 7) and d.tgt_train.shape == (300, 8)
    assert d.src_test.shape == (100, 7) and d.tgt_test.shape == (100, 8)
    for src, tgt in ((d.src_train, d.tgt_train), (d.src_test, d.tgt_test)):
        lengths = check_seq_layout(src, tgt, 12, 3, 7)
        assert set(lengths.tolist()) == set(range(3, 8))
        for s, t, n in zip(src.tolist(), tgt.tolist(), lengths.tolist()):
            want = s[:n][::-1] if task == "reverse" else sorted(s[:n])
            assert t[:n] == want


def test_seq2seq_label_noise_only_in_training_targets_at_the_requested_rate():
    clean = data.seq2seq(n_train=2000, n_test=200, seed=2, noise=0.0)
    noisy = data.seq2seq(n_train=2000, n_test=200, seed=2, noise=0.2)
    assert torch.equal(clean.src_train, noisy.src_train)
    assert torch.equal(clean.src_test, noisy.src_test) and torch.equal(clean.tgt_test, noisy.tgt_test)
    check_seq_layout(noisy.src_train, noisy.tgt_train, noisy.vocab, 4, 10)  # EOS and PAD untouched
    content = clean.tgt_train >= 3
    changed = noisy.tgt_train != clean.tgt_train
    assert not (changed & ~content).any()
    rate = changed[content].float().mean().item()
    assert abs(rate - 0.2) < 0.02, rate
    # The default rate.
    default = data.seq2seq(n_train=2000, n_test=200, seed=2)
    rate = (default.tgt_train != clean.tgt_train)[content].float().mean().item()
    assert abs(rate - 0.05) < 0.015, rate


def test_seq2seq_rejects_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        data.seq2seq(task="copy")
    with pytest.raises(ValueError, match="min_len"):
        data.seq2seq(min_len=5, max_len=4)


def test_sbm_graph():
    g = data.sbm_graph(
        num_nodes=300, num_classes=4, p_in=0.06, p_out=0.005, feature_dim=16, train_per_class=10, num_val=50, seed=0
    )
    assert g.x.shape == (300, 16) and g.x.dtype == torch.float32
    assert g.adj.shape == (300, 300) and g.adj.dtype == torch.bool
    assert g.y.shape == (300,) and g.y.dtype == torch.int64 and set(g.y.tolist()) == set(range(4))
    assert torch.equal(g.adj, g.adj.T)
    assert g.adj.diagonal().all()
    masks = torch.stack([g.train_mask, g.val_mask, g.test_mask]).to(torch.int64)
    assert all(m.dtype == torch.bool for m in (g.train_mask, g.val_mask, g.test_mask))
    assert (masks.sum(0) == 1).all()  # disjoint and covering
    assert torch.bincount(g.y[g.train_mask], minlength=4).tolist() == [10] * 4
    assert int(g.val_mask.sum()) == 50 and int(g.test_mask.sum()) == 300 - 40 - 50
    # Edges mostly join nodes of one class, at about the requested rates.
    off = g.adj & ~torch.eye(300, dtype=torch.bool)
    same = g.y[:, None] == g.y[None, :]
    p_same = (off & same).sum() / (same.sum() - 300)
    p_diff = (off & ~same).sum() / (~same).sum()
    assert 0.04 < p_same < 0.08 and 0.002 < p_diff < 0.008
    # Features: class means + noise; nodes are closer to their own class mean than the noise alone would allow.
    means = torch.stack([g.x[g.y == c].mean(0) for c in range(4)])
    nearest = torch.cdist(g.x, means).argmin(1)
    assert 0.4 < (nearest == g.y).float().mean() < 0.95


def test_sbm_graph_rejects_too_few_nodes_per_class():
    with pytest.raises(ValueError, match="train_per_class"):
        data.sbm_graph(num_nodes=30, num_classes=3, train_per_class=20)
