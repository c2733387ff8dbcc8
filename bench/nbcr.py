"""Nested BCR (block row/column) products: nbcr_linear and nbcr_conv2d against torch dense and against nested CSR
built from the SAME tags, fp32, one run.

Every weight is ONE nested buffer with two levels, from ``bcr_tags(w, densities, block_shape)`` on a random
Gaussian weight; level 0 and level 1 are timed from that same buffer, with the plan built once outside the timed
loop (``nbcr_plan(block_ptr, counts, bm)``, as the modules cache it). The NCSR rows use
``NestedCSR.from_dense(w, same tags)``: same non-zeros, unstructured kernel, so x_vs_ncsr is what the block
structure buys. Each case times dense first, then the sparse products, back to back: every ratio is taken side
by side in one run. Every product is checked against the dense result of its level before it is timed.

Tables:
1. Linear (4096x4096; also 1024x1024 and 4096x1024 in full runs), densities (0.13, 0.05), batch N.
   x_dense_L*: dense ms / NBCR ms. x_ncsr_L*: NCSR ms / NBCR ms. rate_L*: % of the dense GEMM's FLOP rate the
   NBCR product reaches counting only the kept multiply-adds, (2 nnz_l N / t_nbcr) / (2 M K N / t_dense); it is
   density x speedup, and 100% would mean the sparse kernel computes as efficiently as the dense GEMM.
2. Block-shape sweep, 4096x4096 at density 0.13 (level 0): speed (N = 1 and 64) against the weight-error proxy
   kept_bcr = share of ||W||^2 that level 0 keeps, next to kept_mag for unstructured magnitude tags at the
   same density (the most any mask of that density can keep). sub-block: mean r0 x c0 kept per stored block.
   On an i.i.d. Gaussian weight blocks find no row/column structure to exploit, so read kept_* relative to each
   other across block shapes, not as the accuracy of a trained network.
3. ResNet-50 convolutions (the layer list of bench/conv.py), densities (0.10, 0.05), batch 1, 224x224 input;
   each time is the fastest over bench/conv.py's separately allocated input copies, and the total weights each
   layer by how often the network uses it.
4. Targets, from the numbers above.

    python bench/nbcr.py [--quick] [--csv PATH] [--min-run-time S] [--block-shape BMxBK] [--patience S]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import nestsparse as ns
from nestsparse.formats import DEFAULT_BLOCK_SHAPE, NestedBCR, NestedCSR
from nestsparse.pruning import bcr_tags, magnitude_tags

from common import check_close, environment, load_warning, markdown_table, run_quietly, time_ms, verdict, write_csv
from conv import INPUT_COPIES, resnet50_convs

DENSITIES = (0.13, 0.05)
CONV_DENSITIES = (0.10, 0.05)  # 90% sparse at level 0
BATCHES = (1, 16, 64, 256)
SWEEP = ((8, 8), (16, 16), (32, 32), (16, 64), (64, 64), (32, 64))
SWEEP_QUICK = ((16, 16), (32, 32))
QUICK_CONVS = {(128, 128, 3, 2, 56), (256, 256, 3, 1, 14), (1024, 256, 1, 1, 14)}  # bench/conv.py's quick subset
# (description, minimum speedup of NBCR level 0 over dense)
TARGETS = {"linear N=64": 3.0, "linear N=256": 3.0, "linear N=1": 5.0, "conv total": 3.0}

LINEAR_COLUMNS = [
    "shape",
    "N",
    "dense_ms",
    "nbcr_L0_ms",
    "nbcr_L1_ms",
    "ncsr_L0_ms",
    "ncsr_L1_ms",
    "x_dense_L0",
    "x_dense_L1",
    "x_ncsr_L0",
    "x_ncsr_L1",
    "rate_L0",
    "rate_L1",
    "other_cpu",
]
SWEEP_COLUMNS = [
    "block",
    "density",
    "sub-block",
    "N1_dense_ms",
    "N1_nbcr_ms",
    "N1_x_dense",
    "N64_dense_ms",
    "N64_nbcr_ms",
    "N64_x_dense",
    "kept_bcr",
    "kept_mag",
    "kept_bcr/mag",
    "other_cpu",
]
CONV_COLUMNS = [
    "stage",
    "layer",
    "conv",
    "input",
    "count",
    "dense_ms",
    "nbcr_L0_ms",
    "nbcr_L1_ms",
    "ncsr_L0_ms",
    "ncsr_L1_ms",
    "x_dense_L0",
    "x_dense_L1",
    "x_ncsr_L0",
    "x_ncsr_L1",
    "other_cpu",
]


def block_shape_arg(s: str) -> tuple[int, int]:
    try:
        bm, bk = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"block shape must look like 32x32, got {s!r}") from None
    return bm, bk


def build(w: torch.Tensor, densities, block_shape) -> tuple[NestedBCR, NestedCSR, torch.Tensor]:
    """The NBCR buffer, the NCSR buffer of the same tags, and the NBCR plan."""
    tags = bcr_tags(w, densities, block_shape)
    nb = NestedBCR.from_dense(w, tags, block_shape, len(densities), densities)
    nc = NestedCSR.from_dense(w, tags, len(densities), densities)
    return nb, nc, ns.ops.nbcr_plan(nb.block_ptr, nb.counts, block_shape[0])


def linear_fns(x, nb, nc, plan, nc_plan):
    """level -> (NBCR call, NCSR call)."""
    m = nb.shape[0]
    return {
        lvl: (
            lambda lvl=lvl: ns.ops.nbcr_linear(
                x, nb.values, nb.indices, nb.block_ptr, nb.blocks, nb.counts, lvl, m, nb.block_shape, None, "none", plan
            ),
            lambda lvl=lvl: ns.ops.ncsr_linear(
                x, nc.values, nc.col_idx, nc.row_ptr, nc.row_end, lvl, None, "none", nc_plan
            ),
        )
        for lvl in range(nb.num_levels)
    }


def check_linear(x, nb, fns, what):
    for lvl, (f_nbcr, f_ncsr) in fns.items():
        ref = x @ nb.to_dense(lvl).T
        check_close(f_nbcr(), ref, f"nbcr_linear {what} level {lvl}")
        check_close(f_ncsr(), ref, f"ncsr_linear {what} level {lvl} (same tags)")


def linear_case(w, nb, nc, plan, nc_plan, n, min_run_time) -> dict:
    m, k = nb.shape
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    fns = linear_fns(x, nb, nc, plan, nc_plan)
    check_linear(x, nb, fns, f"{m}x{k} N={n}")
    row = dict(shape=f"{m}x{k}", N=n, dense_ms=time_ms(lambda: x @ w.T, min_run_time))
    for lvl, (f_nbcr, f_ncsr) in fns.items():
        row[f"nbcr_L{lvl}_ms"] = t = time_ms(f_nbcr, min_run_time)
        row[f"ncsr_L{lvl}_ms"] = time_ms(f_ncsr, min_run_time)
        row[f"x_dense_L{lvl}"] = row["dense_ms"] / t
        row[f"x_ncsr_L{lvl}"] = row[f"ncsr_L{lvl}_ms"] / t
        row[f"rate_L{lvl}"] = 100 * (nb.flops(lvl, n) / t) / (2 * m * k * n / row["dense_ms"])
    return row


def sweep_row(w, bs, kept_mag, min_run_time) -> dict:
    tags = bcr_tags(w, DENSITIES[:1], bs)
    nb = NestedBCR.from_dense(w, tags, bs, 1)
    plan = ns.ops.nbcr_plan(nb.block_ptr, nb.counts, bs[0])
    w2 = w.double() ** 2
    kept = float(w2[tags >= 0].sum() / w2.sum())
    r, c = nb.counts[0].double().mean(0).tolist()
    row = dict(
        block=f"{bs[0]}x{bs[1]}",
        density=round(nb.density(0), 4),
        **{"sub-block": f"{r:.1f}x{c:.1f}"},
        kept_bcr=kept,
        kept_mag=kept_mag,
        **{"kept_bcr/mag": kept / kept_mag},
    )
    for n in (1, 64):
        x = torch.randn(n, w.shape[1], generator=torch.Generator().manual_seed(n))

        def f(x=x):
            return ns.ops.nbcr_linear(
                x, nb.values, nb.indices, nb.block_ptr, nb.blocks, nb.counts, 0, w.shape[0], bs, None, "none", plan
            )

        check_close(f(), x @ nb.to_dense(0).T, f"nbcr_linear block {bs} N={n}")
        row[f"N{n}_dense_ms"] = time_ms(lambda: x @ w.T, min_run_time)
        row[f"N{n}_nbcr_ms"] = time_ms(f, min_run_time)
        row[f"N{n}_x_dense"] = row[f"N{n}_dense_ms"] / row[f"N{n}_nbcr_ms"]
    return row


def conv_row(c: dict, block_shape, min_run_time) -> dict:
    k, s, pad = c["k"], c["stride"], c["k"] // 2
    w = torch.randn(
        c["cout"], c["cin"], k, k, generator=torch.Generator().manual_seed(c["cin"] * 7 + c["cout"] + k + s)
    )
    nb, nc, plan = build(w, CONV_DENSITIES, block_shape)
    nc_plan = ns.ops.ncsr_plan(nc.row_ptr, nc.row_end)
    x = torch.randn(1, c["cin"], c["hw"], c["hw"], generator=torch.Generator().manual_seed(c["hw"]))
    copies = [x.clone() for _ in range(INPUT_COPIES)]  # see bench/conv.py: dense conv time hangs on allocator luck
    row = dict(c, conv=f"{c['cin']}->{c['cout']} {k}x{k} /{s}", input=f"{c['hw']}x{c['hw']}")

    def nbcr(x, lvl):
        return ns.ops.nbcr_conv2d(
            x,
            nb.values,
            nb.indices,
            nb.block_ptr,
            nb.blocks,
            nb.counts,
            lvl,
            c["cout"],
            block_shape,
            (k, k),
            None,
            (s, s),
            (pad, pad),
            (1, 1),
            1,
            "none",
            plan,
        )

    def ncsr(x, lvl):
        return ns.ops.ncsr_conv2d(
            x,
            nc.values,
            nc.col_idx,
            nc.row_ptr,
            nc.row_end,
            lvl,
            (k, k),
            None,
            (s, s),
            (pad, pad),
            (1, 1),
            1,
            "none",
            nc_plan,
        )

    def best_ms(fn):
        return min(time_ms(lambda: fn(xc), min_run_time / 2) for xc in copies)

    for lvl in range(nb.num_levels):
        ref = F.conv2d(x, nb.to_dense(lvl), None, s, pad)
        check_close(nbcr(x, lvl), ref, f"nbcr_conv2d {row['conv']} at {row['input']} level {lvl}")
        check_close(ncsr(x, lvl), ref, f"ncsr_conv2d {row['conv']} at {row['input']} level {lvl} (same tags)")
    row["dense_ms"] = best_ms(lambda xc: F.conv2d(xc, w, None, s, pad))
    for lvl in range(nb.num_levels):
        row[f"nbcr_L{lvl}_ms"] = best_ms(lambda xc: nbcr(xc, lvl))
        row[f"ncsr_L{lvl}_ms"] = best_ms(lambda xc: ncsr(xc, lvl))
    return row


def conv_ratios(row: dict) -> dict:
    for lvl in range(len(CONV_DENSITIES)):
        row[f"x_dense_L{lvl}"] = row["dense_ms"] / row[f"nbcr_L{lvl}_ms"]
        row[f"x_ncsr_L{lvl}"] = row[f"ncsr_L{lvl}_ms"] / row[f"nbcr_L{lvl}_ms"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="4096x4096 only, 2 block shapes, 3 convs (CI smoke run, < 90 s)"
    )
    p.add_argument("--csv", metavar="PATH", help="also write the rows of all tables as CSV (column 'table' says which)")
    p.add_argument("--min-run-time", type=float, help="seconds per blocked_autorange (default 0.05 quick, 0.5 full)")
    p.add_argument(
        "--block-shape",
        type=block_shape_arg,
        default=DEFAULT_BLOCK_SHAPE,
        metavar="BMxBK",
        help=f"block shape of tables 1 and 3 (default {DEFAULT_BLOCK_SHAPE[0]}x{DEFAULT_BLOCK_SHAPE[1]}, "
        "the library's)",
    )
    p.add_argument(
        "--patience",
        type=float,
        help="seconds to wait for quiet CPUs before redoing a contended row "
        "(default 0 quick: never redo; 120 full). 0 keeps every row and only reports other_cpu",
    )
    args = p.parse_args()
    start, env = time.perf_counter(), environment()  # before any rebuild of csrc/ can change the answer
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.5)
    # CI must finish quickly; full runs wait out other jobs (on a machine that is never quiet, pass --patience 0)
    patience = args.patience if args.patience is not None else 0.0 if args.quick else 120.0
    bs = args.block_shape
    shapes = [(4096, 4096)] if args.quick else [(1024, 1024), (4096, 4096), (4096, 1024)]
    batches = (1, 64, 256) if args.quick else BATCHES
    shares = []

    def measured(fn):
        out, share = run_quietly(fn, patience)
        shares.append(share)
        return dict(out, other_cpu=round(100 * share))

    linear = []
    with tqdm(total=len(shapes) * len(batches), desc="nbcr linear", file=sys.stderr) as bar:
        for m, k in shapes:
            w = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
            nb, nc, plan = build(w, DENSITIES, bs)
            nc_plan = ns.ops.ncsr_plan(nc.row_ptr, nc.row_end)
            for n in batches:
                bar.set_postfix_str(f"{m}x{k} N={n}")
                linear.append(measured(lambda: linear_case(w, nb, nc, plan, nc_plan, n, min_run_time)))
                bar.update()

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(8192))
    w2 = w.double() ** 2
    kept_mag = float(w2[magnitude_tags(w, DENSITIES[:1]) >= 0].sum() / w2.sum())
    sweep = [
        measured(lambda: sweep_row(w, b, kept_mag, min_run_time))
        for b in tqdm(SWEEP_QUICK if args.quick else SWEEP, desc="block shapes", file=sys.stderr)
    ]
    for r in sweep:
        r["block"] += " (default)" if r["block"] == f"{DEFAULT_BLOCK_SHAPE[0]}x{DEFAULT_BLOCK_SHAPE[1]}" else ""

    convs = resnet50_convs()
    if args.quick:
        convs = [c for c in convs if (c["cin"], c["cout"], c["k"], c["stride"], c["hw"]) in QUICK_CONVS]
    conv = [
        conv_ratios(measured(lambda: conv_row(c, bs, min_run_time)))
        for c in tqdm(convs, desc="nbcr conv", file=sys.stderr)
    ]
    cols = ("dense_ms", "nbcr_L0_ms", "nbcr_L1_ms", "ncsr_L0_ms", "ncsr_L1_ms")
    total = conv_ratios(
        dict(
            stage="all",
            layer="network total (ms x count)" if not args.quick else "QUICK SUBSET total (ms x count)",
            count=sum(r["count"] for r in conv),
            **{c: sum(r[c] * r["count"] for r in conv) for c in cols},
        )
    )
    conv.append(total)

    print(f"# nestsparse NBCR benchmark ({'quick' if args.quick else 'full'})\n")
    print(env)
    print(load_warning(shares) + (f" Patience {patience:g} s: contended rows were {'redone' if patience else 'kept'}."))
    print(
        f"fp32; timings are blocked_autorange medians (min_run_time {min_run_time} s) after warm-up. "
        f"Block shape {bs[0]}x{bs[1]} in tables 1 and 3 (library default {DEFAULT_BLOCK_SHAPE[0]}x"
        f"{DEFAULT_BLOCK_SHAPE[1]}).\n"
    )
    print("- dense: `x @ W.T` (linear) or `F.conv2d(x, W, None, stride, padding)` with the full dense W.")
    print(
        "- nbcr: `nbcr_linear` / `nbcr_conv2d` on ONE nested BCR buffer from `bcr_tags`, plan from `nbcr_plan` "
        "built once; ncsr: `ncsr_linear` / `ncsr_conv2d` on a nested CSR of the SAME tags, plan built once."
    )
    print(
        "- x_dense_L*: dense ms / nbcr ms; x_ncsr_L*: ncsr ms / nbcr ms; rate_L*: % of the dense GEMM's FLOP "
        "rate, (2 nnz N / t_nbcr) / (2 M K N / t_dense).\n"
    )
    print(f"## 1. Linear, densities {DENSITIES} (levels 0 and 1 of one buffer)\n")
    print(markdown_table(linear, LINEAR_COLUMNS))
    print(
        f"\n## 2. Block shapes: 4096x4096, density {DENSITIES[0]} (level 0){' (QUICK: 2 shapes only)' * args.quick}\n"
    )
    print(
        "Speed vs weight kept: N*_x_dense = dense ms / nbcr ms; kept_bcr = share of ||W||^2 kept by bcr_tags at "
        "that block shape, kept_mag = by unstructured magnitude tags at the same density (the upper bound); "
        "sub-block = mean rows x columns kept per stored block. Random Gaussian W: compare kept_* across rows.\n"
    )
    print(markdown_table(sweep, SWEEP_COLUMNS))
    print(
        f"\n## 3. ResNet-50 convolutions, densities {CONV_DENSITIES}, batch 1, 224x224"
        f"{' (QUICK SUBSET: 3 layers, not the network)' * args.quick}\n"
    )
    print(
        f"Each time is the fastest over {INPUT_COPIES} separately allocated input copies. count: occurrences in "
        "ResNet-50 v1.5; the last row sums ms x count.\n"
    )
    print(markdown_table(conv, CONV_COLUMNS))

    print(f"\n## 4. Targets (NBCR level 0, block shape {bs[0]}x{bs[1]})\n")
    checks = []
    for n in (64, 256, 1):
        for r in linear:
            if r["shape"] == "4096x4096" and r["N"] == n:
                checks.append(
                    (f"linear 4096x4096, N={n}, density {DENSITIES[0]}", r["x_dense_L0"], TARGETS[f"linear N={n}"])
                )
    checks.append(
        (
            f"ResNet-50 convs, 90% sparse, batch 1, summed{' (QUICK SUBSET)' * args.quick}",
            total["x_dense_L0"],
            TARGETS["conv total"],
        )
    )
    for what, x, goal in checks:
        print(f"- {what}: {x:.2f}x vs dense; target >= {goal}x: {verdict(x >= goal)}")
    print(
        f"\n{sum(x >= goal for _, x, goal in checks)} of {len(checks)} targets met. "
        f"Run time {time.perf_counter() - start:.0f} s."
    )
    if args.csv:
        rows = (
            [dict(r, table="linear") for r in linear]
            + [dict(r, table="block_sweep") for r in sweep]
            + [dict(r, table="conv") for r in conv]
        )
        columns = ["table"] + list(dict.fromkeys(LINEAR_COLUMNS + SWEEP_COLUMNS + CONV_COLUMNS))
        write_csv(args.csv, rows, columns)


if __name__ == "__main__":
    main()
