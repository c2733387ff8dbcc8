"""QoS under a deadline: static densest, static sparsest, choose-once and rerouting, side by side.

Three workloads under the built-in fluctuating-load scenario (background CPU load switched by a seeded trace),
the deadline at the densest level's unloaded p95:
- ResNet-50 at full size (batch 1): deadline-met rate, nines, tail latency, checkpoint cost;
- the trained digits CNN (levels trained jointly): the same plus effective accuracy (a missed deadline
  counts as wrong);
- the 28x28 CNN trained on real Fashion-MNIST (levels trained jointly), scored on real test images, where the
  sparsest level costs real accuracy; skipped with a note when `make real-data` has not installed the data.
Then it checks the targets and prints MET / NOT MET for each. The same runs one at a time:
``python -m nestsparse qos --model resnet50 --deadline p95 --scenario fluctuating``.

    python bench/qos.py [--quick] [--models resnet50,digits,fashion-mnist] [--scenario fluctuating] [--csv F]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

from nestsparse.apps import qos, real_data

TARGETS = """Targets: static densest meets the deadline in at most ~90-99% of inferences; rerouting in at least 99.9%
(one to two nines more); rerouting's effective accuracy above both static policies (digits, fashion-mnist); a
checkpoint costs under 1% of the densest level's latency (ResNet-50)."""


def verdicts(name: str, out: dict) -> list[tuple[str, bool]]:
    r = out["results"]
    checks = []
    if {"static-densest", "reroute"} <= r.keys():
        dense, rr = r["static-densest"], r["reroute"]
        checks.append((f"{name}: static densest meets {100 * dense.met_rate:.2f}% (<= ~99%)", dense.met_rate <= 0.99))
        checks.append((f"{name}: rerouting meets {100 * rr.met_rate:.2f}% (>= 99.9%)", rr.met_rate >= 0.999))
        gain = rr.nines - dense.nines
        checks.append((f"{name}: rerouting adds {gain:.2f} nines (>= 1)", gain >= 1))
    scored = all(res.effective_accuracy is not None for res in r.values())
    if scored and {"static-densest", "static-sparsest", "reroute"} <= r.keys():
        eff = {p: r[p].effective_accuracy for p in r}
        best_static = max(eff["static-densest"], eff["static-sparsest"])
        checks.append(
            (
                f"{name}: rerouting effective accuracy {100 * eff['reroute']:.2f}% > best static "
                f"{100 * best_static:.2f}%",
                eff["reroute"] > best_static,
            )
        )
    if name == "resnet50":
        c = out["cost"]
        checks.append(
            (
                f"{name}: checkpoint cost {c['per_checkpoint_pct']:.4f}% of the densest latency (< 1%)",
                c["per_checkpoint_pct"] < 1,
            )
        )
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few inferences and short training (a smoke run)")
    ap.add_argument("--models", default="resnet50,digits,fashion-mnist")
    ap.add_argument("--scenario", default="fluctuating")
    ap.add_argument("-n", "--inferences", type=int, help="per policy (default 1000, --quick 40)")
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot-dir", default="bench/results", help="latency CDF PNGs go here ('' for none)")
    ap.add_argument("--csv", default="", help="also write one row per model and policy")
    ap.add_argument(
        "--levels",
        default="",
        help="level densities for ResNet-50, e.g. 0.3,0.13,0.05,0.02 (default nestsparse.apps.qos.DEFAULT_LEVELS)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per inference (default 1: see nestsparse.apps.scenarios on why)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.inferences or (40 if args.quick else 1000)
    repeats = 8 if args.quick else 50
    print(
        f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}; {n} inferences "
        f"per policy\n"
    )
    outs = {}
    for name in [m for m in args.models.split(",") if m]:
        print(f"## {name}")
        if name == "fashion-mnist":
            try:
                real_data.fashion_mnist_raw()
            except FileNotFoundError as e:
                print(f"skipped: {e}\n")
                continue
        t0 = time.perf_counter()
        plot = os.path.join(args.plot_dir, f"qos-{name}{'-quick' if args.quick else ''}.png") if args.plot_dir else None
        if plot:
            os.makedirs(args.plot_dir, exist_ok=True)
        levels = [float(v) for v in args.levels.split(",")] if args.levels and name == "resnet50" else None
        outs[name] = qos.run(
            model=name,
            deadline="p95",
            scenario=args.scenario,
            n=n,
            seed=args.seed,
            levels=levels,
            margin=args.margin,
            repeats=repeats,
            plot=plot,
            epochs={"digits": 3, "fashion-mnist": 1}.get(name) if args.quick else None,
            progress=sys.stderr.isatty(),
        )
        print(f"({time.perf_counter() - t0:.0f} s)\n")
    print(TARGETS)
    for text, ok in [c for name, out in outs.items() for c in verdicts(name, out)]:
        print(f"- {'MET' if ok else 'NOT MET'}: {text}")
    if args.quick:
        print(f"(--quick: {n} inferences cannot resolve 99.9%; the verdicts above are a smoke run only)")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "model",
                    "policy",
                    "deadline_ms",
                    "n",
                    "met_rate",
                    "nines",
                    "p50_ms",
                    "p99_ms",
                    "p999_ms",
                    "accuracy",
                    "effective_accuracy",
                ]
                + [f"level{lvl}_share" for lvl in range(4)]
            )
            for name, out in outs.items():
                for r in out["results"].values():
                    hist = r.level_histogram() + [math.nan] * 4
                    w.writerow(
                        [
                            name,
                            r.policy,
                            1e3 * r.deadline,
                            r.n,
                            r.met_rate,
                            r.nines,
                            1e3 * r.latency_percentile(50),
                            1e3 * r.latency_percentile(99),
                            1e3 * r.latency_percentile(99.9),
                            r.accuracy,
                            r.effective_accuracy,
                        ]
                        + hist[:4]
                    )
        print(f"CSV written to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
