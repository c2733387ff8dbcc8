"""Sparse x dense products: nestsparse ncsr_linear against torch dense and torch.sparse CSR, same shapes, one run.

Every weight is ONE nested buffer with two levels; level 0 and level 1 are timed from that same buffer.
Square matrices use random magnitude tags at densities (0.13, 0.05). DLMC matrices (ResNet-50 and Transformer,
magnitude pruning 0.9) use the real pattern as level 0 and nest a level 1 keeping its largest 40%; without the
DLMC folder, random patterns of the same shapes and densities stand in for them.

    python bench/spmm.py [--quick] [--csv PATH] [--dlmc DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import nestsparse as ns

from common import (
    DEFAULT_DLMC,
    check_close,
    environment,
    geomean,
    load_warning,
    markdown_table,
    nested_from_pattern,
    nested_random,
    pattern_mask,
    read_bandwidth_gbs,
    read_smtx,
    run_quietly,
    time_ms,
    verdict,
    write_csv,
)

DENSITIES = (0.13, 0.05)
BATCHES = (1, 16, 64, 256)
DLMC_KEEP = 0.4  # level 1 keeps this share of the DLMC pattern: 0.10 -> 0.04, near the (0.13, 0.05) pair
DLMC_DENSITY = 0.1  # of the magnitude_pruning/0.9 patterns, used for the random stand-ins

# One matrix per distinct ResNet-50 shape, and the three Transformer shapes from two layers (72 of its 96
# matrices are 512x512). Shapes are listed so that the stand-ins work without the folder.
_RN, _TF = "rn50/magnitude_pruning/0.9/", "transformer/magnitude_pruning/0.9/"
DLMC_FULL = [
    (_RN + "bottleneck_1_block_group_projection_block_group1", 64, 64),
    (_RN + "initial_conv", 64, 147),
    (_RN + "bottleneck_1_block_group1_1_1", 64, 256),
    (_RN + "bottleneck_2_block_group1_1_1", 64, 576),
    (_RN + "bottleneck_1_block_group_projection_block_group2", 128, 256),
    (_RN + "bottleneck_1_block_group2_1_1", 128, 512),
    (_RN + "bottleneck_2_block_group2_1_1", 128, 1152),
    (_RN + "bottleneck_3_block_group1_1_1", 256, 64),
    (_RN + "bottleneck_1_block_group_projection_block_group3", 256, 512),
    (_RN + "bottleneck_1_block_group3_1_1", 256, 1024),
    (_RN + "bottleneck_2_block_group3_1_1", 256, 2304),
    (_RN + "bottleneck_3_block_group2_1_1", 512, 128),
    (_RN + "bottleneck_projection_block_group_projection_block_group2", 512, 256),
    (_RN + "bottleneck_1_block_group_projection_block_group4", 512, 1024),
    (_RN + "bottleneck_1_block_group4_1_1", 512, 2048),
    (_RN + "bottleneck_2_block_group4_1_1", 512, 4608),
    (_RN + "final_dense", 1000, 2048),
    (_RN + "bottleneck_3_block_group3_1_1", 1024, 256),
    (_RN + "bottleneck_projection_block_group_projection_block_group3", 1024, 512),
    (_RN + "bottleneck_3_block_group4_1_1", 2048, 512),
    (_RN + "bottleneck_projection_block_group_projection_block_group4", 2048, 1024),
    (_TF + "body_encoder_layer_0_self_attention_multihead_attention_q_fully_connected", 512, 512),
    (_TF + "body_encoder_layer_0_self_attention_multihead_attention_output_transform_fully_connected", 512, 512),
    (_TF + "body_encoder_layer_0_ffn_conv1_fully_connected", 2048, 512),
    (_TF + "body_encoder_layer_0_ffn_conv2_fully_connected", 512, 2048),
    (_TF + "body_decoder_layer_5_encdec_attention_multihead_attention_k_fully_connected", 512, 512),
    (_TF + "body_decoder_layer_5_ffn_conv1_fully_connected", 2048, 512),
]
DLMC_QUICK = [DLMC_FULL[i] for i in (10, 19, 21, 23)]

# (M=K, level, N) -> [(baseline, minimum speedup)]: the project's targets, checked on the 4096 square.
TARGETS = {
    (4096, 0, 1): [("dense", 4.5), ("csr", 5.0)],
    (4096, 1, 1): [("dense", 9.0)],
    (4096, 0, 64): [("dense", 3.5)],
    (4096, 0, 256): [("dense", 2.0)],
}

COLUMNS = [
    "matrix",
    "shape",
    "level",
    "density",
    "N",
    "dense_ms",
    "torch_csr_ms",
    "nestsparse_ms",
    "x_vs_dense",
    "x_vs_csr",
    "roofline",
    "other_cpu",
    "target",
]


def square_weights(sizes):
    for s in sizes:
        yield f"random {s}x{s}", "square", lambda s=s: nested_random((s, s), DENSITIES, seed=s)


def dlmc_weights(entries, root: Path | None):
    for i, (name, m, k) in enumerate(entries):
        group = name.split("/")[0]
        short = name.split("/")[-1]
        for noise in ("body_", "_multihead_attention", "_fully_connected"):  # keeps the table readable
            short = short.replace(noise, "")
        if root is None:

            def build(m=m, k=k, i=i):
                return nested_random((m, k), (DLMC_DENSITY, DLMC_KEEP * DLMC_DENSITY), seed=i)

            yield f"{group}/{short} (random pattern)", group, build
        else:

            def build(name=name, m=m, k=k, i=i):
                rows, cols, rp, ci = read_smtx(root / f"{name}.smtx")
                if (rows, cols) != (m, k):
                    raise SystemExit(f"{name}.smtx is {rows}x{cols}, expected {m}x{k}")
                return nested_from_pattern(pattern_mask(rows, cols, rp, ci), DLMC_KEEP, seed=i)

            yield f"{group}/{short}", group, build


def target_text(m: int, k: int, level: int, n: int, vs: dict) -> tuple[str, list]:
    """The target cell of a row and the (text, ok) verdicts it holds."""
    if m != k:
        return "", []
    checks = [(f">= {x}x vs {b}: {verdict(vs[b] >= x)}", vs[b] >= x) for b, x in TARGETS.get((m, level, n), [])]
    return "; ".join(c[0] for c in checks), checks


def run_case(label, group, w, nested, plan, n, min_run_time):
    """Rows for one weight and batch size: dense once, then torch CSR and nestsparse per level."""
    m, k = nested.shape
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    dense_ms = time_ms(lambda: x @ w.T, min_run_time)
    rows = []
    for level in range(nested.num_levels):
        w_l = nested.to_dense(level)
        w_csr = w_l.to_sparse_csr()
        args = (nested.values, nested.col_idx, nested.row_ptr, nested.row_end, level, None, "none", plan)
        ref = x @ w_l.T
        what = f"{label} level {level} N={n}"
        check_close(ns.ops.ncsr_linear(x, *args), ref, f"nestsparse {what}")
        check_close(torch.sparse.mm(w_csr, x.T).T, ref, f"torch CSR {what}")
        csr_ms = time_ms(lambda: torch.sparse.mm(w_csr, x.T), min_run_time)
        ns_ms = time_ms(lambda: ns.ops.ncsr_linear(x, *args), min_run_time)
        vs = {"dense": dense_ms / ns_ms, "csr": csr_ms / ns_ms}
        target, checks = target_text(m, k, level, n, vs)
        rows.append(
            dict(
                matrix=label,
                group=group,
                shape=f"{m}x{k}",
                level=level,
                density=round(nested.density(level), 4),
                N=n,
                dense_ms=dense_ms,
                torch_csr_ms=csr_ms,
                nestsparse_ms=ns_ms,
                x_vs_dense=vs["dense"],
                x_vs_csr=vs["csr"],
                weight_bytes=nested.nbytes(level),
                target=target,
                checks=checks,
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few shapes, short timings (CI smoke run, < 60 s)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument(
        "--dlmc",
        metavar="DIR",
        type=Path,
        default=DEFAULT_DLMC,
        help=f"DLMC folder (default {DEFAULT_DLMC}; random stand-in patterns if it is absent)",
    )
    p.add_argument("--min-run-time", type=float, help="seconds per blocked_autorange (default 0.05 quick, 0.5 full)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # once per weight, noise
    start, env = time.perf_counter(), environment()  # before any rebuild of csrc/ can change the answer
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.5)
    patience = 0.0 if args.quick else 120.0  # CI must finish in a minute; full runs wait out other jobs
    batches = (1, 64, 256) if args.quick else BATCHES
    dlmc_root = args.dlmc if args.dlmc.is_dir() else None
    if dlmc_root is None:
        print(f"note: no DLMC folder at {args.dlmc}; using random patterns of the same shapes", file=sys.stderr)

    weights = list(square_weights((4096,) if args.quick else (1024, 4096)))
    weights += list(dlmc_weights(DLMC_QUICK if args.quick else DLMC_FULL, dlmc_root))
    bandwidth, bw_share = run_quietly(read_bandwidth_gbs, patience)
    shares = [bw_share]
    rows = []
    with tqdm(total=len(weights) * len(batches), desc="spmm", file=sys.stderr) as bar:
        for label, group, build in weights:
            w, nested = build()
            plan = ns.ops.ncsr_plan(nested.row_ptr, nested.row_end)  # once per weight, as the modules cache it
            for n in batches:
                bar.set_postfix_str(f"{label} N={n}")
                case, share = run_quietly(lambda: run_case(label, group, w, nested, plan, n, min_run_time), patience)
                rows += [dict(r, other_cpu=round(100 * share)) for r in case]
                shares.append(share)
                bar.update()
    bandwidth_end, share = run_quietly(read_bandwidth_gbs, patience)
    shares.append(share)
    # The roofline is the best bandwidth seen: a slow reading is noise (other VMs), not the memory system.
    peak = max(bandwidth, bandwidth_end)
    for r in rows:  # the bytes the level reads (values, col_idx, row_ptr, its row_end row) at peak bandwidth
        r["roofline"] = r["weight_bytes"] / (peak * 1e9) / (r["nestsparse_ms"] * 1e-3) if r["N"] == 1 else float("nan")

    print(f"# nestsparse spmm benchmark ({'quick' if args.quick else 'full'})\n")
    print(env)
    print(load_warning(shares))
    print(
        f"Read bandwidth (torch.sum over a 512 MiB fp32 tensor): {bandwidth:.1f} GB/s at the start, "
        f"{bandwidth_end:.1f} GB/s at the end; the roofline column uses the higher."
    )
    print(
        f"DLMC: {dlmc_root or 'absent, random stand-in patterns'}. fp32; timings are blocked_autorange medians "
        f"(min_run_time {min_run_time} s) after warm-up.\n"
    )
    print("- dense: `x @ W.T` with x (N, K) and the full dense W (M, K).")
    print(
        "- torch CSR: `torch.sparse.mm(Wcsr, x.T)` with Wcsr = W_level.to_sparse_csr() (fp32, int64 indices); "
        "it returns y.T (M, N), as a user would write it to avoid densifying W."
    )
    print(
        "- nestsparse: `ncsr_linear(x, values, col_idx, row_ptr, row_end, level, None, 'none', plan)` on ONE "
        "nested buffer (int16 col_idx) for both levels, plan built once outside the timed loop."
    )
    print(
        "- x_vs_*: baseline ms / nestsparse ms. roofline (N=1 only): bytes of values + col_idx + row_ptr + "
        "row_end row of the level / read bandwidth / nestsparse time; x and y are not counted, and a weight that "
        "fits in the last-level cache can exceed 1.\n"
    )
    print(markdown_table(rows, COLUMNS))

    print("\n## Geometric means of the speedups\n")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["group"], r["level"], r["N"])].append(r)
    summary = [
        dict(
            set=g,
            level=lvl,
            N=n,
            matrices=len(rs),
            density=round(geomean(r["density"] for r in rs), 4),
            x_vs_dense=geomean(r["x_vs_dense"] for r in rs),
            x_vs_csr=geomean(r["x_vs_csr"] for r in rs),
        )
        for (g, lvl, n), rs in sorted(groups.items())
    ]
    print(markdown_table(summary, ["set", "level", "density", "N", "matrices", "x_vs_dense", "x_vs_csr"]))

    print("\n## Targets (4096x4096)\n")
    for r in rows:
        for text, _ in r["checks"]:
            print(
                f"- N={r['N']}, density {r['density']} (level {r['level']}): {r['x_vs_dense']:.2f}x vs dense, "
                f"{r['x_vs_csr']:.2f}x vs torch CSR; target {text}"
            )
    met = sum(ok for r in rows for _, ok in r["checks"])
    total = sum(len(r["checks"]) for r in rows)
    print(f"\n{met} of {total} targets met. Run time {time.perf_counter() - start:.0f} s.")
    write_csv(args.csv, rows, COLUMNS)


if __name__ == "__main__":
    main()
