"""Accuracy per level of nested sparse models, four families, three ways of getting the levels.

For each family (nestsparse.apps.tasks: digits/ResNet, point clouds/PointNet++, seq2seq/GNMT, graph/GAT) it trains
the dense baseline, then gets levels (0.13, 0.05) by
  1. one-shot nested magnitude tags on the dense model (no training; BatchNorm statistics re-estimated per
     level without labels or weight updates),
  2. progressive core-first training (nestsparse.pruning.core_first),
  3. joint sandwich training with distillation (nestsparse.pruning.joint),
and prints weights %, FLOPs % and the test score per level side by side, the targets (level 0 within 0.5
points of dense, level 1 within 3.25% relative), the latency of each level through the sparse kernels,
and the size of the saved file (nestsparse.save) next to the densest level's storage. A PNG plots accuracy
against weights kept.

``--real`` runs the real-data families instead (install the data with `make real-data`, the pretrained
all-MiniLM-L6-v2 and MobileNetV2 with `make bench-extras`; a family whose files are missing is skipped with a note):
  - the 28x28 CNN trained from scratch on full Fashion-MNIST (60k / 10k);
  - the pretrained MNIST CNN (99.06% dense), its levels started from its trained weights, on the real MNIST test set;
  - all-MiniLM-L6-v2 with a fresh classification head, fine-tuned on 4,000 of the 10,246 Rotten Tomatoes training
    snippets (2 cores make the whole set too slow; the split is real_data.rotten_tomatoes's fixed one), scored on
    all 2,562 test snippets, every encoder Linear pruned;
then, without training, what one-shot nesting does to the pretrained ImageNet MobileNetV2 (top-1 agreement with
dense on views of the bundled photos, a Fashion-MNIST linear probe per level) and to MiniLM's word embeddings
(WordSim353 / SimLex-999 Spearman), and a summary table of every family. About 45 minutes on 2 cores; --quick
trains on 10k images (1k snippets) for a quarter of the epochs.

Latency (both modes): the best method's converted model at batch 1 and 64 against the best dense baseline, the
fastest of torch eager, channels-last, torch.compile and ONNX Runtime, side by side (see ``latencies``).

    python bench/accuracy.py [--quick] [--real] [--families digits,graph] [--plot PATH] [--csv PATH]
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import nestsparse
from nestsparse import pruning
from nestsparse.apps import data, models, real_data, tasks
from nestsparse.nn import LevelBatchNorm, NestedSparseModule

DENSITIES = (0.13, 0.05)
METHODS = ("one-shot", "core-first", "joint")
BATCH = 64  # the batched latency's batch size


@dataclass
class Family:
    """How one family is built and trained. Epoch counts are for the full run; --quick divides them."""

    task: Callable[[int, bool], object]
    model: Callable[[], nn.Module]
    example: Callable[[object, int], tuple]  # the first n test inputs, as model(*example)
    dense_epochs: int
    prune_epochs: int
    core_epochs: int
    level_epochs: int
    joint_epochs: int
    lr: float = 2e-3
    finetune_lr: float = 1e-3
    max_grad_norm: float | None = None
    pretrained: bool = False  # the model comes trained: no dense training, the levels start from its weights
    missing: Callable[[], str | None] = lambda: None  # why the family cannot run here (an optional install), or None
    about: str = ""  # model and data, for the summary table


def first_test_inputs(task, n: int) -> tuple:
    """The first ``n`` test inputs of a SupervisedTask, as model(*example)."""
    return (task.test[0][:n].contiguous(),)


def _seq_example(task, n):
    src, tgt = task.data.src_test[:n], task.data.tgt_test[:n]
    return src, task.decoder_input(tgt)


FAMILIES = {
    "digits": Family(
        task=lambda seed, quick: tasks.digits_task(seed),
        model=lambda: models.resnet_small(num_classes=10, in_channels=1, width=16),
        example=first_test_inputs,
        dense_epochs=30,
        prune_epochs=10,
        core_epochs=10,
        level_epochs=10,
        joint_epochs=40,
    ),
    "pointcloud": Family(
        task=lambda seed, quick: tasks.point_cloud_task(seed, n_per_class=40 if quick else 150),
        model=lambda: models.pointnet2(num_classes=len(data.POINT_CLOUD_CLASSES)),
        example=first_test_inputs,
        dense_epochs=25,
        prune_epochs=10,
        core_epochs=10,
        level_epochs=10,
        joint_epochs=40,
    ),
    "seq2seq": Family(
        task=lambda seed, quick: tasks.seq2seq_task(seed, n_train=600 if quick else 4000),
        model=lambda: models.gnmt(),
        example=_seq_example,
        dense_epochs=12,
        prune_epochs=5,
        core_epochs=5,
        level_epochs=5,
        joint_epochs=20,
        lr=3e-3,
        finetune_lr=2e-3,
        max_grad_norm=1.0,
    ),
    "graph": Family(
        task=lambda seed, quick: tasks.graph_task(seed),
        model=lambda: models.gat(),
        example=lambda t, n: (t.graph.x, t.graph.adj),  # one graph: always all of it
        dense_epochs=40,
        prune_epochs=10,
        core_epochs=10,
        level_epochs=10,
        joint_epochs=40,
        lr=5e-3,
        finetune_lr=5e-3,
    ),
}


# Real data (`make real-data`, nestsparse.apps.real_data): the 28x28 CNN trained from scratch on Fashion-MNIST, and
# the pretrained MNIST CNN pruned the way users prune a trained model. --quick trains on 10k images, a quarter of
# the epochs.
REAL_FAMILIES = {
    "fashion-mnist": Family(
        task=lambda seed, quick: tasks.fashion_mnist_task(seed, n_train=10_000 if quick else None),
        about="28x28 CNN from scratch; Fashion-MNIST 60k / 10k",
        model=lambda: models.mnist_cnn(),
        example=first_test_inputs,
        dense_epochs=6,
        prune_epochs=2,
        core_epochs=2,
        level_epochs=2,
        joint_epochs=6,
    ),
    "mnist-pretrained": Family(
        task=lambda seed, quick: tasks.mnist_task(seed, n_train=10_000 if quick else None),
        about="pretrained 28x28 CNN (digit-recognizer-py); MNIST 60k / 10k",
        model=lambda: models.mnist_cnn(pretrained=True),
        example=first_test_inputs,
        dense_epochs=0,
        prune_epochs=1,
        core_epochs=1,
        level_epochs=1,
        joint_epochs=3,
        finetune_lr=5e-4,
        pretrained=True,
    ),
    # all-MiniLM-L6-v2 (pretrained) + a fresh head, fine-tuned on 4,000 of the 10,246 training snippets (--quick:
    # 1,000), scored on all 2,562 test snippets; every encoder Linear pruned.
    "minilm-rotten-tomatoes": Family(
        task=lambda seed, quick: tasks.rotten_tomatoes_task(seed, n_train=1_000 if quick else 4_000),
        about="pretrained all-MiniLM-L6-v2 + head; Rotten Tomatoes 4k of 10,246 / 2,562",
        model=lambda: models.minilm_classifier(),
        example=first_test_inputs,
        dense_epochs=1,
        prune_epochs=1,
        core_epochs=1,
        level_epochs=1,
        joint_epochs=2,
        lr=5e-5,
        finetune_lr=3e-4,  # 1e-4 over one joint epoch: 71.4 / 59.0%; 3e-4 over two: 75.4 / 66.9% (dense 81.7%)
        missing=lambda: _minilm_missing(),
    ),
}


def _minilm_missing() -> str | None:
    if models.minilm_path() is None:
        return f"all-MiniLM-L6-v2 is not installed ({models.minilm.INSTALL_HINT})"
    try:
        real_data.rotten_tomatoes()
    except FileNotFoundError as e:
        return str(e)
    return None


@dataclass
class LevelRow:
    family: str
    method: str
    level: str
    weights_pct: float
    flops_pct: float
    score: float


def layer_flops(model: nn.Module, example: tuple) -> dict[str, int]:
    """Multiply-adds x 2 of every nn.Linear / nn.Conv2d call on ``example``, summed per module name."""
    flops: dict[str, int] = {}

    def hook(name):
        def f(m, inp, out):  # every output element of a Linear or Conv2d costs one row of the weight
            flops[name] = flops.get(name, 0) + 2 * m.weight[0].numel() * out.numel()

        return f

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        model.eval()(*example)
    for h in handles:
        h.remove()
    return flops


def level_stats(
    tags: dict[str, Tensor], flops: dict[str, int], level: int, weight_sizes: dict[str, int]
) -> tuple[float, float]:
    """Weights % of the pruned layers and FLOPs % of all Linear/Conv2d layers at ``level``."""
    kept = {n: int((t >= level).sum()) for n, t in tags.items()}
    w_pct = 100.0 * sum(kept.values()) / sum(weight_sizes[n] for n in tags)
    total = sum(flops.values())
    sparse = sum(f * (kept[n] / weight_sizes[n] if n in tags else 1.0) for n, f in flops.items())
    return w_pct, 100.0 * sparse / total


def one_shot(dense: nn.Module, tags: dict[str, Tensor], skip: list[str]) -> nn.Module:
    """A copy of ``dense`` with the level masks of ``tags`` (no training) and per-level BatchNorm (its statistics
    still the dense ones: ``recalibrate_bn`` re-estimates them)."""
    model = copy.deepcopy(dense)
    pruning.prepare(model, len(DENSITIES), skip=skip)
    return pruning.apply_level_masks(model, tags, len(DENSITIES))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, task, levels: int, batches: int = 20) -> None:
    """Re-estimates every level's BatchNorm statistics from training inputs (no labels, no weight update); a model
    with plain BatchNorm (one level) gets its statistics re-estimated the same way."""
    bns = [m for m in model.modules() if isinstance(m, (LevelBatchNorm, nn.modules.batchnorm._BatchNorm))]
    if not bns:
        return
    if levels > 1 and not all(isinstance(bn, LevelBatchNorm) for bn in bns):
        raise ValueError("recalibrate_bn: a model with levels needs LevelBatchNorm (nestsparse.pruning.prepare)")
    momentum = [bn.momentum for bn in bns]
    for level in range(levels):
        if levels > 1:
            nestsparse.set_level(model, level)
        for bn in bns:
            if isinstance(bn, LevelBatchNorm):
                bn.running_mean[level].zero_()
                bn.running_var[level].fill_(1)
                bn.num_batches_tracked[level] = 0
            else:
                bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the batches
        model.train()
        for i, batch in enumerate(task.batches(0)):
            if i == batches:
                break
            task.logits(model, batch)
    for bn, m in zip(bns, momentum):
        bn.momentum = m
    if levels > 1:
        nestsparse.set_level(model, 0)
    model.eval()


def scores(model: nn.Module, task, levels: int) -> list[float]:
    out = []
    for level in range(levels):
        nestsparse.set_level(model, level)
        out.append(task.evaluate(model))
    nestsparse.set_level(model, 0)
    return out


def latencies(dense: nn.Module, sparse: nn.Module, x: tuple, levels: int, quick: bool, tmp: str) -> dict:
    """Median ms per call, side by side (bench/models.py's round robin, all threads), of the best dense baseline and
    of each level. Dense: the fastest of torch eager, channels-last (image input), torch.compile with freezing
    (not in a ``quick`` run, which also takes fewer rounds) and ONNX Runtime (single-input models, when installed).
    A level: the faster of the converted model and nestsparse.fuse of it (when torch.fx can trace the model). Every
    variant's first output is checked against its reference first. Returns {"dense": (variant, ms), "level l":
    (variant, ms), "rounds": n}."""
    import models as e2e  # noqa: PLC0415  (bench/models.py: the end-to-end benchmark's timing machinery)

    torch._dynamo.reset()
    what = f"{type(dense).__name__} batch {len(x[0])}"
    with torch.inference_mode():
        ref = dense(*x)
        level_refs = []
        for level in range(levels):
            level_refs.append(nestsparse.to_dense(sparse, level).eval()(*x))
    variants = [e2e.Variant("eager", lambda: dense(*x), ref)]
    if x[0].dim() == 4:
        cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
        x_cl = (x[0].contiguous(memory_format=torch.channels_last), *x[1:])
        variants.append(e2e.Variant("channels-last", lambda: cl(*x_cl), ref))
    if not quick:
        compiled = torch.compile(copy.deepcopy(dense), dynamic=False, options={"freezing": True})
        variants.append(e2e.Variant("compile", lambda: compiled(*x), ref))
    if len(x) == 1:
        session, why = e2e.ort_session(dense, x[0], Path(tmp) / "dense.onnx")
        if why:
            print(f"- {what}: {why}", file=sys.stderr)
        if session is not None:
            feed = {"x": x[0].numpy()}
            variants.append(e2e.Variant("ORT", lambda: session.run(None, feed)[0], ref, ort=True))
    lowered = [("eager", sparse)]
    try:
        lowered.append(("fused", nestsparse.fuse(copy.deepcopy(sparse).eval())))
    except ValueError:  # fuse names what torch.fx cannot trace (a transformers model): the eager model only
        pass
    for level in range(levels):
        for label, m in lowered:
            variants.append(
                e2e.Variant(
                    label,
                    lambda m=m: m(*x),
                    level_refs[level],
                    level,
                    setup=lambda m=m, lv=level: nestsparse.set_level(m, lv),
                )
            )
    with torch.inference_mode():
        for v in list(variants):
            try:
                v.prepare(what, 3, e2e.SAMPLE_S)
            except Exception as e:  # a compiler failure drops the variant (a wrong result exits the run)
                if v.name != "compile":
                    raise
                variants.remove(v)
                first = (str(e).strip().splitlines() or [""])[0][:200]
                print(
                    f"- {what}: dense compile skipped, torch.compile failed ({type(e).__name__}: {first})",
                    file=sys.stderr,
                )
        rounds = e2e.round_robin(variants, 0, 0.2 if quick else 3.0, 3 if quick else 11, what)
    nestsparse.set_level(sparse, 0)
    torch._dynamo.reset()  # the compiled copy's graphs go
    best = lambda vs: min(((v.name, v.ms) for v in vs), key=lambda t: t[1])  # noqa: E731
    out = {"dense": best(v for v in variants if v.level is None), "rounds": rounds}
    for level in range(levels):
        out[f"level {level}"] = best(v for v in variants if v.level == level)
    return out


def run_family(name: str, fam: Family, quick: bool, seed: int, save_dir: str) -> tuple[list[LevelRow], dict]:
    div = 4 if quick else 1
    ep = lambda e: max(1, e // div)  # noqa: E731
    task = fam.task(seed, quick)
    torch.manual_seed(seed)
    dense = fam.model()
    skip = models.dense_layers(dense)
    t0 = time.perf_counter()
    if not fam.pretrained:
        pruning.train_dense(dense, task, ep(fam.dense_epochs), lr=fam.lr, max_grad_norm=fam.max_grad_norm, seed=seed)
    info = {"dense_s": time.perf_counter() - t0}
    example = fam.example(task, 1)
    flops = layer_flops(dense, example)
    sizes = {
        n: dense.get_submodule(n).weight.numel()
        for n, m in dense.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    dense_score = task.evaluate(dense)
    rows = [LevelRow(name, "dense", "dense", 100.0, 100.0, dense_score)]
    L = len(DENSITIES)
    trained = {}

    tags = nestsparse.model_tags(dense, DENSITIES, skip=skip)
    one = one_shot(dense, tags, skip)
    recalibrate_bn(one, task, L)
    trained["one-shot"] = (one, tags, 0.0)

    t0 = time.perf_counter()
    core = copy.deepcopy(dense)
    tags = pruning.core_first(
        core,
        task,
        DENSITIES,
        prune_epochs=ep(fam.prune_epochs),
        core_epochs=ep(fam.core_epochs),
        level_epochs=ep(fam.level_epochs),
        lr=fam.finetune_lr,
        skip=skip,
        max_grad_norm=fam.max_grad_norm,
        seed=seed,
    )
    trained["core-first"] = (core, tags, time.perf_counter() - t0)

    t0 = time.perf_counter()
    joint = copy.deepcopy(dense)
    tags = pruning.joint(
        joint,
        task,
        DENSITIES,
        ep(fam.joint_epochs),
        lr=fam.finetune_lr,
        skip=skip,
        max_grad_norm=fam.max_grad_norm,
        seed=seed,
    )
    trained["joint"] = (joint, tags, time.perf_counter() - t0)

    for method, (model, tags, secs) in trained.items():
        info[f"{method}_s"] = secs
        for level, s in enumerate(scores(model, task, L)):
            w, f = level_stats(tags, flops, level, sizes)
            rows.append(LevelRow(name, method, f"level {level}", w, f, s))

    # The best method (level 0, then level 1) goes through the sparse kernels and a save/load round trip.
    best = max(METHODS, key=lambda m: tuple(r.score for r in rows if r.method == m))
    model, _, _ = trained[best]
    plain, tags = pruning.unmask(copy.deepcopy(model))
    sparse = nestsparse.convert(plain, tags, densities=DENSITIES).eval()
    lat = {}
    for n in (1, BATCH) if name != "graph" else (1,):
        lat[n] = latencies(dense.eval(), sparse, fam.example(task, n), L, quick, save_dir)
    path = os.path.join(save_dir, f"{name}.safetensors")
    size = nestsparse.save(sparse, path)
    loaded = nestsparse.load(path)
    a, b = sparse.state_dict(), loaded.state_dict()
    same = list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    stored = sum(m.nested().nbytes() for m in sparse.modules() if isinstance(m, NestedSparseModule))
    nested_ids = {
        id(t) for m in sparse.modules() if isinstance(m, NestedSparseModule) for t in [m.values, *m.index_tensors()]
    }
    rest = sum(
        t.numel() * t.element_size() for t in sparse.state_dict(keep_vars=True).values() if id(t) not in nested_ids
    )
    info.update(
        best=best,
        latency_ms=lat,
        file_bytes=size,
        nested_bytes=stored,
        rest_bytes=rest,
        roundtrip=same,
        dense_bytes=sum(p.numel() * p.element_size() for p in dense.state_dict().values()),
        bn_extra_bytes=sum(
            (m.num_levels - 1) * m.num_features * 4 * (2 + 2 * m.per_level_affine)
            for m in sparse.modules()
            if isinstance(m, LevelBatchNorm)
        ),
    )
    return rows, info


def word_similarity_levels() -> list[str]:
    """What one-shot nesting costs a pretrained encoder without any training: all-MiniLM-L6-v2 with every encoder
    Linear at (13%, 5%) by magnitude (layer scope), word embeddings (mean-pooled last hidden states) scored by the
    Spearman correlation of their cosine similarities with the human scores of WordSim353 and SimLex-999. Returns
    the markdown lines to print (or one line saying what is missing)."""
    path = models.minilm_path()
    if path is None:
        return ["- MiniLM word similarity skipped: `make bench-extras` installs transformers and all-MiniLM-L6-v2"]
    try:
        sets = {name: real_data.word_similarity(name) for name in ("wordsim353", "simlex999")}
    except FileNotFoundError as e:
        return [f"- MiniLM word similarity skipped: {e}"]
    from scipy.stats import spearmanr  # noqa: PLC0415  (scikit-learn's dependency)
    from transformers import AutoModel  # noqa: PLC0415

    tokenizer = models.minilm_tokenizer()
    dense = AutoModel.from_pretrained(path, local_files_only=True).eval()
    skip = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and not n.startswith("encoder.")]
    tags = nestsparse.model_tags(dense, DENSITIES, skip=skip)
    sparse = nestsparse.convert(dense, tags).eval()

    @torch.no_grad()
    def embed(model, words):
        enc = tokenizer(words, padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    lines = [
        "| set (Spearman x 100) | dense | one-shot level 0 (13%) | one-shot level 1 (5%) |",
        "|---|---:|---:|---:|",
    ]
    for name, pairs in sets.items():
        words = sorted({w for a, b, _ in pairs for w in (a, b)})
        where = {w: i for i, w in enumerate(words)}
        a = torch.tensor([where[p[0]] for p in pairs])
        b = torch.tensor([where[p[1]] for p in pairs])
        human = [p[2] for p in pairs]
        cells = []
        for model, level in ((dense, None), (sparse, 0), (sparse, 1)):
            if level is not None:
                nestsparse.set_level(model, level)
            e = embed(model, words)
            cells.append(100 * spearmanr((e[a] * e[b]).sum(-1).numpy(), human).statistic)
        lines.append(f"| {name} ({len(pairs)} pairs) | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return lines


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def imagenet_views(img: Tensor, n: int, seed: int, size: int = 224) -> Tensor:
    """``n`` normalised ``size`` x ``size`` views of a uint8 (3, H, W) photo: the first the usual centre crop (shorter
    side resized to 256/224 x size), the others random resized crops (25-100% of the area, aspect 3/4 to 4/3), each
    flipped left-right with probability 1/2."""
    g = torch.Generator().manual_seed(seed)
    x = img.float().unsqueeze(0) / 255
    H, W = x.shape[-2:]
    resize = lambda t, hw: torch.nn.functional.interpolate(t, hw, mode="bilinear", antialias=True)  # noqa: E731
    views = []
    for i in range(n):
        if i == 0:
            s = round(size * 256 / 224) / min(H, W)
            h, w = round(H * s), round(W * s)
            top, left = (h - size) // 2, (w - size) // 2
            views.append(resize(x, (h, w))[..., top : top + size, left : left + size])
            continue
        u = torch.rand(3, generator=g).tolist()
        area, aspect = H * W * (0.25 + 0.75 * u[0]), (3 / 4) * (16 / 9) ** u[1]
        ch, cw = min(H, round((area / aspect) ** 0.5)), min(W, round((area * aspect) ** 0.5))
        top = int(torch.randint(0, H - ch + 1, (1,), generator=g))
        left = int(torch.randint(0, W - cw + 1, (1,), generator=g))
        v = resize(x[..., top : top + ch, left : left + cw], (size, size))
        views.append(v.flip(-1) if u[2] < 0.5 else v)
    return (torch.cat(views) - IMAGENET_MEAN) / IMAGENET_STD


def fashion_as_imagenet(x: Tensor, size: int) -> Tensor:
    """uint8 (N, 28, 28) Fashion-MNIST images as normalised RGB ``size`` x ``size`` ImageNet inputs."""
    x = torch.nn.functional.interpolate(x.float().unsqueeze(1) / 255, (size, size), mode="bilinear")
    return (x.expand(-1, 3, -1, -1) - IMAGENET_MEAN) / IMAGENET_STD


@torch.no_grad()
def pooled_features(model: nn.Module, x: Tensor, batch: int = 128) -> Tensor:
    """MobileNetV2's 1280 pooled features (the classifier's input)."""
    model.eval()
    return torch.cat([model.features(xb).mean((2, 3)) for xb in x.split(batch)])


def linear_probe(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.1))
    clf.fit(train[0].numpy(), train[1].numpy())
    return float(clf.score(test[0].numpy(), test[1].numpy()))


def mobilenet_levels(quick: bool, seed: int) -> tuple[list[str], list[LevelRow]]:
    """What one-shot nesting does to the pretrained ImageNet MobileNetV2 (every 1x1 convolution at (13%, 5%) by
    magnitude, layer scope; stem, depthwise convolutions and classifier dense), without training:
    - top-1 agreement with the dense model on views of the bundled photos, with the BatchNorm statistics as
      trained and re-estimated without labels on other random crops of the same photos (the dense model's row is
      the control: what re-estimating alone changes);
    - Fashion-MNIST linear probe: a logistic regression on each level's pooled features (images upsampled to
      96x96 RGB; BatchNorm statistics of the dense model and of each level re-estimated on the first 1,280 of the
      probe's unlabelled training images), 5,000 training and 2,000 test images (--quick: 500 / 200).
    Returns the markdown lines to print and the probe's rows for the plot (or one line saying what is missing)."""
    if models.mobilenet_pretrained_path() is None:
        return ["- MobileNetV2 skipped: `make bench-extras` installs its ImageNet weights"], []
    try:
        photos = real_data.photos()
        (x_train, y_train), (x_test, y_test) = real_data.fashion_mnist_raw()
    except FileNotFoundError as e:
        return [f"- MobileNetV2 skipped: {e}"], []
    L, name = len(DENSITIES), "mobilenet-v2 probe"
    dense = models.mobilenet_v2(pretrained=True).eval()
    skip = models.dense_layers(dense)
    tags = nestsparse.model_tags(dense, DENSITIES, skip=skip)
    sizes = {n: m.weight.numel() for n, m in dense.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    flops = layer_flops(dense, (torch.zeros(1, 3, 224, 224),))

    @torch.no_grad()
    def top5(model: nn.Module, x: Tensor) -> Tensor:
        return torch.cat([model.eval()(xb).topk(5, -1).indices for xb in x.split(64)])

    views = 4 if quick else 16
    evals = torch.cat([imagenet_views(p, views, seed + i) for i, (_, p) in enumerate(photos)])
    calib = torch.cat([imagenet_views(p, views + 1, 10_000 + seed + i)[1:] for i, (_, p) in enumerate(photos)])
    crops = pruning.SupervisedTask((calib, torch.zeros(len(calib))), ([], []), 32, seed)
    as_trained, re_estimated, dense_re = one_shot(dense, tags, skip), one_shot(dense, tags, skip), copy.deepcopy(dense)
    recalibrate_bn(re_estimated, crops, L)
    recalibrate_bn(dense_re, crops, 1)  # the control: what re-estimating alone does to the dense model
    ref = top5(dense, evals)

    def agreement(model: nn.Module) -> tuple[float, float]:  # top-1 agreement, dense top-1 in the model's top-5
        got = top5(model, evals)
        return float((got[:, 0] == ref[:, 0]).float().mean()), float((got == ref[:, :1]).any(1).float().mean())

    agree = [(agreement(dense), agreement(dense_re))]
    for level in range(L):
        nestsparse.set_level(as_trained, level)
        nestsparse.set_level(re_estimated, level)
        agree.append((agreement(as_trained), agreement(re_estimated)))

    n_train, n_test = (500, 200) if quick else (5_000, 2_000)
    g = torch.Generator().manual_seed(seed)
    tr, te = torch.randperm(len(y_train), generator=g)[:n_train], torch.randperm(len(y_test), generator=g)[:n_test]
    xtr, xte = fashion_as_imagenet(x_train[tr], 96), fashion_as_imagenet(x_test[te], 96)
    unlabelled = pruning.SupervisedTask((xtr, y_train[tr]), ([], []), 64, seed)
    probe_dense, probe = copy.deepcopy(dense), one_shot(dense, tags, skip)
    recalibrate_bn(probe_dense, unlabelled, 1)
    recalibrate_bn(probe, unlabelled, L)

    def probe_accuracy(model: nn.Module) -> float:
        return linear_probe((pooled_features(model, xtr), y_train[tr]), (pooled_features(model, xte), y_test[te]))

    acc = [probe_accuracy(probe_dense)]
    for level in range(L):
        nestsparse.set_level(probe, level)
        acc.append(probe_accuracy(probe))

    rows = [LevelRow(name, "dense", "dense", 100.0, 100.0, acc[0])]
    lines = [
        f"Top-1 agreement with the dense model on {len(evals)} views of {len(photos)} photos (in brackets: the "
        "dense top-1 class in the model's top-5), with the BatchNorm statistics as trained on ImageNet and "
        "re-estimated on other crops of the photos; the Fashion-MNIST linear probe's test accuracy "
        f"({n_train} / {n_test} images).\n",
        "| model | weights % | FLOPs % | agreement, BN as trained | agreement, BN re-estimated | linear probe |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for level in range(-1, L):
        if level >= 0:
            w, f = level_stats(tags, flops, level, sizes)
            rows.append(LevelRow(name, "one-shot", f"level {level}", w, f, acc[level + 1]))
        else:
            w = f = 100.0
        cells = [f"{100 * a:.1f}% ({100 * b:.1f}%)" for a, b in agree[level + 1]]
        lines.append(
            f"| {'dense' if level < 0 else f'one-shot level {level}'} | {w:.1f} | {f:.1f} | {cells[0]} | {cells[1]} "
            f"| {100 * acc[level + 1]:.2f}% |"
        )
    return lines, rows


def summary(results: list[tuple[str, Family, list[LevelRow], dict]]) -> list[str]:
    """One table over the families: each method's score per level, the targets, and (for the method that went
    through the kernels) each level's speed against the best dense variant at each batch size."""
    batches = sorted({n for *_, info in results for n in info["latency_ms"]})
    lines = [
        "| family | model; data (train / test) | method | dense | level 0 | level 1 | weights % L0 / L1 "
        "| FLOPs % L0 / L1 | targets L0 / L1 | "
        + " | ".join(f"x best dense, batch {n}, L0 / L1" for n in batches)
        + " |",
        "|---|---|---|---:|---:|---:|---:|---:|---|" + "---:|" * len(batches),
    ]
    for name, fam, rows, info in results:
        dense = next(r.score for r in rows if r.method == "dense")
        for method in METHODS:
            lv = [next(r for r in rows if r.method == method and r.level == f"level {i}") for i in range(2)]
            verdict = " / ".join("met" if ok else "missed" for ok in met(rows, method)[:2])
            speed = []
            for n in batches:
                lat = info["latency_ms"].get(n)
                ok = method == info["best"] and lat is not None
                speed.append(
                    " / ".join(f"{lat['dense'][1] / lat[f'level {i}'][1]:.2f}x" for i in range(2)) if ok else ""
                )
            lines.append(
                f"| {name} | {fam.about} | {method} | {100 * dense:.2f} | {100 * lv[0].score:.2f} | "
                f"{100 * lv[1].score:.2f} | {lv[0].weights_pct:.1f} / {lv[1].weights_pct:.1f} | "
                f"{lv[0].flops_pct:.1f} / {lv[1].flops_pct:.1f} | {verdict} | " + " | ".join(speed) + " |"
            )
    return lines


def met(rows: list[LevelRow], method: str) -> tuple[bool, bool, float, float]:
    """The paper's bar for ``method``: level 0 within 0.5 points of dense, level 1 within 3.25% relative of dense;
    (level 0 met, level 1 met, level 0 - dense in points, level 1 / dense - 1 in %)."""
    dense = next(r.score for r in rows if r.method == "dense")
    l0 = next(r.score for r in rows if r.method == method and r.level == "level 0")
    l1 = next(r.score for r in rows if r.method == method and r.level == "level 1")
    return l0 >= dense - 0.005, l1 >= dense * (1 - 0.0325), 100 * (l0 - dense), 100 * (l1 / dense - 1)


def targets(rows: list[LevelRow]) -> list[str]:
    """Per method: whether it meets the paper's bar at each level (``met``), as lines to print."""
    out = []
    for method in METHODS:
        ok0, ok1, d0, d1 = met(rows, method)
        out.append(
            f"{method}: level 0 {d0:+.2f} pt ({'MET' if ok0 else 'NOT MET'}), "
            f"level 1 {d1:+.2f}% rel ({'MET' if ok1 else 'NOT MET'})"
        )
    return out


def print_family(name: str, rows: list[LevelRow], info: dict) -> None:
    print(f"\n### {name}\n")
    print("| method | level | weights % | FLOPs % | test score |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r.method} | {r.level} | {r.weights_pct:.1f} | {r.flops_pct:.1f} | {100 * r.score:.2f}% |")
    print()
    for line in targets(rows):
        print(f"- {line}")
    for n, lat in info["latency_ms"].items():
        what = "the whole graph" if name == "graph" else f"batch {n}"
        dense_name, dense_ms = lat["dense"]
        print(
            f"- latency ({info['best']} model, {what}, median of {lat['rounds']} side-by-side rounds): best dense "
            f"({dense_name}) {dense_ms:.3f} ms; "
            + "; ".join(
                f"{k} ({v[0]}) {v[1]:.3f} ms ({dense_ms / v[1]:.2f}x)" for k, v in lat.items() if k.startswith("level")
            )
        )
    print(
        f"- saved file {info['file_bytes'] / 1e3:.1f} kB = nested layers (all levels, one buffer each) "
        f"{info['nested_bytes'] / 1e3:.1f} kB + dense rest {info['rest_bytes'] / 1e3:.1f} kB + header "
        f"{(info['file_bytes'] - info['nested_bytes'] - info['rest_bytes']) / 1e3:.1f} kB; dense model "
        f"{info['dense_bytes'] / 1e3:.1f} kB; round trip exact: {info['roundtrip']}"
    )
    if info["bn_extra_bytes"]:
        print(
            f"- level-aware BatchNorm costs {info['bn_extra_bytes'] / 1e3:.1f} kB of extra statistics "
            f"({100 * info['bn_extra_bytes'] / info['file_bytes']:.2f}% of the file) and no extra time"
        )
    print(
        f"- training time: dense {info['dense_s']:.0f} s, core-first {info['core-first_s']:.0f} s, "
        f"joint {info['joint_s']:.0f} s"
    )


def plot(all_rows: list[LevelRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(r.family for r in all_rows))
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.6), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        rows = [r for r in all_rows if r.family == fam]
        dense = next(r.score for r in rows if r.method == "dense")
        ax.axhline(100 * dense, color="k", lw=1, ls="--", label="dense")
        ax.axhspan(100 * dense * (1 - 0.0325), 100 * dense, color="0.9")
        trained = [r.score for r in rows if r.method != "one-shot"]
        if len(trained) == 1:  # one-shot levels only (MobileNetV2): the axis shows them
            trained = [r.score for r in rows]
        lo, hi = 100 * min(trained) - 3, min(100.5, 100 * max(trained) + 1.5)
        for method, marker in zip(METHODS, "osD"):
            pts = [r for r in rows if r.method == method]
            ys = [max(100 * r.score, lo) for r in pts]  # a point below the axis sits on its edge, value written
            (line,) = ax.plot([r.weights_pct for r in pts], ys, marker + "-", label=method)
            for r, y in zip(pts, ys):
                if 100 * r.score < lo:
                    ax.annotate(
                        f"{100 * r.score:.0f}%",
                        (r.weights_pct, y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        color=line.get_color(),
                        fontsize=8,
                    )
        ax.set(title=fam, xlabel="weights kept in pruned layers (%)", ylabel="test score (%)")
        ax.set_ylim(lo - 0.5, hi)
        ax.set_xticks([100 * d for d in DENSITIES])
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a quarter of the epochs and smaller data (a smoke run)")
    ap.add_argument(
        "--real",
        action="store_true",
        help=f"the real-data families instead ({', '.join(REAL_FAMILIES)}; install the data with make real-data)",
    )
    ap.add_argument(
        "--families",
        default="",
        help=f"comma-separated subset of {','.join(FAMILIES)} (or, with "
        f"--real, of {','.join(REAL_FAMILIES)}); default all",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="bench/results/accuracy.png", help="PNG path ('' for none)")
    ap.add_argument("--csv", default="", help="also write the rows as CSV")
    args = ap.parse_args(argv)
    known = REAL_FAMILIES if args.real else FAMILIES
    fams = [f for f in args.families.split(",") if f] or list(known)
    unknown = [f for f in fams if f not in known]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {list(known)}")
    if args.real:
        try:
            real_data.fashion_mnist_raw(), real_data.mnist_raw()
            models.mnist_cnn(pretrained=True)
        except FileNotFoundError as e:
            print(f"accuracy --real: {e}", file=sys.stderr)
            return 2
        if args.plot == ap.get_default("plot"):
            args.plot = "bench/results/accuracy-real.png"
    print(
        f"nestsparse {nestsparse.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"levels {DENSITIES}, {'quick' if args.quick else 'full'} run, seed {args.seed}"
    )
    all_rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in fams:
            why = known[name].missing()
            if why:
                print(f"\n### {name}\n\n- skipped: {why}")
                continue
            rows, info = run_family(name, known[name], args.quick, args.seed, tmp)
            print_family(name, rows, info)
            all_rows += rows
            results.append((name, known[name], rows, info))
            sys.stdout.flush()
    if args.real:
        print("\n### MobileNetV2 (ImageNet weights) per level, one-shot (no training)\n")
        lines, rows = mobilenet_levels(args.quick, args.seed)
        print("\n".join(lines))
        all_rows += rows
        print("\n### all-MiniLM-L6-v2 word similarity per level, one-shot (no training)\n")
        print("\n".join(word_similarity_levels()))
    if results:
        print(f"\n### Summary (accuracy %, levels at {DENSITIES}; latency: the best method through the kernels)\n")
        print("\n".join(summary(results)))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["family", "method", "level", "weights_pct", "flops_pct", "score"])
            for r in all_rows:
                w.writerow(
                    [r.family, r.method, r.level, f"{r.weights_pct:.3f}", f"{r.flops_pct:.3f}", f"{r.score:.5f}"]
                )
    if args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        plot(all_rows, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
