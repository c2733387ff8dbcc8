"""QoS measurement: many inferences per policy under a load scenario; deadline-met rate, tail latency, effective
accuracy, and the table and plot of them."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .executor import POLICIES, ReroutingExecutor
from .profile import LatencyProfile
from .timing import median_time

__all__ = [
    "QosResult",
    "run_qos",
    "parse_deadline",
    "deadline_from",
    "qos_table",
    "plot_latency_cdf",
    "checkpoint_cost",
]


@dataclass
class QosResult:
    """N inferences of one policy: latencies (s), deadline met, the level of every stage, and each inference's
    score (share of correct predictions; None when there are no labels)."""

    policy: str
    deadline: float
    latencies: np.ndarray
    met: np.ndarray
    levels: np.ndarray
    scores: np.ndarray | None
    overhead: np.ndarray
    num_levels: int

    @property
    def n(self) -> int:
        return len(self.latencies)

    @property
    def met_rate(self) -> float:
        return float(self.met.mean())

    @property
    def nines(self) -> float:
        """-log10 of the miss rate (99% met = 2 nines); with no miss, the resolution log10(N) as a bound."""
        miss = 1.0 - self.met_rate
        return -math.log10(miss) if miss > 0 else math.log10(self.n)

    def latency_percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))

    @property
    def accuracy(self) -> float | None:
        return None if self.scores is None else float(self.scores.mean())

    @property
    def effective_accuracy(self) -> float | None:
        """Accuracy with every inference that missed its deadline counted as wrong."""
        return None if self.scores is None else float((self.scores * self.met).mean())

    def level_histogram(self) -> list[float]:
        """Share of stage executions at each level."""
        return [float((self.levels == lvl).mean()) for lvl in range(self.num_levels)]

    def final_level_histogram(self) -> list[float]:
        """Share of inferences whose last stage ran at each level."""
        return [float((self.levels[:, -1] == lvl).mean()) for lvl in range(self.num_levels)]


def parse_deadline(spec: str | float) -> tuple[str, float]:
    """("ms", milliseconds) from "12.5" / "12.5ms", or ("percentile", q) from "p95"; ValueError otherwise."""
    text = str(spec).strip().lower()
    try:
        if text.startswith("p"):
            value = float(text[1:])
            if not 0 < value <= 100:
                raise ValueError
            return "percentile", value
        value = float(text[:-2] if text.endswith("ms") else text)
    except ValueError:
        raise ValueError(
            f"deadline {spec!r}: give milliseconds (e.g. 40 or 40ms) or a percentile in (0, 100] of "
            "the densest level's unloaded latency (e.g. p95)"
        ) from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"deadline must be positive, got {spec!r}")
    return "ms", value


def deadline_from(spec: str | float, profile: LatencyProfile) -> float:
    """A deadline in seconds from "12.5" / "12.5ms" (milliseconds) or "p95" (that percentile of the densest
    level's unloaded latency in ``profile``)."""
    kind, value = parse_deadline(spec)
    return profile.percentile(0, value) if kind == "percentile" else value / 1e3


def _wait_until(t: float) -> None:
    while True:
        left = t - time.perf_counter()
        if left <= 0:
            return
        time.sleep(min(left, 0.002) if left > 0.003 else 0)


def run_qos(
    executor: ReroutingExecutor,
    inputs: Callable[[int], tuple],
    n: int,
    deadline: float,
    *,
    policies: Iterable[str] = POLICIES,
    scenario=None,
    period: float | None = None,
    score: Callable[[int, object], float] | None = None,
    warmup: int = 3,
    progress: bool = True,
) -> dict[str, QosResult]:
    """Runs ``n`` inferences per policy; inference i gets ``inputs(i)`` (a tuple of arguments) and is scored
    by ``score(i, output)`` (share correct, in [0, 1]) if given.

    Inferences arrive periodically: inference i starts at i x ``period`` (default 1.25 x deadline) after the
    policy's start, or when the previous one ends if that is later. ``scenario`` (nestsparse.apps.scenarios) is
    restarted for every policy, so each policy meets the same load at the same moments of its schedule."""
    if n < 1:
        raise ValueError(f"run_qos: n must be >= 1, got {n}")
    if not deadline > 0:
        raise ValueError(f"run_qos: deadline must be positive, got {deadline}")
    period = 1.25 * deadline if period is None else period
    if not period > 0:
        raise ValueError(f"run_qos: period must be positive, got {period}")
    policies = list(policies)
    if not policies:
        raise ValueError("run_qos: no policies given")
    for policy in policies:
        executor.start_level(policy, deadline)  # refuses an unknown policy before any work
    results = {}
    for policy in policies:
        for i in range(warmup):
            executor(*inputs(i), deadline=deadline, policy=policy)
        executor.slowdown = 1.0
        lat, met, lev, sc, ovh = [], [], [], [], []
        if scenario is not None:
            scenario.start(executor)
        try:
            t0 = time.perf_counter()
            for i in tqdm(
                range(n), desc=f"{policy} ({getattr(scenario, 'name', 'no load')})", unit="inf", disable=not progress
            ):
                _wait_until(t0 + i * period)
                inf = executor(*inputs(i), deadline=deadline, policy=policy)
                lat.append(inf.latency)
                met.append(inf.met)
                lev.append(inf.levels)
                ovh.append(inf.overhead)
                if score is not None:
                    sc.append(float(score(i, inf.output)))
        finally:
            if scenario is not None:
                scenario.stop()
        results[policy] = QosResult(
            policy,
            deadline,
            np.array(lat),
            np.array(met, dtype=bool),
            np.array(lev),
            np.array(sc) if score is not None else None,
            np.array(ovh),
            executor.num_levels,
        )
    return results


def qos_table(results: dict[str, QosResult]) -> str:
    """A markdown table: one row per policy."""
    any_r = next(iter(results.values()))
    lines = [
        f"deadline {1e3 * any_r.deadline:.2f} ms, {any_r.n} inferences per policy",
        "",
        "| policy | deadline met | nines | p50 ms | p99 ms | p99.9 ms | accuracy | effective accuracy | "
        "levels used (share of stages) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results.values():
        nines = f"{r.nines:.2f}" if r.met_rate < 1 else f">= {r.nines:.2f}"
        acc = "n/a" if r.accuracy is None else f"{100 * r.accuracy:.2f}%"
        eff = "n/a" if r.effective_accuracy is None else f"{100 * r.effective_accuracy:.2f}%"
        hist = " / ".join(f"L{lvl} {100 * h:.1f}%" for lvl, h in enumerate(r.level_histogram()))
        lines.append(
            f"| {r.policy} | {100 * r.met_rate:.2f}% | {nines} | {1e3 * r.latency_percentile(50):.2f} | "
            f"{1e3 * r.latency_percentile(99):.2f} | {1e3 * r.latency_percentile(99.9):.2f} | {acc} | {eff} | "
            f"{hist} |"
        )
    return "\n".join(lines)


def plot_latency_cdf(results: dict[str, QosResult], path: str | os.PathLike, title: str = "") -> None:
    """Latency CDF per policy (left) and its tail, 1 - CDF on a log scale (right), with the deadline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"plotting needs matplotlib: pip install matplotlib ({exc})") from exc
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in results.values():
        x = np.sort(r.latencies) * 1e3
        cdf = np.arange(1, len(x) + 1) / len(x)
        label = f"{r.policy} ({100 * r.met_rate:.2f}% met)"
        ax[0].plot(x, cdf, label=label)
        ax[1].step(x, np.maximum(1 - cdf + 1 / len(x), 1 / len(x)), where="post", label=label)
    deadline = next(iter(results.values())).deadline * 1e3
    for a in ax:
        a.axvline(deadline, color="k", ls="--", lw=1)
        a.set_xlabel("latency (ms)")
    ax[0].set_xlim(0, min(2.5 * deadline, max(1e3 * r.latencies.max() for r in results.values())))
    ax[0].set(ylabel="share of inferences done", title="latency CDF (dashed: deadline)")
    ax[1].set(yscale="log", ylabel="share slower than x", title="tail: 1 - CDF")
    ax[0].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checkpoint_cost(executor: ReroutingExecutor, results: dict[str, QosResult], min_run_time: float = 0.2) -> dict:
    """What a checkpoint costs: the decision itself (measured inside every rerouted checkpoint) plus the forward
    pre-hook dispatch (an empty module timed with and without an idle hook, ``min_run_time`` seconds each), per
    checkpoint and per inference, as a share of the densest level's median latency."""
    probe = nn.Identity()
    x = torch.zeros(1)
    bare = median_time(lambda: probe(x), min_run_time=min_run_time)
    handle = probe.register_forward_pre_hook(lambda m, a: None)
    hooked = median_time(lambda: probe(x), min_run_time=min_run_time)
    handle.remove()
    dispatch = max(0.0, hooked - bare)
    stages = len(executor.order)
    reroute = results.get("reroute")
    decision = float(reroute.overhead.mean()) / stages if reroute is not None else math.nan
    per_checkpoint = decision + dispatch
    densest = executor.profile.percentile(0, 50)
    return {
        "checkpoints": stages,
        "decision_us": 1e6 * decision,
        "dispatch_us": 1e6 * dispatch,
        "per_checkpoint_us": 1e6 * per_checkpoint,
        "per_inference_us": 1e6 * per_checkpoint * stages,
        "per_checkpoint_pct": 100 * per_checkpoint / densest,
        "per_inference_pct": 100 * per_checkpoint * stages / densest,
    }
