"""The ``qos`` command: build a nested model, profile it, run every policy under a scenario, print the table.

Models:
- ``resnet50``: full-size ResNet-50 (224x224 RGB, batch 1), seeded random weights with one-shot nested
  magnitude tags per layer (stem and classifier dense), nested CSR. No labels: latency only.
- ``digits``: the demo's CNN on scikit-learn's digits, trained and its levels trained jointly (about a minute
  on 2 cores); one inference classifies a batch of test digits and is scored by its share of correct answers.
- ``fashion-mnist``: the 28x28 CNN trained from scratch on 20,000 real Fashion-MNIST training images (``make
  real-data``), its levels trained jointly (about two minutes on 2 cores); one inference classifies a batch of
  real test images and is scored by its share of correct answers.
- a path to a nestsparse checkpoint (``nestsparse.save``) with ``input_shape``: random inputs, latency only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..convert import convert
from ..io import load
from ..pruning import LevelSpec, SupervisedTask, joint, model_tags, train_dense, unmask
from ..runtime import (
    POLICIES,
    LatencyProfile,
    ReroutingExecutor,
    checkpoint_cost,
    deadline_from,
    parse_deadline,
    plot_latency_cdf,
    qos_table,
    run_qos,
)
from .data import digits, labelled_batches
from .models import dense_layers, digits_cnn, mnist_cnn, resnet50
from .scenarios import make_scenario
from .tasks import fashion_mnist_task

__all__ = ["Workload", "workload", "run"]

DEFAULT_LEVELS = {"resnet50": (0.3, 0.13, 0.05), "digits": (0.3, 0.03, 0.005), "fashion-mnist": (0.3, 0.05, 0.01)}
DEFAULT_EPOCHS = {"digits": 25, "fashion-mnist": 3}  # dense training, then as many epochs of joint training


@dataclass
class Workload:
    """A nested model, the i-th inference's arguments, and (when there are labels) the i-th score."""

    name: str
    model: nn.Module
    inputs: object
    score: object | None
    description: str


def _resnet50(levels: Sequence[float], seed: int) -> Workload:
    torch.manual_seed(seed)
    dense = resnet50().eval()
    tags = model_tags(dense, levels, skip=dense_layers(dense))
    model = convert(dense, tags, densities=tuple(levels)).eval()
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(8)]
    return Workload(
        "resnet50",
        model,
        lambda i: (pool[i % len(pool)],),
        None,
        f"ResNet-50, batch 1 (224x224), random weights, one-shot magnitude levels {tuple(levels)}",
    )


def _unknown_model(model: str) -> str:
    return f"unknown model {model!r}: 'resnet50', 'digits', 'fashion-mnist' or a nestsparse checkpoint (.safetensors)"


def _trained(model: nn.Module, task: SupervisedTask, spec: LevelSpec, epochs: int, seed: int, scope: str) -> nn.Module:
    """``model`` trained dense, then its levels trained jointly, converted."""
    nested = train_dense(model, task, epochs, lr=2e-3, seed=seed)
    joint(nested, task, spec, epochs, scope=scope, skip=dense_layers(nested), seed=seed)
    plain, tags = unmask(nested)
    return convert(plain, tags, densities=spec.densities).eval()


def _digits(levels: Sequence[float], seed: int, batch: int, epochs: int) -> Workload:
    spec = LevelSpec(tuple(levels))
    torch.manual_seed(seed)
    train_set, test_set = digits(seed)
    model = _trained(digits_cnn(64), SupervisedTask(train_set, test_set, seed=seed), spec, epochs, seed, "global")
    inputs, score = labelled_batches(test_set, batch)
    return Workload(
        "digits",
        model,
        inputs,
        score,
        f"digits CNN, batches of {batch} test digits, levels {tuple(levels)} trained jointly",
    )


def _fashion_mnist(levels: Sequence[float], seed: int, batch: int, epochs: int) -> Workload:
    spec = LevelSpec(tuple(levels))
    torch.manual_seed(seed)
    task = fashion_mnist_task(seed, batch_size=128, n_train=20_000)
    # Per-layer budgets: a global one at 1% would empty the first fully connected layer (the most weights).
    model = _trained(mnist_cnn(), task, spec, epochs, seed, "layer")
    inputs, score = labelled_batches(task.test, batch)
    return Workload(
        "fashion-mnist",
        model,
        inputs,
        score,
        f"Fashion-MNIST CNN (20k real training images), batches of {batch} real test images, levels "
        f"{tuple(levels)} trained jointly",
    )


