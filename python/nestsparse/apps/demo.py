"""The main job: train a small CNN on scikit-learn's bundled handwritten digits (no download), train its nested
levels jointly (nestsparse.pruning.joint, one global budget per level), convert it to the sparse kernels and
report every level next to the dense model: weights %, FLOPs %, accuracy (and what one-shot magnitude tags
without training would give) and latency."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..convert import choose_dense_levels, convert
from ..nn import NestedSparseModule, set_level
from ..pruning import LevelSpec, SupervisedTask, apply_level_masks, joint, model_tags, train_dense, unmask
from ..runtime import ReroutingExecutor, median_time, qos_table, run_qos
from .data import digits, labelled_batches
from .models import dense_layers, digits_cnn
from .scenarios import make_scenario


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    x, y = data
    return (model(x).argmax(1) == y).float().mean().item()


def dense_flops(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Multiply-adds x 2 of every Linear/Conv2d for one sample, by module name."""
    flops: dict[str, int] = {}

    def hook(name):
        def f(m, inp, out):
            per_out = m.weight[0].numel()
            flops[name] = 2 * per_out * out[0].numel()

        return f

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        model(sample[:1])
    for h in handles:
        h.remove()
    return flops


def latency_us(model: nn.Module, x: torch.Tensor) -> float:
    """Median microseconds of ``model(x)`` on one thread (the demo compares levels, not thread scaling)."""
    with torch.no_grad():
        return median_time(lambda: model(x), min_run_time=0.4, warmup=0, threads=1) * 1e6


@dataclass
class Row:
    name: str
    weights_pct: float
    flops_pct: float
    acc: float
    one_shot_acc: float
    lat1: float
    lat256: float


def run(
    levels=(0.3, 0.13, 0.05), width: int = 64, epochs: int = 25, seed: int = 0, plot: str | None = None
) -> list[Row]:
    spec = LevelSpec(tuple(levels))
    torch.manual_seed(seed)
    train_set, test_set = digits(seed)
    t0 = time.perf_counter()
    task = SupervisedTask(train_set, test_set, seed=seed)
    dense = train_dense(digits_cnn(width), task, epochs, lr=2e-3, seed=seed)
    print(
        f"dense CNN trained in {time.perf_counter() - t0:.1f} s on {len(train_set[1])} digits "
        f"({sum(p.numel() for p in dense.parameters()):,} parameters)"
    )
    skip = dense_layers(dense)
    one_shot = copy.deepcopy(dense)
    apply_level_masks(one_shot, model_tags(dense, spec, scope="global", skip=skip), spec.num_levels)
    nested = copy.deepcopy(dense)
    t0 = time.perf_counter()
    joint(nested, task, spec, epochs, scope="global", skip=skip, seed=seed)
    print(f"{spec.num_levels} nested levels trained jointly in {time.perf_counter() - t0:.1f} s")
    plain, tags = unmask(nested)
    sparse = convert(plain, tags, densities=spec.densities)
    names = list(tags)
    xb1, xb256 = test_set[0][:1].contiguous(), test_set[0][:256].contiguous()
    # Levels that sparsity cannot speed up at batch 1 (too dense for the sparse kernel) run as dense products.
    chosen = [r for r in choose_dense_levels(sparse, xb1, threads=1) if r["dense"]]
    print(
        "dense products, chosen by measurement at batch 1: "
        + (", ".join(f"{r['name']} at level {r['level']}" for r in chosen) or "none")
    )
    total_w = sum(dense.get_submodule(n).weight.numel() for n in names)
    fl = dense_flops(dense, test_set[0])
    total_fl = sum(fl.values())
    dense_acc = accuracy(dense, test_set)
    rows = [Row("dense", 100.0, 100.0, dense_acc, dense_acc, latency_us(dense, xb1), latency_us(dense, xb256))]
    for lvl in tqdm(range(spec.num_levels), desc="measuring levels", unit="level"):
        set_level(sparse, lvl)
        set_level(one_shot, lvl)
        nnz = {n: sparse.get_submodule(n).nnz(lvl) for n in names}
        w_pct = 100.0 * sum(nnz.values()) / total_w
        f_sparse = sum(fl[n] * nnz[n] / dense.get_submodule(n).weight.numel() for n in names)
        f_pct = 100.0 * (f_sparse + total_fl - sum(fl[n] for n in names)) / total_fl
        rows.append(
            Row(
                f"level {lvl} (target {spec.densities[lvl]:.0%})",
                w_pct,
                f_pct,
                accuracy(sparse, test_set),
                accuracy(one_shot, test_set),
                latency_us(sparse, xb1),
                latency_us(sparse, xb256),
            )
        )
    print_table(rows)
    one_buffer = sum(m.nested().nbytes() for m in sparse.modules() if isinstance(m, NestedSparseModule))
    dense_bytes = total_w * 4
    print(
        f"\nAll {spec.num_levels} levels live in one buffer: {one_buffer / 1e6:.2f} MB of nested CSR for the pruned "
        f"layers, vs {dense_bytes / 1e6:.2f} MB dense (float32 values, int16 column indices)."
    )
    show_rerouting(sparse, test_set, seed)
    if plot:
        plot_levels(rows, plot)
        print(f"plot written to {plot}")
    return rows


