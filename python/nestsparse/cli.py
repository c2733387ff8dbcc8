"""Command line: ``python -m nestsparse demo`` (the main job) and ``python -m nestsparse info``."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nestsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on the bundled digits, nest it, run every level")
    demo.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.13, 0.05],
                      help="level densities, densest first (default: 0.3 0.13 0.05)")
    demo.add_argument("--width", type=int, default=64, help="channels of the first conv (default 64)")
    demo.add_argument("--epochs", type=int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", metavar="PNG", help="also draw accuracy and latency per level")
    sub.add_parser("info", help="print how the compiled library was built and which CPU kernels it uses")
    args = parser.parse_args(argv)
    if args.command == "info":
        import nestsparse

        print(json.dumps(nestsparse.build_info(), indent=2))
        return 0
    from .demo import run

    try:
        run(levels=args.levels, width=args.width, epochs=args.epochs, seed=args.seed, plot=args.plot)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
