"""Nested mask training: level masks, schedules, grow-and-prune, joint and core-first training, SupervisedTask."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import nestsparse
import nestsparse.pruning.methods as methods
from nestsparse import NestedBCR, model_tags
from nestsparse.nn import LevelBatchNorm
from nestsparse.pruning import (
    LevelMask,
    SupervisedTask,
    apply_level_masks,
    core_first,
    cubic_density,
    grow_and_prune,
    joint,
    level_masks,
    masked_tags,
    prepare,
    raw_weights,
    unmask,
)

# ----------------------------------------------------------------------------------------------- helpers

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 4),
    )


def classification(n, shape, seed=0):
    """Learnable synthetic labels: the argmax of a fixed random projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    proj = torch.randn(x[0].numel(), 4, generator=g)
    return x, (x.flatten(1) @ proj).argmax(1)


def mlp_task(batch_size=32):
    x, y = classification(128, (8,), seed=1)
    return SupervisedTask((x[:96], y[:96]), (x[96:], y[96:]), batch_size=batch_size)


def cnn_task():
    x, y = classification(96, (3, 8, 8), seed=2)
    return SupervisedTask((x[:64], y[:64]), (x[64:], y[64:]), batch_size=32)


def assert_valid_tags(tags, model, num_levels):
    mods = dict(model.named_modules())
    for n, t in tags.items():
        assert t.dtype == torch.int8 and t.shape == mods[n].weight.shape
        assert int(t.min()) >= -1 and int(t.max()) <= num_levels - 1


def assert_layer_densities(tags, densities):
    for n, t in tags.items():
        for lvl, d in enumerate(densities):
            assert int((t >= lvl).sum()) == round(d * t.numel()), (n, lvl)


def outputs_by_level(model, x, num_levels):
    model.eval()
    outs = []
    with torch.no_grad():
        for lvl in range(num_levels):
            nestsparse.set_level(model, lvl)
            outs.append(model(x))
    nestsparse.set_level(model, 0)
    return outs


# -------------------------------------------------------------------------------------------- level masks


def masked_mlp(densities=(0.5, 0.2, 0.05)):
    model = mlp()
    raw = {n: m.weight.detach().clone() for n, m in nestsparse.prunable_layers(model).items()}
    tags = model_tags(model, densities)
    apply_level_masks(model, tags, len(densities))
    return model, raw, tags


def test_masked_weight_is_raw_times_mask_at_every_level():
    model, raw, tags = masked_mlp()
    assert set(level_masks(model)) == {"0", "2", "4"}
    assert nestsparse.get_levels(model) == 3
    mods = dict(model.named_modules())
    raws = raw_weights(model)
    for n in tags:
        assert raws[n] is mods[n].parametrizations.weight.original
        assert torch.equal(raws[n], raw[n])
    for lvl in range(3):
        nestsparse.set_level(model, lvl)
        for n, t in tags.items():
            w = mods[n].weight
            assert torch.equal(w, raw[n] * (t >= lvl))
            assert int((w != 0).sum()) == round((0.5, 0.2, 0.05)[lvl] * t.numel())
    # masked_tags hands out copies
    mt = masked_tags(model)
    assert all(torch.equal(mt[n], tags[n]) for n in tags)
    mt["0"].fill_(-1)
    assert torch.equal(level_masks(model)["0"].tags, tags["0"])


def test_gradient_of_raw_weight_is_zero_outside_the_level():
    model, raw, tags = masked_mlp()
    x = torch.randn(16, 8)
    for lvl in (0, 1, 2):
        nestsparse.set_level(model, lvl)
        model.zero_grad()
        model(x).square().sum().backward()
        for n, g in ((n, p.grad) for n, p in raw_weights(model).items()):
            assert (g[tags[n] < lvl] == 0).all()
            if lvl < 2:  # (at 5 % density a layer's kept weights may all sit on dead paths)
                assert (g[tags[n] >= lvl] != 0).any()
    # the raw gradient is the masked weight's gradient, masked: compare with a hand-made masked model
    nestsparse.set_level(model, 1)
    model.zero_grad()
    model(x).square().sum().backward()
    ref = mlp()
    with torch.no_grad():
        for n, m in nestsparse.prunable_layers(ref).items():
            m.weight.mul_(tags[n] >= 1)
    ref(x).square().sum().backward()
    for n, m in nestsparse.prunable_layers(ref).items():
        torch.testing.assert_close(raw_weights(model)[n].grad, m.weight.grad * (tags[n] >= 1))


