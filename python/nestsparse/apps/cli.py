"""Command line: ``python -m nestsparse demo`` (the main job), ``qos`` (deadlines under load) and ``info``."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nestsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on the bundled digits, nest it, run every level")
    demo.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=[0.3, 0.13, 0.05],
        help="level densities, densest first (default: 0.3 0.13 0.05)",
    )
    demo.add_argument("--width", type=int, default=64, help="channels of the first conv (default 64)")
    demo.add_argument("--epochs", type=int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", metavar="PNG", help="also draw accuracy and latency per level")
    sub.add_parser("info", help="print how the compiled library was built and which CPU kernels it uses")
    qos = sub.add_parser(
        "qos",
        help="deadline-met rate, tail latency and effective accuracy of the static, "
        "choose-once and rerouting policies under a load scenario",
    )
    qos.add_argument(
        "--model",
        default="resnet50",
        help="resnet50 (default), digits or fashion-mnist (trained here, scored; fashion-mnist needs make "
        "real-data), or a nestsparse .safetensors checkpoint",
    )
    qos.add_argument(
        "--deadline",
        default="p95",
        help="milliseconds (40 or 40ms) or a percentile of the densest level's unloaded latency (default p95)",
    )
    qos.add_argument(
        "--scenario",
        default="fluctuating",
        help="none, fluctuating (background CPU load, default), slowdown (synthetic trace), gpu-stream",
    )
    qos.add_argument("-n", "--inferences", type=int, default=1000, help="inferences per policy (default 1000)")
    qos.add_argument("--seed", type=int, default=0, help="seeds the model, the inputs and the load trace")
    qos.add_argument("--levels", type=float, nargs="+", help="level densities, densest first (model default)")
    qos.add_argument(
        "--stages",
        choices=("block", "layer"),
        default="block",
        help="checkpoints before every residual block / top-level layer (block) or every layer",
    )
    qos.add_argument("--margin", type=float, default=0.1, help="share of the deadline rerouting keeps in reserve")
    qos.add_argument("--policies", nargs="+", help="subset of static-densest static-sparsest choose-once reroute")
    qos.add_argument("--profile", metavar="JSON", help="use this latency profile instead of measuring one")
    qos.add_argument("--save-profile", metavar="JSON", help="write the measured latency profile")
    qos.add_argument("--repeats", type=int, default=50, help="profiling runs per level (default 50)")
    qos.add_argument("--batch", type=int, default=16, help="digits per inference for --model digits")
    qos.add_argument("--input-shape", help="input shape for a checkpoint model, e.g. 1,3,224,224")
    qos.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per inference (default 1; 0 = torch's default). Under the fluctuating "
        "scenario, inferences with as many threads as cores stall at every barrier (see "
        "nestsparse.apps.scenarios)",
    )
    qos.add_argument("--plot", metavar="PNG", help="write the latency CDF of every policy")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .. import build_info

        print(json.dumps(build_info(), indent=2))
        return 0
    if args.command == "qos":
        return _qos(qos, args)
    from .demo import run

    try:
        run(levels=args.levels, width=args.width, epochs=args.epochs, seed=args.seed, plot=args.plot)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


def _qos(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch

    from ..runtime import POLICIES
    from .qos import run

    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shape = [int(v) for v in args.input_shape.split(",")] if args.input_shape else []
        run(
            model=args.model,
            deadline=args.deadline,
            scenario=args.scenario,
            n=args.inferences,
            seed=args.seed,
            levels=args.levels,
            stages=args.stages,
            margin=args.margin,
            policies=args.policies or POLICIES,
            profile=args.profile,
            save_profile=args.save_profile,
            repeats=args.repeats,
            plot=args.plot,
            batch=args.batch,
            input_shape=shape,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