def _checkpoint(path: str, input_shape: Sequence[int], seed: int) -> Workload:
    if not input_shape:
        raise ValueError("a checkpoint model needs input_shape (e.g. 1,3,224,224)")
    model = load(path).eval()
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randn(*input_shape, generator=g) for _ in range(8)]
    return Workload(path, model, lambda i: (pool[i % len(pool)],), None, f"{path}, random inputs {tuple(input_shape)}")


def workload(
    model: str,
    levels: Sequence[float] | None = None,
    seed: int = 0,
    batch: int = 16,
    epochs: int | None = None,
    input_shape: Sequence[int] = (),
) -> Workload:
    """The model named ``model`` ("resnet50", "digits", "fashion-mnist") or loaded from the checkpoint file
    ``model``; ``epochs`` of training for the trained ones (default DEFAULT_EPOCHS)."""
    if model in DEFAULT_LEVELS:
        levels = tuple(levels or DEFAULT_LEVELS[model])
        if model == "resnet50":
            return _resnet50(levels, seed)
        build = _digits if model == "digits" else _fashion_mnist
        return build(levels, seed, batch, DEFAULT_EPOCHS[model] if epochs is None else epochs)
    if model.endswith(".safetensors"):
        return _checkpoint(model, input_shape, seed)
    raise ValueError(_unknown_model(model))


def run(
    model: str = "resnet50",
    deadline: str = "p95",
    scenario: str = "fluctuating",
    n: int = 1000,
    seed: int = 0,
    levels: Sequence[float] | None = None,
    stages: str = "block",
    margin: float = 0.1,
    policies: Sequence[str] = POLICIES,
    profile: str | None = None,
    save_profile: str | None = None,
    repeats: int = 50,
    plot: str | None = None,
    batch: int = 16,
    epochs: int | None = None,
    input_shape: Sequence[int] = (),
    period: float | None = None,
    progress: bool = True,
) -> dict:
    """Runs the QoS comparison and prints it; returns the results, the deadline and the checkpoint cost."""
    # Everything that can be refused is refused before minutes of building and profiling.
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    parse_deadline(deadline)
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    for p in policies:
        if p not in POLICIES and not (p.startswith("static:") and p[7:].isdigit()):
            raise ValueError(f"unknown policy {p!r}; expected one of {POLICIES} or 'static:<level>'")
    if stages not in ("block", "layer"):
        raise ValueError(f"stages must be 'block' or 'layer', got {stages!r}")
    if model not in DEFAULT_LEVELS and not model.endswith(".safetensors"):
        raise ValueError(_unknown_model(model))
    scen = make_scenario(scenario, seed=seed)
    t0 = time.perf_counter()
    wl = workload(model, levels, seed, batch, epochs, input_shape)
    print(f"{wl.description}; built in {time.perf_counter() - t0:.1f} s; torch threads: {torch.get_num_threads()}")
    with ReroutingExecutor(wl.model, stages, margin=margin) as ex:
        if profile:
            ex.set_profile(LatencyProfile.load(profile))
            print(f"latency profile loaded from {profile}")
        else:
            # Inferences arrive periodically with idle time between them; profile them the same way.
            warm = sorted(ex(*wl.inputs(0), policy="static-densest").latency for _ in range(5))
            ex.measure_profile(*wl.inputs(0), repeats=repeats, gap=0.25 * warm[2], progress=progress)
        prof = ex.profile
        if save_profile:
            prof.save(save_profile)
            print(f"latency profile written to {save_profile}")
        print(f"{len(ex.order)} stages ({stages}); unloaded latency per level:\n{prof.summary()}")
        dl = deadline_from(deadline, prof)
        print(
            f"deadline {1e3 * dl:.2f} ms ({deadline}); scenario {scen.name}: {scen.describe()}; "
            f"rerouting margin {margin:.0%}"
        )
        results = run_qos(
            ex, wl.inputs, n, dl, policies=policies, scenario=scen, period=period, score=wl.score, progress=progress
        )
        cost = checkpoint_cost(ex, results)
    print()
    print(qos_table(results))
    print(
        f"\ncheckpoint cost: {cost['per_checkpoint_us']:.1f} us each (decision {cost['decision_us']:.1f} us + hook "
        f"dispatch {cost['dispatch_us']:.1f} us) = {cost['per_checkpoint_pct']:.3f}% of the densest level's median "
        f"latency; {cost['checkpoints']} checkpoints per inference = {cost['per_inference_pct']:.2f}%"
    )
    if plot:
        plot_latency_cdf(results, plot, title=f"{wl.name}, scenario {scen.name}, deadline {1e3 * dl:.1f} ms")
        print(f"latency CDF written to {plot}")
    return {"results": results, "deadline": dl, "cost": cost, "profile": prof, "workload": wl.name}