def test_frozen_elements_keep_their_value_under_adamw_weight_decay():
    model, raw, tags = masked_mlp((0.5, 0.2))
    mask = level_masks(model)["2"]
    where = tags["2"] == 1
    mask.freeze(where, raw_weights(model)["2"])
    frozen_values = raw["2"][where].clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        nestsparse.set_level(model, step % 2)
        opt.zero_grad()
        model(torch.randn(16, 8, generator=g)).square().mean().backward()
        assert (raw_weights(model)["2"].grad[where] == 0).all()
        opt.step()
    r = raw_weights(model)["2"].detach()
    for lvl in (0, 1):
        nestsparse.set_level(model, lvl)
        assert torch.equal(model[2].weight[where], frozen_values)
    # the raw tensor drifted under weight decay; the other level-0 weights trained
    assert (r[where] != frozen_values).all()
    assert (r[tags["2"] == 0] != raw["2"][tags["2"] == 0]).float().mean() > 0.9


def test_capture_grad_sums_the_dense_gradient_of_the_masked_weight():
    model = nn.Sequential(nn.Linear(6, 5))
    tags = model_tags(model, (0.6, 0.2))
    apply_level_masks(model, tags, 2)
    mask = level_masks(model)["0"]
    assert not mask.capture_grad and mask.grad_sum.numel() == 0
    mask.capture_grad = True
    assert mask.capture_grad and torch.equal(mask.grad_sum, torch.zeros(5, 6))
    g = torch.Generator().manual_seed(0)
    expected = torch.zeros(5, 6)
    for lvl in (0, 1, 1):
        nestsparse.set_level(model, lvl)
        x, r = torch.randn(7, 6, generator=g), torch.randn(7, 5, generator=g)
        (model(x) * r).sum().backward()
        expected += r.T @ x  # dL/dW_eff for y = x @ W_eff^T + b, signed: dense, pruned positions included
    torch.testing.assert_close(mask.grad_sum, expected, rtol=1e-5, atol=1e-5)
    assert (mask.grad_sum[tags["0"] < 0] != 0).all()
    with torch.no_grad():
        model(torch.randn(3, 6))  # no graph, no hook
    torch.testing.assert_close(mask.grad_sum, expected, rtol=1e-5, atol=1e-5)
    mask.capture_grad = False
    assert mask.grad_sum.numel() == 0
    model(torch.randn(3, 6)).sum().backward()
    assert mask.grad_sum.numel() == 0


def test_mask_errors():
    model = mlp()
    good = model_tags(model, (0.5, 0.2))
    with pytest.raises(KeyError, match="no module named"):
        apply_level_masks(model, {"9": good["0"]}, 2)
    with pytest.raises(TypeError, match="no weight"):
        apply_level_masks(model, {"1": good["0"]}, 2)
    with pytest.raises(ValueError, match="shape"):
        apply_level_masks(model, {"0": good["2"]}, 2)
    with pytest.raises(TypeError, match="int8"):
        LevelMask(good["0"].to(torch.int32), 2)
    with pytest.raises(ValueError, match="only 2 levels"):
        LevelMask(torch.full((3, 3), 2, dtype=torch.int8), 2)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        apply_level_masks(model, {"0": torch.full((24, 8), 2, dtype=torch.int8)}, 2)
    assert not level_masks(model)
    apply_level_masks(model, good, 2)
    with pytest.raises(ValueError, match="levels"):
        apply_level_masks(model, {"0": model_tags(model, (0.5, 0.2, 0.1))["0"]}, 3)
    with pytest.raises(ValueError, match="levels"):
        joint(model, mlp_task(), (0.5, 0.2, 0.1), 1, progress=False)
    with pytest.raises(ValueError, match="no level masks"):
        unmask(mlp())


