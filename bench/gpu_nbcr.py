"""CUDA nested BCR (tensor cores) against cuBLAS dense and CUDA nested CSR on the same tags, side by side in one run.

Layers (float16 and bfloat16, block row/column tags of 32x32 blocks from nestsparse.bcr_tags at densities 0.13 at
level 0 and 0.05 at level 1 of ONE nested buffer, batch 256-4096): nbcr_linear against cuBLAS dense (x @ W.T) and
ncsr_linear on the same element tags. The shapes are 4096x4096 and the ResNet-50 1x1 convolutions as GEMMs
(Cout x Cin; the batch is images x pixels). Each row also prints the rate on the FLOPs the level needs (2 x batch x
the level's non-zeros) as a share of the tensor-core rate cuBLAS measures on an 8192^3 GEMM in the same dtype.

Model: ResNet-50 (random weights, calibrated BatchNorm) converted with NBCR at levels (0.3, 0.13), the 13% level
through nestsparse.fuse, float16, batch 64 and 256, against the dense model: the fastest of cuDNN NCHW, cuDNN
channels-last and torch.compile. The model is not rotated over copies: its weights (about 50 MB in float16) are near
the size of L2, and at these batches the activations (hundreds of MB per call) pass through it between layers.

Timing as bench/gpu.py: CUDA events around a CUDA graph of many calls, median of --repeats replays, every variant
rotating over enough copies of its weights to exceed twice the L2 cache, every output checked against float64
first.

    python bench/gpu_nbcr.py [--quick] [--csv PATH] [--no-resnet] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import nestsparse as ns

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import calibrated_resnet50, copies_for, dense_model_times, graph_time_ms, l2_bytes  # noqa: E402

from common import markdown_table, write_csv  # noqa: E402

DENSITIES = (0.13, 0.05)
BLOCK = (32, 32)
BATCHES = (256, 1024, 4096)
# (name, M = Cout, K = Cin): 4096x4096 and ResNet-50's distinct 1x1 convolutions.
SHAPES = [
    ("square", 4096, 4096),
    ("r50 1x1 64->256", 256, 64),
    ("r50 1x1 256->64", 64, 256),
    ("r50 1x1 256->128", 128, 256),
    ("r50 1x1 128->512", 512, 128),
    ("r50 1x1 512->256", 256, 512),
    ("r50 1x1 256->1024", 1024, 256),
    ("r50 1x1 1024->512", 512, 1024),
    ("r50 1x1 512->2048", 2048, 512),
    ("r50 1x1 2048->512", 512, 2048),
]


def tensor_core_tflops(dtype: torch.dtype) -> float:
    """The rate cuBLAS reaches on an 8192^3 GEMM: the measured tensor-core rate."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = graph_time_ms([lambda: a @ b], 10, 5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (out.double() - ref).abs().max().item() / (ref.abs().max().item() + 1)
    if err > tol:
        raise SystemExit(f"{name}: differs from float64 by {err:.3g}")


def layer_rows(name: str, M: int, K: int, dtype: torch.dtype, batches, args, peak: float) -> list[dict]:
    g = torch.Generator().manual_seed(M * 7 + K)
    w = torch.randn(M, K, generator=g) / K**0.5
    tags = ns.bcr_tags(w, DENSITIES, BLOCK)
    nb = ns.NestedBCR.from_dense(w, tags, BLOCK, num_levels=2).to("cuda", dtype)
    nc = ns.NestedCSR.from_dense(w, tags, num_levels=2).to("cuda", dtype)
    dense = w.to("cuda", dtype)
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    rows = []
    for n in batches:
        x = torch.randn(n, K, device="cuda", dtype=dtype)
        dn = [dense.clone() for _ in range(copies_for(dense.numel() * dense.element_size()))]
        t_dense = graph_time_ms([lambda d=d: x @ d.T for d in dn], args.repeats, args.per_graph)
        for lvl in range(2):
            ref = x.double() @ nb.to_dense(lvl).double().T
            nnz = nb.nnz(lvl)
            variants = {}
            for label, fmt in (("NBCR", nb), ("NCSR", nc)):
                check(f"{name} {label} batch {n} level {lvl}", fmt.linear(x, lvl, None, "none", fmt.plan()), ref, tol)
                ws = [dataclasses.replace(fmt, values=fmt.values.clone()) for _ in range(copies_for(fmt.nbytes(lvl)))]
                plans = [v.plan() for v in ws]
                variants[label] = graph_time_ms(
                    [lambda v=v, p=p: v.linear(x, lvl, None, "none", p) for v, p in zip(ws, plans)],
                    args.repeats,
                    args.per_graph,
                )
            ns.check_errors()
            t_b, t_c = variants["NBCR"], variants["NCSR"]
            rows.append(
                {
                    "layer": name,
                    "M x K": f"{M}x{K}",
                    "dtype": str(dtype).replace("torch.", ""),
                    "batch": n,
                    "level": lvl,
                    "density": round(nnz / (M * K), 4),
                    "cuBLAS ms": round(t_dense, 4),
                    "NCSR ms": round(t_c, 4),
                    "NBCR ms": round(t_b, 4),
                    "x cuBLAS": round(t_dense / t_b, 2),
                    "x NCSR": round(t_c / t_b, 2),
                    "% TC rate": round(100 * 2 * n * nnz / (t_b * 1e-3) / 1e12 / peak, 1),
                }
            )
    return rows


