"""What converting one large layer costs: peak memory over the dense weight's bytes, and time.

Each case runs in a fresh process: the dense layer and its tags are made first, then the process's peak resident
memory is reset (/proc/self/clear_refs) and read after ``nestsparse.convert``, so the peak
printed is the conversion's own: the dense weight the caller holds plus what convert adds above what the process
held when it started. ``--size 16384`` is a 1 GiB float32 nn.Linear.

    python bench/convert.py [--size 8192] [--densities 0.3 0.1] [--format ncsr nbcr]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time, torch, nestsparse

def status(key):  # kB figures of /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

size, densities, fmt = int(sys.argv[1]), tuple(json.loads(sys.argv[2])), sys.argv[3]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(size, size))
structure = {"structure": "bcr"} if fmt == "nbcr" else {}
tags = nestsparse.model_tags(model, densities, **structure)
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to what is resident now
start = time.perf_counter()
sparse = nestsparse.convert(model, tags, format=fmt)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "before": before, "peak": status("VmHWM"),
                  "weight": model[0].weight.nbytes}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="the Linear is size x size, float32")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.1])
    parser.add_argument("--format", nargs="+", default=["ncsr", "nbcr"])
    args = parser.parse_args()
    import torch  # noqa: PLC0415

    import nestsparse  # noqa: PLC0415

    print(f"torch {torch.__version__}, CPU kernels {nestsparse.native.cpu_isa()}, {torch.get_num_threads()} threads")
    print(f"nn.Linear({args.size}, {args.size}) float32, densities {tuple(args.densities)}")
    print(f"{'format':>6} {'weight MB':>10} {'convert adds MB':>16} {'peak x weight':>14} {'s':>6}")
    for fmt in args.format:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.size), json.dumps(args.densities), fmt],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        # convert adds: its peak above what the process held when it started (the model, its tags, and what making
        # the tags left in the allocator); the peak counts the dense weight the caller holds plus that.
        adds = max(r["peak"] - r["before"], 0)
        print(
            f"{fmt:>6} {r['weight'] / 2**20:>10.0f} {adds / 2**20:>16.0f} {1 + adds / r['weight']:>14.2f} "
            f"{r['seconds']:>6.1f}"
        )


if __name__ == "__main__":
    main()