def show_rerouting(sparse: nn.Module, test_set, seed: int, n: int = 300, batch: int = 16) -> None:
    """A short QoS run: batches of test digits under the fluctuating CPU-load scenario, deadline at the densest
    level's unloaded p95, every policy side by side (``python -m nestsparse qos`` runs the full version)."""
    inputs, score = labelled_batches(test_set, batch)
    scenario = make_scenario("fluctuating", seed=seed)
    print(
        f"\nRerouting: {n} inferences of {batch} digits per policy, one thread, checkpoints before each sparse "
        f"layer; {scenario.describe()}"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ReroutingExecutor(sparse, "block", margin=0.1) as ex:
            profile = ex.measure_profile(*inputs(0), repeats=40, gap=0.002)
            results = run_qos(ex, inputs, n, profile.percentile(0, 95), scenario=scenario, score=score)
    finally:
        torch.set_num_threads(threads)
    print(qos_table(results))
    print(
        "A rerouted inference starts at level 0 and, when a checkpoint predicts a miss, finishes at the densest level "
        "that still fits; effective accuracy counts a missed deadline as wrong."
    )


def print_table(rows: list[Row]) -> None:
    dense = rows[0]
    print(
        "\n| model | weights % | FLOPs % | test accuracy | one-shot, untrained | latency batch 1 (us) | speedup | "
        "latency batch 256 (us) | speedup |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.name} | {r.weights_pct:.1f} | {r.flops_pct:.1f} | {100 * r.acc:.2f}% | "
            f"{100 * r.one_shot_acc:.2f}% | "
            f"{r.lat1:.0f} | "
            f"{dense.lat1 / r.lat1:.2f}x | {r.lat256:.0f} | {dense.lat256 / r.lat256:.2f}x |"
        )
    print(
        "\nweights % counts the pruned layers (the first conv and the classifier stay dense); FLOPs % counts every "
        "layer's multiply-adds. Accuracy: levels trained jointly (nestsparse.pruning.joint); the next column is the "
        "same budget by one-shot magnitude tags on the dense model, without training. Latency: median of repeated "
        "runs of the whole model on this machine, levels through the sparse kernels, dense through torch."
    )


def plot_levels(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib: pip install matplotlib ({exc})") from exc
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([r.weights_pct for r in rows], [100 * r.acc for r in rows], "o-")
    for r in rows:
        ax[0].annotate(r.name.split(" (")[0], (r.weights_pct, 100 * r.acc), textcoords="offset points", xytext=(4, 4))
    ax[0].set(xscale="log", xlabel="weights kept (%)", ylabel="test accuracy (%)", title="accuracy per level")
    ax[1].bar([r.name.split(" (")[0] for r in rows], [r.lat256 / 1000 for r in rows])
    ax[1].set(ylabel="latency, batch 256 (ms)", title="latency per level")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