def resnet(args) -> list[dict]:
    model, dense_layers = calibrated_resnet50()
    levels = (0.3, 0.13)
    tags = ns.model_tags(model, levels, skip=dense_layers, structure="bcr", block_shape=BLOCK)
    converted = ns.convert(model, tags, densities=levels, format="nbcr", block_shape=BLOCK).eval()
    sparse = ns.fuse(copy.deepcopy(converted)).eval().half().cuda()
    ns.set_level(sparse, 1)
    dense = copy.deepcopy(model).half().cuda()
    ref = ns.to_dense(converted, 1).eval().half().cuda()
    rows = []
    for n in (64,) if args.quick else (64, 256):
        x = torch.randn(n, 3, 224, 224, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            check(f"resnet50 nbcr batch {n}", sparse(x).float(), ref(x).double(), 5e-2)
            t = dense_model_times(dense, x, args)
            best = min(t.values())
            t["NBCR 13%"] = graph_time_ms([lambda: sparse(x)], args.repeats, 2)
        ns.check_errors()
        rows.append(
            {
                "model": "resnet50",
                "batch": n,
                **{k: round(v, 3) for k, v in t.items()},
                "x best dense": round(best / t["NBCR 13%"], 2),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and batches, fewer repeats")
    ap.add_argument("--csv", help="also write the layer rows here")
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the dense baselines")
    args = ap.parse_args()
    args.repeats = 10 if args.quick else 30
    args.per_graph = 10 if args.quick else 30
    if not torch.cuda.is_available() or not torch.ops.nestsparse.with_cuda():
        raise SystemExit("bench/gpu_nbcr.py needs a GPU and a CUDA build of nestsparse")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, nestsparse {ns.__version__}")
    ns.set_deferred_checks(True)  # graphs: no host synchronisation inside the ops; checked after each variant
    print(f"L2 {l2_bytes() >> 20} MiB")
    shapes = SHAPES[:3] if args.quick else SHAPES
    batches = (256, 4096) if args.quick else BATCHES
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        peak = tensor_core_tflops(dtype)
        print(f"cuBLAS 8192^3 {str(dtype).replace('torch.', '')}: {peak:.0f} TFLOP/s (the tensor-core rate)")
        for name, M, K in tqdm(shapes, desc=f"layers {dtype}", file=sys.stderr):
            rows += layer_rows(name, M, K, dtype, batches, args, peak)
    cols = list(rows[0])
    print("\n## Layers (targets at density 0.13: >= 1.5x cuBLAS; faster than NCSR at batch >= 256)\n")
    print(markdown_table(rows, cols))
    write_csv(args.csv, rows, cols)
    lvl0 = [r for r in rows if r["level"] == 0]
    print(
        f"\nlevel 0 (density 0.13): >= 1.5x cuBLAS in {sum(r['x cuBLAS'] >= 1.5 for r in lvl0)}/{len(lvl0)}, faster "
        f"than NCSR in {sum(r['x NCSR'] > 1 for r in lvl0)}/{len(lvl0)}"
    )
    if not args.no_resnet:
        rrows = resnet(args)
        print("\n## ResNet-50 end to end, NBCR, float16, ms (target: the 13% level faster than the best dense)\n")
        print(markdown_table(rrows, list(rrows[0])))


if __name__ == "__main__":
    main()