def test_apply_level_masks_checks_tags_of_an_already_masked_layer():
    # a fresh layer refuses a tag >= num_levels (LevelMask checks it); an already masked one must too, or the
    # model silently holds tags no format accepts
    model = mlp()
    prepare(model, 2)
    with pytest.raises(ValueError):
        apply_level_masks(model, {"0": torch.full((24, 8), 5, dtype=torch.int8)}, 2)


def test_reapplying_masks_updates_tags_in_place():
    model, raw, tags = masked_mlp((0.5, 0.2))
    params = [id(p) for p in model.parameters()]
    new = model_tags(mlp(seed=7), (0.4, 0.1))
    apply_level_masks(model, new, 2)
    assert [id(p) for p in model.parameters()] == params  # DistributedDataParallel's parameters stay valid
    assert all(torch.equal(level_masks(model)[n].tags, new[n]) for n in new)
    nestsparse.set_level(model, 1)
    assert torch.equal(model[0].weight, raw["0"] * (new["0"] >= 1))


def conv_model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(72, 5)
    )


def test_unmask_and_convert_match_the_masked_model_at_every_level():
    densities = (0.5, 0.2, 0.05)
    model = conv_model()
    tags = model_tags(model, densities)
    apply_level_masks(model, tags, 3)
    # freeze some level-0 weights at values that differ from their raw tensor
    mask = level_masks(model)["2"]
    where = (tags["2"] >= 0) & (torch.rand(tags["2"].shape, generator=torch.Generator().manual_seed(0)) < 0.3)
    mask.freeze(where, torch.full(where.shape, 0.25))
    x = torch.randn(4, 3, 9, 9)
    ref = outputs_by_level(model, x, 3)
    level0 = {n: m.weight.detach().clone() for n, m in nestsparse.prunable_layers(model).items()}
    assert torch.all(level0["2"][where] == 0.25)
    nestsparse.set_level(model, 2)
    plain, out_tags = unmask(model)
    assert plain is model
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert all(torch.equal(out_tags[n], tags[n]) for n in tags)
    for n, m in nestsparse.prunable_layers(plain).items():
        assert isinstance(m.weight, nn.Parameter)
        assert torch.equal(m.weight, level0[n])
    sparse = nestsparse.convert(plain, out_tags, densities=densities)
    assert nestsparse.get_levels(sparse) == 3
    got = outputs_by_level(sparse, x, 3)
    for lvl in range(3):
        torch.testing.assert_close(got[lvl], ref[lvl], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref[0], ref[2])


def test_set_level_refuses_bad_levels():
    model, _, _ = masked_mlp()
    nestsparse.set_level(model, 1)
    for bad in (3, -1, True, 1.0, "0", None):
        with pytest.raises(ValueError, match="out of range"):
            nestsparse.set_level(model, bad)
    assert all(m.level == 1 for m in level_masks(model).values())


# -------------------------------------------------------------------------------------------- schedules


def test_cubic_density():
    assert cubic_density(0, 0.1, 10, 20) == 1.0
    assert cubic_density(10, 0.1, 10, 20) == 1.0
    assert cubic_density(20, 0.1, 10, 20) == 0.1
    assert cubic_density(99, 0.1, 10, 20) == 0.1
    assert cubic_density(5, 0.2, 10, 20, initial=0.8) == 0.8
    assert cubic_density(15, 0.1, 10, 20) == pytest.approx(0.1 + 0.9 * 0.5**3)
    assert cubic_density(12, 0.2, 10, 20, initial=0.6) == pytest.approx(0.2 + 0.4 * 0.8**3)
    vals = [cubic_density(s, 0.05, 3, 40) for s in range(50)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert vals[4] < 1.0 and vals[39] > 0.05
    assert cubic_density(7, 0.3, 7, 7) == 1.0 and cubic_density(8, 0.3, 7, 7) == 0.3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(final=0.0),
        dict(final=-0.1),
        dict(final=0.6, initial=0.5),
        dict(final=0.5, initial=1.5),
        dict(start=10, end=5),
    ],
)
def test_cubic_density_errors(kwargs):
    args = dict(step=3, final=0.1, start=0, end=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match="cubic_density"):
        cubic_density(**args)


