"""ResNet-50 convolutions: nestsparse ncsr_conv2d (levels 0 and 1 of one nested weight, densities 0.10 and 0.05)
against dense torch.nn.functional.conv2d, batch 1, 224x224 input, fp32, one run.

The 1x1 and 3x3 convolutions of the four bottleneck stages (v1.5: the stride sits in the 3x3 of a stage's
first block, and in its projection shortcut), each distinct shape timed once and weighted by how often the
network uses it. The stem 7x7 and the classifier are left out.

    python bench/conv.py [--quick] [--csv PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import nestsparse as ns

from common import (
    check_close,
    environment,
    load_warning,
    markdown_table,
    nested_random,
    run_quietly,
    time_ms,
    verdict,
    write_csv,
)

DENSITIES = (0.10, 0.05)  # level 0: 90% sparse; level 1 nested inside it
TARGET = 2.5  # network total, level 0 vs dense
INPUT_COPIES = 4
# (bottleneck width, output channels, blocks, stride of the first block, input size) for a 224x224 image.
STAGES = [(64, 256, 3, 1, 56), (128, 512, 4, 2, 56), (256, 1024, 6, 2, 28), (512, 2048, 3, 2, 14)]
COLUMNS = ["stage", "layer", "conv", "input", "count", "dense_ms", "L0_ms", "x_L0", "L1_ms", "x_L1", "other_cpu"]


def resnet50_convs() -> list[dict]:
    """The distinct (stage, Cin, Cout, k, stride, input size) convolutions and how often each occurs."""
    counts, roles = Counter(), defaultdict(list)
    cin = 64
    for stage, (width, cout, blocks, stride, size) in enumerate(STAGES, 1):
        for b in range(blocks):
            s = stride if b == 0 else 1
            hw = size if b == 0 else size // stride
            layers = [
                ("reduce", cin, width, 1, 1, hw),
                ("3x3", width, width, 3, s, hw),
                ("expand", width, cout, 1, 1, hw // s),
            ]
            if b == 0:
                layers.append(("projection", cin, cout, 1, s, hw))
            for role, ci, co, k, st, h in layers:
                key = (stage, ci, co, k, st, h)
                counts[key] += 1
                if role not in roles[key]:
                    roles[key].append(role)
            cin = cout
    assert sum(counts.values()) == 52, "ResNet-50 has 16 bottlenecks x 3 convs + 4 projections"
    return [
        dict(stage=k[0], cin=k[1], cout=k[2], k=k[3], stride=k[4], hw=k[5], count=n, layer="/".join(roles[k]))
        for k, n in counts.items()
    ]


def run_layer(c: dict, min_run_time: float) -> dict:
    k, s, pad = c["k"], c["stride"], c["k"] // 2
    w, nested = nested_random((c["cout"], c["cin"], k, k), DENSITIES, seed=c["cin"] * 7 + c["cout"] + k + s)
    plan = ns.ops.ncsr_plan(nested.row_ptr, nested.row_end)  # once per weight, as the modules cache it
    x = torch.randn(1, c["cin"], c["hw"], c["hw"], generator=torch.Generator().manual_seed(c["hw"]))
    # Dense conv time swings up to 5x with where its input happens to be allocated (seen on 64->64 1x1 at
    # 56x56: 0.3 vs 1.6 ms; likely 4K aliasing with the output), so every op runs on separately allocated
    # copies of the input and keeps its fastest: the verdict must not hang on allocator luck.
    copies = [x.clone() for _ in range(INPUT_COPIES)]
    row = dict(c, conv=f"{c['cin']}->{c['cout']} {k}x{k} /{s}", input=f"{c['hw']}x{c['hw']}")

    def dense(x):
        return F.conv2d(x, w, None, s, pad)

    def sparse(x, level):
        return ns.ops.ncsr_conv2d(
            x,
            nested.values,
            nested.col_idx,
            nested.row_ptr,
            nested.row_end,
            level,
            (k, k),
            None,
            (s, s),
            (pad, pad),
            (1, 1),
            1,
            "none",
            plan,
        )

    def best_ms(fn):
        return min(time_ms(lambda: fn(xc), min_run_time / 2) for xc in copies)

    for level in range(nested.num_levels):
        ref = F.conv2d(x, nested.to_dense(level), None, s, pad)
        check_close(sparse(x, level), ref, f"ncsr_conv2d {row['conv']} at {row['input']}, level {level}")
    row["dense_ms"] = best_ms(dense)
    for level in range(nested.num_levels):
        row[f"L{level}_ms"] = best_ms(lambda xc: sparse(xc, level))
        row[f"x_L{level}"] = row["dense_ms"] / row[f"L{level}_ms"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="three shapes, short timings (CI smoke run, < 60 s)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--min-run-time", type=float, help="seconds per blocked_autorange (default 0.05 quick, 0.5 full)")
    args = p.parse_args()
    start, env = time.perf_counter(), environment()  # before any rebuild of csrc/ can change the answer
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.5)
    patience = 0.0 if args.quick else 120.0  # CI must finish in a minute; full runs wait out other jobs
    convs = resnet50_convs()
    if args.quick:  # a strided 3x3, a plain 3x3 and a 1x1 reduce
        convs = [
            c
            for c in convs
            if (c["cin"], c["cout"], c["k"], c["stride"], c["hw"])
            in {(128, 128, 3, 2, 56), (256, 256, 3, 1, 14), (1024, 256, 1, 1, 14)}
        ]
    rows, shares = [], []
    for c in tqdm(convs, desc="conv", file=sys.stderr):
        row, share = run_quietly(lambda: run_layer(c, min_run_time), patience)
        rows.append(dict(row, other_cpu=round(100 * share)))
        shares.append(share)

    total = {col: sum(r[col] * r["count"] for r in rows) for col in ("dense_ms", "L0_ms", "L1_ms")}
    rows.append(
        dict(
            stage="all",
            layer="network total (ms x count)",
            count=sum(r["count"] for r in rows),
            **total,
            x_L0=total["dense_ms"] / total["L0_ms"],
            x_L1=total["dense_ms"] / total["L1_ms"],
        )
    )

    print(f"# nestsparse ResNet-50 convolution benchmark ({'quick' if args.quick else 'full'})\n")
    print(env)
    print(load_warning(shares))
    print(
        f"fp32, batch 1, NCHW. Each time: blocked_autorange median (min_run_time {min_run_time / 2} s) after "
        f"warm-up, the fastest over {INPUT_COPIES} separately allocated copies of the input. dense: "
        "`F.conv2d(x, W, None, stride, padding)`; L0/L1: `ncsr_conv2d` at levels 0 (density 0.10) and 1 "
        "(density 0.05) of ONE nested weight (magnitude tags of a random weight), plan built once. x_L*: dense "
        "ms / sparse ms. count: occurrences in ResNet-50 v1.5.\n"
    )
    print(markdown_table(rows, COLUMNS))
    scope = "network" if not args.quick else "QUICK SUBSET only, not the network"
    print(
        f"\nTotal ({scope}): dense {total['dense_ms']:.3f} ms, level 0 {total['L0_ms']:.3f} ms "
        f"({rows[-1]['x_L0']:.2f}x), level 1 {total['L1_ms']:.3f} ms ({rows[-1]['x_L1']:.2f}x)."
    )
    print(
        f"Target: level 0 (90% sparse) total >= {TARGET}x vs dense: {verdict(rows[-1]['x_L0'] >= TARGET)}"
        f"{' (quick subset)' if args.quick else ''}."
    )
    print(f"Run time {time.perf_counter() - start:.0f} s.")
    write_csv(args.csv, rows, COLUMNS)


if __name__ == "__main__":
    main()
