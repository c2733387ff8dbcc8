"""LevelBatchNorm: per-level BatchNorm statistics (and optionally affine parameters), level_batchnorms."""

import copy

import pytest
import torch
from torch import nn

import nestsparse
from nestsparse.nn import LevelBatchNorm, level_batchnorms

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_bn(cls=nn.BatchNorm2d, c=5, shape=(8, 5, 4, 4), momentum=0.1, affine=True, seed=0):
    """A BatchNorm with non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    bn = cls(c, momentum=momentum, affine=affine)
    bn.train()
    for _ in range(3):
        bn(torch.randn(shape, generator=g) * 3 + 1)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


@pytest.mark.parametrize("per_level_affine", [False, True])
def test_from_batchnorm_matches_eval_output_at_every_level(per_level_affine):
    bn = _trained_bn().eval()
    lbn = LevelBatchNorm.from_batchnorm(bn, 3, per_level_affine=per_level_affine).eval()
    assert lbn.num_levels == 3
    x = torch.randn(4, 5, 3, 3) * 2
    ref = bn(x)
    for lvl in range(3):
        lbn.set_level(lvl)
        torch.testing.assert_close(lbn(x), ref, rtol=0, atol=1e-6)
    assert int(lbn.num_batches_tracked[0]) == int(bn.num_batches_tracked) == 3
    # the statistics really are non-trivial (the comparison above is not against an identity map)
    assert not torch.allclose(ref, x)


@pytest.mark.parametrize("per_level_affine", [False, True])
def test_train_mode_moves_only_current_level_stats_like_batchnorm(per_level_affine):
    bn = _trained_bn()
    lbn = LevelBatchNorm.from_batchnorm(bn, 3, per_level_affine=per_level_affine)
    before_mean, before_var = lbn.running_mean.clone(), lbn.running_var.clone()
    before_nbt = lbn.num_batches_tracked.clone()
    ref = copy.deepcopy(bn).train()
    lbn.train()
    lbn.set_level(1)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        x = torch.randn(6, 5, 3, 3, generator=g) * 2 - 1
        torch.testing.assert_close(lbn(x), ref(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(lbn.running_mean[1], ref.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(lbn.running_var[1], ref.running_var, rtol=0, atol=1e-5)
    assert int(lbn.num_batches_tracked[1]) == int(ref.num_batches_tracked) == 7
    for other in (0, 2):
        assert torch.equal(lbn.running_mean[other], before_mean[other])
        assert torch.equal(lbn.running_var[other], before_var[other])
        assert int(lbn.num_batches_tracked[other]) == int(before_nbt[other])
    assert not torch.allclose(lbn.running_mean[1], before_mean[1])
    # eval at the trained level uses the new statistics, at another level the old ones
    lbn.eval()
    ref.eval()
    x = torch.randn(3, 5, 2, 2)
    torch.testing.assert_close(lbn(x), ref(x), rtol=0, atol=1e-5)
    lbn.set_level(0)
    torch.testing.assert_close(lbn(x), bn.eval()(x), rtol=0, atol=1e-5)


def test_per_level_affine_gradient_only_in_current_row():
    bn = _trained_bn()
    lbn = LevelBatchNorm.from_batchnorm(bn, 3, per_level_affine=True)
    assert lbn.weight.shape == (3, 5) and lbn.bias.shape == (3, 5)
    lbn.set_level(2)
    x = torch.randn(6, 5, 3, 3)
    r = torch.randn(6, 5, 3, 3)
    (lbn(x) * r).sum().backward()
    ref = copy.deepcopy(bn)
    (ref(x) * r).sum().backward()
    assert (lbn.weight.grad[:2] == 0).all() and (lbn.bias.grad[:2] == 0).all()
    torch.testing.assert_close(lbn.weight.grad[2], ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lbn.bias.grad[2], ref.bias.grad, rtol=1e-5, atol=1e-5)
    assert lbn.weight.grad[2].abs().sum() > 0
    # a separate affine per level: changing row 0 changes level 0's output only
    lbn = LevelBatchNorm.from_batchnorm(bn, 3, per_level_affine=True).eval()
    with torch.no_grad():
        lbn.weight[0] *= 2
    lbn.set_level(2)
    out2 = lbn(x)
    lbn.set_level(0)
    out0 = lbn(x)
    lbn.set_level(1)
    out1 = lbn(x)
    assert torch.allclose(out1, out2)
    assert not torch.allclose(out0, out1)


def test_shared_affine_gradient_is_the_batchnorm_gradient():
    bn = _trained_bn()
    lbn = LevelBatchNorm.from_batchnorm(bn, 2)
    assert lbn.weight.shape == (5,)
    lbn.set_level(1)
    x, r = torch.randn(6, 5, 3, 3), torch.randn(6, 5, 3, 3)
    (lbn(x) * r).sum().backward()
    ref = copy.deepcopy(bn)
    (ref(x) * r).sum().backward()
    torch.testing.assert_close(lbn.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)


def test_momentum_none_is_cumulative_average():
    lbn = LevelBatchNorm(4, 2, momentum=None)
    ref = nn.BatchNorm2d(4, momentum=None)
    lbn.train()
    lbn.set_level(1)
    g = torch.Generator().manual_seed(3)
    means, vars_ = [], []
    for k in range(3):
        x = torch.randn(5, 4, 3, 3, generator=g) * (k + 1) + k
        lbn(x)
        ref(x)
        means.append(x.mean((0, 2, 3)))
        vars_.append(x.var((0, 2, 3), unbiased=True))
    expected_mean = torch.stack(means).mean(0)
    # momentum 1/n on the n-th batch: the first batch replaces the initial (0, 1), then a plain average
    expected_var = torch.stack(vars_).mean(0)
    torch.testing.assert_close(lbn.running_mean[1], expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lbn.running_var[1], expected_var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lbn.running_mean[1], ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lbn.running_var[1], ref.running_var, rtol=1e-5, atol=1e-6)
    assert torch.equal(lbn.running_mean[0], torch.zeros(4)) and torch.equal(lbn.running_var[0], torch.ones(4))
    assert lbn.num_batches_tracked.tolist() == [0, 3]


def test_momentum_none_from_batchnorm_continues_its_average():
    bn = _trained_bn(momentum=None)
    lbn = LevelBatchNorm.from_batchnorm(bn, 2)
    assert lbn.momentum is None
    ref = copy.deepcopy(bn)
    lbn.set_level(0)
    for _ in range(2):
        x = torch.randn(6, 5, 4, 4) + 2
        lbn(x)
        ref(x)
    torch.testing.assert_close(lbn.running_mean[0], ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lbn.running_var[0], ref.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lbn.running_mean[1], bn.running_mean)


@pytest.mark.parametrize("shape", [(7, 6), (7, 6, 5)])
def test_batchnorm1d_shapes(shape):
    bn = _trained_bn(nn.BatchNorm1d, c=6, shape=shape)
    lbn = LevelBatchNorm.from_batchnorm(bn, 2, per_level_affine=True)
    ref = copy.deepcopy(bn)
    x = torch.randn(shape) * 2 + 0.5
    for mode in ("train", "eval"):
        getattr(lbn, mode)()
        getattr(ref, mode)()
        lbn.set_level(1)
        torch.testing.assert_close(lbn(x), ref(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(lbn.running_mean[1], ref.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(lbn.running_mean[0], bn.running_mean, rtol=0, atol=0)


def test_affine_false():
    bn = _trained_bn(affine=False)
    lbn = LevelBatchNorm.from_batchnorm(bn, 2).eval()
    assert lbn.weight is None and lbn.bias is None
    x = torch.randn(3, 5, 2, 2)
    torch.testing.assert_close(lbn(x), bn.eval()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(5,), (2, 4), (2, 5, 1, 1, 1, 1), (2, 3, 4, 4)])
def test_bad_input_shape(shape):
    lbn = LevelBatchNorm(5, 2)
    with pytest.raises(ValueError, match="LevelBatchNorm"):
        lbn(torch.randn(shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_levels"):
        LevelBatchNorm(4, 0)
    with pytest.raises(ValueError, match="per_level_affine"):
        LevelBatchNorm(4, 2, affine=False, per_level_affine=True)
    with pytest.raises(ValueError, match="track running"):
        LevelBatchNorm.from_batchnorm(nn.BatchNorm2d(4, track_running_stats=False), 2)
    with pytest.raises(ValueError, match="per_level_affine"):
        LevelBatchNorm.from_batchnorm(nn.BatchNorm2d(4, affine=False), 2, per_level_affine=True)


def test_set_level_checks_range():
    lbn = LevelBatchNorm(4, 2)
    lbn.set_level(1)
    for bad in (2, -1, True, 1.0):
        with pytest.raises(ValueError, match="out of range"):
            lbn.set_level(bad)
    assert lbn.level == 1


def _bn_model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 6),
        nn.BatchNorm1d(6),
    )


def test_level_batchnorms_swaps_every_batchnorm():
    torch.manual_seed(0)
    model = _bn_model()
    model.train()
    model(torch.randn(8, 3, 8, 8))  # non-trivial running statistics
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    ref = model(x)
    out = level_batchnorms(model, 3, per_level_affine=True)
    assert out is model
    model.eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    lbns = [m for m in model.modules() if isinstance(m, LevelBatchNorm)]
    assert len(lbns) == 3 and all(m.per_level_affine and m.num_levels == 3 for m in lbns)
    assert isinstance(model[1], LevelBatchNorm) and isinstance(model[3][1], LevelBatchNorm)
    assert nestsparse.get_levels(model) == 3
    for lvl in range(3):
        nestsparse.set_level(model, lvl)
        assert all(m.level == lvl for m in lbns)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        nestsparse.set_level(model, 3)
    assert all(m.level == 2 for m in lbns)


def test_level_batchnorms_keeps_train_eval_mode():
    # like torch.nn.SyncBatchNorm.convert_sync_batchnorm, the swap should keep each BatchNorm's mode: a model
    # swapped while in eval mode must not start updating running statistics on its next forward
    model = _bn_model().eval()
    level_batchnorms(model, 2)
    assert [m.training for m in model.modules() if isinstance(m, LevelBatchNorm)] == [False, False, False]


def test_get_levels_refuses_disagreeing_counts():
    model = nn.Sequential(LevelBatchNorm(3, 2), LevelBatchNorm(3, 3))
    with pytest.raises(ValueError, match="level counts"):
        nestsparse.get_levels(model)
    with pytest.raises(ValueError, match="no level-aware"):
        nestsparse.set_level(nn.Sequential(nn.Linear(2, 2)), 0)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    model = level_batchnorms(_bn_model(), 2, per_level_affine=True)
    model.train()
    for lvl in (0, 1):
        nestsparse.set_level(model, lvl)
        model(torch.randn(8, 3, 8, 8) + lvl)
    with torch.no_grad():
        model[1].weight[1] += 1
    sd = model.state_dict()
    assert sd["1.running_mean"].shape == (2, 4) and sd["1.num_batches_tracked"].tolist() == [1, 1]
    torch.manual_seed(2)
    fresh = level_batchnorms(_bn_model(), 2, per_level_affine=True)
    fresh.load_state_dict(sd)
    model.eval()
    fresh.eval()
    x = torch.randn(3, 3, 8, 8)
    for lvl in (0, 1):
        nestsparse.set_level(model, lvl)
        nestsparse.set_level(fresh, lvl)
        assert torch.equal(model(x), fresh(x))
    nestsparse.set_level(model, 0)
    out0 = model(x)
    nestsparse.set_level(model, 1)
    assert not torch.allclose(out0, model(x))
    # a plain BatchNorm's state does not load into a LevelBatchNorm model
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(_bn_model().state_dict())


def test_to_dense_sets_level_batchnorm_to_its_level():
    """to_dense(model, l) computes level l: the LevelBatchNorms it keeps are set to l, whatever level the converted
    model is at."""
    torch.manual_seed(0)
    model = _bn_model()
    level_batchnorms(model, 2, per_level_affine=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LevelBatchNorm):  # level 1's statistics and affine differ from level 0's
                m.running_mean[1].normal_()
                m.weight[1].uniform_(0.5, 1.5)
    tags = nestsparse.model_tags(model, (0.5, 0.2))
    sparse = nestsparse.convert(model, tags).eval()
    x = torch.randn(3, 3, 8, 8)
    nestsparse.set_level(sparse, 1)
    want = sparse(x)
    nestsparse.set_level(sparse, 0)  # the converted model at another level
    dense = nestsparse.to_dense(sparse, 1).eval()
    assert all(m.level == 1 for m in dense.modules() if isinstance(m, LevelBatchNorm))
    torch.testing.assert_close(dense(x), want, rtol=1e-4, atol=1e-5)
    assert all(m.level == 0 for m in sparse.modules() if isinstance(m, LevelBatchNorm))  # the original is untouched
    with pytest.raises(ValueError, match="level"):
        nestsparse.to_dense(sparse, 2)