def gap_setup(shape=(12, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g) + 0.0
    grad = torch.randn(shape, generator=g)
    u = torch.rand(shape, generator=g)
    tags = torch.full(shape, -1, dtype=torch.int8)
    tags[u < 0.6] = 0
    tags[u < 0.3] = 1
    tags[u < 0.1] = 2
    return weight, grad, tags


def level_counts(tags, L=3):
    return [int((tags >= lvl).sum()) for lvl in range(L)]


@pytest.mark.parametrize("level", [0, 1, 2])
def test_grow_and_prune_moves_the_right_weights(level):
    weight, grad, tags = gap_setup()
    w0, t0 = weight.clone(), tags.clone()
    frozen = torch.zeros_like(tags, dtype=torch.bool)
    own_idx = (t0 == level).nonzero()
    frozen[tuple(own_idx[weight[t0 == level].abs().argmin()])] = True  # the best drop candidate is frozen
    source = level - 1
    cand_idx = (t0 == source).nonzero()
    frozen[tuple(cand_idx[grad[t0 == source].abs().argmax()])] = True  # and the best grow candidate
    n = grow_and_prune(weight, grad, tags, level, 0.3, frozen)
    own = (t0 == level) & ~frozen
    cand = (t0 == source) & ~frozen
    assert n == min(int(0.3 * int(((t0 == level) & ~frozen).sum())), int(cand.sum())) and n > 0
    assert level_counts(tags) == level_counts(t0)
    dropped = (t0 == level) & (tags != level)
    grown = (t0 != level) & (tags == level)
    assert int(dropped.sum()) == int(grown.sum()) == n
    assert (tags[dropped] == source).all() and (t0[grown] == source).all()
    assert torch.equal(tags[~(dropped | grown)], t0[~(dropped | grown)])
    assert not (frozen & (dropped | grown)).any()
    # dropped: the smallest |w| of the level's own free weights; grown: the largest |grad| of the candidates
    assert weight[dropped].abs().max() <= w0[own & ~dropped].abs().min()
    assert grad[grown].abs().min() >= grad[cand & ~grown].abs().max()
    if source == -1:
        assert (weight[grown] == 0).all() and (w0[grown] != 0).all()
        assert torch.equal(weight[~grown], w0[~grown])
    else:
        assert torch.equal(weight, w0)  # taken from a denser level: values kept (that level shares them)
    # masks stay nested and every level's weights are the same count
    for lvl in range(2):
        assert not ((tags >= lvl + 1) & ~(tags >= lvl)).any()


def test_grow_and_prune_regrow_from_pruned():
    weight, grad, tags = gap_setup(seed=1)
    w0, t0 = weight.clone(), tags.clone()
    n = grow_and_prune(weight, grad, tags, 1, 0.5, regrow_from=-1)
    assert n == int(0.5 * int((t0 == 1).sum()))
    assert level_counts(tags) == level_counts(t0)
    dropped = (t0 == 1) & (tags != 1)
    grown = (t0 != 1) & (tags == 1)
    assert (tags[dropped] == -1).all() and (t0[grown] == -1).all()
    assert (weight[grown] == 0).all() and torch.equal(weight[~grown], w0[~grown])
    assert torch.equal(tags[t0 == 0], t0[t0 == 0]) and torch.equal(tags[t0 == 2], t0[t0 == 2])
    # level 2 regrowing from level 0 (skipping level 1): counts still hold
    t1 = tags.clone()
    n = grow_and_prune(weight, grad, tags, 2, 1.0, regrow_from=0)
    assert n == int((t1 == 2).sum())
    assert level_counts(tags) == level_counts(t1)
    assert ((tags == 0) & (t1 == 2)).sum() == n


def test_grow_and_prune_limited_by_candidates_and_zero_fraction():
    weight, grad, tags = gap_setup(seed=2)
    tags[tags == -1] = 0  # no pruned weights: nothing for level 0 to regrow
    t0 = tags.clone()
    assert grow_and_prune(weight, grad, tags, 0, 1.0) == 0
    assert torch.equal(tags, t0)
    assert grow_and_prune(weight, grad, tags, 1, 0.0) == 0
    tags[0, :3] = -1
    t0 = tags.clone()
    assert grow_and_prune(weight, grad, tags, 0, 1.0) == 3
    assert level_counts(tags) == level_counts(t0)
    assert int((tags == -1).sum()) == 3 and (tags[0, :3] == 0).all()


def test_grow_and_prune_errors():
    weight, grad, tags = gap_setup()
    with pytest.raises(ValueError, match="one shape"):
        grow_and_prune(weight[:, :5], grad, tags, 0, 0.1)
    with pytest.raises(ValueError, match="one shape"):
        grow_and_prune(weight, grad.T, tags, 0, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        w = torch.randn(20, 12).T
        grow_and_prune(w, grad, tags, 0, 0.1)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            grow_and_prune(weight, grad, tags, 0, bad)
    for level, rf in ((1, 1), (1, 2), (1, -2), (0, 0)):
        with pytest.raises(ValueError, match="regrow_from"):
            grow_and_prune(weight, grad, tags, level, 0.1, regrow_from=rf)


# -------------------------------------------------------------------------------------------- joint

_JOINT = {}


def joint_run(densities=(0.5, 0.2), epochs=3, seed=0, **kw):
    """A cached joint() run of the MLP: (model, tags)."""
    key = (densities, epochs, seed, tuple(sorted(kw.items())))
    if key not in _JOINT:
        model = mlp()
        tags = joint(model, mlp_task(), densities, epochs, seed=seed, progress=False, **kw)
        _JOINT[key] = (model, tags)
    return _JOINT[key]


def test_joint_layer_densities_nesting_and_masks():
    model, tags = joint_run()
    assert set(tags) == {"0", "2", "4"}
    assert_valid_tags(tags, model, 2)
    assert_layer_densities(tags, (0.5, 0.2))
    assert not model.training
    masks = level_masks(model)
    assert set(masks) == set(tags) and all(torch.equal(masks[n].tags, tags[n]) for n in tags)
    assert all(m.level == 0 for m in masks.values())
    x = mlp_task().test[0]
    out = outputs_by_level(model, x, 2)
    assert not torch.allclose(out[0], out[1])
    # the weights trained (the raw weights differ from the initial ones where level 0 keeps them)
    init = mlp()
    for n, m in nestsparse.prunable_layers(init).items():
        kept = tags[n] >= 0
        assert (raw_weights(model)[n][kept] != m.weight[kept]).float().mean() > 0.9


def test_joint_global_budget():
    model, tags = joint_run(scope="global")
    total = sum(t.numel() for t in tags.values())
    for lvl, d in enumerate((0.5, 0.2)):
        assert sum(int((t >= lvl).sum()) for t in tags.values()) == round(d * total)
    assert_valid_tags(tags, model, 2)


def test_joint_is_deterministic_for_a_seed():
    a_model, a_tags = joint_run(seed=3)
    b_model = mlp()
    b_tags = joint(b_model, mlp_task(), (0.5, 0.2), 3, seed=3, progress=False)
    for n in a_tags:
        assert torch.equal(a_tags[n], b_tags[n])
    for (na, pa), (nb, pb) in zip(a_model.state_dict().items(), b_model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_joint_three_levels_and_sandwich_rule(monkeypatch):
    model, tags = joint_run(densities=(0.6, 0.3, 0.1))
    assert_layer_densities(tags, (0.6, 0.3, 0.1))
    out = outputs_by_level(model, mlp_task().test[0], 3)
    assert not torch.allclose(out[1], out[2]) and not torch.allclose(out[0], out[1])
    # which levels each step trains: with 4 levels, sandwich = densest, sparsest, one in between
    seen = []
    real = methods.set_level
    monkeypatch.setattr(methods, "set_level", lambda m, lvl: (seen.append(lvl), real(m, lvl))[1])
    dens = (0.6, 0.4, 0.2, 0.1)
    joint(mlp(), mlp_task(), dens, 2, progress=False)
    steps = [seen[i : i + 3] for i in range(0, len(seen) - 1, 3)]
    assert len(seen) == 6 * 3 + 1 and seen[-1] == 0
    assert all(s[:2] == [0, 3] and s[2] in (1, 2) for s in steps)
    assert {s[2] for s in steps} == {1, 2}
    seen.clear()
    tags4 = joint(mlp(), mlp_task(), dens, 2, sandwich=False, progress=False)
    assert seen[:-1] == [0, 3, 1, 2] * 6
    assert_layer_densities(tags4, dens)


def test_joint_distill_changes_training():
    with_kd, tags_kd = joint_run(distill=0.5)
    without, tags_plain = joint_run(distill=0.0)
    assert_layer_densities(tags_kd, (0.5, 0.2))
    assert_layer_densities(tags_plain, (0.5, 0.2))
    assert not torch.allclose(raw_weights(with_kd)["4"], raw_weights(without)["4"])


def test_joint_bcr_structure():
    bs = (4, 4)
    model = mlp()
    tags = joint(model, mlp_task(), (0.5, 0.2), 3, structure="bcr", block_shape=bs, progress=False)
    for t in tags.values():
        NestedBCR.structured_tags(t, bs)  # raises FormatError if not block row/column structured
        assert int(t.min()) >= -1 and int(t.max()) <= 1
        c = [int((t >= lvl).sum()) for lvl in range(2)]
        assert 0 < c[1] < c[0] <= int(0.5 * t.numel() + 1e-6) and c[1] <= int(0.2 * t.numel() + 1e-6)
    x = mlp_task().test[0]
    ref = outputs_by_level(model, x, 2)
    plain, _ = unmask(model)  # (not a deepcopy: torch's parametrized copies share their class with the original)
    sparse = nestsparse.convert(plain, tags, format="nbcr", block_shape=bs, densities=(0.5, 0.2))
    for a, b in zip(ref, outputs_by_level(sparse, x, 2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_joint_grow_and_prune_moves_level0_and_keeps_counts():
    base_model, base = joint_run()
    gp_model, gp = joint_run(grow_prune_every=1, grow_prune_fraction=0.2)
    assert_layer_densities(gp, (0.5, 0.2))
    moved = 0
    for n in base:
        # level 1 is fixed after the pruning phase: the same positions in both runs
        assert torch.equal(gp[n] >= 1, base[n] >= 1), n
        moved += int(((gp[n] >= 0) != (base[n] >= 0)).sum())
    assert moved > 0
    assert all(not m.capture_grad for m in level_masks(gp_model).values())


def test_joint_refuses_grow_and_prune_with_bcr():
    with pytest.raises(ValueError, match="grow-and-prune"):
        joint(mlp(), mlp_task(), (0.5, 0.2), 1, structure="bcr", grow_prune_every=1, progress=False)
    with pytest.raises(ValueError, match="grow-and-prune"):
        core_first(
            mlp(),
            mlp_task(),
            (0.5, 0.2),
            prune_epochs=1,
            core_epochs=1,
            level_epochs=1,
            structure="bcr",
            grow_prune_every=1,
            progress=False,
        )


def test_joint_reaches_targets_when_pruning_spans_all_steps():
    # prune_fraction=1.0: the cubic schedule ends on the last step, whose tag update must still happen
    model = mlp()
    tags = joint(model, mlp_task(), (0.5, 0.2), 3, prune_fraction=1.0, tag_updates=3, progress=False)
    assert_layer_densities(tags, (0.5, 0.2))


def test_joint_with_batchnorm_unmasks_and_converts():
    model = cnn()
    tags = joint(model, cnn_task(), (0.5, 0.2), 2, progress=False)
    assert_layer_densities(tags, (0.5, 0.2))
    lbns = [m for m in model.modules() if isinstance(m, LevelBatchNorm)]
    assert len(lbns) == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # each level has its own running statistics
    assert not torch.allclose(lbns[1].running_mean[0], lbns[1].running_mean[1])
    x = cnn_task().test[0]
    ref = outputs_by_level(model, x, 2)
    plain, t = unmask(model)
    got = outputs_by_level(nestsparse.convert(plain, t, densities=(0.5, 0.2)), x, 2)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- core-first

_CORE = {}


def core_run(level_epochs=2, densities=(0.5, 0.2), prepared=None, **kw):
    key = (level_epochs, densities, prepared, tuple(sorted(kw.items())))
    if key not in _CORE:
        model = cnn()
        if prepared is not None:
            prepare(model, len(densities), per_level_affine=prepared)
        tags = core_first(
            model,
            cnn_task(),
            densities,
            prune_epochs=2,
            core_epochs=1,
            level_epochs=level_epochs,
            seed=1,
            progress=False,
            **kw,
        )
        _CORE[key] = (model, tags)
    return _CORE[key]


def test_core_first_densities_bn_and_freezing():
    model, tags = core_run()
    assert set(tags) == {"0", "3", "8"}
    assert_layer_densities(tags, (0.5, 0.2))
    assert_valid_tags(tags, model, 2)
    lbns = [m for m in model.modules() if isinstance(m, LevelBatchNorm)]
    assert len(lbns) == 2 and all(m.per_level_affine and m.num_levels == 2 for m in lbns)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # every finished level is frozen at its values
    for n, m in level_masks(model).items():
        assert torch.equal(m.frozen, tags[n] >= 0)
        eff = dict(model.named_modules())[n].weight
        assert torch.equal(eff[m.frozen], m.frozen_values[m.frozen])
    out = outputs_by_level(model, cnn_task().test[0], 2)
    assert not torch.allclose(out[0], out[1])


def test_core_first_never_changes_the_core():
    trained, t2 = core_run(level_epochs=2)
    fresh, t0 = core_run(level_epochs=0)
    x = cnn_task().test[0]
    a, b = outputs_by_level(trained, x, 2), outputs_by_level(fresh, x, 2)
    assert torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], b[0])  # level 0 did train
    for n in t2:
        assert torch.equal(t2[n] == 1, t0[n] == 1)
    # with no level training, level 0 starts out computing exactly what level 1 does
    torch.testing.assert_close(b[0], b[1], rtol=0, atol=0)
    assert any(not torch.equal(t0[n] >= 0, t0[n] >= 1) for n in t0)


def test_core_first_three_levels_start_from_the_sparser_level():
    model, tags = core_run(level_epochs=0, densities=(0.6, 0.3, 0.1))
    assert_layer_densities(tags, (0.6, 0.3, 0.1))
    out = outputs_by_level(model, cnn_task().test[0], 3)
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[2])


def test_core_first_keeps_the_core_with_a_shared_batchnorm_affine():
    # prepare() before DistributedDataParallel gives one affine per BatchNorm by default; the denser levels'
    # training must still leave the finished core's function alone
    trained, _ = core_run(level_epochs=2, prepared=False)
    fresh, _ = core_run(level_epochs=0, prepared=False)
    x = cnn_task().test[0]
    assert torch.equal(outputs_by_level(trained, x, 2)[1], outputs_by_level(fresh, x, 2)[1])


def test_core_first_bcr():
    bs = (4, 4)
    dense = cnn()
    model, tags = core_run(structure="bcr", block_shape=bs)
    expected = nestsparse.model_tags(dense, (0.5, 0.2), structure="bcr", block_shape=bs)
    for n, t in tags.items():
        NestedBCR.structured_tags(t, bs)
        assert torch.equal(t, expected[n]), n
        c = [int((t >= lvl).sum()) for lvl in range(2)]
        assert 0 < c[1] < c[0] <= int(0.5 * t.numel() + 1e-6)
    out = outputs_by_level(model, cnn_task().test[0], 2)
    assert not torch.allclose(out[0], out[1])


def test_core_first_grow_and_prune_keeps_counts():
    model, tags = core_run(grow_prune_every=1, grow_prune_fraction=0.3)
    base_model, base = core_run()
    assert_layer_densities(tags, (0.5, 0.2))
    assert any(not torch.equal(tags[n] == 1, base[n] == 1) for n in tags)


@pytest.mark.parametrize("prune_epochs,core_epochs", [(2, 0), (0, 2)])
def test_core_first_reaches_targets(prune_epochs, core_epochs):
    # the sparsest level must end at its density whatever the split between pruning and extra core epochs
    tags = core_first(
        mlp(),
        mlp_task(),
        (0.5, 0.2),
        prune_epochs=prune_epochs,
        core_epochs=core_epochs,
        level_epochs=1,
        progress=False,
    )
    assert_layer_densities(tags, (0.5, 0.2))


# -------------------------------------------------------------------------------------------- SupervisedTask


def index_task(n, batch_size, seed=0):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return SupervisedTask((x, torch.arange(n)), (x, torch.arange(n)), batch_size=batch_size, seed=seed)


def test_supervised_task_batches_cover_a_permutation():
    task = index_task(70, 16)
    batches = list(task.batches(0))
    assert [len(y) for _, y in batches] == [16, 16, 16, 16, 6]
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(ys.sort().values, torch.arange(70))
    assert all(torch.equal(x.squeeze(1).long(), y) for x, y in batches)
    assert not torch.equal(ys, torch.arange(70))
    assert torch.equal(torch.cat([y for _, y in task.batches(0)]), ys)
    assert not torch.equal(torch.cat([y for _, y in task.batches(1)]), ys)
    assert not torch.equal(torch.cat([y for _, y in index_task(70, 16, seed=1).batches(0)]), ys)


@pytest.mark.parametrize("n,kept", [(70, 5), (69, 4)])
def test_supervised_task_shards_contiguous_halves(monkeypatch, n, kept):
    task = index_task(n, 16)
    single = list(task.batches(2))
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(methods, "_rank_world", lambda rank=rank: (rank, 2))
        shards.append(list(task.batches(2)))
    assert len(shards[0]) == len(shards[1]) == kept
    for (x0, y0), (x1, y1), (x, y) in zip(shards[0], shards[1], single):
        assert len(y0) == len(y1) == len(y) // 2
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
    if kept < len(single):  # the odd last batch (5 samples) is dropped on both ranks
        assert len(single[-1][1]) % 2 == 1
    monkeypatch.setattr(methods, "_rank_world", lambda: (0, 3))
    with pytest.raises(ValueError, match="divide"):
        list(task.batches(0))


def test_supervised_task_evaluate_restores_mode():
    x, y = classification(40, (8,), seed=4)
    task = SupervisedTask((x, y), (x, y))
    model = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.5))
    with torch.no_grad():
        expected = float((model.eval()(x).argmax(1) == y).float().mean())
    model.train()
    assert task.evaluate(model) == pytest.approx(expected)
    assert model.training and model[1].training
    model.eval()
    assert task.evaluate(model) == pytest.approx(expected)
    assert not model.training
    logits = task.logits(model, (x, y))
    assert task.loss(logits, (x, y)).item() == pytest.approx(nn.functional.cross_entropy(logits, y).item())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(epochs=-1),
        dict(epochs=1.5),
        dict(prune_fraction=0.0),
        dict(distill=1.5),
        dict(temperature=0.0),
        dict(tag_updates=-2),
    ],
)
def test_joint_refuses_bad_arguments(kwargs):
    args = dict(epochs=1) | kwargs
    with pytest.raises(ValueError, match="joint"):
        joint(mlp(), mlp_task(), (0.5, 0.2), args.pop("epochs"), progress=False, **args)


@pytest.mark.parametrize("kwargs", [dict(prune_epochs=-1), dict(core_epochs=None), dict(level_epochs=2.0)])
def test_core_first_refuses_bad_arguments(kwargs):
    args = dict(prune_epochs=1, core_epochs=1, level_epochs=1) | kwargs
    with pytest.raises(ValueError, match="core_first"):
        core_first(mlp(), mlp_task(), (0.5, 0.2), progress=False, **args)


def test_frozen_values_keep_the_weight_dtype_exactly():
    model = nn.Sequential(nn.Linear(6, 5)).double()
    apply_level_masks(model, model_tags(model, (0.6, 0.2)), 2)
    mask = level_masks(model)["0"]
    raw = model[0].parametrizations.weight.original
    with torch.no_grad():
        raw.add_(1e-12)  # a difference float32 cannot hold
    mask.freeze(torch.ones_like(mask.frozen), raw)
    assert mask.frozen_values.dtype == torch.float64
    assert torch.equal(model[0].weight, raw * (mask.tags >= 0))
